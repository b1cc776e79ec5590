"""Compute precision against result quality: the same run in float32 and with the VGG convolutions
in bfloat16 (``config.compute_dtype``), and on accelerators with ``precision=highest`` (true f32)
against ``default`` (TF32 convolutions on NVIDIA GPUs).

Each variant's final image is judged by the same float32 objective, so the numbers compare results,
not each variant's own arithmetic. Prints a table and writes ``precision.json``:

    python experiments/precision.py --size 128 --steps 50 --out runs/precision
    python experiments/precision.py --size 512 --steps 200 --out runs/precision_gpu   # on a GPU

Columns: seconds per step (median of the chunks after the first), the final loss judged in float32,
its ratio to the float32 run's, and the PSNR of the final image against the float32 run's final
image (in dB over 0..255; higher = closer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--content", default="../shared/images/tubingen.jpg")
    ap.add_argument("--style", default="../shared/images/starry_night.jpg")
    ap.add_argument("--out", default="runs/precision")
    args = ap.parse_args(argv)

    import jax

    from nstjax import config as config_lib
    from nstjax.batch import optimise_problem
    from nstjax.optimize import evaluate
    from nstjax.problem import load_problem
    from nstjax.weights import load_vgg19_with_info

    params, info = load_vgg19_with_info()
    c = config_lib.get_config()
    c.content, c.style, c.size, c.steps, c.progress = (args.content, args.style, args.size,
                                                       args.steps, False)
    c.log_every = 1
    base = config_lib.validate(c)
    problem = load_problem(base, params, info)
    variants = [("float32", "default"), ("bfloat16", "default")]
    if jax.default_backend() != "cpu":
        variants.insert(0, ("float32", "highest"))
    rows, reference = [], None
    for dtype, precision in variants:
        obj = dataclasses.replace(base.objective, compute_dtype=dtype,
                                  precision=None if precision == "default" else "highest")
        prob = dataclasses.replace(problem, spec=dataclasses.replace(base, objective=obj),
                                   objective=obj)
        times = []
        t = [time.time()]

        def on_log(rec, t=t, times=times):
            now = time.time()
            if rec.get("steps_per_s"):
                times.append(1.0 / rec["steps_per_s"])
            t[0] = now

        image = optimise_problem(prob, on_log=on_log).image
        judge = dataclasses.replace(base.objective, precision="highest")
        judged = float(evaluate(params, problem.targets, problem.weights, image, obj=judge)["loss"])
        if reference is None:
            reference = (image, judged)
        mse = float(np.mean((image - reference[0]) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        rows.append({"compute_dtype": dtype, "precision": precision,
                     "s_per_step": float(np.median(times[1:] or times)), "loss_f32": judged,
                     "loss_ratio": judged / reference[1], "psnr_vs_first_db": psnr})
        print(f"{dtype:9s} {precision:8s} {rows[-1]['s_per_step']:.3f} s/step  loss {judged:.5g} "
              f"(x{rows[-1]['loss_ratio']:.4f})  PSNR {psnr:.1f} dB", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"size": args.size, "steps": args.steps, "backend": jax.default_backend(),
              "device": str(jax.devices()[0]), "rows": rows}
    (out / "precision.json").write_text(json.dumps(record, indent=1))
    print(f"wrote {out / 'precision.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
