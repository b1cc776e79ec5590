"""The histogram loss of Risser, Wilmot & Barnes (2017), "Stable and Controllable Neural Texture
Synthesis and Style Transfer Using Histogram Losses".

For each layer and channel, the output's activations are remapped to the style's histogram by exact,
sort-based matching: the activation of rank r among the output's n values is replaced by the
style's quantile at (r + 1/2) / n. The loss is the squared distance between the activations and
their remapped values, with the remapped values held constant (``stop_gradient``), as in the paper:

    L_hist = mean over positions and channels of (O - R(O))^2,   R(O) = stop_gradient(remap(O)).

Its value is the squared 1-D Wasserstein-2 distance between the output's and the style's
activation distributions, channel by channel; the Gram loss only sees second moments, and
Risser et al. show that this is why Gram-only syntheses drift into regions of wrong intensity.

A style's histogram is stored as its quantile function sampled at ``Q`` evenly spaced probabilities
(r + 1/2) / Q, r = 0..Q-1 (``Q`` = the output's number of positions at that layer, so that in the
usual case the matching is exact: the remapped activations are the style's sorted activations).
Several style images, or a masked region of one, give a weighted quantile function (the pooled
activations, each image weighted by its blend weight).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


# Compiled as one program: eagerly its dozen operations each compile once per shape (the judge's
# colour targets, two calls a run, took 2.3 s of a 64 px run's start-up that way).
@partial(jax.jit, static_argnames=("q",))
def weighted_quantiles(values: jax.Array, weights: jax.Array | None, q: int) -> jax.Array:
    """Quantile functions of the columns of ``values`` (N, C), sampled at (r + 1/2) / q.

    ``weights`` (N,) are non-negative sample weights (None = equal); samples of weight zero do not
    count. Sample i of sorted order sits at its cumulative weight midpoint, so with equal weights
    and ``q == N`` the result is exactly the sorted columns. Returns (q, C).
    """
    values = jnp.asarray(values, jnp.float32)
    n = values.shape[0]
    if weights is None:
        weights = jnp.ones((n,), jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    used = weights > 0
    # Samples of weight zero sort last (key +inf) and sit beyond probability 1, at the largest
    # used value, so they never enter the interpolation.
    order = jnp.argsort(jnp.where(used[:, None], values, jnp.inf), axis=0)  # (N, C)
    v = jnp.take_along_axis(values, order, axis=0)
    w = weights[order]
    top = jnp.max(jnp.where(used[:, None], values, -jnp.inf), axis=0)
    v = jnp.where(w > 0, v, top[None, :])
    total = jnp.maximum(jnp.sum(weights), 1e-30)
    cum = (jnp.cumsum(w, axis=0) - 0.5 * w) / total  # each sample at its weight midpoint in (0, 1)
    cum = jnp.where(w > 0, cum, 2.0 + jnp.arange(n, dtype=jnp.float32)[:, None])
    p = (jnp.arange(q, dtype=jnp.float32) + 0.5) / q
    return jax.vmap(jnp.interp, in_axes=(None, 1, 1), out_axes=1)(p, cum, v)


def quantiles(values: jax.Array, q: int) -> jax.Array:
    """Equal-weight quantile functions of the columns of ``values`` (N, C), sampled at q points.

    Exact (the sorted columns) when ``q == N``; otherwise linear interpolation between the sorted
    values, each at its midpoint (i + 1/2) / N.
    """
    values = jnp.asarray(values, jnp.float32)
    n = values.shape[0]
    s = jnp.sort(values, axis=0)
    if q == n:
        return s
    return _sample(s, (jnp.arange(q, dtype=jnp.float32) + 0.5) * (n / q) - 0.5)


def _sample(table: jax.Array, index: jax.Array) -> jax.Array:
    """Linear interpolation of the rows of ``table`` (Q, C) at fractional row ``index`` (R,) or
    (R, C), clipped to [0, Q-1]."""
    q = table.shape[0]
    index = jnp.clip(index, 0.0, q - 1.0)
    lo = jnp.floor(index).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, q - 1)
    frac = index - lo
    if index.ndim == 1:
        lo, hi, frac = lo[:, None], hi[:, None], frac[:, None]
        lo = jnp.broadcast_to(lo, (index.shape[0], table.shape[1]))
        hi = jnp.broadcast_to(hi, lo.shape)
    a = jnp.take_along_axis(table, lo, axis=0)
    b = jnp.take_along_axis(table, hi, axis=0)
    return a + (b - a) * frac


def histogram_match(values: jax.Array, target_quantiles: jax.Array,
                    mask: jax.Array | None = None) -> jax.Array:
    """Remaps each column of ``values`` (M, C) to the distribution given by ``target_quantiles``
    (Q, C): the value of rank r among the column's n values becomes the target quantile at
    (r + 1/2) / n. Exact (a permutation of the target's values) when ``n == Q``.

    ``mask`` (M,) of booleans restricts the matching to the masked positions (n = their count);
    the other positions are returned unchanged.
    """
    values = jnp.asarray(values, jnp.float32)
    m, c = values.shape
    qn = target_quantiles.shape[0]
    if mask is None:
        keyed, n = values, jnp.float32(m)
    else:
        mask = jnp.asarray(mask, bool)
        keyed = jnp.where(mask[:, None], values, jnp.inf)  # outside the mask: ranked last
        n = jnp.maximum(jnp.sum(mask).astype(jnp.float32), 1.0)
    order = jnp.argsort(keyed, axis=0)  # order[r, c] = position of rank r in column c
    ranks = jnp.arange(m, dtype=jnp.float32)
    matched = _sample(target_quantiles, (ranks + 0.5) * (qn / n) - 0.5)  # (M, C), by rank
    cols = jnp.arange(c)[None, :]
    remapped = jnp.zeros_like(values).at[order, cols].set(matched)
    if mask is not None:
        remapped = jnp.where(mask[:, None], remapped, values)
    return remapped


def histogram_loss(feats: jax.Array, target_quantiles: jax.Array, mask: jax.Array | None = None
                   ) -> jax.Array:
    """Risser et al.'s histogram loss of one layer's activations (H, W, C) or (M, C): the mean
    squared distance to their histogram-matched remapping, held constant. With ``mask`` (M,) the
    mean is over the masked positions only (zero if there are none)."""
    f = jnp.asarray(feats, jnp.float32)
    f = f.reshape(-1, f.shape[-1])
    remapped = jax.lax.stop_gradient(histogram_match(f, target_quantiles, mask))
    d = f - remapped
    if mask is None:
        return jnp.mean(d * d)
    mask = jnp.asarray(mask, bool)
    area = jnp.sum(mask).astype(jnp.float32)
    total = jnp.sum(jnp.where(mask[:, None], d * d, 0.0))
    return jnp.where(area > 0, total / (jnp.maximum(area, 1.0) * f.shape[-1]), 0.0)


def histogram_distance(feats: jax.Array, target_quantiles: jax.Array) -> jax.Array:
    """Per-channel 1-D Wasserstein-2 distance (root mean square difference of the quantile
    functions), averaged over channels: a measurement, not a loss."""
    f = jnp.asarray(feats, jnp.float32)
    f = f.reshape(-1, f.shape[-1])
    d = quantiles(f, target_quantiles.shape[0]) - target_quantiles
    return jnp.mean(jnp.sqrt(jnp.mean(d * d, axis=0)))
