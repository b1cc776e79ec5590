"""Coarse-to-fine against single-scale, in one process: time to reach a loss at the output size.

Runs the same config (default: configs/default.py's objective on Tübingen x The Starry Night) once
at the output size only and once with ``config.scales`` (coarse stages first), each from a fresh
process-level start of its own compiled programs, and reports for each the loss at the output size
against wall-clock seconds since the run began (set-up and compilation included), and how long each
took to reach the single-scale run's final loss. Writes ``multiscale.json`` and ``multiscale.png``.

    python experiments/multiscale.py --size 384 --steps 120 --scales 192 --scale-steps 60
        --out runs/multiscale
    python experiments/multiscale.py --config configs/pastiche_objective.py --size 512 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def time_to(records: list[dict], loss: float) -> float | None:
    for r in records:
        if r["loss"] <= loss:
            return r["elapsed_s"]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.py")
    ap.add_argument("--content", default="../shared/images/tubingen.jpg")
    ap.add_argument("--style", default="../shared/images/starry_night.jpg")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--steps", type=int, default=120, help="steps of the single-scale run")
    ap.add_argument("--scales", default="192", help="comma-separated sizes of the coarse stages")
    ap.add_argument("--scale-steps", default="60",
                    help="comma-separated steps of the coarse stages")
    ap.add_argument("--fine-steps", type=int, default=None,
                    help="steps at the output size after the coarse stages (default: --steps)")
    ap.add_argument("--out", default="runs/multiscale")
    args = ap.parse_args(argv)

    import importlib.util

    from nstjax import records
    from nstjax.run import run
    from nstjax.weights import load_vgg19_with_info

    spec = importlib.util.spec_from_file_location("cfg", args.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params, info = load_vgg19_with_info()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scales = tuple(int(s) for s in args.scales.split(",") if s)
    scale_steps = tuple(int(s) for s in args.scale_steps.split(",") if s)
    variants = {"single": ((), (), args.steps),
                "multiscale": (scales, scale_steps, args.fine_steps or args.steps)}
    result = {}
    for name, (sc, st, steps) in variants.items():
        c = mod.get_config()
        c.content, c.style, c.size, c.steps = args.content, args.style, args.size, steps
        c.scales, c.scale_steps, c.log_every, c.progress, c.checkpoint_every = sc, st, 1, False, 0
        workdir = out / name
        shutil.rmtree(workdir, ignore_errors=True)
        run(c, workdir, params=params, weights_info=info, handle_signals=False, log=lambda m: None)
        recs = records.read_metrics(workdir / "metrics.jsonl")
        last = recs[-1].get("stage")
        fine = [r for r in recs if r.get("stage") == last]  # the records at the output size
        result[name] = {"scales": list(sc), "scale_steps": list(st), "steps": steps,
                        "curve": [(r["elapsed_s"], r["loss"]) for r in fine],
                        "final_loss": recs[-1]["loss"], "wall_s": recs[-1]["elapsed_s"]}
    target = result["single"]["final_loss"]
    for name, r in result.items():
        r["seconds_to_single_final_loss"] = time_to(
            [{"elapsed_s": s, "loss": l} for s, l in r["curve"]], target)
        print(f"{name:10s} final loss {r['final_loss']:.5g} in {r['wall_s']:.1f} s; reached the "
              f"single-scale final loss {target:.5g} after "
              f"{r['seconds_to_single_final_loss']} s", flush=True)
    a, b = (result[k]["seconds_to_single_final_loss"] for k in ("single", "multiscale"))
    result["speedup_to_single_final_loss"] = (a / b) if a and b else None
    print(f"speed-up to the single-scale final loss: {result['speedup_to_single_final_loss']}")
    (out / "multiscale.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in variants:
        xs, ys = zip(*result[name]["curve"])
        ax.plot(xs, ys, label=f"{name} {result[name]['scales'] or ''}")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start (set-up and compilation included)")
    ax.set_ylabel(f"loss at {args.size} px")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "multiscale.png", dpi=100)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
