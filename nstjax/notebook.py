"""Style transfer from a notebook: arrays in, arrays out, no workdir.

    import nstjax
    image = nstjax.stylize(photo, painting, size=384, steps=200)   # float32 (H, W, 3) in 0..255

``photo`` and ``painting`` may be arrays ((H, W, 3), uint8 in 0..255 or float in 0..1 or 0..255),
PIL images or paths; a list of paintings is a blend (``style_blend=(0.7, 0.3)``). Every config field
is a keyword (``style_layers=("relu1_1", "relu2_1")``; a group as a dict,
``optimizer={"name": "adam", "learning_rate": 5.0}``). It is the engine every run uses
(nstjax/batch.py, a batch of one), writing nothing unless ``workdir`` is given: then it is a run
with all its files (its images written to ``workdir/inputs/`` first, so the run can be resumed and
replayed). The VGG-19 weights are loaded once per process, and a second call of the same shapes
reuses the compiled programs. Bad input raises the one-line :class:`nstjax.errors.UserError` the
command line prints.

:func:`stylize_sweep` runs a sweep (``axes``, ``points``) the same way, on the sweep engine (one
compiled program per batch), and returns the points' images and summary rows.
"""

from __future__ import annotations

import copy
import csv
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from nstjax import images
from nstjax.errors import ConfigError

_WEIGHTS: dict = {}  # weights_path -> (params, info): loaded once per process


def _weights(path: str):
    from nstjax.weights import load_vgg19_with_info

    if path not in _WEIGHTS:
        _WEIGHTS[path] = load_vgg19_with_info(path or None)
    return _WEIGHTS[path]


def _set(cfg: ml_collections.ConfigDict, field: str, value) -> None:
    from nstjax.sweep import set_field

    if isinstance(value, dict) and isinstance(cfg.get(field), ml_collections.ConfigDict):
        for k, v in value.items():
            set_field(cfg, f"{field}.{k}", v)
    else:
        set_field(cfg, field, tuple(value) if isinstance(value, list) else value)


def make_config(base: ml_collections.ConfigDict | None = None,
                **overrides) -> ml_collections.ConfigDict:
    """``base`` (default: :func:`nstjax.config.base_config`, without a progress bar) with the
    keyword overrides applied; an unknown field raises :class:`ConfigError`."""
    from nstjax.config import base_config

    cfg = copy.deepcopy(base) if base is not None else base_config()
    if base is None:
        cfg.progress = False
    for field, value in overrides.items():
        _set(cfg, field, value)
    return cfg


def _styles(style) -> list:
    if isinstance(style, (list, tuple)) and not (len(style) and np.isscalar(style[0])):
        return list(style)
    return [style]


def stylize(content, style, *, workdir: str | os.PathLike | None = None, return_terms: bool = False,
            config: ml_collections.ConfigDict | None = None, **overrides) -> Any:
    """The styled image, float32 (H, W, 3) RGB in 0..255; with ``return_terms``, also the list of
    metrics records (``step``, ``loss``, every term; as ``metrics.jsonl`` holds them). See the
    module doc."""
    import jax

    from nstjax import multiscale
    from nstjax.batch import Context, Job, run_batch
    from nstjax.config import validate
    from nstjax.errors import UserError
    from nstjax.problem import check_problem
    from nstjax.programs import Devices, Programs

    cfg = make_config(config, **overrides)
    styles = _styles(style)
    with (images.in_memory([content], "content") as (c_name,),
          images.in_memory(styles, "style") as s_names):
        if workdir is not None:
            return _stylize_into(Path(workdir), cfg, content, styles, return_terms)
        cfg.content, cfg.style = c_name, ",".join(s_names)
        spec = validate(cfg)
        check_problem(multiscale.stages(spec)[-1])
        from nstjax.network import load_network

        plain = _weights(str(cfg.weights_path))
        params, info = load_network(spec.network, None, *plain)
        records: list[dict] = []
        ctx = Context(Programs(Devices(jax.local_devices()[:1])), params, info, lambda m: None,
                      progress=bool(cfg.progress), writer=False, judge_params=plain[0])
        job = Job(cfg, spec, Path("."), on_record=records.append)
        outcome = run_batch([job], ctx, spec.objective).outcomes[0]
        if outcome.result.bad_terms is not None:
            from nstjax.run import describe_bad_terms

            raise UserError(describe_bad_terms(outcome.result.bad_terms, outcome.result.steps_done))
    image = np.asarray(outcome.result.image, np.float32)
    return (image, records) if return_terms else image


def _stylize_into(workdir: Path, cfg, content, styles: list, return_terms: bool):
    """A run with its files: array inputs written to ``workdir/inputs/`` first."""
    from nstjax import records as rec
    from nstjax.run import run
    from nstjax.workdir import prepare_dir

    prepare_dir(workdir)

    def path_of(image, name: str) -> str:
        if isinstance(image, (str, os.PathLike)):
            return str(image)
        out = workdir / "inputs" / f"{name}.png"
        images.save_png(out, images.to_array(images.from_any(image, name)))
        return str(out)

    cfg.content = path_of(content, "content")
    cfg.style = ",".join(path_of(s, f"style_{i + 1}") for i, s in enumerate(styles))
    params, info = _weights(str(cfg.weights_path))
    summary = run(cfg, workdir, params=params, weights_info=info, handle_signals=False,
                  log=lambda m: None, overwrite=True)
    image = np.asarray(summary["image"], np.float32)
    if not return_terms:
        return image
    return image, rec.read_metrics(workdir / "metrics.jsonl")


def stylize_sweep(config: ml_collections.ConfigDict | dict | None = None, *,
                  axes: Sequence = (), points: Sequence = (), content=None, style=None,
                  workdir: str | os.PathLike | None = None, **overrides) -> dict:
    """A sweep from a notebook: ``config`` (a ConfigDict, or a dict of overrides) with
    ``sweep.axes = axes`` and ``sweep.points = points`` (values may be arrays where a field names
    an image: ``axes=[("style", [painting_a, painting_b])]``), run on the sweep engine into
    ``workdir`` (default: a temporary directory, removed after). Returns ``{"images": (N, H, W, 3)
    float32, "rows": [summary.csv's rows as dicts, numbers as floats], "points": [each point's
    values]}``, in point order."""
    from nstjax.run import run_sweep

    if isinstance(config, dict):
        overrides = {**config, **overrides}
        config = None
    cfg = make_config(config, **overrides)
    held = []
    try:
        def name(image, what):
            if isinstance(image, (str, os.PathLike)):
                return str(image)
            block = images.in_memory([image], what)
            held.append(block)
            return block.names[0]

        if content is not None:
            cfg.content = name(content, "content")
        if style is not None:
            cfg.style = ",".join(name(s, "style") for s in _styles(style))
        image_fields = ("content", "style", "init", "content_masks", "style_masks")
        cfg.sweep.axes = tuple((f, tuple(name(v, f) if f in image_fields else v for v in vs))
                               for f, vs in axes)
        cfg.sweep.points = tuple({f: name(v, f) if f in image_fields else v for f, v in p.items()}
                                 for p in points)
        if not cfg.sweep.axes and not cfg.sweep.points:
            raise ConfigError("stylize_sweep needs axes or points")
        params, info = _weights(str(cfg.weights_path))
        with tempfile.TemporaryDirectory(prefix="nstjax-sweep-") as tmp:
            where = Path(workdir) if workdir is not None else Path(tmp) / "sweep"
            out = run_sweep(cfg, where, params=params, weights_info=info, say=lambda m: None,
                            write_figures=workdir is not None, handle_signals=False)
            with open(where / "summary.csv", newline="") as f:
                rows = [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)]
    finally:
        for block in held:
            block.__exit__(None, None, None)
    by_index = {r["index"]: r for r in out["points"]}
    order = sorted(by_index)
    return {"images": np.stack([np.asarray(by_index[i]["image"], np.float32) for i in order]),
            "rows": rows, "points": [by_index[i]["values"] for i in order], "wall_s": out["wall_s"]}


def _number(v: str):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


__all__ = ["make_config", "stylize", "stylize_sweep"]
