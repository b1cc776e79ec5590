"""What the command line adds to its own compiled step, and what the one-engine change cost a single
run: the measurements behind docs/performance.md's "One engine" section.

    python experiments/engine_overhead.py cli       [--size 512] [--steps 60] [--reps 8]
    python experiments/engine_overhead.py commits --old DIR [--size 512] [--steps 40] [--rounds 3]

``cli``, in one process: the compiled one-step chunk of pastiche's objective (configs/
pastiche_objective.py, L-BFGS with a 100-pair history, 512x384) called bare, back to back; then
:func:`nstjax.run.run` of the same config with a metrics line every step (so one-step chunks) and
checkpoints at their default interval (50). The run's steady step is the median gap between its
metrics lines; its mean gap includes the checkpoint. Prints both against the bare step.

``commits``: the command line of this checkout and of ``--old`` (a checkout of another commit, e.g.
``git worktree add /tmp/old HEAD~1``) run alternately, the default config at ``--size``; per-step
seconds (median gap between metrics lines, chunks of 10 logged every 10) and peak RSS (the child's
``ru_maxrss``). Prints the medians over rounds and their ratios (new / old).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _gaps(metrics: Path) -> list[float]:
    """Seconds per step between consecutive metrics lines, leaving out the first gap (a line's
    ``elapsed_s`` is when its image existed, so the gap after step 0 holds the first chunk, which
    compiles)."""
    recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [(r["step"], r["elapsed_s"]) for r in recs if r.get("steps_per_s") is not None]
    return [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(steps[1:])]


def cli(args) -> dict:
    import jax
    import numpy as np

    from experiments.benchmark import load_config
    from nstjax.batch import stage_inputs
    from nstjax.config import validate
    from nstjax.problem import load_problem
    from nstjax.programs import Devices, Programs
    from nstjax.run import run

    inputs = {"content": "builtin:hopper", "style": "builtin:swirls", "overrides": []}
    cfg, _ = load_config([], args.size, inputs, strict=True)
    spec = validate(cfg)
    problem = load_problem(spec)
    programs = Programs(Devices(jax.local_devices()[:1]))
    x = stage_inputs(programs, programs.devices.replicate(problem.params), [problem], 1)
    img, state = x.images, x.states
    bare = []
    for i in range(args.reps + 1):
        t = time.perf_counter()
        img, state, terms, _, _ = programs.steps(x.params, x.targets, x.weights, img, state,
                                                 obj=x.obj, spec=x.opt, n_steps=1)
        np.asarray(terms["loss"])  # what the loop waits for
        if i:  # the first call compiles
            bare.append(time.perf_counter() - t)
    cfg.steps, cfg.log_every, cfg.chunk = args.steps, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        run(cfg, Path(tmp) / "w", params=problem.params, weights_info=problem.weights_info,
            handle_signals=False, log=lambda m: None)
        gaps = _gaps(Path(tmp) / "w" / "metrics.jsonl")
    out = {"size": args.size, "bare_step_s": statistics.median(bare), "bare_all": bare,
           "cli_steady_step_s": statistics.median(gaps), "cli_mean_step_s": statistics.mean(gaps),
           "cli_gaps": gaps}
    out["steady_over_bare"] = out["cli_steady_step_s"] / out["bare_step_s"]
    out["mean_over_bare"] = out["cli_mean_step_s"] / out["bare_step_s"]
    return out


def _one_cli(checkout: Path, size: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, PYTHONPATH=str(checkout), NSTJAX_COMPILE_CACHE="0")
        cmd = [sys.executable, "-m", "nstjax", f"--workdir={tmp}/w", f"--config.size={size}",
               f"--config.steps={steps}", "--config.progress=False", "--config.checkpoint_every=0"]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise SystemExit(f"{checkout}: nstjax failed: {proc.stderr.read().decode()[-2000:]}")
        return {"s_per_step": statistics.median(_gaps(Path(tmp) / "w" / "metrics.jsonl")),
                "peak_rss_mb": usage.ru_maxrss / 1024}


def commits(args) -> dict:
    runs: dict = {"new": [], "old": []}
    for _ in range(args.rounds):
        for name, where in (("old", Path(args.old)), ("new", ROOT)):
            runs[name].append(_one_cli(where, args.size, args.steps))
            print(name, runs[name][-1], flush=True)
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("s_per_step", "peak_rss_mb")}
           for n, rs in runs.items()}
    return {"size": args.size, "steps": args.steps, "runs": runs, "median": med,
            "ratio_new_over_old": {k: med["new"][k] / med["old"][k] for k in med["new"]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("cli", "commits"))
    ap.add_argument("--old", help="a checkout of the commit to compare with (commits)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 60 if args.what == "cli" else 40
    os.environ.setdefault("NSTJAX_COMPILE_CACHE", "0")
    print(json.dumps(cli(args) if args.what == "cli" else commits(args), indent=1))


if __name__ == "__main__":
    main()
