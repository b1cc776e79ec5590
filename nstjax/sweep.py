"""Sweeps, expanded and planned: a config's points and how they group into batches. Pure: no
file is written and nothing is computed here (image headers are read to size the outputs); running
a sweep is :func:`nstjax.run.run_sweep`, its summary files :mod:`nstjax.sweep_files`.

A config's ``sweep`` field (see :func:`nstjax.config.base_config`) names a product of axes,
``((field, (value, ...)), ...)``, and/or a list of points, ``({field: value, ...}, ...)``; the sweep
is every point of the list combined with every combination of the axes. ``content`` or ``style``
naming a folder or a glob (``photos/``, ``paintings/*.jpg``) is an axis too, with one value per
image (sorted; labelled by file name). Each point is a whole run config, validated like a single
run.

Points whose runs compile to the same program form a *batch*: every config field except the
:data:`TRACED_FIELDS` must agree (optimiser, steps, stages, pooling, normalisations, precision,
chunking), and so must the output's shape (of every stage). Within a batch

- the layer choices become per-layer weights over the *union* of the batch's layers (zero = off),
  so a layer ablation does not change the program;
- each point's targets (content features, style statistics, masks), loss weights and initial image
  are data along the batch's point axis, so points that differ only in their images share the
  program too (Gatys et al. Fig. 2: one photo, five paintings, one batch);
- the batch runs as :mod:`nstjax.batch` runs a single run (a batch of one): checkpoints, stages,
  intermediate images, resume; sharded over all devices along a ``"sweep"`` mesh axis (the point
  count padded to a multiple of the device count), with ``sweep.distributed`` over several hosts;
- when the batch would not fit in memory (:mod:`nstjax.memory`, the model single runs are
  refused by) or exceeds ``sweep.max_batch`` it runs in equal chunks, which share the program.

A zero-weighted term adds exact zeros to the loss and the gradient, so every point ends where the
same config run alone would, up to floating-point reassociation (tested: within 1e-3 relative).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from nstjax import memory, multiscale, records, vgg
from nstjax.config import RunSpec, base_config, chunk_length, validate
from nstjax.errors import ConfigError, UserError
from nstjax.losses import Objective
from nstjax.problem import check_size_for_layers, output_shape, union_objective

# The fields that points of one batch may differ in without changing the compiled program: the
# layer choices (per-layer weights over the union of layers), the loss weights and the gradient
# normalisation switch (arrays among the weights), the images and everything that only changes how
# they become targets and a starting image (per-point data), the seed, and the progress and console
# settings. Every other field is part of the batch key, so a field added later splits batches rather
# than being silently shared.
TRACED_FIELDS = ("content_layers", "content_layer_weights", "style_layers", "style_layer_weights",
                 "content_weight", "style_weight", "tv_weight", "normalize_gradients", "seed",
                 "init", "progress", "hist_layers", "hist_layer_weights", "hist_weight",
                 "content", "style", "style_blend", "style_scale", "style_resize", "content_masks",
                 "style_masks", "preserve_color", "color_space", "print_every", "output",
                 "output_bits", "style_layer_images")
# summary.csv's columns besides the swept fields and the loss terms. A swept field's column is its
# config field's name (dotted for a nested one), so none of these may be a config field's name:
# the steps done are "steps_done" because "steps" is a field (tests/test_sweep.py checks them all).
SUMMARY_COLUMNS = ("index", "dir", "status", "steps_done", "seconds", "batch")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


# ------------------------------------------------------------------------------------------------
# Expansion: config -> points


@dataclasses.dataclass
class Point:
    """One run of a sweep."""

    index: int
    name: str  # its directory under points/: "<index>_<slug>"
    values: dict  # swept field -> value, for every swept field (defaults filled in)
    overrides: dict  # the fields this point sets
    config: ml_collections.ConfigDict  # the whole run config (its own sweep field empty)
    spec: RunSpec

    @property
    def label(self) -> str:
        return ", ".join(f"{short_field(f)}={value_label(v)}" for f, v in self.values.items())


@dataclasses.dataclass
class Sweep:
    fields: tuple[str, ...]  # swept fields: the axes' fields, then those the points set
    axes: tuple[tuple[str, tuple], ...]
    points: list[Point]
    grid: tuple[str | None, str | None]  # fields for grid.png's rows and columns
    max_batch: int
    memory_gb: float
    distributed: bool


def is_sweep(cfg: ml_collections.ConfigDict) -> bool:
    """Whether ``cfg`` defines a sweep: non-empty ``sweep.axes`` or ``sweep.points``, or a
    ``content`` or ``style`` that names a folder or a glob of images."""
    s = cfg.get("sweep") if hasattr(cfg, "get") else None
    explicit = s is not None and bool(len(s.get("axes", ())) or len(s.get("points", ())))
    return explicit or any(_is_pattern(cfg.get(f)) for f in ("content", "style")
                           if hasattr(cfg, "get"))


def _is_pattern(value) -> bool:
    return isinstance(value, str) and "," not in value and not value.startswith("builtin:") and (
        any(c in value for c in "*?[") or os.path.isdir(os.path.expanduser(value)))


def images_in(pattern: str, field: str) -> tuple[str, ...]:
    """The images a folder or a glob names, sorted; raises :class:`ConfigError` for none."""
    path = os.path.expanduser(pattern)
    if os.path.isdir(path):
        found = [str(p) for p in Path(path).iterdir() if p.is_file()]
        where = f"folder {pattern}"
    else:
        found = [p for p in glob.glob(path) if os.path.isfile(p)]
        where = f"glob {pattern!r}"
    found = sorted(p for p in found if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise ConfigError(f"{field}: the {where} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return tuple(found)


def image_axes(cfg: ml_collections.ConfigDict) -> list[tuple[str, tuple]]:
    """The axes that ``content`` and ``style`` make when they name a folder or a glob."""
    out = []
    for field in ("content", "style"):
        value = cfg.get(field) if hasattr(cfg, "get") else None
        if _is_pattern(value):
            out.append((field, images_in(value, field)))
    return out


def _freeze(value):
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (dict, ml_collections.ConfigDict)):
        raise ConfigError(f"sweep values must be numbers, strings or tuples, not {dict(value)!r}")
    return value


def get_field(cfg: ml_collections.ConfigDict, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"sweep: unknown config field {path!r}")
        node = node[part]
    return node


def set_field(cfg: ml_collections.ConfigDict, path: str, value) -> None:
    if not isinstance(path, str) or not path:
        raise ConfigError(f"sweep: a field name must be a non-empty string, not {path!r}")
    if path == "sweep" or path.startswith("sweep."):
        raise ConfigError("sweep: the sweep field itself cannot be swept")
    parent, _, last = path.rpartition(".")
    node = get_field(cfg, parent) if parent else cfg
    if not isinstance(node, ml_collections.ConfigDict) or last not in node:
        raise ConfigError(f"sweep: unknown config field {path!r}")
    if isinstance(node[last], ml_collections.ConfigDict):
        raise ConfigError(f"sweep: {path!r} is a group of fields; sweep its fields ({path}.NAME)")
    try:
        node[last] = value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"sweep: cannot set {path} to {value!r}: {e}") from None


def _parse_axes(axes) -> list[tuple[str, tuple]]:
    if isinstance(axes, (dict, ml_collections.ConfigDict)):
        raise ConfigError("sweep.axes must be a tuple of (field, values) pairs, e.g. "
                          "(('style_weight', (1e2, 1e3)),), not a dict")
    out, seen = [], set()
    for entry in axes:
        if not isinstance(entry, (tuple, list)) or len(entry) != 2 or not isinstance(entry[0], str):
            raise ConfigError("sweep.axes entries must be (field, (value, ...)) pairs, not "
                              f"{entry!r}")
        field, values = entry
        if isinstance(values, (str, bytes)) or not isinstance(values, (tuple, list)):
            raise ConfigError(f"sweep axis {field!r} needs a tuple of values, not {values!r}")
        if not values:
            raise ConfigError(f"sweep axis {field!r} has no values")
        if field in seen:
            raise ConfigError(f"sweep axis {field!r} is given twice")
        seen.add(field)
        out.append((field, tuple(_freeze(v) for v in values)))
    return out


def _parse_points(points) -> list[dict]:
    if isinstance(points, (dict, ml_collections.ConfigDict)):
        raise ConfigError("sweep.points must be a tuple of dicts of field overrides, not one dict")
    out = []
    for p in points:
        if not isinstance(p, (dict, ml_collections.ConfigDict)):
            raise ConfigError(f"sweep.points entries must be dicts of field overrides, not {p!r}")
        out.append({str(k): _freeze(v) for k, v in dict(p).items()})
    return out


def expand(cfg: ml_collections.ConfigDict) -> Sweep:
    """The sweep's points, each validated as a run config; raises :class:`ConfigError`."""
    if "sweep" not in cfg:
        raise ConfigError("config has no sweep field")
    s = cfg.sweep
    extra = set(s.keys()) - set(base_config().sweep.keys())
    if extra:
        raise ConfigError(f"unknown sweep field(s): {', '.join(sorted(extra))}")
    if cfg.get("output", ""):  # one file for many points: each point's final.png is its output
        raise ConfigError("output (--output) is for a single run; a sweep writes "
                          "points/*/final.png")
    axes = _parse_axes(s.axes)
    for field, values in image_axes(cfg):
        if field in dict(axes):
            raise ConfigError(f"sweep: {field} names a folder or glob and is also a sweep axis")
        axes.append((field, values))
    listed = _parse_points(s.points)
    axis_fields = [f for f, _ in axes]
    point_fields: list[str] = []
    for p in listed:
        for f in p:
            if f in axis_fields:
                raise ConfigError(f"sweep field {f!r} is both an axis and set by a point")
            if f not in point_fields:
                point_fields.append(f)
    fields = tuple(axis_fields + point_fields)

    base = copy.deepcopy(cfg)
    base.sweep = base_config().sweep
    for field, values in image_axes(cfg):  # each point names one image
        set_field(base, field, values[0])
    combos = list(itertools.product(*(v for _, v in axes)))
    listed = listed or [{}]
    n = len(combos) * len(listed)
    width = len(str(n - 1))
    points, seen = [], {}
    for combo in combos:
        for extra_fields in listed:
            i = len(points)
            overrides = dict(zip(axis_fields, combo))
            overrides.update(extra_fields)
            c = copy.deepcopy(base)
            for f, v in overrides.items():
                set_field(c, f, v)
            values = {f: _freeze(get_field(c, f)) for f in fields}
            desc = ", ".join(f"{k}={value_label(v)}" for k, v in values.items())
            try:
                spec = validate(c)
            except ConfigError as e:
                raise ConfigError(f"sweep point {i} ({desc}): {e}") from None
            key = records.dumps(c.to_dict())
            if key in seen:
                raise ConfigError(f"sweep points {seen[key]} and {i} are the same run ({desc})")
            seen[key] = i
            points.append(Point(i, f"{i:0{width}d}_{slug(values)}", values, overrides, c, spec))

    grid = tuple(s.grid) if isinstance(s.grid, (tuple, list)) else (s.grid,)
    if len(grid) != 2 or not all(isinstance(g, str) for g in grid):
        raise ConfigError(f"sweep.grid must be two field names (rows, columns), not {s.grid!r}")
    for g in grid:
        if g and g not in fields:
            raise ConfigError(f"sweep.grid names {g!r}, which is not swept (swept: "
                              f"{', '.join(fields)})")
    row, col = (g or None for g in grid)
    if row is not None and row == col:
        raise ConfigError("sweep.grid needs two different fields")
    rest = [f for f in fields if f not in (row, col)]
    if row is None and col is None:  # the first two swept fields; a single one makes one row
        row, col = (rest[0], rest[1]) if len(rest) >= 2 else (None, rest[0] if rest else None)
    elif col is None:
        col = rest[0] if rest else None
    elif row is None:
        row = rest[0] if rest else None
    max_batch = s.max_batch
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 0:
        raise ConfigError(f"sweep.max_batch must be an integer >= 0, not {max_batch!r}")
    mem = s.memory_gb
    if (isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem)
            or mem < 0):
        raise ConfigError(f"sweep.memory_gb must be a non-negative number, not {mem!r}")
    return Sweep(fields, tuple(axes), points, (row, col), max_batch, float(mem),
                 bool(s.distributed))


# ------------------------------------------------------------------------------------------------
# Labels


def short_field(field: str) -> str:
    return field.rpartition(".")[2]


def value_label(v) -> str:
    """A short readable form of a swept value: 1e+03 -> "1000", layer lists "relu1_1+2_1+3_1"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        if not v:
            return "none"
        if all(isinstance(x, str) and x in vgg.LAYER_INDEX for x in v):
            kinds = {x[:4] for x in v}
            if len(kinds) == 1:
                return v[0] + "".join(f"+{x[4:]}" for x in v[1:])
            return "+".join(v)
        return ",".join(value_label(x) for x in v)
    if isinstance(v, str) and ("/" in v or os.sep in v):
        return Path(v).stem
    return str(v)


def slug(values: dict, limit: int = 60) -> str:
    text = "_".join(f"{short_field(f)}={value_label(v)}" for f, v in values.items()) or "base"
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "-", text).strip("-.")
    return text[:limit].rstrip("-._") or "point"


def ranges(indices: Sequence[int]) -> str:
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [i]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(out)


# ------------------------------------------------------------------------------------------------
# Batching and memory planning


def stage_shapes(spec: RunSpec) -> list[tuple[int, int]]:
    """(H, W) of the output at every stage (one for a single-scale run)."""
    return [output_shape(st) for st in multiscale.stages(spec)]


def batch_key(cfg: ml_collections.ConfigDict, shapes: Sequence[tuple[int, int]] = ()) -> str:
    """Every field that shapes the compiled program, and the output's shape at every stage, as
    canonical JSON. The objective's static settings other than its layers (which the union takes)
    are in it through their fields; the number of masked regions is added, as masks are traced."""
    d = cfg.to_dict()
    regions = len([m for m in str(d.get("content_masks", "")).split(",") if m.strip()])
    for f in TRACED_FIELDS + ("sweep",):
        d.pop(f, None)
    d["_shapes"] = [list(s) for s in shapes]
    d["_regions"] = regions
    return json.dumps(json.loads(records.dumps(d)), sort_keys=True)


def plan_chunks(n_points: int, n_devices: int, per_point: float, budget: float | None,
                max_batch: int = 0, shared: float = 0) -> tuple[int, int, str]:
    """(slots per compiled chunk, number of chunks, why it was split or "").

    Chunks are equal, so they share one compiled program; their size is a multiple of the device
    count (the last chunk padded by repeating its last point)."""
    cap, why = n_points, ""
    if 0 < max_batch < cap:
        cap, why = max_batch, f"sweep.max_batch={max_batch}"
    if budget is not None:
        per_device = max(1, int((budget - shared) // max(per_point, 1)))
        if per_device * n_devices < cap:
            cap = per_device * n_devices
            why = (f"{n_points} points need about "
                   f"{(shared + per_point * n_points / n_devices) / 2**30:.3g} GiB per device, "
                   f"{budget / 2**30:.3g} GiB is available")
    if why:  # a limit: the most slots within it, but at least one per device
        cap = max(n_devices, cap // n_devices * n_devices)
    else:
        cap = math.ceil(n_points / n_devices) * n_devices
    n_chunks = math.ceil(n_points / cap)
    size = math.ceil(math.ceil(n_points / n_chunks) / n_devices) * n_devices
    return size, n_chunks, why if n_chunks > 1 else ""


@dataclasses.dataclass
class Batch:
    """Points that share a compiled program, run in ``n_chunks`` equal chunks."""

    index: int
    points: list[Point]
    objective: Objective  # the union of the points' layers
    shape: tuple[int, int]  # output (H, W) (of the last stage)
    chunk_size: int  # slots per compiled chunk (a multiple of the devices)
    n_chunks: int
    bytes_per_point: int
    split_reason: str

    def chunks(self) -> list[list[Point]]:
        return [self.points[i * self.chunk_size:(i + 1) * self.chunk_size]
                for i in range(self.n_chunks)]

    def record(self) -> dict:
        spec = self.points[0].spec
        return {
            "index": self.index, "points": [p.index for p in self.points],
            "shape": list(self.shape), "content_layers": list(self.objective.content_layers),
            "style_layers": list(self.objective.style_layers), "optimizer": spec.optimizer.name,
            "steps": spec.steps, "chunk_size": self.chunk_size, "n_chunks": self.n_chunks,
            "bytes_per_point": self.bytes_per_point, "split_reason": self.split_reason,
            "key": json.loads(batch_key(self.points[0].config, stage_shapes(spec))),
        }


def plan(sweep: Sweep, points: Sequence[Point], n_devices: int, budget: float | None = None,
         shared: float = 0.0, rows: int = 1) -> list[Batch]:
    """Groups ``points`` into batches by :func:`batch_key` and sizes their chunks with the memory
    model (:func:`nstjax.memory.point_bytes`); ``n_devices`` is the point slots side by side (the
    devices, over ``rows`` devices per image), ``budget`` bytes per device, ``shared`` what a device
    holds whatever the batch size."""
    groups: dict[str, list[Point]] = {}
    shapes: dict[str, list] = {}
    for p in points:
        s = stage_shapes(p.spec)
        key = batch_key(p.config, s)
        groups.setdefault(key, []).append(p)
        shapes[key] = s
    out = []
    for i, (key, pts) in enumerate(groups.items()):
        obj = union_objective([p.spec for p in pts])
        shape = shapes[key][-1]
        for s in shapes[key]:
            check_size_for_layers(s, obj.layers, "the output image")
        spec = pts[0].spec
        per = memory.point_bytes(*shape, obj.layers, spec.optimizer.name,
                                 memory_size=spec.optimizer.memory_size,
                                 chunk_steps=min(chunk_length(spec), max(spec.steps, 1))) / rows
        size, n, why = plan_chunks(len(pts), n_devices, per, budget, sweep.max_batch, shared)
        out.append(Batch(i, pts, obj, shape, size, n, int(per), why))
    return out


def _programs(spec: RunSpec) -> str:
    n = chunk_length(spec)
    if spec.steps == 0 or spec.steps % n == 0 or spec.steps < n:
        return f"one compiled step program ({min(n, spec.steps)} steps each)"
    return f"two compiled step programs ({n} steps each, then {spec.steps % n})"


def describe(sweep: Sweep, batches: Sequence[Batch], done: Sequence[int], n_devices: int,
             platform: str) -> str:
    """The dry-run listing: every point, and how the points to run will be batched."""
    n = len(sweep.points)
    lines = [(f"sweep: {n} point{'s' * (n != 1)} over {' x '.join(sweep.fields) or '(no fields)'}; "
             f"{len(done)} already done, {n - len(done)} to run on {n_devices} {platform} "
             f"device{'s' * (n_devices != 1)}")]
    header = ["#", "dir"] + list(sweep.fields) + ["batch"]
    where = {p.index: b.index for b in batches for p in b.points}
    rows = [[str(p.index), f"points/{p.name}"] + [value_label(v) for v in p.values.values()]
            + ["done" if p.index in done else str(where.get(p.index, "-"))] for p in sweep.points]
    widths = [max(len(r[j]) for r in rows + [header]) for j in range(len(header))]
    for r in [header] + rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for b in batches:
        spec = b.points[0].spec
        k = len(b.points)
        pad = b.chunk_size * b.n_chunks - k
        stages = len(spec.scales) + 1
        lines.append(
            f"batch {b.index}: points {ranges([p.index for p in b.points])} ({k}), output "
            f"{b.shape[1]}x{b.shape[0]}, {spec.optimizer.name} x {spec.steps} steps"
            + (f" in the last of {stages} stages" if stages > 1 else "")
            + f"; content layers {value_label(b.objective.content_layers)}, style layers "
            f"{value_label(b.objective.style_layers)}; "
            f"{b.n_chunks} chunk{'s' * (b.n_chunks != 1)} of {b.chunk_size} on {n_devices} "
            f"device{'s' * (n_devices != 1)}" + (f" ({pad} padding)" if pad else "")
            + f", ~{b.bytes_per_point / 2**20:.0f} MiB per point; " + _programs(spec)
            + (f"; split because {b.split_reason}" if b.split_reason else ""))
    if sweep.grid[1]:
        lines.append(f"grid.png: rows {sweep.grid[0] or '-'}, columns {sweep.grid[1]}")
    return "\n".join(lines)


class NonFinitePoints(UserError):
    """Some points of a sweep stopped on a non-finite loss (the sweep's files are all written)."""
