"""Beyond Gatys 2015, side by side on one image pair (issue 7): a labelled grid and a CSV.

    python experiments/extensions.py --quick        # CPU: 128 px, 60 steps per panel, a few minutes
    python experiments/extensions.py                # 384 px, 200 steps (an accelerator helps)
        [--content PATH] [--style PATH] [--style2 PATH] [--out runs/extensions] [--size N]
        [--steps N] [--masks SKY.png,REST.png] [--docs docs/extensions.png] [--only WORD]
    python experiments/extensions.py --quick --only scale --out runs/scale_control   # one figure

Every panel is one ordinary nstjax run (``nstjax.run.run``) of the default config with a few
fields changed, so each leaves its own workdir (config.json, metrics.jsonl, final.png,
manifest.json) under ``--out``. Panels:

- Gatys 2015 (the Gram loss; the baseline the others change one thing of);
- + histogram loss (Risser et al. 2017) at relu1_1 and relu4_1;
- mean/std and Wasserstein-2 (Gaussian) style statistics instead of the Gram matrix;
- colour preservation (Gatys et al. 2016): luminance-only transfer (YIQ), and the style's colours
  matched to the content's (mean and covariance) first;
- style scale 0.5 and 2 (the style image's size relative to the output's);
- spatial control (Gatys et al. 2017): the sky in the first style, the rest in ``--style2``; and
  the sky alone styled (one mask, one style);
- scale control (Gatys et al. 2017, ``style_layer_images``): the fine style layers (relu1_1,
  relu2_1) from one painting and the coarse ones (relu3_1..relu5_1) from the other, both ways;
- texture synthesis (no content loss, white-noise start) with the Gram loss alone and with the
  histogram loss added: where the Gram loss's instabilities (activations of the wrong mean and
  spread) show most, as in Risser et al.'s figures.

``results.csv`` has one row per panel: the final loss terms (named as in a sweep's summary.csv:
``loss``, ``content_loss``, ``style_loss``, ``hist_loss``, ``tv_loss``), the wall time, and
measurements of what each paper claims: ``hist_<layer>``, the per-channel 1-D Wasserstein distance
between the output's and the (first) style image's VGG activations (lower = the activation
histograms match better), and ``chroma_to_content``, the mean absolute difference of the YIQ chroma
(I, Q) between the output and the content photo (lower = the content's colours kept).

The masks default to a sky mask found in the content photo (pixels, connected to the top edge
column by column, of the colour of the top rows) and its complement, written to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nstjax import color, features, histogram, images, records  # noqa: E402 - after sys.path
from nstjax.config import base_config  # noqa: E402 - after sys.path
from nstjax.run import run  # noqa: E402 - after sys.path
from nstjax.sweep_files import term_column  # noqa: E402 - after sys.path
from nstjax.weights import load_vgg19_with_info  # noqa: E402 - after sys.path

SHARED = ROOT.parent / "shared" / "images"
MEASURE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
TUBINGEN_CREDIT = "Content: Neckarfront, Tübingen, photo by Andreas Praefcke, CC BY 3.0"
HIST = {"hist_layers": ("relu1_1", "relu4_1"), "hist_layer_weights": (100.0, 1.0)}


def sky_mask(content: np.ndarray, tolerance: float = 40.0) -> np.ndarray:
    """A soft (H, W) mask of the sky: pixels within ``tolerance`` (RGB distance) of the median
    colour of the top 8% of rows, kept only while connected to the top edge down each column."""
    h = content.shape[0]
    top = content[: max(1, h // 12)].reshape(-1, 3)
    near = np.linalg.norm(content - np.median(top, axis=0), axis=-1) < tolerance
    mask = np.cumprod(near, axis=0).astype(np.uint8) * 255  # stops at the first non-sky pixel
    im = Image.fromarray(mask).filter(ImageFilter.MedianFilter(5)).filter(
        ImageFilter.GaussianBlur(1.5))
    return np.asarray(im, np.float32) / 255.0


def panels(style: str, style2: str, masks: tuple[str, str]) -> list[tuple[str, dict]]:
    two = f"{style},{style2}"
    return [
        ("Gatys 2015 (Gram)", {}),
        ("+ histogram loss", dict(HIST)),
        ("mean/std statistic", {"style_stat": "mean_std"}),
        ("Wasserstein-2 statistic", {"style_stat": "w2"}),
        ("luminance only (YIQ)", {"preserve_color": "luminance"}),
        ("colour matched to content", {"preserve_color": "histogram"}),
        ("style scale 0.5", {"style_scale": 0.5}),
        ("style scale 2", {"style_scale": 2.0}),
        ("masks: sky / town", {"style": two, "content_masks": ",".join(masks)}),
        ("mask: sky only", {"content_masks": masks[0]}),
        ("scale: fine 1, coarse 2", {"style": two, "style_layer_images": (0, 0, 1, 1, 1)}),
        ("scale: fine 2, coarse 1", {"style": two, "style_layer_images": (1, 1, 0, 0, 0)}),
        ("texture: Gram", {"content_weight": 0.0, "init": "noise"}),
        ("texture: Gram + histogram", {"content_weight": 0.0, "init": "noise", **HIST}),
    ]


def _font(size: int):
    try:  # matplotlib (a dependency) ships DejaVu Sans, which has the accents PIL's default lacks
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # noqa: BLE001 - any failure: PIL's own font
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()


def grid(cells: list[tuple[str, np.ndarray]], columns: int, cell_w: int,
         footer: str = "") -> Image.Image:
    """Images with a label under each, ``columns`` to a row, each scaled to ``cell_w`` wide."""
    font_px = max(10, cell_w // 14)
    font = _font(font_px)
    cell_h = max(round(a.shape[0] * cell_w / a.shape[1]) for _, a in cells)
    label_h = font_px + 8
    rows = -(-len(cells) // columns)
    foot_h = font_px + 8 if footer else 0
    out = Image.new("RGB", (columns * cell_w, rows * (cell_h + label_h) + foot_h), "white")
    draw = ImageDraw.Draw(out)
    for i, (label, arr) in enumerate(cells):
        im = Image.fromarray(images.to_uint8(arr))
        im = im.resize((cell_w, round(im.height * cell_w / im.width)), Image.LANCZOS)
        x, y = (i % columns) * cell_w, (i // columns) * (cell_h + label_h)
        out.paste(im, (x, y + (cell_h - im.height) // 2))
        draw.text((x + cell_w // 2, y + cell_h + 3), label, fill="black", font=font, anchor="ma")
    if footer:
        draw.text((4, out.height - foot_h + 3), footer, fill=(80, 80, 80),
                  font=_font(max(9, font_px - 2)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CPU settings: 128 px, 60 steps")
    ap.add_argument("--content", default=str(SHARED / "tubingen.jpg"))
    ap.add_argument("--style", default=str(SHARED / "starry_night.jpg"))
    ap.add_argument("--style2", default=str(SHARED / "shipwreck.jpg"), help="second style (masks)")
    ap.add_argument("--masks", default="",
                    help="two masks SKY,REST (default: found in the content)")
    ap.add_argument("--size", type=int, default=0, help="output long side (default 384; quick 128)")
    ap.add_argument("--steps", type=int, default=0, help="steps per panel (default 200; quick 60)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "extensions"))
    ap.add_argument("--docs", default="",
                    help="also write a compact (128-colour) grid of the results alone (no input "
                         "images) here")
    ap.add_argument("--reuse", action="store_true",
                    help="keep panels already finished in --out with the same config (re-plot "
                         "only)")
    ap.add_argument("--only", default="",
                    help="run only the panels whose label starts with this (scale, mask, ...)")
    a = ap.parse_args(argv)
    size = a.size or (128 if a.quick else 384)
    steps = a.steps or (60 if a.quick else 200)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    params, info = load_vgg19_with_info()

    content = images.load_image(a.content, size)
    if a.masks:
        masks = tuple(a.masks.split(","))
    else:
        sky = sky_mask(content)
        masks = (str(out / "mask_sky.png"), str(out / "mask_rest.png"))
        Image.fromarray(images.to_uint8(sky * 255)).save(masks[0])
        Image.fromarray(images.to_uint8((1 - sky) * 255)).save(masks[1])
    mask_shown = images.load_image(masks[0], size)

    style_img = images.load_image(a.style, size)
    measure_style = features(params, style_img, MEASURE_LAYERS)
    inputs = [("content", content), ("style", style_img),
              ("style 2 (town)", images.load_image(a.style2, size)), ("sky mask", mask_shown)]
    cells = []
    rows = []
    chosen = [(label, o) for label, o in panels(a.style, a.style2, masks)
              if label.startswith(a.only)]
    if not chosen:
        raise SystemExit(f"extensions: error: no panel's label starts with {a.only!r}")
    for label, overrides in chosen:
        c = base_config()
        c.content, c.style, c.size, c.steps, c.progress = a.content, a.style, size, steps, False
        c.log_every = c.chunk = 10
        for k, v in overrides.items():
            c[k] = v
        name = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
        manifest = out / name / "manifest.json"
        same = manifest.is_file() and json.loads(manifest.read_text())["config"] == json.loads(
            records.dumps(c.to_dict()))
        if not (a.reuse and same):
            run(c, out / name, overwrite=True, params=params, weights_info=info)
        record = json.loads(manifest.read_text())
        wall = record["timing"]["wall_s"]
        image = images.load_image(out / name / "final.png")  # what the run wrote, 8-bit
        fo = features(params, image, MEASURE_LAYERS)
        row = {"panel": label, "workdir": name, "overrides": json.dumps(overrides),
               "wall_s": round(wall, 2)}
        # Named as in a sweep's summary.csv (nstjax.sweep_files.term_column):
        # loss, content_loss, ...
        row.update({term_column(k): record["final"].get(k, 0.0)
                    for k in ("loss", "content", "style", "hist", "tv")})
        for l in MEASURE_LAYERS:
            f, s = fo[l][0], np.asarray(measure_style[l][0])
            q = histogram.quantiles(s.reshape(-1, s.shape[-1]), f.shape[0] * f.shape[1])
            row[f"hist_{l}"] = float(histogram.histogram_distance(f, q))
        row["chroma_to_content"] = float(np.abs(color.chroma(image) - color.chroma(content)).mean())
        rows.append(row)
        cells.append((label, image))
        print(f"{label:28s} {wall:6.1f} s  loss {row['loss']:.4g}  hist relu1_1 "
              f"{row['hist_relu1_1']:.2f} relu4_1 {row['hist_relu4_1']:.2f}  chroma "
              f"{row['chroma_to_content']:.2f}", flush=True)

    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    footer = (TUBINGEN_CREDIT if Path(a.content).name == "tubingen.jpg" else "") + \
        f"{'; ' if Path(a.content).name == 'tubingen.jpg' else ''}{size} px, {steps} L-BFGS " \
        "steps per panel; made by nstjax"
    grid(inputs + cells, 4, max(192, size), footer).save(out / "grid.png")
    print(f"wrote {out / 'grid.png'} and {out / 'results.csv'}")
    if a.docs:  # only what nstjax made: no copies of the input photo or paintings
        g = grid(cells, 4, max(192, size), footer)
        g.quantize(128, method=Image.Quantize.MEDIANCUT).save(a.docs, optimize=True)
        print(f"wrote {a.docs} ({Path(a.docs).stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
