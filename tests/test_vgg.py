"""The VGG-19 feature extractor: names, shapes, preprocessing, and numbers against plain numpy."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from nstjax import features
from nstjax.errors import ConfigError
from nstjax.vgg import BGR_MEANS, LAYERS


def test_layer_names_follow_the_paper():
    assert len(LAYERS) == 16 * 2 + 5
    assert LAYERS[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert LAYERS[-3:] == ("conv5_4", "relu5_4", "pool5")
    assert "relu4_2" in LAYERS and "conv3_4" in LAYERS and "conv2_3" not in LAYERS


@pytest.mark.parametrize("layer,shape", [
    ("conv1_1", (1, 64, 96, 64)), ("pool1", (1, 32, 48, 64)), ("relu2_1", (1, 32, 48, 128)),
    ("relu3_1", (1, 16, 24, 256)), ("conv4_2", (1, 8, 12, 512)), ("relu5_1", (1, 4, 6, 512)),
    ("pool5", (1, 2, 3, 512)),
])
def test_shapes(params, layer, shape):
    img = np.random.default_rng(0).uniform(0, 255, (64, 96, 3)).astype(np.float32)
    out = features(params, img, [layer])
    assert set(out) == {layer}
    assert out[layer].shape == shape


def test_batch_and_single_image_agree(params, tubingen):
    one = features(params, tubingen, ["relu2_1"])["relu2_1"]
    two = features(params, np.stack([tubingen, tubingen[::-1]]), ["relu2_1"])["relu2_1"]
    assert two.shape[0] == 2
    np.testing.assert_allclose(two[0], one[0], rtol=1e-5, atol=1e-3)
    assert not np.allclose(two[1], one[0])


def test_unknown_layer_lists_valid_ones(params, tubingen):
    with pytest.raises(ConfigError, match="unknown layer 'relu4_5'.*conv1_1.*pool5"):
        features(params, tubingen, ["relu4_5"])


def test_pooling_kinds_differ_and_bad_kind_refused(params, tubingen):
    mx = features(params, tubingen, ["relu2_1"], pooling="max")["relu2_1"]
    av = features(params, tubingen, ["relu2_1"], pooling="avg")["relu2_1"]
    assert not np.allclose(mx, av)
    with pytest.raises(ConfigError, match="pooling"):
        features(params, tubingen, ["relu2_1"], pooling="median")


def _np_conv3x3(x, kernel, bias):
    """Plain numpy 3x3 'same' cross-correlation: x (H, W, Cin), kernel HWIO."""
    h, w, _ = x.shape
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    out = np.zeros((h, w, kernel.shape[-1]), np.float64)
    for dy in range(3):
        for dx in range(3):
            out += xp[dy:dy + h, dx:dx + w] @ kernel[dy, dx].astype(np.float64)
    return out + bias


def test_against_numpy_reference(params, tubingen):
    """Preprocessing (RGB->BGR, Caffe means), kernel layout and pooling, computed by hand."""
    img = tubingen[:16, :24].astype(np.float64)
    p = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in params["params"].items()}
    x = img[..., ::-1] - np.asarray(BGR_MEANS)
    c11 = _np_conv3x3(x, p["conv1_1"]["kernel"], p["conv1_1"]["bias"])
    r12 = np.maximum(_np_conv3x3(np.maximum(c11, 0), p["conv1_2"]["kernel"], p["conv1_2"]["bias"]),
                     0)
    pool = r12.reshape(8, 2, 12, 2, 64).max(axis=(1, 3))
    r21 = np.maximum(_np_conv3x3(pool, p["conv2_1"]["kernel"], p["conv2_1"]["bias"]), 0)
    out = features(params, img.astype(np.float32), ["conv1_1", "relu2_1"])
    for ours, ref in ((out["conv1_1"][0], c11), (out["relu2_1"][0], r21)):
        err = np.linalg.norm(np.asarray(ours, np.float64) - ref) / np.linalg.norm(ref)
        assert err < 1e-5


def test_activations_are_those_of_a_trained_network(params, tubingen):
    """A trained VGG responds sparsely after ReLU and far more strongly to a photo than to flat
    gray."""
    out = features(params, tubingen, ["relu3_1"])["relu3_1"]
    gray = features(params, np.full_like(tubingen, 128.0), ["relu3_1"])["relu3_1"]
    zeros = float((np.asarray(out) == 0).mean())
    assert 0.3 < zeros < 0.98
    assert float(np.abs(out).mean()) > 3 * float(np.abs(gray).mean())


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("shape", [(1, 8, 6, 4), (2, 7, 9, 3)])
def test_pooling_equals_flax_reduce_window(pooling, shape):
    """The reshape-and-reduce pooling gives flax's values, odd sizes included (last row dropped)."""
    import flax.linen as nn
    import jax

    from nstjax.vgg import pool2x2

    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    ref = (nn.max_pool if pooling == "max" else nn.avg_pool)(x, (2, 2), strides=(2, 2))
    got = pool2x2(x, pooling)
    assert got.shape == ref.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)


def test_bfloat16_convolutions_stay_close_to_float32(params, tubingen):
    """compute_dtype="bfloat16": float32 activations out, within bf16's ~3 significant digits."""
    from nstjax.vgg import apply_features

    layers = ("relu1_1", "relu3_1", "relu5_1")
    f32 = apply_features(params, tubingen[None], layers)
    bf16 = apply_features(params, tubingen[None], layers, dtype="bfloat16")
    for l in layers:
        assert bf16[l].dtype == np.float32
        err = (np.linalg.norm(np.asarray(bf16[l]) - np.asarray(f32[l]))
               / np.linalg.norm(np.asarray(f32[l])))
        assert 0 < err < 3e-2, (l, err)


def test_unknown_compute_dtype_is_a_config_error():
    from nstjax.config import get_config, validate

    c = get_config()
    c.compute_dtype = "float16"
    with pytest.raises(ConfigError, match="compute_dtype must be one of float32, bfloat16"):
        validate(c)


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("shape", [(1, 8, 10, 16), (2, 7, 9, 8)])
def test_pooling_gradient_equals_flax(pooling, shape):
    """The hand-written backward pass of max pooling (a uint8 index per output) gives flax's
    gradient, also where a window has tied maxima (flax's reduce-window gives it to the first
    maximum in row-major order, and so does ours)."""
    import flax.linen as nn
    import jax

    from nstjax.vgg import pool2x2

    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    x = x.at[:, :4, :4].set(jnp.round(x[:, :4, :4]))  # ties in some windows
    x = x.at[0, 0:2, 0:2, 0].set(1.5)  # a window of four equal maxima
    g = jax.random.normal(jax.random.PRNGKey(3), pool2x2(x, pooling).shape)
    ref_pool = nn.max_pool if pooling == "max" else nn.avg_pool
    ref = jax.grad(lambda z: jnp.sum(ref_pool(z, (2, 2), strides=(2, 2)) * g))(x)
    got = jax.grad(lambda z: jnp.sum(pool2x2(z, pooling) * g))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-6)
    if pooling == "max":
        assert float(got[0, 0, 0, 0]) == float(g[0, 0, 0, 0]) and float(got[0, 1, 1, 0]) == 0.0


def test_relu_gradient_is_the_mask():
    import jax

    from nstjax.vgg import relu

    x = jnp.asarray([[-2.0, -0.0, 0.0, 1e-30, 3.0, -1e-30, 7.0, 0.5] * 3])  # 24 channels: 3 bytes
    g = jnp.arange(1.0, 25.0)[None]
    got = jax.grad(lambda z: jnp.sum(relu(z) * g))(x)
    ref = jax.grad(lambda z: jnp.sum(jax.nn.relu(z) * g))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(relu(x)), np.asarray(jax.nn.relu(x)))
    x5, g5 = x[:, :5], g[:, :5]  # a channel count that does not pack into bytes
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda z: jnp.sum(relu(z) * g5))(x5)),
                                  np.asarray(jax.grad(lambda z: jnp.sum(jax.nn.relu(z) * g5))(x5)))


def test_vgg_gradient_equals_the_plain_jax_network(params, tubingen):
    """VGG-19's custom backward passes (ReLU masks packed to bits, max pooling's uint8 index)
    give the gradient JAX derives for the plain network (flax pooling, jax.nn.relu)."""
    import flax.linen as nn
    import jax

    from nstjax import vgg

    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_2", "relu5_1")
    x = jnp.asarray(tubingen[:64, :80], jnp.float32)[None]

    def loss(z):
        f = vgg.apply_features(params, z, layers, "max")
        return sum(jnp.sum(jnp.sin(v * 0.01 + i)) for i, v in enumerate(f.values()))

    got = jax.grad(loss)(x)
    saved = vgg.relu, vgg.pool2x2
    vgg.relu = nn.relu
    vgg.pool2x2 = lambda z, p: nn.max_pool(z, (2, 2), strides=(2, 2))
    try:
        ref = jax.grad(loss)(x)
    finally:
        vgg.relu, vgg.pool2x2 = saved
    err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert err < 1e-5, err


def test_backward_pass_keeps_little_memory(params):
    """The compiled value-and-grad of a style loss through relu5_1 needs less temporary memory
    than the activations it differentiates through (about 1,280 bytes per input pixel): masks
    are kept as bits and bytes, the Gram gradient is one product (docs/performance.md)."""
    import jax

    from nstjax import losses, memory, vgg

    layers = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    h, w = 192, 256
    targets = {l: jnp.eye(vgg.layer_channels(l)) for l in layers}

    def loss(z):
        f = vgg.apply_features(params, z[None], layers, "max")
        return sum(losses.style_loss(f[l], targets[l]) for l in layers)

    c = jax.jit(jax.value_and_grad(loss)).lower(jnp.zeros((h, w, 3))).compile()
    temp = c.memory_analysis().temp_size_in_bytes
    assert temp < 1.2 * memory.act_bytes_per_pixel(layers) * h * w, temp


def test_importing_nstjax_starts_no_jax_backend():
    """Nothing at import time may create a JAX array: that starts the backend, after which
    jax.distributed.initialize() (multi-host sweeps, sweep.distributed) refuses to run."""
    import subprocess
    import sys

    code = ("import nstjax, nstjax.sweep, nstjax.cli\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, 'a JAX backend was started at import'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
