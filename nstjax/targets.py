"""What the optimised image is matched against: the content photo's activations and the style
images' statistics, computed once per run (:func:`compute_targets`).

The inputs are checked in Python (shapes, counts, the blend), and the activations and statistics
are then one compiled program per objective and image shapes, not a few hundred single operations:
run eagerly, each operation compiled a program of its own for each new shape (with the judge's
colour quantiles, 111 of the 122 programs a 64 px run compiled; one program each, the run takes
0.93x the time, ``experiments/startup.py``), and a network pass run operation by operation peaks
at about twice the memory of the compiled one. The blend's fractions are traced, so a sweep over
``style_blend`` compiles the targets once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import histogram, masks, stats, vgg
from nstjax.errors import ConfigError
from nstjax.losses import Objective, style_target


def compute_targets(params, obj: Objective, content_image, style_images: Sequence,
                    style_blend: Sequence[float] | None = None, *,
                    content_masks: Sequence | None = None, style_masks: Sequence | None = None,
                    style_layer_images: Mapping[str, int] | None = None) -> dict:
    """Content activations and blended per-position style Grams, computed once per run.

    ``content_image`` and each style image are (H, W, 3) RGB in [0, 255]. Several style images are
    blended by mixing their Gram matrices with weights ``style_blend`` (normalised to sum to 1).

    Keys: ``content`` {layer: activations}; ``style`` {layer: target statistic}: the per-position
    Gram (C, C) for ``style_stat="gram"``, ``{"mean", "std"}`` for ``"mean_std"``,
    ``{"mean", "cov_sqrt", "cov_trace"}`` for ``"w2"``; for other statistics several style images
    are blended as the mixture of their activations (mixed first and second moments), like Grams.
    With histogram layers, ``hist`` {layer: (Q, C)}: the style's per-channel quantile functions at
    Q = the content's number of positions at that layer (of the blend's pooled activations).

    With ``obj.regions`` = K > 0, ``content_masks`` holds K (H, W) masks in [0, 1] shaped like the
    content, one per style image (no blending): every target gets a leading axis K (style k's
    statistics), and ``masks`` {layer: (K, h, w)} holds the masks at each style and histogram
    layer's resolution. ``style_masks`` (optional, with or without regions): one mask per style
    image, shaped like it (None entries = all of it), restricting its statistics to that region.

    ``style_layer_images`` (scale control, Gatys et al. 2017): {style layer: index of a style
    image}; a layer named there takes its statistics (and its histogram, if it is a histogram layer
    too) from that image alone, so coarse layers can come from one painting and fine ones from
    another. The other layers take the blend, as without it. Not with regions.
    """
    content = jnp.asarray(content_image, jnp.float32)
    if not (set(obj.style_layers) | set(obj.hist_layers)):
        return _compute(params, content, (), (), None, None, obj=obj, chosen=())
    styles = tuple(jnp.asarray(s, jnp.float32) for s in style_images)
    fractions, chosen = _check(obj, content.shape[:2], styles, style_blend, content_masks,
                               style_masks, style_layer_images)
    smasks = tuple(None if m is None else jnp.asarray(m, jnp.float32)
                   for m in (style_masks or [None] * len(styles)))
    cmasks = tuple(jnp.asarray(m, jnp.float32) for m in content_masks) if obj.regions else None
    return _compute(params, content, styles, smasks, cmasks, fractions, obj=obj, chosen=chosen)


def _check(obj: Objective, shape: tuple[int, int], styles: Sequence, style_blend, content_masks,
           style_masks, style_layer_images) -> tuple[np.ndarray, tuple]:
    """Checks the inputs of :func:`compute_targets` with style layers; returns the blend's
    fractions (summing to 1) and the scale-control choices as a sorted tuple."""
    if not styles:
        raise ConfigError("style layers are set but no style image is given")
    n_styles = len(styles)
    style_masks = list(style_masks) if style_masks else [None] * n_styles
    if len(style_masks) != n_styles:
        raise ConfigError(f"{len(style_masks)} style masks for {n_styles} style images")
    for img, smask in zip(styles, style_masks):
        if smask is not None and tuple(np.shape(smask)) != tuple(np.shape(img)[:2]):
            raise ConfigError(f"a style mask of shape {tuple(np.shape(smask))} for a style image "
                              f"of shape {tuple(np.shape(img)[:2])}")
    if obj.regions:
        if content_masks is None or len(content_masks) != obj.regions:
            raise ConfigError(f"the objective has {obj.regions} masked regions but "
                              f"{0 if content_masks is None else len(content_masks)} content masks "
                              "were given")
        if n_styles != obj.regions:
            raise ConfigError(f"{obj.regions} content masks need {obj.regions} style images, one "
                              f"per region, not {n_styles}")
        if style_blend:
            raise ConfigError("style_blend cannot be combined with content masks (each region has "
                              "its own style image)")
        for m in content_masks:
            if tuple(np.shape(m)) != tuple(shape):
                raise ConfigError(f"a content mask of shape {tuple(np.shape(m))} for a content "
                                  f"image of shape {tuple(shape)}")
        blend = [1.0] * n_styles
    else:
        if content_masks:
            raise ConfigError("content masks were given but the objective has no regions")
        blend = [1.0] * n_styles if not style_blend else list(style_blend)
        if len(blend) != n_styles:
            raise ConfigError(f"{len(blend)} style blend weights for {n_styles} style images")
    chosen = dict(style_layer_images or {})
    if chosen and obj.regions:
        raise ConfigError("style_layer_images cannot be combined with masked regions")
    for l, i in chosen.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_styles:
            raise ConfigError(f"style layer {l} takes style image {i!r}, not one of "
                              f"0..{n_styles - 1}")
    total = float(sum(blend))
    if total <= 0:
        raise ConfigError("style blend weights must sum to a positive number")
    for l in obj.hist_layers:
        k = masks.pools_before(l)
        if (shape[0] >> k) * (shape[1] >> k) < 1:
            raise ConfigError(f"the content image is too small for histogram layer {l}")
    fractions = np.asarray([b / total for b in blend], np.float32)
    return fractions, tuple(sorted(chosen.items()))


@partial(jax.jit, static_argnames=("obj", "chosen"))
def _compute(params, content, styles, style_masks, content_masks, fractions, *, obj: Objective,
             chosen: tuple) -> dict:
    """The targets of checked inputs (see :func:`compute_targets`); ``chosen`` is the scale
    control's (layer, image) pairs."""
    targets = {"content": {}, "style": {}}
    if obj.content_layers:
        feats = vgg.features(params, content, obj.content_layers, obj.pooling, obj.precision)
        targets["content"] = {l: feats[l][0] for l in obj.content_layers}
    styled = tuple(sorted(set(obj.style_layers) | set(obj.hist_layers),
                          key=vgg.LAYER_INDEX.__getitem__))
    if not styled:
        return targets

    # Each style image's activations (M, C) and position weights (M,), summing to 1.
    per_style = []
    for img, smask in zip(styles, style_masks):
        feats = vgg.features(params, img, styled, obj.pooling, obj.precision)
        acts = {}
        for l in styled:
            f = feats[l][0]
            if smask is None:
                w = stats.uniform_weights(f.shape[0] * f.shape[1])
            else:
                w = masks.region_weights(masks.layer_mask(smask, l))
            acts[l] = (f.reshape(-1, f.shape[-1]), w, smask is None)
        per_style.append(acts)

    def stack(items):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *items)

    chosen = dict(chosen)
    one = [jnp.float32(1.0)]
    for l in obj.style_layers:
        if obj.regions:
            targets["style"][l] = stack([_style_statistic(obj, [a[l]], one) for a in per_style])
        elif l in chosen:  # scale control: this layer's statistics from one image alone
            targets["style"][l] = _style_statistic(obj, [per_style[chosen[l]][l]], one)
        else:
            targets["style"][l] = _style_statistic(obj, [a[l] for a in per_style],
                                                   list(fractions))
    h, w_px = content.shape[:2]
    if obj.hist_layers:
        targets["hist"] = {}
        for l in obj.hist_layers:
            k = masks.pools_before(l)
            q = (h >> k) * (w_px >> k)
            if obj.regions:
                targets["hist"][l] = jnp.stack([_hist_target([a[l]], one, q) for a in per_style])
            elif l in chosen:
                targets["hist"][l] = _hist_target([per_style[chosen[l]][l]], one, q)
            else:
                targets["hist"][l] = _hist_target([a[l] for a in per_style], list(fractions), q)
    if obj.regions:
        targets["masks"] = {l: jnp.stack([masks.layer_mask(m, l) for m in content_masks])
                            for l in styled}
    return targets


def _style_statistic(obj: Objective, acts: Sequence, fractions: Sequence):
    """The stored target of ``obj.style_stat`` for the mixture of several images' activations
    ``acts`` [(f (M, C), w (M,), unmasked)] with mixture weights ``fractions`` summing to 1."""
    if obj.style_stat == "gram":
        out = None
        for (f, w, unmasked), b in zip(acts, fractions):
            g = style_target(f) if unmasked else masks.weighted_gram(f, w)
            out = g * b if out is None else out + g * b
        return out
    if obj.style_stat == "mean_std":
        if len(acts) == 1:
            return stats.mean_std_target(acts[0][0], acts[0][1])
        parts = [stats.weighted_mean_std(f, w) for f, w, _ in acts]
        mu = sum(b * m for (m, _), b in zip(parts, fractions))
        var = sum(b * ((sd * sd - stats.STD_EPS) + (m - mu) ** 2)
                  for (m, sd), b in zip(parts, fractions))
        return {"mean": mu, "std": jnp.sqrt(jnp.maximum(var, 0.0) + stats.STD_EPS)}
    if len(acts) == 1:
        return stats.w2_target(acts[0][0], acts[0][1])
    parts = [stats.weighted_mean_cov(f, w) for f, w, _ in acts]
    mu = sum(b * m for (m, _), b in zip(parts, fractions))
    cov = sum(b * (s + jnp.outer(m - mu, m - mu)) for (m, s), b in zip(parts, fractions))
    return stats.w2_target_from_moments(mu, cov)


def _hist_target(acts: Sequence, fractions: Sequence, q: int) -> jax.Array:
    """Per-channel quantile functions (q, C) of the pooled activations of several images."""
    if len(acts) == 1 and acts[0][2]:
        return histogram.quantiles(acts[0][0], q)
    values = jnp.concatenate([f for f, _, _ in acts])
    weights = jnp.concatenate([w * b for (_, w, _), b in zip(acts, fractions)])
    return histogram.weighted_quantiles(values, weights, q)
