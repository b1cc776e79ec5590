"""One compiled sweep against the same points as separate ``nstjax`` runs, side by side.

    PYTHONPATH=. python experiments/sweep_vs_separate.py [--steps=20] [--size=128] [--out=DIR]

Runs ``configs/ablation_style_layers.py:quick`` (4 style-layer subsets x 2 style weights, 8 points)
once as a sweep (one process, one compile) and once as 8 separate ``nstjax`` processes, each point
set with command-line overrides, as a user would without sweeps. Both are timed end to end
(process start, weights, targets, compiles, files). Prints the wall times and how far each
point's final.png from the sweep is from the one its separate run wrote. Run from the repo root
(the config names ../shared/images/).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/ablation_style_layers.py:quick"


def nstjax(*args: str) -> float:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "nstjax", *args], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    if r.returncode != 0:
        sys.exit(f"nstjax {' '.join(args)} failed:\n{r.stderr}")
    return time.time() - t


def literal(v) -> str:
    return repr(tuple(v)) if isinstance(v, (list, tuple)) else repr(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="sweep_vs_separate."))
    common = [f"--config.steps={a.steps}", f"--config.size={a.size}", "--config.progress=False"]

    sweep_s = nstjax(f"--config={CONFIG}", f"--workdir={out / 'sweep'}", *common)
    record = json.loads((out / "sweep" / "sweep.json").read_text())
    points = record["points"]

    separate = []
    for p in points:
        overrides = [f"--config.{k}={literal(v)}" for k, v in p["overrides"].items()]
        separate.append(nstjax(f"--config={CONFIG}", "--config.sweep.axes=()",
                               f"--workdir={out / 'separate' / str(p['index'])}", *common,
                               *overrides))

    rows = []
    for p, s in zip(points, separate):
        a_img = np.asarray(Image.open(out / "sweep" / p["dir"] / "final.png"), np.float64)
        b_img = np.asarray(Image.open(out / "separate" / str(p["index"]) / "final.png"), np.float64)
        rel = float(np.linalg.norm(a_img - b_img) / np.linalg.norm(b_img))
        rows.append({"index": p["index"], "values": p["values"], "separate_s": round(s, 1),
                     "final_png_rel_diff": rel, "max_abs_diff": float(np.abs(a_img - b_img).max())})
    total = sum(separate)
    batch = record["invocations"][-1]["batches"][0]
    print(json.dumps({"points": len(points), "size": a.size, "steps": a.steps,
                      "sweep_wall_s": round(sweep_s, 1), "separate_wall_s": round(total, 1),
                      "speedup": round(total / sweep_s, 2), "sweep_chunk_size": batch["chunk_size"],
                      "per_point": rows, "out": str(out)}, indent=1))


if __name__ == "__main__":
    main()
