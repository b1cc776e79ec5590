"""The figures of Gatys, Ecker & Bethge (2015), each in one command.

    python experiments/figures.py NAME [--quick] [--out DIR] [--images DIR] [--content FILE]
    python experiments/figures.py all --quick          # every figure, a few minutes each on a CPU
    python experiments/figures.py NAME --dry-run       # the points and batches, nothing computed

NAME is one of

  style_layers    Fig. 1, style row (and the texture paper): style reconstructions from white noise,
                  style loss only, on the cumulative subsets conv1_1, conv1_1+conv2_1, ...,
                  conv1_1..conv5_1, for each painting.
  content_layers  Fig. 1, content row: content reconstructions from white noise, content loss
                  only, at conv1_2, conv2_2, conv3_2, conv4_2, conv5_2.
  styles          Fig. 2: the Tübingen photo under each painting.
  alpha_beta      Fig. 3: rows = the cumulative style-layer subsets, columns = alpha/beta
                  1e-5, 1e-4, 1e-3, 1e-2.
  pooling_init    max against average pooling, white-noise against content initialisation.
  init            Gatys et al. CVPR 2016, Fig. 6: initialised from the content photo, from the
                  painting, and from four white-noise images (seeds 0-3), in one sweep.
  content_layer   Gatys et al. CVPR 2016, Fig. 5: the content matched at conv2_2 against conv4_2.
  networks        the normalised network (the paper's) beside the plain ImageNet VGG-19, at
                  alpha/beta 1e-4 and 1e-3.

Every figure is a sweep (nstjax/sweep.py) over the paper's settings (configs/gatys2015.py: the
normalised VGG-19, content conv4_2, style conv1_1..conv5_1 with w_l = 1/L, the paper's loss
normalisations and alpha/beta, average pooling, white-noise init, L-BFGS), with alpha/beta as the
paper gives it at every size (no rescaling by the pixel count). Layer names: the paper's
"convX_Y" responses are rectified, so they are nstjax's ``reluX_Y`` (see configs/gatys2015.py).
Points that share image shapes run as one compiled program (the two networks of ``networks`` are
two programs' batches); each figure's output directory holds

  figure.png       the labelled figure
  losses.csv       one row per cell: the swept values, steps done, final loss and every term, named
                   as in summary.csv (no timings, so a second run gives the same file)
  loss_curves.png  the loss of every cell against the step
  manifest.json    figure, mode, command, the sweep's config, seed, package versions,
                   weights sha256, and for each cell its point directory
  sweep/           the sweep itself: sweep.json, summary.csv (with timings), grid.png, and every
                   point's directory with the files of a single nstjax run (final.png, config.json,
                   metrics.jsonl, manifest.json)

``--quick`` runs at 96 px with fewer steps (minutes on 2 CPU cores); without it, 512 px and the
paper's long L-BFGS runs, meant for an accelerator. Running a figure again in the same ``--out``
finishes only the cells not yet done; ``--overwrite`` starts over. Images come from
``../shared/images`` (the content photo is ``tubingen.jpg``, every other image there is a
painting) or from ``--images DIR`` and ``--content FILE``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIGURES = ("style_layers", "content_layers", "styles", "alpha_beta", "pooling_init", "init",
           "content_layer", "networks")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CUMULATIVE = tuple(STYLE_LAYERS[: i + 1] for i in range(5))
CONTENT_LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")
RATIOS = (1e-5, 1e-4, 1e-3, 1e-2)

# size, steps for (quick, full); reconstructions from noise need more steps than transfers.
SETTINGS = {
    "style_layers": ((96, 150), (512, 1000)),
    "content_layers": ((96, 150), (512, 1000)),
    "styles": ((96, 200), (512, 1000)),
    "alpha_beta": ((96, 150), (512, 1000)),
    "pooling_init": ((96, 200), (512, 1000)),
    "init": ((96, 200), (512, 1000)),
    "content_layer": ((96, 200), (512, 1000)),
    "networks": ((96, 200), (512, 1000)),
}
NETWORK_RATIOS = (1e-4, 1e-3)


def paper_label(layer: str) -> str:
    """nstjax's rectified ``reluX_Y`` as the paper names it, ``convX_Y``."""
    return layer.replace("relu", "conv")


def subset_label(layers) -> str:
    layers = tuple(layers)
    if len(layers) == 1:
        return paper_label(layers[0])
    return f"{paper_label(layers[0])}..{paper_label(layers[-1])}"


def find_images(images: Path, content: str) -> tuple[Path, list[Path]]:
    """The content photo and the paintings (every other image in ``images``, sorted)."""
    from nstjax.errors import UserError

    if not images.is_dir():
        raise UserError(f"no image folder {images} (name one with --images)")
    content_path = (Path(content) if Path(content).is_absolute() or "/" in content
                    else images / content)
    if not content_path.is_file():
        raise UserError(f"no content photo {content_path} (name one with --content)")
    styles = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                    and p.resolve() != content_path.resolve())
    if not styles:
        raise UserError(f"no paintings in {images} besides the content photo")
    return content_path, styles


def figure_config(name: str, quick: bool, content: Path, styles: list[Path]):
    """The sweep config of figure ``name`` and how to label its cells."""
    from configs.gatys2015 import get_config

    (size, steps) = SETTINGS[name][0 if quick else 1]
    c = get_config()
    c.content = str(content)
    c.style = str(styles[0])
    c.size, c.steps = size, steps
    c.style_layer_weights = ()  # 1/L for each subset's L layers, as w_l = 1/5 for five
    c.progress = False
    c.log_every = 10
    c.chunk = 10
    c.seed = 0
    ctx = {"alpha": c.content_weight}  # alpha, for the labels of alpha/beta
    style_names = tuple(str(s) for s in styles)
    if name == "style_layers":
        c.content_layers, c.content_weight = (), 0.0
        c.sweep.axes = (("style", style_names), ("style_layers", CUMULATIVE))
        c.sweep.grid = ("style", "style_layers")
        rows = ("style", lambda v: Path(v).stem)
        cols = ("style_layers", subset_label)
    elif name == "content_layers":
        c.style_layers, c.style_weight = (), 0.0
        c.sweep.axes = (("content_layers", tuple((l,) for l in CONTENT_LAYERS)),)
        c.sweep.grid = ("", "content_layers")
        rows = (None, lambda v: "from white noise")
        cols = ("content_layers", subset_label)
    elif name == "styles":
        c.sweep.axes = (("style", style_names),)
        c.sweep.grid = ("", "style")
        rows = (None, lambda v: f"alpha/beta = {ctx['alpha'] / c.style_weight:g}")
        cols = ("style", lambda v: Path(v).stem)
    elif name == "alpha_beta":
        c.sweep.axes = (("style_layers", CUMULATIVE),
                        ("style_weight", tuple(float(f"{1.0 / r:.6g}") for r in RATIOS)))
        c.sweep.grid = ("style_layers", "style_weight")
        rows = ("style_layers", subset_label)
        cols = ("style_weight", lambda v: f"alpha/beta = {ctx['alpha'] / v:g}")
    elif name == "pooling_init":
        c.sweep.axes = (("pooling", ("max", "avg")), ("init", ("noise", "content")))
        c.sweep.grid = ("pooling", "init")
        rows = ("pooling", lambda v: f"{v} pooling")
        cols = ("init", lambda v: "white-noise init" if v == "noise" else "content init")
    elif name == "init":  # one sweep: content, style, and white noise with four seeds
        c.sweep.points = ({"init": "content"}, {"init": "style"},
                          *({"init": "noise", "seed": s} for s in range(4)))
        c.sweep.grid = ("seed", "init")
        rows = (None, lambda v: f"alpha/beta = {ctx['alpha'] / c.style_weight:g}")
        cols = (None, lambda v: (f"noise, seed {v['seed']}" if v["init"] == "noise"
                                 else f"from {v['init']}"))
    elif name == "content_layer":
        c.sweep.axes = (("content_layers", (("relu2_2",), ("relu4_2",))),)
        c.sweep.grid = ("", "content_layers")
        rows = (None, lambda v: f"alpha/beta = {ctx['alpha'] / c.style_weight:g}")
        cols = ("content_layers", lambda v: f"content at {subset_label(v)}")
    elif name == "networks":
        c.sweep.axes = (("network", ("vgg19_normalized", "vgg19")),
                        ("style_weight", tuple(float(f"{1.0 / r:.6g}") for r in NETWORK_RATIOS)))
        c.sweep.grid = ("network", "style_weight")
        rows = ("network", lambda v: ("normalised VGG-19" if v == "vgg19_normalized"
                                      else "plain VGG-19"))
        cols = ("style_weight", lambda v: f"alpha/beta = {ctx['alpha'] / v:g}")
    else:
        raise SystemExit(f"figures: error: unknown figure {name!r}; one of {', '.join(FIGURES)} or "
                         "all")
    return c, rows, cols, ctx


def label(field, fn, values: dict) -> str:
    """A cell's row or column label: ``fn`` of its value of ``field``, or of all its values."""
    return fn(values) if field is None else fn(values.get(field))


TITLES = {
    "style_layers": "Style reconstructions by layers (Gatys et al. 2015, Fig. 1)",
    "content_layers": "Content reconstructions by layer (Gatys et al. 2015, Fig. 1)",
    "styles": "One photograph, several styles (Gatys et al. 2015, Fig. 2)",
    "alpha_beta": "Style layers x alpha/beta (Gatys et al. 2015, Fig. 3)",
    "pooling_init": "Pooling and initialisation",
    "init": "Initialisation: content, style, four white-noise images (Gatys et al. 2016, Fig. 6)",
    "content_layer": "Content matched at conv2_2 or conv4_2 (Gatys et al. 2016, Fig. 5)",
    "networks": "The normalised VGG-19 and the plain one",
}


def losses_csv(sweep, rows: list[dict]) -> str:
    """One row per cell: the swept values, status, steps done and every final term; no timings.
    Columns named as in the sweep's summary.csv (``steps_done``, ``loss``, ``content_loss``,
    ``style_loss``, ``style/relu1_1``, ...: :func:`nstjax.sweep_files.term_column`), so a figure
    sweeping ``style`` has one ``style`` column, the painting."""
    from nstjax.sweep_files import term_column

    terms: list[str] = []
    for r in rows:
        for t in r["manifest"].get("final", {}):
            if t not in terms:
                terms.append(t)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["index", *sweep.fields, "status", "steps_done", *map(term_column, terms)])
    for r in rows:
        p, m = r["point"], r["manifest"]
        values = []
        for f in sweep.fields:
            v = p.values[f]
            values.append("+".join(map(str, v)) if isinstance(v, tuple) else
                          (Path(v).name if f == "style" else v))
        final = m.get("final", {})
        w.writerow([p.index, *values, m.get("status"), m.get("steps"),
                    *[repr(float(final[t])) if t in final else "" for t in terms]])
    return buf.getvalue()


def run_figure(name: str, args) -> dict:
    from nstjax import images, plots, records, sweep_files
    from nstjax import sweep as sw
    from nstjax.run import run_sweep, sweep_main
    from nstjax.workdir import POINTS_DIR

    content, styles = find_images(Path(args.images), args.content)
    cfg, (row_f, row_label), (col_f, col_label), ctx = figure_config(name, args.quick, content,
                                                                     styles)
    for override in args.set or []:
        field, _, value = override.partition("=")
        sw.set_field(cfg, field, json.loads(value) if value[:1] in "[{\"0123456789-" or value in
                     ("true", "false") else value)
    ctx["alpha"] = cfg.content_weight  # after --set
    out = Path(args.out or f"runs/figures/{name}{'_quick' if args.quick else ''}")
    if args.dry_run:
        return {"code": sweep_main(cfg, str(out / "sweep"), dry_run=True)}
    t0 = time.time()
    result = run_sweep(cfg, out / "sweep", overwrite=args.overwrite,
                          say=lambda m: print(f"figures {name}: {m}", flush=True))
    sweep = result["sweep"]
    rows = sweep_files._point_records(out / "sweep", sweep)
    records.write_text(out / "losses.csv", losses_csv(sweep, rows))
    cells = []
    for r in rows:
        p, m = r["point"], r["manifest"]
        loss = m.get("final", {}).get("loss")
        ok = m.get("status") == "finished"
        caption = (f"loss {float(loss):.3g}" if ok and loss is not None
                   else f"stopped at step {m.get('steps')}")
        cells.append(plots.Cell(label(row_f, row_label, p.values),
                                label(col_f, col_label, p.values),
                                images.to_uint8(images.load_image(r["final_png"])), caption, ok))
    mode = "quick" if args.quick else "full"
    size, steps = cfg.size, cfg.steps
    credit = ("Content photo: Neckarfront, Tübingen, by Andreas Praefcke (CC BY 3.0)"
              if "tubingen" in content.name.lower() and name != "style_layers" else "")
    plots.save_grid(out / "figure.png", cells, title=f"{TITLES[name]}: {size} px, {steps} steps"
                    + (f". {credit}" if credit else ""))
    plots.save_loss_curves(out / "loss_curves.png",
                           [(f"{label(row_f, row_label, r['point'].values)} "
                             f"{label(col_f, col_label, r['point'].values)}".strip(), r["curve"])
                            for r in rows],
                           title=f"{name}: loss of every cell")
    first = rows[0]["manifest"] if rows else {}
    manifest = {
        "figure": name, "title": TITLES[name], "mode": mode, "size": size, "steps": steps,
        "command": [sys.executable, *sys.argv],
        "seed": cfg.seed,
        "config": json.loads(records.dumps(cfg.to_dict())),
        "images": {"content": str(content), "styles": [str(s) for s in styles]},
        "weights": first.get("weights"),
        "cells": [{"index": r["point"].index,
                   "values": json.loads(records.dumps(r["point"].values)),
                   "dir": str(Path("sweep") / POINTS_DIR / r["point"].name),
                   "final": r["manifest"].get("final")} for r in rows],
        "wall_s_this_invocation": time.time() - t0,
        "environment": records.environment(),
    }
    records.write_json(out / "manifest.json", manifest)
    print(f"figures {name}: wrote {out / 'figure.png'}, losses.csv, loss_curves.png, manifest.json "
          f"in {time.time() - t0:.0f} s", flush=True)
    return {"code": 0, "out": str(out)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="The figures of Gatys et al. (2015), each in one command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("NAME is one of", 1)[1].split("Every figure", 1)[0])
    ap.add_argument("name", choices=FIGURES + ("all",))
    ap.add_argument("--quick", action="store_true", help="96 px and fewer steps: minutes on a CPU")
    ap.add_argument("--out", default=None,
                    help="output directory (default runs/figures/NAME[_quick]; "
                         "with 'all', the parent of one directory per figure)")
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "images"),
                    help="folder with the content photo and the paintings (default "
                         "../shared/images)")
    ap.add_argument("--content", default="tubingen.jpg",
                    help="the content photo, in --images or a path")
    ap.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="override a config field of the figure's sweep, e.g. --set size=64 "
                         "(repeatable)")
    ap.add_argument("--overwrite", action="store_true", help="start the figure over in --out")
    ap.add_argument("--dry-run", action="store_true", help="list the points and batches only")
    args = ap.parse_args(argv)
    from nstjax import compile_cache
    from nstjax.errors import UserError

    compile_cache.enable()  # a figure run again (or the next figure) loads its programs

    names = FIGURES if args.name == "all" else (args.name,)
    base_out = args.out
    try:
        for name in names:
            if args.name == "all":
                args.out = str(Path(base_out or "runs/figures")
                               / (name + ("_quick" if args.quick else "")))
            code = run_figure(name, args)["code"]
            if code:
                return code
    except UserError as e:
        print(f"figures: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
