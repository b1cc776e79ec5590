"""Peak memory and compile time against the chunk length: the measurement behind the compile term
of nstjax.memory's estimate (docs/performance.md, "Chunk length").

    python experiments/chunk_memory.py [--size 64] [--chunks 1,10,25,50]

Each chunk length is one ``nstjax`` process (the default config, ``steps`` = the chunk, no
checkpoints, no compilation cache) whose peak RSS (``ru_maxrss``) and first-chunk seconds (the
manifest's ``first_chunk_s``: mostly compilation) are printed beside the estimate
(:func:`nstjax.memory.estimate_bytes`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--chunks", default="1,10,25,50")
    args = ap.parse_args()
    from nstjax import memory
    from nstjax.config import base_config, chunk_length, validate
    from nstjax.problem import output_shape

    rows = []
    for n in map(int, args.chunks.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, PYTHONPATH=str(ROOT), NSTJAX_COMPILE_CACHE="0",
                       NSTJAX_MEMORY_CHECK="0")
            cmd = [sys.executable, "-m", "nstjax", f"--workdir={tmp}/w",
                   f"--config.size={args.size}", f"--config.steps={n}", f"--config.chunk={n}",
                   f"--config.log_every={n}", "--config.progress=False",
                   "--config.checkpoint_every=0"]
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            _, status, usage = os.wait4(proc.pid, 0)
            if status:
                raise SystemExit(proc.stderr.read().decode()[-2000:])
            m = json.loads((Path(tmp) / "w" / "manifest.json").read_text())
        c = base_config()
        c.size, c.steps, c.chunk, c.log_every = args.size, n, n, n
        spec = validate(c)
        h, w = output_shape(spec)
        est = memory.estimate_bytes(h, w, spec.objective.layers, chunk_steps=chunk_length(spec))
        rows.append({"chunk": n, "peak_rss_mb": usage.ru_maxrss / 1024, "estimate_mb": est / 2**20,
                     "first_chunk_s": m["timing"]["first_chunk_s"]})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
