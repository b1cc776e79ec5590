"""VGG-19 feature extractor as a Flax module and a pure function.

Layer names follow the paper and jcjohnson/neural-style: ``conv1_1, relu1_1, conv1_2, relu1_2,
pool1, ..., conv5_4, relu5_4, pool5``. ``convX_Y`` is the convolution's output before the ReLU and
``reluX_Y`` after it. (In the authors' Caffe code the ReLU ran in place, so the paper's "conv4_2" is
the rectified response, our ``relu4_2``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nstjax.errors import ConfigError

BLOCKS = (2, 2, 4, 4, 4)  # convs per block
CHANNELS = (64, 128, 256, 512, 512)
# The Caffe VGG models expect BGR pixels in 0..255 minus these means (in BGR order).
BGR_MEANS = (103.939, 116.779, 123.68)


def _layer_names() -> tuple[str, ...]:
    names = []
    for b, n in enumerate(BLOCKS, start=1):
        for i in range(1, n + 1):
            names += [f"conv{b}_{i}", f"relu{b}_{i}"]
        names.append(f"pool{b}")
    return tuple(names)


LAYERS: tuple[str, ...] = _layer_names()
LAYER_INDEX = {name: i for i, name in enumerate(LAYERS)}


def layer_channels(layer: str) -> int:
    return CHANNELS[int(layer[4]) - 1]


def layer_stride(layer: str) -> int:
    """Downsampling factor of ``layer``'s activations relative to the input."""
    block = int(layer[4])
    return 2 ** (block - 1) * (2 if layer.startswith("pool") else 1)


def check_layers(layers: Iterable[str], what: str = "layer") -> tuple[str, ...]:
    layers = tuple(layers)
    for layer in layers:
        if layer not in LAYER_INDEX:
            raise ConfigError(f"unknown {what} {layer!r}; valid layers: {', '.join(LAYERS)}")
    return layers


def deepest(layers: Iterable[str]) -> str:
    return max(layers, key=LAYER_INDEX.__getitem__)


def preprocess(image: jax.Array) -> jax.Array:
    """RGB in [0, 255] -> BGR with the Caffe means subtracted."""
    return image[..., ::-1] - jnp.asarray(BGR_MEANS, image.dtype)


class VGG19(nn.Module):
    """VGG-19 conv stack on NHWC BGR mean-subtracted input, stopping at ``last_layer``.

    Returns a dict with the activations of every layer in ``outputs``.
    """

    outputs: Sequence[str]
    pooling: str = "max"
    precision: jax.lax.Precision | None = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        wanted = set(self.outputs)
        last = LAYER_INDEX[deepest(self.outputs)]
        out = {}
        for name in LAYERS[: last + 1]:
            kind = name[:4]
            if kind == "conv":
                x = nn.Conv(layer_channels(name), (3, 3), padding=((1, 1), (1, 1)), name=name,
                            precision=self.precision, dtype=self.dtype)(x)
            elif kind == "relu":
                x = relu(x)
            else:
                x = pool2x2(x, self.pooling)
            if name in wanted:
                out[name] = x
        return out


def pool2x2(x: jax.Array, pooling: str) -> jax.Array:
    """2x2 pooling with stride 2 on NHWC, dropping an odd last row or column (as VALID padding
    does).

    Not ``flax.linen.max_pool``: XLA:CPU expands a reduce-window's gradient into index tensors and a
    scatter, 21 % of a step's time and 0.86 GB at 1024x768 for pool1 alone (docs/performance.md).
    Max pooling is :func:`_max_pool2x2`, whose backward pass keeps one byte per *output* element;
    average pooling is a reshape and a mean (linear: its backward pass keeps nothing)."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    if pooling == "max":
        return _max_pool2x2(x)
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _corners(x):
    """The four corners of every 2x2 window of an NHWC array of even height and width."""
    n, h, w, c = x.shape
    r = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return r[:, :, 0, :, 0], r[:, :, 0, :, 1], r[:, :, 1, :, 0], r[:, :, 1, :, 1]


@jax.custom_vjp
def _max_pool2x2(x):
    """2x2 max pooling with stride 2 of an NHWC array of even height and width.

    Its gradient goes to the first maximum of each window in row-major order (as in Caffe, torch
    and flax), found again from a uint8 index saved by the forward pass: the backward pass keeps
    1/16 of the bytes of the float indicator tensors that JAX's gradient of a max keeps (201 MB at
    pool1 at 1024x768), and XLA:CPU's reduce-window gradient (index tensors and a scatter)."""
    return _max_pool2x2_fwd(x)[0]


def _max_pool2x2_fwd(x):
    a, b, c, d = _corners(x)
    m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
    idx = jnp.where(a == m, 0, jnp.where(b == m, 1, jnp.where(c == m, 2, 3))).astype(jnp.uint8)
    return m, idx


def _max_pool2x2_bwd(idx, g):
    zero = jnp.zeros_like(g)
    a, b, c, d = (jnp.where(idx == k, g, zero) for k in range(4))
    n, h, w, ch = g.shape
    shape = (n, 2 * h, 2 * w, ch)
    top = jnp.stack([a, b], axis=3)  # (n, h/2, w/2, 2, c)
    bottom = jnp.stack([c, d], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(shape),)


_max_pool2x2.defvjp(_max_pool2x2_fwd, _max_pool2x2_bwd)


@jax.custom_vjp
def relu(x):
    """``max(x, 0)`` whose backward pass keeps the mask ``x > 0`` packed 8 to a byte along the
    channels (a plain boolean mask when they do not divide by 8) instead of a float activation.
    Packing is a reduction, which XLA does not fuse into the backward pass; a bare comparison it
    would, keeping the float input alive instead (four 201 MB activations of block 1 at 1024x768;
    ``jax.lax.optimization_barrier`` does not prevent that: XLA:CPU removes barriers first)."""
    return jnp.maximum(x, 0)


# numpy, not jnp: a JAX array made at import would start the backend before
# jax.distributed.initialize() (multi-host sweeps) could run.
_BITS = np.asarray([1, 2, 4, 8, 16, 32, 64, 128], np.uint8)


def _pack_bits(mask):
    """A boolean array whose last axis divides by 8, packed 8 to a byte along it."""
    m = mask.reshape(*mask.shape[:-1], mask.shape[-1] // 8, 8).astype(jnp.uint8)
    return (m * _BITS).sum(axis=-1, dtype=jnp.uint8)


def _unpack_bits(packed):
    m = (packed[..., None] & _BITS) != 0
    return m.reshape(*packed.shape[:-1], packed.shape[-1] * 8)


def _relu_fwd(x):
    y = jnp.maximum(x, 0)
    if x.ndim == 0 or x.shape[-1] % 8:  # not VGG's channel counts: a plain boolean mask
        return y, x > 0
    return y, _pack_bits(x > 0)


def _relu_bwd(mask, g):
    if mask.dtype != jnp.bool_:
        mask = _unpack_bits(mask)
    return (jnp.where(mask, g, jnp.zeros_like(g)),)


relu.defvjp(_relu_fwd, _relu_bwd)


def check_pooling(pooling: str) -> str:
    if pooling not in ("max", "avg"):
        raise ConfigError(f"pooling must be 'max' or 'avg', not {pooling!r}")
    return pooling


@partial(jax.jit, static_argnames=("layers", "pooling", "precision"))
def _features(params, image, layers, pooling, precision):
    x = preprocess(image.astype(jnp.float32))
    return VGG19(outputs=layers, pooling=pooling, precision=precision).apply(params, x)


def apply_features(params, image, layers: Sequence[str], pooling: str = "max", precision=None,
                   dtype: str = "float32"):
    """Un-jitted feature extraction for use inside other transformed functions.

    ``dtype="bfloat16"`` runs the convolutions in bfloat16 (weights cast, accumulation as the
    backend does it) for accelerators with fast bf16 units; the activations returned are float32,
    so everything computed from them (Grams, losses) stays in float32."""
    x = preprocess(image)
    if dtype == "float32":
        return VGG19(outputs=tuple(layers), pooling=pooling, precision=precision).apply(params, x)
    out = VGG19(outputs=tuple(layers), pooling=pooling, precision=precision,
                dtype=jnp.dtype(dtype)).apply(params, x.astype(dtype))
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def features(params, image, layers: Iterable[str], pooling: str = "max", precision=None) -> dict:
    """VGG-19 activations of ``image`` at ``layers``.

    Args:
      params: Flax params from :func:`nstjax.load_vgg19`.
      image: RGB pixels in [0, 255], shape (H, W, 3) or (N, H, W, 3).
      layers: layer names, e.g. ``["relu1_1", "relu4_2"]``.
      pooling: ``"max"`` or ``"avg"``.
    Returns:
      dict from layer name to NHWC activations (a batch axis is always present).
    """
    layers = check_layers(layers)
    if not layers:
        raise ConfigError("features() needs at least one layer")
    check_pooling(pooling)
    image = jnp.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must have shape (H, W, 3) or (N, H, W, 3), not {image.shape}")
    return _features(params, image, tuple(sorted(set(layers), key=LAYER_INDEX.__getitem__)),
                     pooling, precision)
