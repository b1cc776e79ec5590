"""Per-device memory of one image's compiled step split over 1, 2 and 4 devices (spatial
partitioning, ``devices_per_image``), against nstjax.memory's model: the measurement behind
docs/performance.md's "One image across several devices".

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python experiments/spatial_memory.py
        [--size 1024]

For each split, the default config's 10-step chunk is lowered and compiled (not run) for a batch of
one image on a ("sweep", "rows") mesh of 1 x N devices, and ``compiled.memory_analysis()`` gives
what each device holds: its arguments (params, targets, the image and optimiser state), outputs and
temporaries (aliased donated buffers counted once). The model's prediction for a device is what the
planner uses (``nstjax.memory.per_device`` of the run's estimate, less the fixed runtime base that
``memory_analysis`` does not see): the optimisation's share, ``point_bytes`` over N.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    args = ap.parse_args()
    import jax

    from nstjax import aot, memory
    from nstjax.batch import stage_inputs
    from nstjax.config import base_config, chunk_length, validate
    from nstjax.optimize import unaliased
    from nstjax.problem import load_problem
    from nstjax.programs import Devices, Programs, _jitted

    cfg = base_config()
    cfg.size = args.size
    spec = validate(cfg)
    problem = load_problem(spec)
    h, w = problem.content.shape[:2]
    n = chunk_length(spec)
    rows_out = []
    for rows in (1, 2, 4):
        if rows > jax.device_count():
            break
        programs = Programs(Devices(jax.devices()[:rows], rows))
        x = stage_inputs(programs, programs.devices.replicate(problem.params), [problem], 1)
        states = unaliased(x.states)
        layout = programs.devices.layout((x.images, states), x.images.shape[1:])
        fn = _jitted(programs.devices.mesh, "steps",
                     (("obj", x.obj), ("spec", x.opt), ("n_steps", n)), layout)
        compiled = fn.lower(x.params, x.targets, x.weights, x.images, states).compile()
        m = compiled.memory_analysis()
        measured = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                    - m.alias_size_in_bytes)
        need = memory.estimate_bytes(h, w, spec.objective.layers, spec.optimizer.name,
                                     memory_size=spec.optimizer.memory_size, chunk_steps=n,
                                     platform="gpu")
        model = memory.per_device(need, rows, "gpu") - memory.base_bytes("gpu")
        rows_out.append({"devices": rows, "per_device_mb": measured / 2**20,
                         "model_mb": model / 2**20, "model_over_measured": model / measured,
                         "arguments_mb": m.argument_size_in_bytes / 2**20,
                         "temporaries_mb": m.temp_size_in_bytes / 2**20})
        print(json.dumps(rows_out[-1]), flush=True)
        del compiled
        aot._COMPILED.clear()


if __name__ == "__main__":
    main()
