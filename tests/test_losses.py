"""Gram matrices and losses against hand-computed numpy, and their gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from nstjax import features
from nstjax.errors import ConfigError
from nstjax.losses import (
    Objective,
    content_loss,
    gram,
    loss_terms,
    objective_weights,
    style_loss,
    style_target,
    tv_loss,
)
from nstjax.targets import compute_targets

RNG = np.random.default_rng(42)


def _feats(h=5, w=7, c=4):
    return RNG.normal(size=(h, w, c)).astype(np.float32) * 3


def test_gram_normalisations():
    f = _feats()
    F = f.reshape(-1, 4).T.astype(np.float64)  # N x M, the paper's F^l
    raw = F @ F.T
    np.testing.assert_allclose(gram(f, "paper"), raw, rtol=1e-5)
    np.testing.assert_allclose(gram(f[None], "paper"), raw, rtol=1e-5)
    np.testing.assert_allclose(gram(f, "mean"), raw / 35, rtol=1e-5)
    np.testing.assert_allclose(gram(f, "chw"), raw / (35 * 4), rtol=1e-5)
    with pytest.raises(ConfigError):
        gram(f, "bogus")


def test_content_loss_is_the_papers_half_sum_of_squares():
    f, p = _feats(), _feats()
    d = f.astype(np.float64) - p
    np.testing.assert_allclose(content_loss(f, p, "paper"), 0.5 * (d ** 2).sum(), rtol=1e-5)
    np.testing.assert_allclose(content_loss(f, p, "mean"), (d ** 2).mean(), rtol=1e-5)


def test_style_loss_is_the_papers_e_l():
    """E_l = 1/(4 N^2 M^2) sum (G - A)^2 with raw Grams of same-size images (eq. 4)."""
    f, s = _feats(), _feats()
    N, M = 4, 35
    G = f.reshape(-1, N).T.astype(np.float64) @ f.reshape(-1, N).astype(np.float64)
    A = s.reshape(-1, N).T.astype(np.float64) @ s.reshape(-1, N).astype(np.float64)
    expected = ((G - A) ** 2).sum() / (4 * N ** 2 * M ** 2)
    np.testing.assert_allclose(style_loss(f, style_target(s), "paper"), expected, rtol=1e-4)
    np.testing.assert_allclose(style_loss(f, style_target(s), "mean"), (((G - A) / M) ** 2).mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(style_loss(f, style_target(s), "chw"),
                               (((G - A) / M) ** 2).mean() / N ** 2, rtol=1e-4)


def test_style_target_does_not_depend_on_style_image_size():
    """A style image twice the size (same texture) gives the same per-position target."""
    s = _feats(4, 4, 3)
    big = np.tile(s, (2, 2, 1))
    np.testing.assert_allclose(style_target(big), style_target(s), rtol=1e-5)


def test_tv_loss():
    img = RNG.uniform(0, 255, (6, 5, 3)).astype(np.float32)
    dy, dx = np.diff(img.astype(np.float64), axis=0), np.diff(img.astype(np.float64), axis=1)
    np.testing.assert_allclose(tv_loss(img, "l2"), (dy ** 2).mean() + (dx ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(tv_loss(img, "l1"), np.abs(dy).mean() + np.abs(dx).mean(), rtol=1e-5)
    assert float(tv_loss(np.full((6, 5, 3), 7.0, np.float32))) == 0.0


def test_loss_terms_match_hand_computation(params, tubingen, starry):
    obj = Objective(("relu4_2",), ("relu1_1", "relu3_1"), pooling="avg")
    w = objective_weights(obj, 2.0, 30.0, 0.5, style_layer_weights=(0.25, 0.75))
    t = compute_targets(params, obj, tubingen, [starry])
    x = np.clip(tubingen + RNG.normal(0, 20, tubingen.shape), 0, 255).astype(np.float32)
    terms = loss_terms(params, jnp.asarray(x), t, w, obj)
    fx = features(params, x, obj.layers, "avg")
    fc = features(params, tubingen, ["relu4_2"], "avg")
    fs = features(params, starry, obj.style_layers, "avg")
    content = 2.0 * 0.5 * np.sum((np.asarray(fx["relu4_2"], np.float64)
                                  - np.asarray(fc["relu4_2"])) ** 2)
    np.testing.assert_allclose(terms["content"], content, rtol=1e-4)
    style = 0.0
    for l, wl in (("relu1_1", 0.25), ("relu3_1", 0.75)):
        a, b = np.asarray(fx[l][0], np.float64), np.asarray(fs[l][0], np.float64)
        n = a.shape[-1]
        ga = a.reshape(-1, n).T @ a.reshape(-1, n) / (a.shape[0] * a.shape[1])
        gb = b.reshape(-1, n).T @ b.reshape(-1, n) / (b.shape[0] * b.shape[1])
        e = ((ga - gb) ** 2).sum() / (4 * n ** 2)
        np.testing.assert_allclose(terms[f"style/{l}"], 30.0 * wl * e, rtol=1e-3)
        style += 30.0 * wl * e
    np.testing.assert_allclose(terms["style"], style, rtol=1e-3)
    np.testing.assert_allclose(terms["tv"], 0.5 * tv_loss(x), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"], terms["content"] + terms["style"] + terms["tv"],
                               rtol=1e-6)


def test_zero_layer_weight_switches_a_layer_off(params, tubingen, starry):
    obj = Objective((), ("relu1_1", "relu2_1"))
    t = compute_targets(params, obj, tubingen, [starry])
    both = loss_terms(params, jnp.asarray(tubingen), t, objective_weights(obj, 0, 1, 0), obj)
    only1 = loss_terms(params, jnp.asarray(tubingen), t,
                       objective_weights(obj, 0, 1, 0, style_layer_weights={"relu1_1": 0.5}), obj)
    assert float(only1["style/relu2_1"]) == 0.0
    np.testing.assert_allclose(only1["loss"], both["style/relu1_1"], rtol=1e-6)


def test_style_blend_mixes_grams(params, tubingen, starry):
    obj = Objective((), ("relu2_1",))
    a = compute_targets(params, obj, tubingen, [tubingen])["style"]["relu2_1"]
    b = compute_targets(params, obj, tubingen, [starry])["style"]["relu2_1"]
    mix = compute_targets(params, obj, tubingen, [tubingen, starry], [3.0, 1.0])["style"]["relu2_1"]
    np.testing.assert_allclose(mix, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-3)


def test_weight_validation():
    obj = Objective(("relu4_2",), ("relu1_1", "relu2_1"))
    with pytest.raises(ConfigError, match="2 layers"):
        objective_weights(obj, 1, 1, 0, style_layer_weights=(1.0,))
    with pytest.raises(ConfigError, match="not in use"):
        objective_weights(obj, 1, 1, 0, style_layer_weights={"relu5_1": 1.0})
    with pytest.raises(ConfigError, match="unknown style layer"):
        Objective(("relu4_2",), ("relu9_1",))
    with pytest.raises(ConfigError, match="gram_norm"):
        Objective(("relu4_2",), (), gram_norm="frobenius")


def test_gradients_match_finite_differences(params):
    """check_grads on a small real case, in float64 so finite differences are meaningful."""
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        rng = np.random.default_rng(0)
        content = rng.uniform(0, 255, (8, 8, 3))
        style = rng.uniform(0, 255, (8, 8, 3))
        obj = Objective(("relu2_1",), ("relu1_1", "relu2_1"), pooling="avg")
        t = compute_targets(p64, obj, content, [style])
        w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                         objective_weights(obj, 1e-3, 1.0, 1e-2))
        x0 = jnp.asarray(rng.uniform(20, 235, (8, 8, 3)))
        check_grads(lambda x: loss_terms(p64, x, t, w, obj)["loss"], (x0,), order=1, modes=["rev"],
                    eps=1e-3, rtol=1e-4)
