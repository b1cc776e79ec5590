"""Sweeps: many style transfers run as one compiled program per batch of compatible points.

A config's ``sweep`` field (see :func:`nstjax.config.base_config`) names a product of axes,
``((field, (value, ...)), ...)``, and/or a list of points, ``({field: value, ...}, ...)``; the sweep
is every point of the list combined with every combination of the axes. Each point is a whole run
config, validated like a single run.

Points whose runs compile to the same program form a *batch*: every config field except the
:data:`TRACED_FIELDS` must agree (same images and sizes, pooling, normalisations, optimiser, steps,
precision, chunking). Within a batch

- the layer choices become per-layer weights over the *union* of the batch's layers (zero = off),
  so a layer ablation does not change the program, and loss weights, seeds and initial images
  become arrays with a leading sweep axis;
- the content and style targets are computed once, for the union of the layers, and shared;
- the optimisation is :func:`nstjax.optimize.run_steps_batched` (the single-run step vmapped;
  jitted here as ``_sweep_steps`` with shardings),
  compiled once and sharded over all devices along a ``"sweep"`` mesh axis (the point count padded
  to a multiple of the device count); with ``sweep.distributed`` over several hosts too;
- when the batch would not fit in memory (or exceeds ``sweep.max_batch``) it runs in equal chunks,
  which share the one compiled program.

A zero-weighted term adds exact zeros to the loss and the gradient, so every point ends where the
same config run alone would, up to floating-point reassociation (tested: within 1e-3 relative).

Files in the sweep's workdir:

- ``sweep.json``: the expanded points (their swept values and full configs) and the batches;
- ``points/<index>_<slug>/``: each point's run directory, with the files of a single run
  (``config.json``, ``metrics.jsonl``, ``final.png``, ``manifest.json``);
- ``summary.csv``: one row per point: its swept values, status, steps done, final loss and every
  term, and seconds (its share of its batch's wall time). The swept fields' columns are named by
  their config fields; no other column can be (:data:`SUMMARY_COLUMNS`, :func:`term_column`), so a
  sweep over ``content`` or ``style`` (the image paths) or ``steps`` has one column of each name;
- ``grid.png``: the final images as a labelled contact sheet, rows and columns by two swept fields;
- ``loss_curves.png``: the loss of every point over the steps.

A point whose directory holds a manifest (it finished, or stopped on a non-finite loss) is done: a
sweep started again on the same workdir runs only the others.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from nstjax import images, records, vgg
from nstjax.config import RunSpec, base_config, validate
from nstjax.errors import ConfigError, UserError
from nstjax.losses import Objective, objective_weights

# The fields that points of one batch may differ in without changing the compiled program: the
# layer choices (per-layer weights over the union of layers), the loss weights (arrays), the seed
# and the initial image (inputs), and the progress bar. Every other field is part of the batch key,
# so a field added later splits batches rather than being silently shared.
TRACED_FIELDS = ("content_layers", "content_layer_weights", "style_layers", "style_layer_weights",
                 "content_weight", "style_weight", "tv_weight", "seed", "init", "progress",
                 "hist_layers", "hist_layer_weights", "hist_weight")
SWEEP_FILES = ("sweep.json", "summary.csv", "grid.png", "loss_curves.png")
# summary.csv's columns besides the swept fields and the loss terms. A swept field's column is its
# config field's name (dotted for a nested one), so none of these may be a config field's name:
# the steps done are "steps_done" because "steps" is a field (tests/test_sweep.py checks them all).
SUMMARY_COLUMNS = ("index", "dir", "status", "steps_done", "seconds", "batch")
POINTS_DIR = "points"
MEMORY_FRACTION = 0.7  # of the memory a device reports free, for planning batches


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
    """Whether ``cfg`` defines a sweep (non-empty ``sweep.axes`` or ``sweep.points``)."""
    s = cfg.get("sweep") if hasattr(cfg, "get") else None
    return s is not None and bool(len(s.get("axes", ())) or len(s.get("points", ())))


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
            raise ConfigError(f"sweep.axes entries must be (field, (value, ...)) pairs, not {entry!r}")
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
        raise ConfigError("output (--output) is for a single run; a sweep writes points/*/final.png")
    axes = _parse_axes(s.axes)
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
            if spec.scales:
                raise ConfigError(f"sweep point {i} ({desc}): multi-scale runs (config.scales) are not "
                                  "supported in sweeps yet; sweep single-scale points, or run each point "
                                  "with nstjax alone")
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
            raise ConfigError(f"sweep.grid names {g!r}, which is not swept (swept: {', '.join(fields)})")
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
    if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not math.isfinite(mem) or mem < 0:
        raise ConfigError(f"sweep.memory_gb must be a non-negative number, not {mem!r}")
    return Sweep(fields, tuple(axes), points, (row, col), max_batch, float(mem), bool(s.distributed))


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


def _ranges(indices: Sequence[int]) -> str:
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


def batch_key(cfg: ml_collections.ConfigDict) -> str:
    """Every field that shapes the compiled program or the targets, as canonical JSON."""
    d = cfg.to_dict()
    for f in TRACED_FIELDS + ("sweep",):
        d.pop(f, None)
    return json.dumps(json.loads(records.dumps(d)), sort_keys=True)


def union_objective(specs: Sequence[RunSpec]) -> Objective:
    """One objective over every layer any of ``specs`` uses (their static settings agree)."""
    o = specs[0].objective
    order = vgg.LAYER_INDEX.__getitem__
    content = sorted({l for s in specs for l in s.objective.content_layers}, key=order)
    style = sorted({l for s in specs for l in s.objective.style_layers}, key=order)
    hist = sorted({l for s in specs for l in s.objective.hist_layers}, key=order)
    # The other static fields (pooling, norms, style statistic, regions) are the same in a batch.
    return dataclasses.replace(o, content_layers=tuple(content), style_layers=tuple(style),
                               hist_layers=tuple(hist))


def point_weights(union: Objective, spec: RunSpec) -> dict:
    """A point's traced weights over the union's layers: its own layer weights, zero elsewhere."""
    w = objective_weights(spec.objective, spec.content_weight, spec.style_weight, spec.tv_weight,
                          spec.content_layer_weights or None, spec.style_layer_weights or None,
                          hist_weight=spec.hist_weight, hist_layer_weights=spec.hist_layer_weights or None)
    f32 = lambda x: np.float32(np.asarray(x))
    out = {
        "content_weight": f32(w["content_weight"]), "style_weight": f32(w["style_weight"]),
        "tv_weight": f32(w["tv_weight"]),
        "content_layers": {l: f32(w["content_layers"].get(l, 0.0)) for l in union.content_layers},
        "style_layers": {l: f32(w["style_layers"].get(l, 0.0)) for l in union.style_layers},
    }
    if union.hist_layers:  # a point without histogram layers has them all at weight zero
        out["hist_weight"] = f32(w.get("hist_weight", 0.0))
        out["hist_layers"] = {l: f32(w.get("hist_layers", {}).get(l, 0.0)) for l in union.hist_layers}
    return out


def output_shape(spec: RunSpec) -> tuple[int, int]:
    """(H, W) of the output image, as :func:`nstjax.run.load_problem` sizes it."""
    pil = images.load_pil(spec.content)
    w, h = images.fit_size(pil.width, pil.height, spec.size)
    return h, w


VGG_PARAM_BYTES = 4 * sum(9 * cin * cout + cout for cin, cout in
                          ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256)) + ((256, 256),) * 3
                          + ((256, 512),) + ((512, 512),) * 7)


def bytes_per_point(shape: tuple[int, int], obj: Objective, opt_name: str, memory_size: int) -> int:
    """A rough estimate of one point's working memory: the VGG activations up to the deepest layer
    (every conv, ReLU and pool output, x2), the image-sized optimiser state, and the Gram matrices.
    Calibrated on XLA:CPU with sweeps of 1 and 8 points, 10-step chunks, relu5_1: peak RSS grew by
    28 MB per point at 128x96 and 124 MB at 256x192, 0.8-0.9 of that activation count; the factor 2
    leaves room. (Before the backward pass kept its masks as bits and bytes, nstjax/vgg.py, it grew
    by ~330 MiB per point at 128 px and the factor was 12.)"""
    h, w = shape
    last = vgg.LAYER_INDEX[vgg.deepest(obj.layers)]
    acts = sum(max(1, h // vgg.layer_stride(n)) * max(1, w // vgg.layer_stride(n)) * vgg.layer_channels(n)
               for n in vgg.LAYERS[: last + 1])
    copies = {"adam": 6, "lbfgs": 2 * memory_size + 8}.get(opt_name, 2 * memory_size + 12)
    grams = sum(vgg.layer_channels(l) ** 2 for l in obj.style_layers)
    return 4 * (2 * acts + copies * h * w * 3 + 3 * grams)


def shared_bytes(shape: tuple[int, int], obj: Objective) -> int:
    """Params and targets, held once per device."""
    h, w = shape
    content = sum(max(1, h // vgg.layer_stride(l)) * max(1, w // vgg.layer_stride(l)) * vgg.layer_channels(l)
                  for l in obj.content_layers)
    grams = sum(vgg.layer_channels(l) ** 2 for l in obj.style_layers)
    return VGG_PARAM_BYTES + 4 * (content + grams)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory_budget(memory_gb: float = 0.0) -> tuple[float | None, str]:
    """(bytes per device to plan with, where the number came from)."""
    if memory_gb > 0:
        return memory_gb * 2**30, "sweep.memory_gb"
    dev = jax.local_devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:  # backends without memory stats raise or return None
        stats = None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return MEMORY_FRACTION * free, f"{dev.platform} memory free"
    avail = _meminfo_available()
    if avail is None:
        return None, "unknown"
    return MEMORY_FRACTION * avail / max(1, jax.local_device_count()), "host memory available"


def plan_chunks(n_points: int, n_devices: int, per_point: int, budget: float | None,
                max_batch: int = 0, shared: int = 0) -> tuple[int, int, str]:
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
            why = (f"{n_points} points need about {(shared + per_point * n_points / n_devices) / 2**30:.3g} GiB "
                   f"per device, {budget / 2**30:.3g} GiB is available")
    if why:  # a limit: the most slots within it, but at least one per device
        cap = max(n_devices, cap // n_devices * n_devices)
    else:
        cap = math.ceil(n_points / n_devices) * n_devices
    n_chunks = math.ceil(n_points / cap)
    size = math.ceil(math.ceil(n_points / n_chunks) / n_devices) * n_devices
    return size, n_chunks, why if n_chunks > 1 else ""


@dataclasses.dataclass
class Batch:
    index: int
    points: list[Point]
    objective: Objective  # the union of the points' layers
    shape: tuple[int, int]  # output (H, W)
    chunk_size: int  # slots per compiled chunk (a multiple of the devices)
    n_chunks: int
    bytes_per_point: int
    split_reason: str

    def chunks(self) -> list[list[Point]]:
        return [self.points[i * self.chunk_size:(i + 1) * self.chunk_size] for i in range(self.n_chunks)]

    def record(self) -> dict:
        spec = self.points[0].spec
        return {
            "index": self.index, "points": [p.index for p in self.points],
            "shape": list(self.shape), "content_layers": list(self.objective.content_layers),
            "style_layers": list(self.objective.style_layers), "optimizer": spec.optimizer.name,
            "steps": spec.steps, "chunk_size": self.chunk_size, "n_chunks": self.n_chunks,
            "bytes_per_point": self.bytes_per_point, "split_reason": self.split_reason,
            "key": json.loads(batch_key(self.points[0].config)),
        }


def plan(sweep: Sweep, points: Sequence[Point], n_devices: int,
         budget: float | None = None) -> list[Batch]:
    """Groups ``points`` into batches by :func:`batch_key` and sizes their chunks."""
    groups: dict[str, list[Point]] = {}
    for p in points:
        groups.setdefault(batch_key(p.config), []).append(p)
    from nstjax.run import check_size_for_layers

    out = []
    for i, pts in enumerate(groups.values()):
        obj = union_objective([p.spec for p in pts])
        shape = output_shape(pts[0].spec)
        check_size_for_layers(shape, obj.layers, "the output image")
        opt = pts[0].spec.optimizer
        per = bytes_per_point(shape, obj, opt.name, opt.memory_size)
        size, n, why = plan_chunks(len(pts), n_devices, per, budget, sweep.max_batch,
                                   shared_bytes(shape, obj))
        out.append(Batch(i, pts, obj, shape, size, n, per, why))
    return out


def _programs(spec: RunSpec) -> str:
    from nstjax.run import chunk_length

    n = chunk_length(spec)
    if spec.steps == 0 or spec.steps % n == 0 or spec.steps < n:
        return f"one compiled step program ({min(n, spec.steps)} steps each)"
    return f"two compiled step programs ({n} steps each, then {spec.steps % n})"


def describe(sweep: Sweep, batches: Sequence[Batch], done: Sequence[int], n_devices: int,
             platform: str) -> str:
    """The dry-run listing: every point, and how the points to run will be batched."""
    n = len(sweep.points)
    lines = [f"sweep: {n} point{'s' * (n != 1)} over {' x '.join(sweep.fields) or '(no fields)'}; "
             f"{len(done)} already done, {n - len(done)} to run on {n_devices} {platform} "
             f"device{'s' * (n_devices != 1)}"]
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
        lines.append(
            f"batch {b.index}: points {_ranges([p.index for p in b.points])} ({k}), output "
            f"{b.shape[1]}x{b.shape[0]}, {spec.optimizer.name} x {spec.steps} steps; content layers "
            f"{value_label(b.objective.content_layers)}, style layers {value_label(b.objective.style_layers)}; "
            f"{b.n_chunks} chunk{'s' * (b.n_chunks != 1)} of {b.chunk_size} on {n_devices} "
            f"device{'s' * (n_devices != 1)}" + (f" ({pad} padding)" if pad else "")
            + f", ~{b.bytes_per_point / 2**20:.0f} MiB per point; " + _programs(spec)
            + (f"; split because {b.split_reason}" if b.split_reason else ""))
    if sweep.grid[1]:
        lines.append(f"grid.png: rows {sweep.grid[0] or '-'}, columns {sweep.grid[1]}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Devices


class _Devices:
    """The ``"sweep"`` mesh over every device (of every host), and moving data onto and off it."""

    def __init__(self, devices: Sequence | None = None):
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.devices = list(devices) if devices else jax.devices()
        self.count = len(self.devices)
        self.mesh = Mesh(np.array(self.devices), ("sweep",))
        self.batched = NamedSharding(self.mesh, PartitionSpec("sweep"))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.multihost = jax.process_count() > 1
        self.steps, self.init_states, self.evaluate = _sharded_programs(self.mesh)

    @staticmethod
    def _put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def shard(self, tree):
        """Host arrays with a leading sweep axis -> global arrays split over the devices."""
        return jax.tree.map(lambda x: self._put(x, self.batched), tree)

    def replicate(self, tree):
        return jax.tree.map(lambda x: self._put(x, self.replicated), tree)

    def host(self, x) -> np.ndarray:
        if self.multihost:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """Process 0's value of ``x`` on every process (what it read from the workdir)."""
        if not self.multihost:
            return x
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.broadcast_one_to_all(x))


_PROGRAMS: dict = {}


# Positional forms of the batched core (jit takes no keyword arguments once shardings are given).
def _sweep_steps(params, targets, weights, images, states, obj, spec, n_steps, precision):
    from nstjax.optimize import _batched_steps

    return _batched_steps(params, targets, weights, images, states, obj=obj, spec=spec,
                          n_steps=n_steps, precision=precision)


def _sweep_init(images, spec):
    from nstjax.optimize import _init_states_batched

    return _init_states_batched(images, spec=spec)


def _sweep_evaluate(params, targets, weights, images, obj, precision):
    from nstjax.optimize import _evaluate_batched

    return _evaluate_batched(params, targets, weights, images, obj=obj, precision=precision)


def _sharded_programs(mesh):
    """The batched step, state init and evaluation, jitted with the batch split along the mesh's
    ``"sweep"`` axis and the params and targets replicated. Explicit out_shardings keep every
    chunk's outputs laid out like its inputs, so all chunks of a batch hit one compiled program.
    Cached per mesh, so later sweeps in the same process reuse the compiled programs."""
    from jax.sharding import NamedSharding, PartitionSpec

    key = (tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
    if key not in _PROGRAMS:
        split, same = NamedSharding(mesh, PartitionSpec("sweep")), NamedSharding(mesh, PartitionSpec())
        steps = jax.jit(_sweep_steps, static_argnums=(5, 6, 7, 8),
                        in_shardings=(same, same, split, split, split), out_shardings=split)
        init = jax.jit(_sweep_init, static_argnums=(1,), in_shardings=(split,), out_shardings=split)
        evaluate = jax.jit(_sweep_evaluate, static_argnums=(4, 5), in_shardings=(same, same, split, split),
                           out_shardings=split)
        _PROGRAMS[key] = (
            lambda p, t, w, x, s, *, obj, spec, n_steps, precision: steps(p, t, w, x, s, obj, spec, n_steps, precision),
            lambda x, *, spec: init(x, spec),
            lambda p, t, w, x, *, obj, precision: evaluate(p, t, w, x, obj, precision),
        )
    return _PROGRAMS[key]


def _init_distributed() -> None:
    try:
        jax.distributed.initialize()
    except RuntimeError as e:
        if "already" not in str(e):
            raise UserError(f"sweep.distributed: jax.distributed.initialize() failed: {e}") from None
    except ValueError as e:
        raise UserError(f"sweep.distributed: jax.distributed.initialize() failed: {e}") from None


# ------------------------------------------------------------------------------------------------
# The workdir


def _config_record(cfg: ml_collections.ConfigDict) -> dict:
    d = json.loads(records.dumps(cfg.to_dict()))
    d.pop("progress", None)
    return d


def point_dir(workdir: Path, p: Point) -> Path:
    return workdir / POINTS_DIR / p.name


def is_done(directory: Path) -> bool:
    """A point is done when its manifest (written last) says it finished or stopped."""
    try:
        m = records.read_json(directory / "manifest.json")
    except (OSError, ValueError):
        return False
    status = str(m.get("status", "")) if isinstance(m, dict) else ""
    return (status == "finished" or status.startswith("stopped")) and (directory / "final.png").is_file()


def _prepare_workdir(workdir: Path, sweep: Sweep, overwrite: bool) -> None:
    from nstjax.run import OUTPUT_FILES

    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"workdir {workdir} is not writable")
    single = [f for f in OUTPUT_FILES if (workdir / f).exists()]
    if single and not overwrite:
        raise UserError(f"workdir {workdir} holds a single run ({', '.join(single)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    if overwrite:
        for f in OUTPUT_FILES + SWEEP_FILES:
            (workdir / f).unlink(missing_ok=True)
        shutil.rmtree(workdir / POINTS_DIR, ignore_errors=True)
        return
    if (workdir / "sweep.json").exists():
        try:
            old = records.read_json(workdir / "sweep.json")
            old_points = [q["config"] for q in old["points"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"workdir {workdir} has an unreadable sweep.json; pass --overwrite to "
                            "start the sweep afresh") from None
        new_points = [_config_record(p.config) for p in sweep.points]
        if old_points != new_points:
            raise UserError(f"workdir {workdir} holds a different sweep (sweep.json); pass --overwrite "
                            "to replace it or choose another --workdir")


def _clean_point_dir(d: Path) -> None:
    """Removes what a killed run of this point left, so it starts again from scratch."""
    from nstjax.run import OUTPUT_FILES

    for f in OUTPUT_FILES:
        (d / f).unlink(missing_ok=True)
    shutil.rmtree(d / "images", ignore_errors=True)


def _sweep_record(sweep: Sweep, n_devices: int) -> dict:
    return {
        "fields": list(sweep.fields),
        "axes": [[f, list(v)] for f, v in sweep.axes],
        "grid": list(sweep.grid),
        "points": [{"index": p.index, "dir": f"{POINTS_DIR}/{p.name}", "values": p.values,
                    "overrides": p.overrides, "config": _config_record(p.config)} for p in sweep.points],
        "devices": n_devices,
        "processes": jax.process_count(),
        "invocations": [],
    }


# ------------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class _Context:
    devices: _Devices
    workdir: Path
    writer: bool
    params: Any  # replicated
    weights_info: Any
    say: Callable[[str], None]
    progress: bool


def _optimise_chunk(ctx: _Context, batch: Batch, pts: list[Point], problem, targets_r,
                    setup_share: float, t_sweep: float) -> list[dict]:
    """Runs one chunk of a batch's points together; writes each point's files. Returns summaries."""
    from nstjax.run import Problem, _Progress, build_manifest, chunk_length, initial_image

    t_chunk = time.time()
    spec0 = pts[0].spec
    obj, opt = batch.objective, spec0.optimizer
    k = len(pts)
    slots = pts + [pts[-1]] * (batch.chunk_size - k)  # padding: repeats of the last point
    own_weights = [point_weights(obj, p.spec) for p in pts]
    weights = jax.tree.map(lambda *xs: np.stack(xs), *(own_weights + own_weights[-1:] * (len(slots) - k)))
    inits = [np.asarray(initial_image(p.spec, problem.content, problem.styles)) for p in pts]
    x = ctx.devices.shard(np.stack(inits + inits[-1:] * (len(slots) - k)))
    w = ctx.devices.shard(weights)
    state = ctx.devices.init_states(x, spec=opt)
    names = [p.spec.objective.term_names for p in pts]
    dirs = [point_dir(ctx.workdir, p) for p in pts]
    logs = []
    if ctx.writer:
        for p, d in zip(pts, dirs):
            _clean_point_dir(d)
            records.write_json(d / "config.json", p.config.to_dict())
            logs.append(records.MetricsLog(d / "metrics.jsonl"))
    n_chunk = chunk_length(spec0)
    steps, log_every, save_every = spec0.steps, spec0.log_every, spec0.save_every
    step, first_s = 0, None
    stopped: list[tuple[int, dict] | None] = [None] * k
    bar = _Progress(steps, ctx.progress)
    t_start = time.time()
    t_prev = t_start
    try:
        while step < steps:
            n = min(n_chunk, steps - step)
            t0 = time.time()
            x, state, terms, done, ok = ctx.devices.steps(
                ctx.params, targets_r, w, x, state, obj=obj, spec=opt, n_steps=n,
                precision=spec0.precision)
            terms_h = {key: ctx.devices.host(v) for key, v in terms.items()}
            done_h, ok_h = ctx.devices.host(done), ctx.devices.host(ok)
            t1 = time.time()
            first_s = t1 - t0 if first_s is None else first_s
            rate = n / max(t1 - t0, 1e-9)
            for j in range(k):
                if stopped[j] is not None:
                    continue
                d = int(done_h[j])
                if ctx.writer:
                    for i in range(d):
                        if (step + i) % log_every == 0:
                            logs[j].write({"step": step + i, **{t: float(terms_h[t][j, i]) for t in names[j]},
                                           "elapsed_s": t_prev - t_start, "steps_per_s": rate})
                if not bool(ok_h[j]):
                    stopped[j] = (step + d, {t: float(terms_h[t][j, d]) for t in names[j]})
            step += n
            t_prev = t1
            running = [j for j in range(k) if stopped[j] is None]
            bar.update(n, min((float(terms_h["loss"][j, n - 1]) for j in running), default=math.nan), rate)
            if not running:
                break
            if ctx.writer and save_every and step % save_every == 0 and step < steps:
                x_h = ctx.devices.host(x)
                for j in running:
                    images.save_png(dirs[j] / "images" / f"step_{step:06d}.png", problem.output(x_h[j]))
        final = {key: ctx.devices.host(v) for key, v in
                 ctx.devices.evaluate(ctx.params, targets_r, w, x, obj=obj, precision=spec0.precision).items()}
        x_h = ctx.devices.host(x)
        out = []
        for j, p in enumerate(pts):
            steps_done, bad = stopped[j] if stopped[j] is not None else (step, None)
            terms = {t: float(final[t][j]) for t in names[j]}
            if ctx.writer and bad is None:  # as a single run: a last line with the final terms
                logs[j].write({"step": steps_done, **terms, "elapsed_s": time.time() - t_start,
                               "steps_per_s": None})
            out.append((p, {"image": problem.output(x_h[j]), "steps_done": steps_done, "final_terms": terms,
                            "first_step_s": first_s, "bad_terms": bad}))
    finally:
        bar.close()
        for log in logs:
            log.close()
    wall = time.time() - t_chunk
    results = []
    for j, (p, summary) in enumerate(out):
        seconds = setup_share + wall / k
        record = {"index": p.index, "name": p.name, "values": p.values,
                  "status": "finished" if summary["bad_terms"] is None else "stopped: non-finite loss",
                  "steps": summary["steps_done"], "final": summary["final_terms"], "seconds": seconds,
                  "image": summary["image"], "batch": batch.index}
        if ctx.writer:
            images.save_png(dirs[j] / "final.png", summary["image"])
            prob = Problem(p.spec, None, ctx.weights_info, problem.content, problem.styles,
                           None, own_weights[j], None, inputs=problem.inputs)
            manifest = build_manifest(p.config, prob, summary, timing={
                "wall_s": seconds, "setup_s": setup_share, "optimise_s": wall / k,
                "first_chunk_s": first_s, "batch_wall_s": wall, "since_sweep_start_s": time.time() - t_sweep})
            manifest["sweep"] = {"index": p.index, "values": p.values, "batch": batch.index,
                                 "points_in_chunk": k, "chunk_slots": batch.chunk_size,
                                 "devices": ctx.devices.count,
                                 "union_content_layers": list(obj.content_layers),
                                 "union_style_layers": list(obj.style_layers)}
            records.write_json(dirs[j] / "manifest.json", manifest)  # last: marks the point done
        if summary["bad_terms"] is not None:
            from nstjax.run import describe_bad_terms

            ctx.say(f"point {p.index} ({p.label}) stopped: "
                    + describe_bad_terms(summary["bad_terms"], summary["steps_done"]))
        results.append(record)
    return results


def run_sweep(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, **kwargs) -> dict:
    """:func:`_run_sweep` holding the workdir's lock, as a single run does, so two processes never
    write one sweep (multi-host sweeps, whose hosts share the workdir, go without it)."""
    from nstjax.run import workdir_lock

    workdir = Path(workdir)
    distributed = bool(cfg.get("sweep", {}).get("distributed", False))
    if not distributed:
        with contextlib.suppress(OSError):
            workdir.mkdir(parents=True, exist_ok=True)
    if distributed or not workdir.is_dir():  # an unusable workdir: _run_sweep says why
        return _run_sweep(cfg, workdir, **kwargs)
    with workdir_lock(workdir):
        return _run_sweep(cfg, workdir, **kwargs)


def _run_sweep(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, overwrite: bool = False,
              params=None, weights_info=None, say: Callable[[str], None] | None = None,
              write_figures: bool = True, devices: Sequence | None = None) -> dict:
    """Runs every point of ``cfg``'s sweep not yet done in ``workdir``; writes all the files.

    Returns ``{"points": [record per point run now], "skipped": [indices already done],
    "batches": [batch records], "wall_s": ..., "stopped": [indices of all points, of this
    invocation or an earlier one, stopped on a non-finite loss (on the writing process)]}``; each record holds the point's final ``image``
    (float32 (H, W, 3)), ``final`` terms, ``steps``, ``status`` and ``seconds``. ``devices``
    (default: all of them, on every host) are the devices the sweep axis is split over.
    """
    t_start = time.time()
    say = say or (lambda m: print(f"nstjax: {m}", flush=True))
    sweep = expand(cfg)
    if sweep.distributed:
        _init_distributed()
    devs = _Devices(devices)
    writer = jax.process_index() == 0
    workdir = Path(workdir)
    if writer:
        _prepare_workdir(workdir, sweep, overwrite)
    done_mask = np.array([writer and is_done(point_dir(workdir, p)) for p in sweep.points], bool)
    done_mask = devs.broadcast(done_mask)
    skipped = [p.index for p in sweep.points if done_mask[p.index]]
    todo = [p for p in sweep.points if not done_mask[p.index]]
    budget, _ = device_memory_budget(sweep.memory_gb)
    batches = plan(sweep, todo, devs.count, budget)

    record = _sweep_record(sweep, devs.count)
    if writer and (workdir / "sweep.json").exists():
        try:
            record["invocations"] = records.read_json(workdir / "sweep.json").get("invocations", [])
        except (OSError, ValueError, AttributeError):
            pass
    invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": skipped,
                  "batches": [b.record() for b in batches], "status": "running"}
    record["invocations"].append(invocation)
    if writer:
        records.write_json(workdir / "sweep.json", record)
    say(f"sweep: {len(sweep.points)} points, {len(skipped)} already done, {len(todo)} to run in "
        f"{len(batches)} batch{'es' * (len(batches) != 1)} on {devs.count} device{'s' * (devs.count != 1)}")

    results: list[dict] = []
    if todo:
        from nstjax.run import load_problem
        from nstjax.weights import load_vgg19_with_info

        if params is None:
            params, weights_info = load_vgg19_with_info(str(todo[0].config.weights_path) or None)
        ctx = _Context(devs, workdir, writer, devs.replicate(params), weights_info, say,
                       bool(cfg.get("progress", False)))
        for b in batches:
            t_b = time.time()
            spec = dataclasses.replace(b.points[0].spec, objective=b.objective, init="gray",
                                       content_layer_weights=(), style_layer_weights=())
            problem = load_problem(spec, params, weights_info)  # the targets, once per batch
            targets_r = devs.replicate(problem.targets)
            setup_share = (time.time() - t_b) / len(b.points)
            if b.split_reason:
                say(f"batch {b.index} runs its {len(b.points)} points in {b.n_chunks} chunks of "
                    f"{b.chunk_size}, one compiled program ({b.split_reason})")
            for c, pts in enumerate(b.chunks()):
                t_c = time.time()
                results += _optimise_chunk(ctx, b, pts, problem, targets_r, setup_share, t_start)
                say(f"batch {b.index}" + (f" chunk {c + 1}/{b.n_chunks}" if b.n_chunks > 1 else "")
                    + f": points {_ranges([p.index for p in pts])} done in {time.time() - t_c:.1f} s")
    wall = time.time() - t_start
    invocation.update(status="finished", wall_s=wall, ran=[r["index"] for r in results])
    stopped = []
    if writer:
        records.write_json(workdir / "sweep.json", record)
        stopped = write_outputs(workdir, sweep, figures=write_figures)
    return {"points": results, "skipped": skipped, "batches": [b.record() for b in batches],
            "wall_s": wall, "sweep": sweep, "stopped": stopped}


# ------------------------------------------------------------------------------------------------
# Sweep-level outputs, from the point directories (so a resumed sweep's outputs are complete)


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
    :func:`term_column`), ``seconds, batch``. No two columns share a name."""
    terms: list[str] = []
    for r in rows:
        for t in r["manifest"].get("final", {}):
            if t not in terms:
                terms.append(t)
    main = [t for t in ("loss", "content", "style", "tv", "hist") if t in terms]
    layer_terms = sorted((t for t in terms if t not in main),
                         key=lambda t: (t.split("/")[0], vgg.LAYER_INDEX.get(t.partition("/")[2], 99)))
    header = ["index", "dir", *sweep.fields, "status", "steps_done",
              *(term_column(t) for t in main + layer_terms), "seconds", "batch"]
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
    cells = []
    for r in rows:
        p, m = r["point"], r["manifest"]
        loss = m.get("final", {}).get("loss")
        status = m.get("status", "")
        caption = f"#{p.index}  loss {float(loss):.3g}" if status == "finished" and loss is not None \
            else f"#{p.index}  stopped at step {m.get('steps')}"
        others = [f for f in sweep.fields if f not in (row_f, col_f)]
        row_label = ", ".join(([value_label(p.values[row_f])] if row_f else [])
                              + [f"{short_field(f)}={value_label(p.values[f])}" for f in others])
        col_label = value_label(p.values[col_f]) if col_f else ""
        cells.append(plots.Cell(row_label, col_label, images.to_uint8(images.load_image(r["final_png"])),
                                caption, status == "finished"))
    others = [short_field(f) for f in sweep.fields if f not in (row_f, col_f)]
    row_title = ", ".join(([short_field(row_f)] if row_f else []) + others)
    plots.save_grid(workdir / "grid.png", cells, row_title=row_title,
                    col_title=short_field(col_f) if col_f else "",
                    title=f"{workdir.name}: {len(sweep.points)} points")
    plots.save_loss_curves(workdir / "loss_curves.png",
                           [(r["point"].label or r["point"].name, r["curve"]) for r in rows],
                           title=f"{workdir.name}: loss of every point")
    return stopped


# ------------------------------------------------------------------------------------------------
# The command line


def main(cfg: ml_collections.ConfigDict, workdir: str | None, *, overwrite: bool = False,
         dry_run: bool = False) -> int:
    """The CLI's sweep path: a dry-run listing, or the sweep. Raises :class:`UserError`."""
    if not is_sweep(cfg):
        spec = validate(cfg)
        if dry_run:
            from nstjax import multiscale

            total = sum(st.steps for st in multiscale.stages(spec))
            print(f"no sweep in this config: one run, {total} steps "
                  f"(add sweep.axes or sweep.points to sweep)")
            return 0
    sweep = expand(cfg)
    if dry_run:
        done = [p.index for p in sweep.points if workdir and is_done(point_dir(Path(workdir), p))]
        budget, _ = device_memory_budget(sweep.memory_gb)
        devs = jax.devices()
        batches = plan(sweep, [p for p in sweep.points if p.index not in done], len(devs), budget)
        print(describe(sweep, batches, done, len(devs), devs[0].platform))
        return 0
    if not workdir:
        raise UserError("--workdir is required (the directory for the sweep's outputs)")
    out = run_sweep(cfg, workdir, overwrite=overwrite)
    print(f"nstjax: sweep wrote {Path(workdir) / 'summary.csv'} and grid.png: {len(out['points'])} points "
          f"run, {len(out['skipped'])} already done, {out['wall_s']:.1f} s", flush=True)
    # Every point's status, those finished in earlier invocations too (only the writing process
    # reads them): a resumed sweep whose stopped points were run before exits as the first did.
    stopped = out["stopped"]
    if stopped:
        raise NonFinitePoints(f"sweep point{'s' * (len(stopped) > 1)} {_ranges(stopped)} stopped on a "
                              f"non-finite loss (last good images kept; the other points finished; "
                              f"see summary.csv)")
    return 0


class NonFinitePoints(UserError):
    """Some points of a sweep stopped on a non-finite loss (the sweep's files are all written)."""
