"""Real optimisation on small real images: the loss goes down, pixels stay in range, seeds hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax.errors import ConfigError
from nstjax.losses import Objective, objective_weights
from nstjax.optimize import OptimizerSpec, init_image, run_steps
from nstjax.targets import compute_targets

OBJ = Objective(("relu4_2",), ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"),
                content_norm="mean", gram_norm="chw")


@pytest.fixture(scope="module")
def problem(params, tubingen, starry):
    targets = compute_targets(params, OBJ, tubingen, [starry])
    weights = objective_weights(OBJ, 1.0, 1e3, 0.0)
    return params, targets, weights


@pytest.mark.parametrize("name,lr,steps",
                         [("lbfgs", 1.0, 10), ("adam", 8.0, 10), ("lbfgs_zoom", 1.0, 3)])
def test_optimisers_lower_the_loss(problem, tubingen, name, lr, steps):
    params, targets, weights = problem
    spec = OptimizerSpec(name, lr)
    x = init_image("noise", jax.random.PRNGKey(0), tubingen)
    state = spec.build().init(x)
    x, state, terms, done, ok = run_steps(params, targets, weights, x, state, obj=OBJ, spec=spec,
                                          n_steps=steps)
    assert bool(ok) and int(done) == steps
    loss = np.asarray(terms["loss"])
    assert loss.shape == (steps,)
    assert loss[-1] < 0.5 * loss[0], loss
    x = np.asarray(x)
    assert x.min() >= 0.0 and x.max() <= 255.0
    np.testing.assert_allclose(loss, np.asarray(terms["content"]) + np.asarray(terms["style"])
                               + np.asarray(terms["tv"]), rtol=1e-5)


def test_chunks_continue_where_they_stopped(problem, tubingen):
    """Two chunks of 5 steps give the same image as one chunk of 10: the state carries over."""
    params, targets, weights = problem
    spec = OptimizerSpec("lbfgs")
    x0 = init_image("content", jax.random.PRNGKey(0), tubingen)
    a, _sa, *_ = run_steps(params, targets, weights, x0, spec.build().init(x0), obj=OBJ, spec=spec,
                          n_steps=10)
    b, sb, *_ = run_steps(params, targets, weights, x0, spec.build().init(x0), obj=OBJ, spec=spec,
                          n_steps=5)
    b, sb, *_ = run_steps(params, targets, weights, b, sb, obj=OBJ, spec=spec, n_steps=5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-2)


def test_noise_init_is_seeded(tubingen):
    a = init_image("noise", jax.random.PRNGKey(3), tubingen)
    b = init_image("noise", jax.random.PRNGKey(3), tubingen)
    c = init_image("noise", jax.random.PRNGKey(4), tubingen)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == tubingen.shape and 0 <= float(a.min()) and float(a.max()) <= 255
    np.testing.assert_array_equal(init_image("content", None, tubingen), tubingen)
    assert (init_image("style", None, tubingen, np.zeros((10, 20, 3), np.float32)).shape
            == tubingen.shape)
    with pytest.raises(ConfigError):
        init_image("sparkles", None, tubingen)


def test_non_finite_loss_freezes_on_the_last_good_image(problem, tubingen):
    params, targets, _ = problem
    weights = objective_weights(OBJ, 1.0, np.inf, 0.0)
    spec = OptimizerSpec("adam", 5.0)
    x0 = init_image("content", None, tubingen)
    x, _, terms, done, ok = run_steps(params, targets, weights, x0, spec.build().init(x0), obj=OBJ,
                                      spec=spec, n_steps=3)
    assert not bool(ok) and int(done) == 0
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
    assert not np.isfinite(float(terms["style"][0]))


def test_bad_optimizer_settings():
    with pytest.raises(ConfigError, match="optimizer.name"):
        OptimizerSpec("sgd-ish")
    with pytest.raises(ConfigError, match="learning_rate"):
        OptimizerSpec("adam", float("nan"))


def test_lbfgs_history_ignores_a_non_finite_gradient():
    """A NaN gradient stores no curvature pair: the history is left as it was (run_steps relies on
    this instead of selecting, and so copying, the whole (m, H, W, 3) history after each step)."""
    from nstjax import lbfgs

    tx = lbfgs.scale_by_lbfgs(4)
    x = jnp.linspace(0.0, 1.0, 12).reshape(2, 2, 3)
    state = tx.init(x)
    for k in range(3):  # a convex quadratic, so every pair is accepted
        _, state = tx.update(2.0 * (x - 0.5), state, x)
        x = x - 0.1 * (k + 1)
    assert int(state.size) == 2
    _, bad = tx.update(jnp.full_like(x, jnp.nan), state, x)
    # The ring of m pairs is untouched; the rejected pair went to the scratch slot m.
    np.testing.assert_array_equal(np.asarray(bad.s[:4]), np.asarray(state.s[:4]))
    np.testing.assert_array_equal(np.asarray(bad.y[:4]), np.asarray(state.y[:4]))
    assert np.isnan(np.asarray(bad.y[4])).all()  # y = grad - prev_grad
    assert int(bad.size) == 2 and int(bad.head) == int(state.head)
    # ...and the scratch slot is never read: the next step's direction is the same, and finite.
    g = 2.0 * (x - 0.5)
    d_bad, _ = tx.update(g, bad._replace(count=state.count, prev_params=state.prev_params,
                                         prev_grad=state.prev_grad), x)
    d_good, _ = tx.update(g, state, x)
    assert np.isfinite(np.asarray(d_bad)).all()
    np.testing.assert_array_equal(np.asarray(d_bad), np.asarray(d_good))


def test_lbfgs_freezes_on_the_last_good_image(problem, tubingen):
    params, targets, _ = problem
    weights = objective_weights(OBJ, 1.0, np.inf, 0.0)
    spec = OptimizerSpec("lbfgs", memory_size=5)
    x0 = init_image("content", None, tubingen)
    x, state, _, done, ok = run_steps(params, targets, weights, x0, spec.build().init(x0), obj=OBJ,
                                      spec=spec, n_steps=2)
    assert not bool(ok) and int(done) == 0
    np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
    assert int(state[0].count) == 0 and int(state[0].size) == 0
