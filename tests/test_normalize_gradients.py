"""normalize_gradients (jcjohnson/neural-style's -normalize_gradients): each weighted term's
gradient with respect to its input (its layer's activations; the image for TV) has L1 norm equal to
its weight, the loss values do not change, off changes nothing, and a sweep over it is one program.
Small: 64 px, real VGG-19 weights and images, 6 optimiser steps."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nstjax import histogram, vgg
from nstjax.config import base_config, validate
from nstjax.errors import ConfigError
from nstjax.losses import (
    Objective,
    content_loss,
    content_term,
    hist_term,
    loss_terms,
    normalize_gradient,
    objective_weights,
    style_loss,
    style_term,
    tv_loss,
    tv_term,
)
from nstjax.optimize import OptimizerSpec, init_image, run_steps
from nstjax.problem import point_weights
from nstjax.run import run_sweep
from nstjax.sweep import TRACED_FIELDS, expand
from nstjax.targets import compute_targets
from tests.test_sweep import _Compiles

# relu2_1 is both a style and a histogram layer, relu2_2 a content layer: terms that share a
# layer's activations must each be normalised on their own.
OBJ = Objective(("relu2_2",), ("relu1_1", "relu2_1"), pooling="avg", content_norm="mean",
                gram_norm="chw", hist_layers=("relu2_1",))
TERMS = [("content", "relu2_2"), ("style", "relu1_1"), ("style", "relu2_1"), ("hist", "relu2_1")]
TERM_FN = {"content": content_term, "style": style_term, "hist": hist_term}


def weights_for(on: bool) -> dict:
    """Weights unlike each other and unlike 1, so a norm that ignored them would show."""
    return objective_weights(OBJ, 2.0, 30.0, 0.5, content_layer_weights=(0.7,),
                             style_layer_weights=(0.25, 0.75), hist_weight=3.0,
                             normalize_gradients=on)


def term_weight(w: dict, kind: str, layer: str) -> float:
    return float(w[f"{kind}_weight"] * w[f"{kind}_layers"][layer])


@pytest.fixture(scope="module")
def setup(params, tubingen, starry):
    targets = compute_targets(params, OBJ, tubingen, [starry])
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.clip(tubingen + rng.normal(0, 20, tubingen.shape), 0, 255), jnp.float32)
    feats = vgg.apply_features(params, x[None], OBJ.layers, OBJ.pooling)
    return params, targets, x, feats


def _term_grad(setup, kind, layer, w):
    _, targets, _, feats = setup
    fn = TERM_FN[kind]
    return jax.grad(lambda f: fn(f, layer, targets, w, OBJ))(feats[layer])


def _l1(a) -> float:
    return float(np.sum(np.abs(np.asarray(a, np.float64))))


@pytest.mark.parametrize("kind,layer", TERMS)
def test_each_weighted_terms_gradient_wrt_its_layer_has_l1_norm_equal_to_its_weight(
        setup, kind, layer):
    w = weights_for(True)
    g = _term_grad(setup, kind, layer, w)
    assert _l1(g) == pytest.approx(term_weight(w, kind, layer), rel=1e-4)
    # and it points where the plain gradient points
    plain = _term_grad(setup, kind, layer, weights_for(False))
    np.testing.assert_allclose(np.asarray(g) * (_l1(plain) / _l1(g)), plain, rtol=1e-4,
                               atol=1e-6 * np.abs(np.asarray(plain)).max())


@pytest.mark.parametrize("kind,layer", TERMS[:3])
def test_with_normalised_gradients_the_loss_normalisations_no_longer_matter(setup, kind, layer):
    """content_norm and gram_norm only scale a term, which the normalisation divides out (the
    targets are stored per position, the same under every norm)."""
    _, targets, _, feats = setup
    other = dataclasses.replace(OBJ, content_norm="paper", gram_norm="paper")
    w = weights_for(True)
    a = _term_grad(setup, kind, layer, w)
    b = jax.grad(lambda f: TERM_FN[kind](f, layer, targets, w, other))(feats[layer])
    scale = np.abs(np.asarray(a)).max()
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)
    plain = weights_for(False)  # without it they do: by orders of magnitude
    ratio = _l1(jax.grad(lambda f: TERM_FN[kind](f, layer, targets, plain, other))(feats[layer])) \
        / _l1(_term_grad(setup, kind, layer, plain))
    assert not 0.5 < ratio < 2.0, ratio


def test_the_tv_terms_gradient_wrt_the_image_has_l1_norm_equal_to_tv_weight(setup):
    _, _, x, _ = setup
    w = weights_for(True)
    g = jax.grad(lambda im: tv_term(im, w, OBJ))(x)
    assert _l1(g) == pytest.approx(0.5, rel=1e-4)
    off = jax.grad(lambda im: tv_term(im, weights_for(False), OBJ))(x)
    np.testing.assert_allclose(off, jax.grad(lambda im: 0.5 * tv_loss(im, OBJ.tv_kind))(x),
                               rtol=1e-6)


@pytest.mark.parametrize("kind,layer", TERMS)
def test_with_the_flag_off_each_terms_gradient_is_the_plain_gradient(setup, kind, layer):
    _, targets, _, feats = setup
    w = weights_for(False)
    a = term_weight(w, kind, layer)
    plain_loss = {
        "content": lambda f: a * content_loss(f[0], targets["content"][layer], OBJ.content_norm),
        "style": lambda f: a * style_loss(f, targets["style"][layer], OBJ.gram_norm),
        "hist": lambda f: a * histogram.histogram_loss(f.reshape(-1, f.shape[-1]),
                                                       targets["hist"][layer]),
    }[kind]
    plain = jax.grad(plain_loss)(feats[layer])
    got = _term_grad(setup, kind, layer, w)
    np.testing.assert_allclose(got, plain, rtol=1e-6, atol=1e-9 * np.abs(np.asarray(plain)).max())


def test_with_the_flag_off_the_image_gradient_is_the_one_without_the_switch(setup):
    params, targets, x, _ = setup
    off = weights_for(False)
    without = {k: v for k, v in off.items() if k != "normalize_gradients"}  # as before the switch

    def grad(w):
        return jax.grad(lambda im: loss_terms(params, im, targets, w, OBJ)["loss"])(x)

    np.testing.assert_array_equal(np.asarray(grad(off)), np.asarray(grad(without)))


def test_the_loss_values_are_the_same_with_the_flag_on_or_off(setup):
    params, targets, x, _ = setup
    on = loss_terms(params, x, targets, weights_for(True), OBJ)
    off = loss_terms(params, x, targets, weights_for(False), OBJ)
    assert set(on) == set(off)
    for k in on:
        assert float(on[k]) == float(off[k]), k


def test_under_vmap_each_example_is_normalised_on_its_own(setup, params, starry):
    """Two examples, one normalised and one not, with other activations and weights: a norm taken
    over the batch axis, or a flag shared across it, would break one of them."""
    _, targets, x, feats = setup
    w_on, w_off = weights_for(True), objective_weights(OBJ, 5.0, 7.0, 0.1, hist_weight=2.0)
    ws = jax.tree.map(lambda a, b: jnp.stack([a, b]), w_on, w_off)
    y = jax.image.resize(jnp.asarray(starry), x.shape, "linear")  # another image, x's shape
    other = vgg.apply_features(params, y[None], OBJ.layers, OBJ.pooling)
    for kind, layer in TERMS:
        term = functools.partial(TERM_FN[kind], layer=layer, targets=targets, obj=OBJ)
        fs = jnp.stack([feats[layer], other[layer]])
        gs = jax.vmap(jax.grad(lambda f, w, term=term: term(f, weights=w)))(fs, ws)
        assert _l1(gs[0]) == pytest.approx(term_weight(w_on, kind, layer), rel=1e-4), (kind, layer)
        alone = jax.grad(lambda f, term=term: term(f, weights=w_off))(other[layer])
        np.testing.assert_allclose(gs[1], alone, rtol=1e-5,
                                   atol=1e-7 * np.abs(np.asarray(alone)).max())
    # Through VGG-19's own custom VJPs (packed ReLU masks) too: each image's gradient is the one it
    # gets alone.
    xs = jnp.stack([x, y])

    def loss(im, w):
        return loss_terms(params, im, targets, w, OBJ)["loss"]

    gs = jax.vmap(jax.grad(loss))(xs, ws)
    for i, w in enumerate((w_on, w_off)):
        alone = jax.grad(loss)(xs[i], w)
        np.testing.assert_allclose(gs[i], alone, rtol=1e-4,
                                   atol=1e-5 * np.abs(np.asarray(alone)).max())


def test_a_batch_normalises_each_example_bit_for_bit_as_alone():
    """The norm's summation order does not depend on batching: L-BFGS would grow a last-bit
    difference into a visible one between a sweep's point and the same run alone."""
    rng = np.random.default_rng(1)
    for shape in [(1, 24, 32, 64), (1, 12, 16, 256), (48, 64, 3)]:
        gs = jnp.asarray(rng.normal(size=(4, *shape)), jnp.float32)
        ws = jnp.asarray([0.5, 3.0, 0.0, 7.0], jnp.float32)
        on = jnp.asarray([1.0, 1.0, 1.0, 0.0], jnp.float32)

        def vjp(g, on, w):
            return jax.vjp(lambda x: normalize_gradient(x, on, w), g)[1](g * w)[0]

        batched = jax.jit(jax.vmap(vjp))(gs, on, ws)
        for i in range(4):
            np.testing.assert_array_equal(batched[i], jax.jit(vjp)(gs[i], on[i], ws[i]))
        assert _l1(batched[0]) == pytest.approx(0.5, rel=1e-5)
        assert not np.any(batched[2])  # a zero weight: zero, not NaN
        np.testing.assert_array_equal(batched[3], gs[3] * 7.0)  # off: passed on as it came


def test_the_field_is_a_validated_traced_bool():
    c = base_config()
    assert c.normalize_gradients is False and "normalize_gradients" in TRACED_FIELDS
    c.normalize_gradients = True
    spec = validate(c)
    assert spec.normalize_gradients is True
    w = point_weights(spec.objective, spec)
    assert w["normalize_gradients"].dtype == np.float32 and float(w["normalize_gradients"]) == 1.0
    assert spec.objective == validate(base_config()).objective  # not static: one program for both
    d = base_config().to_dict()
    d["normalize_gradients"] = "yes"
    with pytest.raises(ConfigError, match="normalize_gradients must be True or False"):
        validate(ml_collections.ConfigDict(d))


def small_sweep(image_dir):
    from tests.test_sweep import small_config

    c = small_config(image_dir, axes=(("normalize_gradients", (False, True)),))
    c.style_layers = ("relu1_1", "relu2_1", "relu3_1")
    c.content_weight = 5.0  # neural-style's defaults, whose scale assumes normalised gradients
    c.style_weight = 100.0
    # neural-style's default start. From the content, L-BFGS's curvature estimate from normalised
    # gradients makes its 4th step overshoot (the loss x70) before it recovers (docs/extensions.md).
    c.init = "noise"
    return c


@pytest.fixture(scope="module")
def swept(tmp_path_factory, image_dir, weights):
    workdir = tmp_path_factory.mktemp("normalize_sweep")
    with _Compiles() as compiles:
        out = run_sweep(small_sweep(image_dir), workdir, params=weights[0], weights_info=weights[1],
                        say=lambda m: None, write_figures=False)
    return workdir, out, compiles.names


def test_a_sweep_over_normalize_gradients_is_one_batch_compiled_once(swept, image_dir):
    _, out, compiles = swept
    assert len(expand(small_sweep(image_dir)).points) == 2
    assert len(out["points"]) == 2 and len(out["batches"]) == 1
    assert compiles.count("batched_steps") == 1, compiles
    a, b = (np.asarray(p["image"]) for p in out["points"])
    assert not np.array_equal(a, b)  # the switch reached the compiled step


@pytest.mark.parametrize("index", [0, 1])
def test_a_short_lbfgs_run_from_noise_lowers_the_loss_with_and_without_normalisation(swept, index):
    workdir, out, _ = swept
    point = out["sweep"].points[index]
    assert point.values["normalize_gradients"] is bool(index)
    lines = [json.loads(s)
             for s in (workdir / "points" / point.name / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 3, 6]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"], lines


def test_adam_from_the_content_lowers_the_loss_with_normalised_gradients(setup, tubingen):
    """Adam, invariant to the gradient's scale, needs no curvature estimate: steady from the
    start."""
    params, targets, _, _ = setup
    spec = OptimizerSpec("adam", 5.0)
    x = init_image("content", jax.random.PRNGKey(0), tubingen)
    x, _, terms, done, ok = run_steps(params, targets, weights_for(True), x, spec.build().init(x),
                                      obj=OBJ, spec=spec, n_steps=10)
    loss = np.asarray(terms["loss"])
    assert bool(ok) and int(done) == 10
    assert loss[-1] < 0.5 * loss[0], loss
