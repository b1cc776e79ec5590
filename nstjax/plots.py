"""Figures of a sweep: a labelled contact sheet of the final images and the loss curves.

:func:`save_grid` draws with PIL (images at their own pixels, text in matplotlib's DejaVu Sans);
:func:`save_loss_curves` uses matplotlib's Agg canvas directly (no pyplot, no global backend
change). Both write atomically, like every other file nstjax writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MARGIN = 14
GAP = 10
MIN_CELL, MAX_CELL = 128, 256  # the longer side of an image in the grid, in pixels
MAX_ROW_LABEL = 240


@dataclasses.dataclass
class Cell:
    row: str  # row label (values of the row field and any other swept fields)
    col: str  # column label (value of the column field)
    image: np.ndarray | None  # uint8 (H, W, 3); None draws an empty cell
    caption: str = ""
    ok: bool = True  # False draws the caption in red (a point that stopped)


def _font(size: int, bold: bool = False):
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(font_manager.FontProperties(
            family="DejaVu Sans", weight="bold" if bold else "normal"))
        return ImageFont.truetype(path, size)
    except Exception:  # noqa: BLE001 - no matplotlib fonts or no FreeType: PIL's own font
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()


def _width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else 7 * len(text)


def wrap(text: str, font, max_width: float) -> list[str]:
    """Greedy wrapping at spaces, commas and "+", breaking words longer than a line."""
    tokens = [t for t in re.split(r"(?<=[+,\s])", text) if t]
    lines, line = [], ""
    for tok in tokens:
        if _width(font, line + tok) <= max_width or not line:
            line += tok
        else:
            lines.append(line.rstrip())
            line = tok
        while _width(font, line) > max_width and len(line) > 1:  # a word longer than a line
            cut = 1
            while cut < len(line) - 1 and _width(font, line[:cut + 1]) <= max_width:
                cut += 1
            lines.append(line[:cut])
            line = line[cut:]
    if line.strip() or not lines:
        lines.append(line.rstrip())
    return lines


def _line_height(font) -> int:
    box = font.getbbox("Ag|") if hasattr(font, "getbbox") else (0, 0, 0, 12)
    return int(box[3] - box[1]) + 4


def contact_sheet(cells: Sequence[Cell], *, row_title: str = "", col_title: str = "",
                  title: str = "") -> Image.Image:
    """Images laid out by their row and column labels (in order of first appearance), with the
    labels along the left and the top and a caption under each image."""
    rows = list(dict.fromkeys(c.row for c in cells))
    cols = list(dict.fromkeys(c.col for c in cells))
    at = {(c.row, c.col): c for c in cells}
    shown = [c.image for c in cells if c.image is not None]
    long_side = max((max(im.shape[:2]) for im in shown), default=MIN_CELL)
    target = int(min(MAX_CELL, max(MIN_CELL, long_side)))

    def fit(im: np.ndarray) -> Image.Image:
        h, w = im.shape[:2]
        s = target / max(h, w)
        pil = Image.fromarray(im, "RGB")
        return pil.resize((max(1, round(w * s)), max(1, round(h * s))),
                          Image.NEAREST if s >= 2 else Image.LANCZOS)

    thumbs = {key: fit(c.image) for key, c in at.items() if c.image is not None}
    box_w = max((t.width for t in thumbs.values()), default=target)
    box_h = max((t.height for t in thumbs.values()), default=target)
    f_label, f_title, f_cap = _font(14), _font(16, bold=True), _font(12)
    lh, th, ch = _line_height(f_label), _line_height(f_title), _line_height(f_cap)

    col_lines = {c: wrap(c, f_label, box_w) for c in cols}
    row_lines = {r: wrap(r, f_label, MAX_ROW_LABEL) for r in rows}
    corner = [f"rows: {row_title}" if row_title else "",
              f"columns: {col_title}" if col_title else ""]
    corner = [line for text in corner if text for line in wrap(text, f_label, MAX_ROW_LABEL)]
    label_w = int(max([_width(f_label, l) for ls in row_lines.values() for l in ls]
                      + [_width(f_label, l) for l in corner] + [40]))
    header_h = max([len(ls) for ls in col_lines.values()] + [len(corner), 1]) * lh
    cell_h = box_h + ch + 4
    row_h = [max(cell_h, len(row_lines[r]) * lh) for r in rows]

    width = MARGIN + label_w + GAP + len(cols) * (box_w + GAP) - GAP + MARGIN
    title_lines = wrap(title, f_title, width - 2 * MARGIN) if title else []
    top = MARGIN + len(title_lines) * th + (GAP if title_lines else 0)
    height = top + header_h + GAP + sum(row_h) + GAP * (len(rows) - 1) + MARGIN
    sheet = Image.new("RGB", (int(width), int(height)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((MARGIN, MARGIN + i * th), line, fill="black", font=f_title)
    for i, line in enumerate(corner):
        draw.text((MARGIN, top + i * lh), line, fill=(90, 90, 90), font=f_label)
    x0 = MARGIN + label_w + GAP
    for j, c in enumerate(cols):
        x = x0 + j * (box_w + GAP)
        lines = col_lines[c]
        for i, line in enumerate(lines):
            y = top + header_h - (len(lines) - i) * lh
            draw.text((x + (box_w - _width(f_label, line)) / 2, y), line, fill="black",
                      font=f_label)
    y = top + header_h + GAP
    for r, h in zip(rows, row_h):
        lines = row_lines[r]
        ty = y + (box_h - len(lines) * lh) / 2
        for i, line in enumerate(lines):
            draw.text((MARGIN + label_w - _width(f_label, line), ty + i * lh), line, fill="black",
                      font=f_label)
        for j, c in enumerate(cols):
            x = x0 + j * (box_w + GAP)
            cell = at.get((r, c))
            if cell is None or cell.image is None:
                draw.rectangle([x, y, x + box_w - 1, y + box_h - 1], fill=(235, 235, 235))
                draw.text((x + box_w / 2 - 4, y + box_h / 2 - lh / 2), "-", fill=(150, 150, 150),
                          font=f_label)
            else:
                t = thumbs[(r, c)]
                sheet.paste(t, (int(x + (box_w - t.width) / 2), int(y + (box_h - t.height) / 2)))
            if cell is not None and cell.caption:
                cap = cell.caption
                while _width(f_cap, cap) > box_w and len(cap) > 4:
                    cap = cap[:-2] + "…"
                draw.text((x + (box_w - _width(f_cap, cap)) / 2, y + box_h + 2), cap,
                          fill=(60, 60, 60) if cell.ok else (200, 0, 0), font=f_cap)
        y += h + GAP
    return sheet


def _atomic_save(path: Path, save) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            save(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_grid(path: str | os.PathLike, cells: Sequence[Cell], **kwargs) -> Image.Image:
    sheet = contact_sheet(cells, **kwargs)
    _atomic_save(Path(path), lambda f: sheet.save(f, format="PNG"))
    return sheet


def save_loss_curves(path: str | os.PathLike,
                     curves: Sequence[tuple[str, Sequence[tuple[int, float]]]],
                     title: str = "") -> None:
    """One line per (label, [(step, loss), ...]) on a log scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legend = 0 < len(curves) <= 24
    fig = Figure(figsize=(10 if legend else 7, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    any_positive = False
    for i, (label, curve) in enumerate(curves):
        pts = [(s, l) for s, l in curve
               if isinstance(l, (int, float)) and math.isfinite(l) and l > 0]
        if not pts:
            continue
        any_positive = True
        steps, losses = zip(*pts)
        ax.plot(steps, losses, label=label, linewidth=1.4, marker="." if len(pts) < 30 else None,
                color=_colour(i, len(curves)))
    if any_positive:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title)
    if legend and any_positive:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
        fig.subplots_adjust(left=0.08, right=0.62)
    else:
        fig.tight_layout()
    _atomic_save(Path(path), lambda f: fig.savefig(f, format="png"))


def _colour(i: int, n: int):
    from matplotlib import colormaps

    return colormaps["viridis"](i / max(1, n - 1))


def save_judge(path: str | os.PathLike, metrics: Sequence[str], x_label: str,
               x_values: Sequence[str], series: Sequence[tuple[str, Sequence[dict | None]]],
               title: str = "") -> None:
    """One panel per judge metric: its value at each of ``x_values`` (the first swept field's
    values, as categories), one line per ``series`` (label, one judge dict or None per x value;
    a series per combination of the other swept fields). Log scale where every value is positive."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    legend = 1 < len(series) <= 24
    fig = Figure(figsize=(4.2 * len(metrics) + (3 if legend else 0), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    xs = list(range(len(x_values)))
    for m, name in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), m + 1)
        values = []
        for i, (label, judged) in enumerate(series):
            ys = [float(d[name]) if d and d.get(name) is not None else math.nan for d in judged]
            values += [y for y in ys if math.isfinite(y)]
            ax.plot(xs, ys, marker="o", linewidth=1.4, label=label, color=_colour(i, len(series)))
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(x_values, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(x_label)
        ax.set_title(f"judge_{name}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    if legend:
        fig.axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    _atomic_save(Path(path), lambda f: fig.savefig(f, format="png"))
