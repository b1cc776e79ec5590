"""A fixed judge for every result: reference metrics that do not depend on the run's own objective,
so the points of an ablation (other layers, other weights, other normalisations) can be compared.

Every run and every sweep point is scored, once at the end (and every ``judge.every`` steps if set),
by the same three numbers, computed on its result resized to a fixed reference size (``judge.size``,
the longer side; default 256) with the plain VGG-19 and max pooling:

- ``style``: the Gram distance of Gatys et al. (2015, eq. 4, the paper's normalisation: per layer
  ``sum (G - A)^2 / (4 N^2 M^2)``) over relu1_1, relu2_1, relu3_1, relu4_1 and relu5_1 with equal
  weights 1/5, against the run's style image(s) at the reference size (blend weights and masks as
  the run has them). Lower is closer to the painting's textures;
- ``content``: the mean squared difference of relu4_2 activations against the content photo at the
  reference size. Lower keeps more of the photo;
- ``color``: the 1-D Wasserstein-1 distance between the pixel values (0..255) of the result and of
  the style image(s) (the blend's mixture), per RGB channel, averaged over the channels: how far
  the result's colour histograms are from the painting's. With colour preservation
  (``preserve_color`` other than ``none``) also ``color_content``: the same against the photo.

The judge's targets are per-point data along the batch's point axis (nstjax/batch.py) and its
program is vmapped and compiled with the batch (nstjax/programs.py), like the optimisation's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nstjax import histogram, vgg
from nstjax.errors import ConfigError
from nstjax.losses import Objective, loss_terms

STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"
METRICS = ("style", "content", "color", "color_content")


def defaults() -> ml_collections.ConfigDict:
    """``config.judge``: how every result is scored (see the module doc)."""
    return ml_collections.ConfigDict({
        "enabled": True,  # False: no judge (no judge_* columns, no judge.png)
        "size": 256,  # longer side of the reference size every result is judged at
        # also judge every N steps (a multiple of log_every), in metrics.jsonl; 0 = end only
        "every": 0,
        "in_grid": False,  # show the judge's numbers under each image of a sweep's grid.png
    })


@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """The validated ``config.judge`` (hashable: part of the compiled judge program's key)."""

    size: int = 256
    every: int = 0
    in_grid: bool = False


def validate(cfg: ml_collections.ConfigDict, log_every: int) -> JudgeSpec | None:
    j = cfg.get("judge")
    if j is None:
        return None
    extra = set(j.keys()) - set(defaults().keys())
    if extra:
        raise ConfigError(f"unknown judge field(s): {', '.join(sorted(extra))}")
    for k in ("enabled", "in_grid"):
        if not isinstance(j.get(k, False), bool):
            raise ConfigError(f"judge.{k} must be True or False, not {j.get(k)!r}")
    size, every = j.get("size", 256), j.get("every", 0)
    if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 4096:
        raise ConfigError(f"judge.size must be an integer in 16..4096, not {size!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ConfigError(f"judge.every must be an integer >= 0, not {every!r}")
    if every and every % log_every:
        raise ConfigError(f"judge.every ({every}) must be a multiple of log_every ({log_every}): "
                          "its numbers go into metrics.jsonl's lines")
    if not j.get("enabled", True):
        return None
    return JudgeSpec(size, every, bool(j.get("in_grid", False)))


def objective(regions: int = 0) -> Objective:
    """The judge's fixed objective (its layers, the paper's Gram normalisation, max pooling)."""
    return Objective((CONTENT_LAYER,), STYLE_LAYERS, "max", content_norm="mean", gram_norm="paper",
                     regions=regions)


def weights() -> dict:
    """Equal style-layer weights 1/5, content and style each 1, no TV: the terms are the metrics."""
    one = np.float32(1.0)
    return {"content_weight": one, "style_weight": one, "tv_weight": np.float32(0.0),
            "content_layers": {CONTENT_LAYER: one},
            "style_layers": {layer: np.float32(1.0 / len(STYLE_LAYERS)) for layer in STYLE_LAYERS}}


def color_quantiles(pixel_sets: list[np.ndarray], fractions: list[float], q: int) -> np.ndarray:
    """The quantile functions (q, 3) of the pixel values of a mixture of images (their blend)."""
    values = np.concatenate([p.reshape(-1, 3) for p in pixel_sets]).astype(np.float32)
    w = np.concatenate([np.full(p.shape[0] * p.shape[1], f / (p.shape[0] * p.shape[1]), np.float32)
                        for p, f in zip(pixel_sets, fractions)])
    return np.asarray(histogram.weighted_quantiles(values, w, q))


def score(params, targets: dict, image: jax.Array, *, obj: Objective,
          shape: tuple[int, int]) -> dict:
    """The judge's metrics of one result ``image`` (H, W, 3) in 0..255, resized to ``shape`` (pure;
    vmap it for a batch). ``targets``: the judge objective's targets at ``shape`` plus
    ``color_style`` and ``color_content``, pixel quantile functions (h * w, 3)."""
    x = jnp.clip(jax.image.resize(image.astype(jnp.float32), tuple(shape) + (3,), "linear"), 0.0,
                 255.0)
    terms = loss_terms(params, x, targets, weights(), obj)
    pixels = jnp.sort(x.reshape(-1, 3), axis=0)
    return {"style": terms["style"], "content": terms["content"],
            "color": jnp.mean(jnp.abs(pixels - targets["color_style"])),
            "color_content": jnp.mean(jnp.abs(pixels - targets["color_content"]))}


def batched_score(params, targets, images, *, obj: Objective, shape: tuple[int, int]) -> dict:
    return jax.vmap(lambda t, x: score(params, t, x, obj=obj, shape=shape))(targets, images)


def names(preserve_color: str) -> tuple[str, ...]:
    """The metrics a run reports (``color_content`` only when it preserves colour)."""
    return METRICS if preserve_color != "none" else METRICS[:3]


def _layers_check() -> None:  # the judge's layers exist (import-time guard against renames)
    vgg.check_layers(STYLE_LAYERS + (CONTENT_LAYER,))


_layers_check()
