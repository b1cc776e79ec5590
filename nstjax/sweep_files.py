"""A sweep's own files, written from its points' directories (so a resumed sweep's are complete):

- ``sweep.json``: the expanded points (their swept values and full configs), the batches and every
  invocation;
- ``summary.csv``: one row per point: its swept values, status, steps done, final loss and every
  term, and seconds (its share of its batch's wall time). The swept fields' columns are named by
  their config fields; no other column can be (:data:`nstjax.sweep.SUMMARY_COLUMNS`,
  :func:`term_column`), so a sweep over ``content`` or ``style`` (the image paths) or ``steps`` has
  one column of each name;
- ``grid.png``: the final images as a labelled contact sheet, rows and columns by two swept fields;
- ``loss_curves.png``: the loss of every point over the steps.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from nstjax import images, records, vgg
from nstjax.judge import METRICS as JUDGE_METRICS
from nstjax.sweep import Point, Sweep, short_field, value_label
from nstjax.workdir import POINTS_DIR, is_done, sweep_config_record


def point_dir(workdir: Path, p: Point) -> Path:
    return workdir / POINTS_DIR / p.name


def sweep_record(sweep: Sweep, n_devices: int, processes: int) -> dict:
    """sweep.json's content, before any invocation is added."""
    return {
        "fields": list(sweep.fields),
        "axes": [[f, list(v)] for f, v in sweep.axes],
        "grid": list(sweep.grid),
        "points": [{"index": p.index, "dir": f"{POINTS_DIR}/{p.name}", "values": p.values,
                    "overrides": p.overrides, "config": sweep_config_record(p.config)}
                   for p in sweep.points],
        "devices": n_devices,
        "processes": processes,
        "invocations": [],
    }


def _point_records(workdir: Path, sweep: Sweep) -> list[dict]:
    out = []
    for p in sweep.points:
        d = point_dir(workdir, p)
        if not is_done(d):
            continue
        m = records.read_json(d / "manifest.json")
        try:
            curve = [(r["step"], r["loss"]) for r in records.read_metrics(d / "metrics.jsonl")]
        except OSError:
            curve = []
        out.append({"point": p, "manifest": m, "curve": curve, "final_png": d / "final.png"})
    return out


def term_column(term: str) -> str:
    """The summary.csv column of a loss term (a key of ``metrics.jsonl`` and the manifest's
    ``final``): ``loss`` (the total) and the per-layer terms (``style/relu1_1``: a '/' is in no
    config field's name) keep their names; every other term ``T`` (``content``, ``style``, ``tv``,
    ``hist``) becomes ``T_loss``, as ``content`` and ``style`` are also the image fields a sweep
    may sweep."""
    return term if term == "loss" or "/" in term else f"{term}_loss"


def summary_csv(sweep: Sweep, rows: list[dict]) -> str:
    """summary.csv: ``index, dir``, the swept fields, ``status, steps_done``, the terms (``loss``,
    ``content_loss``, ``style_loss``, ``tv_loss``, ``hist_loss``, then the per-layer terms, see
    :func:`term_column`), the judge's metrics (``judge_style``, ``judge_content``, ``judge_color``,
    ``judge_color_content``: nstjax/judge.py), ``seconds, batch``. No two columns share a name."""
    terms: list[str] = []
    for r in rows:
        for t in r["manifest"].get("final", {}):
            if t not in terms:
                terms.append(t)
    main = [t for t in ("loss", "content", "style", "tv", "hist") if t in terms]
    layer_terms = sorted((t for t in terms if t not in main),
                         key=lambda t: (t.split("/")[0],
                                        vgg.LAYER_INDEX.get(t.partition("/")[2], 99)))
    judged = [m for m in JUDGE_METRICS
              if any(m in (r["manifest"].get("judge") or {}) for r in rows)]
    header = ["index", "dir", *sweep.fields, "status", "steps_done",
              *(term_column(t) for t in main + layer_terms), *(f"judge_{m}" for m in judged),
              "seconds", "batch"]
    assert len(set(header)) == len(header), header  # the naming scheme above makes this hold
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        p, m = r["point"], r["manifest"]
        final = m.get("final", {})
        cells = [p.index, f"{POINTS_DIR}/{p.name}"]
        for f in sweep.fields:
            v = p.values[f]
            cells.append("+".join(map(str, v)) if isinstance(v, tuple) else v)
        cells += [m.get("status"), m.get("steps")]
        cells += [final.get(t, "") for t in main + layer_terms]
        cells += [(m.get("judge") or {}).get(j, "") for j in judged]
        cells += [round(float(m.get("timing", {}).get("wall_s", math.nan)), 3),
                  m.get("sweep", {}).get("batch", "")]
        w.writerow(cells)
    return buf.getvalue()


def write_outputs(workdir: Path, sweep: Sweep, figures: bool = True) -> list[int]:
    """summary.csv, grid.png and loss_curves.png from the finished points' directories; returns
    the indices of the points (of every invocation) that stopped on a non-finite loss."""
    from nstjax import plots

    rows = _point_records(workdir, sweep)
    records.write_text(workdir / "summary.csv", summary_csv(sweep, rows))
    stopped = [r["point"].index for r in rows if r["manifest"].get("status", "") != "finished"]
    if not figures or not rows:
        return stopped
    row_f, col_f = sweep.grid
    in_grid = (bool(sweep.points[0].config.judge.in_grid) if "judge" in sweep.points[0].config
               else False)
    cells = []
    for r in rows:
        p, m = r["point"], r["manifest"]
        loss = m.get("final", {}).get("loss")
        status = m.get("status", "")
        judge = m.get("judge") or {}
        caption = (f"#{p.index}  loss {float(loss):.3g}"
                   if status == "finished" and loss is not None
                   else f"#{p.index}  stopped at step {m.get('steps')}")
        others = [f for f in sweep.fields if f not in (row_f, col_f)]
        row_label = ", ".join(([value_label(p.values[row_f])] if row_f else [])
                              + [f"{short_field(f)}={value_label(p.values[f])}" for f in others])
        col_label = value_label(p.values[col_f]) if col_f else ""
        if in_grid and judge:  # the fixed judge's numbers, comparable across the cells
            caption += f"  S {judge['style']:.3g} C {judge['content']:.3g} col {judge['color']:.3g}"
        cells.append(plots.Cell(row_label, col_label,
                                images.to_uint8(images.load_image(r["final_png"])), caption,
                                status == "finished"))
    others = [short_field(f) for f in sweep.fields if f not in (row_f, col_f)]
    row_title = ", ".join(([short_field(row_f)] if row_f else []) + others)
    plots.save_grid(workdir / "grid.png", cells, row_title=row_title,
                    col_title=short_field(col_f) if col_f else "",
                    title=f"{workdir.name}: {len(sweep.points)} points")
    save_judge_plot(workdir / "judge.png", sweep, rows)
    plots.save_loss_curves(workdir / "loss_curves.png",
                           [(r["point"].label or r["point"].name, r["curve"]) for r in rows],
                           title=f"{workdir.name}: loss of every point")
    return stopped




def save_judge_plot(path: Path, sweep: Sweep, rows: list[dict]) -> None:
    """judge.png: each judge metric along the first swept field, one line per combination of the
    other swept fields (nothing when no point was judged)."""
    from nstjax import plots

    judged = [r for r in rows if r["manifest"].get("judge")]
    if not judged or not sweep.fields:
        return
    metrics = [m for m in JUDGE_METRICS if any(m in r["manifest"]["judge"] for r in judged)]
    x_field, others = sweep.fields[0], sweep.fields[1:]
    xs: list = []
    series: dict[str, dict] = {}
    for r in judged:
        p = r["point"]
        x = value_label(p.values[x_field])
        if x not in xs:
            xs.append(x)
        label = ", ".join(f"{short_field(f)}={value_label(p.values[f])}" for f in others) or "all"
        series.setdefault(label, {})[x] = r["manifest"]["judge"]
    plots.save_judge(path, metrics, short_field(x_field), xs,
                     [(label, [by_x.get(x) for x in xs]) for label, by_x in series.items()],
                     title=f"{path.parent.name}: the judge's metrics (lower is closer)")
