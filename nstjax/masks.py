"""Spatial control (Gatys, Ecker, Bethge, Hertzmann & Shechtman 2017, "Controlling Perceptual
Factors in Neural Style Transfer", section 4): masks that assign regions of the content image to
different style images, with guided Gram matrices.

A mask is a grayscale image, white (1) inside its region and black (0) outside, resized to the
image it guides. At each layer it is average-pooled 2x2 as often as the network pools before that
layer, so it has exactly the layer's spatial shape (a soft mask at region borders). The guided Gram
of region k is the Gram of the activations multiplied by the mask, T_k * F (the paper's
F_k = T_k o F), normalised by the mask's area sum(T_k^2), i.e. a per-position Gram over the region:

    G_k = sum_i T_ki^2 f_i f_i^T / sum_i T_ki^2.

The same position weights w_k = T_k^2 / sum(T_k^2) give the guided mean/std and mean/covariance
statistics (:mod:`nstjax.stats`); the histogram loss uses the positions where T_k >= 1/2.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from nstjax import images, vgg
from nstjax.errors import ImageError

HIGHEST = jax.lax.Precision.HIGHEST


def load_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """Reads a mask image as float32 (H, W) in [0, 1], resized to ``size`` = (width, height)."""
    im = images.load_pil(path).convert("L")
    if tuple(size) != im.size:
        im = im.resize(tuple(size), Image.BILINEAR)
    mask = np.asarray(im, np.float32) / 255.0
    if not mask.any():
        raise ImageError(f"{path}: the mask is black everywhere (white marks the region)")
    return mask


def pools_before(layer: str) -> int:
    """How many 2x2 poolings the network applies before ``layer``'s output."""
    return int(np.log2(vgg.layer_stride(layer)))


def pool_mask(mask: jax.Array, times: int) -> jax.Array:
    """Average-pools an (H, W) mask 2x2 (stride 2, dropping an odd last row/column, as VGG's
    pooling does) ``times`` times."""
    m = jnp.asarray(mask, jnp.float32)
    for _ in range(times):
        h, w = m.shape[0] // 2, m.shape[1] // 2
        m = m[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
    return m


def layer_mask(mask: jax.Array, layer: str) -> jax.Array:
    """An image-sized (H, W) mask brought to ``layer``'s spatial shape."""
    return pool_mask(mask, pools_before(layer))


def region_weights(mask: jax.Array) -> jax.Array:
    """Position weights (M,) of a layer-sized mask: T^2 / sum(T^2) (zeros for an empty mask)."""
    t2 = jnp.square(jnp.asarray(mask, jnp.float32).reshape(-1))
    area = jnp.sum(t2)
    return t2 / jnp.maximum(area, 1e-12)


def region_area(mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(jnp.asarray(mask, jnp.float32)))


def weighted_gram(f: jax.Array, w: jax.Array) -> jax.Array:
    """F^T diag(w) F for activations ``f`` (M, C) and position weights ``w`` (M,)."""
    return jnp.einsum("mc,m,md->cd", f, w, f, precision=HIGHEST)


def guided_gram(feats: jax.Array, mask: jax.Array) -> jax.Array:
    """The guided Gram (C, C) of one layer's activations (H, W, C) or (1, H, W, C) and a mask of
    the same spatial shape: sum_i T_i^2 f_i f_i^T / sum_i T_i^2."""
    f = jnp.asarray(feats)
    if f.ndim == 4:
        f = f[0]
    return weighted_gram(f.reshape(-1, f.shape[-1]), region_weights(mask))
