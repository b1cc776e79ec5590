"""What a small run costs from a fresh process, where that time goes, and how two commits compare:
the measurement behind the targets' and the judge's compiled programs (nstjax/targets.py,
nstjax/histogram.py) and behind the test suite's time (docs/performance.md, "Start-up").

    python experiments/startup.py [--old DIR] [--size 64] [--steps 10] [--rounds 3]

Runs the command line (the default config, the built-in images, ``--size``, ``--steps``, the judge
on, no compilation cache) of this checkout and, with ``--old`` (a checkout of another commit, e.g.
``git worktree add /tmp/old HEAD~1``), of that one, alternately, ``--rounds`` times each. Prints,
per checkout, the median wall time, the XLA programs compiled (JAX's ``jax_log_compiles`` lines:
how many, and the seconds the compiler took in all and for the chunk of steps alone), and the
ratio of wall times (new / old).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILED = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.e-]+) sec")


def one_run(checkout: Path, size: int, steps: int) -> dict:
    """One command-line run of ``checkout`` in a fresh process: wall seconds and its compiles."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "NSTJAX_COMPILE_CACHE": "0",
           "JAX_LOG_COMPILES": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nstjax", f"--workdir={tmp}/w", f"--config.size={size}",
               f"--config.steps={steps}", "--config.progress=False"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, env=env, check=False)
        wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{checkout}: the run failed: {r.stderr.strip().splitlines()[-1:]}")
    compiles = [(name, float(s)) for name, s in COMPILED.findall(r.stderr)]
    return {"wall_s": wall, "programs": len(compiles),
            "compile_s": sum(s for _, s in compiles),
            "steps_compile_s": sum(s for name, s in compiles if "steps" in name)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="a checkout of the commit to compare with")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    checkouts = {"new": ROOT} | ({"old": Path(args.old).resolve()} if args.old else {})
    got = {k: [] for k in checkouts}
    for _ in range(args.rounds):
        for k, path in checkouts.items():
            got[k].append(one_run(path, args.size, args.steps))
    out = {k: {f: statistics.median(r[f] for r in runs) for f in runs[0]}
           for k, runs in got.items()}
    if args.old:
        out["wall_ratio_new_over_old"] = out["new"]["wall_s"] / out["old"]["wall_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
