"""Runs pastiche 1.6.0 for experiments/benchmark.py. Executed by *another* Python (a venv holding
torch and pastiche); nstjax never imports this file, and it imports nothing from nstjax.

    python _pastiche_driver.py info
    python _pastiche_driver.py run   --content C --style S --size N --steps 60,300 --t0 T
        --out R.json [--save-dir D]
    python _pastiche_driver.py judge --content C --style S --size N --images a.png,b.png
        --out R.json

``run`` builds ``PasticheArtist(content, [style], size=N)`` with every other argument at its default
(max pooling, L-BFGS with lr 1 and one evaluation per step, the content photo as the start, the
style resized to the content's pixel count, its own loss weights: what the ``pastiche`` command
does with ``--size N``), then calls ``draw()`` max(steps) times. It records, per step k, the wall
seconds since ``--t0`` (the moment the benchmark launched this process, so Python start-up, the
torch import and pastiche's set-up count) at which the image after k steps exists, and that image's
loss. pastiche evaluates the loss of the image a step starts from, so the loss after k steps comes
from draw k+1; at each requested step count the loss after exactly that many steps is evaluated
with ``artist._calc_loss()`` and the image saved, both off the clock.

``judge`` builds the same artist (so the same resized content and style targets) and evaluates
pastiche's own ``_calc_loss()`` on each given PNG, read with pastiche's own ``load_image`` at the
content's size (a no-op resize for an image of that size): pastiche's code judging any image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _versions() -> dict:
    import os

    import pastiche
    import torch
    from pastiche import pastiche as pp

    return {"torch": torch.__version__, "pastiche": pp.__version__,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "python": sys.version.split()[0], "pastiche_path": os.path.dirname(pastiche.__file__),
            "executable": sys.executable}


def _artist(content: str, style: str, size: int):
    from pastiche.pastiche import PasticheArtist

    return PasticheArtist(content, [style], size=size, device="cpu")


def cmd_run(a) -> dict:
    t0 = a.t0 if a.t0 else time.time()
    import torch
    from pastiche.pastiche import save_image

    checkpoints = sorted({int(s) for s in a.steps.split(",") if s.strip()})
    n = max(checkpoints)
    artist = _artist(a.content, a.style, a.size)
    times = [time.time() - t0]  # times[k]: the image after k steps exists
    losses = [artist.loss]  # losses[k]: its loss (filled in by draw k+1)
    off_clock = 0.0
    at = {}
    for k in range(1, n + 1):
        artist.draw()  # evaluates the image after k-1 steps (artist.loss), then steps
        losses[k - 1] = artist.loss
        times.append(time.time() - t0 - off_clock)
        losses.append(None)
        if k in checkpoints:
            t_off = time.time()
            with torch.no_grad():
                exact = float(artist._calc_loss().item())
            losses[k] = exact
            png = None
            if a.save_dir:
                png = f"{a.save_dir}/pastiche_{k}.png"
                save_image(artist.pastiche, png)
            at[str(k)] = {"step": k, "seconds": times[k], "loss": exact, "png": png}
            off_clock += time.time() - t_off
    return {
        "versions": _versions(),
        "content_size_hw": list(artist.content_size),
        "style_sizes_hw": [list(s) for s in artist.style_sizes],
        "setup_s": times[0],
        "seconds": times,
        "loss": losses,
        "checkpoints": at,
        "off_clock_s": off_clock,
        "seconds_per_step": (times[n] - times[0]) / n,
    }


def cmd_judge(a) -> dict:
    import torch
    from pastiche.pastiche import load_image

    artist = _artist(a.content, a.style, a.size)
    out = {"versions": _versions(), "content_size_hw": list(artist.content_size),
           "style_sizes_hw": [list(s) for s in artist.style_sizes],
           "content_loss_at_start": artist.loss, "losses": {}}
    for png in [p for p in a.images.split(",") if p]:
        x = load_image(png, size=tuple(artist.content_size))
        artist.pastiche = x
        with torch.no_grad():
            out["losses"][png] = float(artist._calc_loss().item())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info")
    for name in ("run", "judge"):
        s = sub.add_parser(name)
        s.add_argument("--content", required=True)
        s.add_argument("--style", required=True)
        s.add_argument("--size", type=int, required=True)
        s.add_argument("--out", required=True)
        if name == "run":
            s.add_argument("--steps", required=True)
            s.add_argument("--t0", type=float, default=0.0)
            s.add_argument("--save-dir", default="")
        else:
            s.add_argument("--images", required=True)
    a = p.parse_args(argv)
    if a.cmd == "info":
        print(json.dumps(_versions()))
        return 0
    result = cmd_run(a) if a.cmd == "run" else cmd_judge(a)
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
