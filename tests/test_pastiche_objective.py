"""configs/pastiche_objective.py computes pastiche 1.6.0's loss, checked against numpy written
from pastiche's source (mse_loss, gram / (h*w), 10 / C^2, 0.01 on the content term)."""

from __future__ import annotations

import importlib.util

import jax.numpy as jnp
import numpy as np

from nstjax import features
from nstjax.config import validate
from nstjax.losses import loss_terms
from nstjax.problem import load_problem, style_size
from tests.conftest import ROOT


def _config(image_dir):
    spec = importlib.util.spec_from_file_location("pastiche_objective",
                                                  ROOT / "configs" / "pastiche_objective.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.content = str(image_dir / "tubingen.jpg")
    c.style = str(image_dir / "starry_night.jpg")
    c.size = 64
    return c


def test_style_image_gets_the_contents_pixel_count(image_dir):
    spec = validate(_config(image_dir))
    w, h = style_size(1024, 640, (64, 48), spec)
    assert abs(w * h - 64 * 48) <= 64 and abs(w / h - 1.6) < 0.05


def test_value_matches_pastiche_formula(params, image_dir):
    spec = validate(_config(image_dir))
    problem = load_problem(spec, params)
    rng = np.random.default_rng(0)
    x = np.clip(problem.content + rng.normal(0, 25, problem.content.shape), 0,
                255).astype(np.float32)
    ours = float(loss_terms(params, jnp.asarray(x), problem.targets, problem.weights,
                            spec.objective)["loss"])

    def act(img, layer):  # pastiche's VGG activations, NCHW float64 like torch's (1, C, H, W)
        return np.transpose(np.asarray(features(params, img, [layer], "max")[layer], np.float64),
                            (0, 3, 1, 2))

    def gram(a):  # pastiche.gram
        _, c, h, w = a.shape
        f = a.reshape(c, h * w)
        return f @ f.T / (h * w)

    def mse(a, b):
        return float(np.mean((a - b) ** 2))

    expected = 0.01 * mse(act(x, "relu4_2"), act(problem.content, "relu4_2"))
    for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"):
        a, s = act(x, layer), act(problem.styles[0], layer)
        expected += 10.0 / a.shape[1] ** 2 * mse(gram(a), gram(s))
    np.testing.assert_allclose(ours, expected, rtol=2e-4)
