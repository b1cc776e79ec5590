"""experiments/conditioning.py's pieces: the colour transfer matches the style's colour statistics,
and each parametrisation's clipping correction moves the image by exactly the clipped amount (else
a variant would optimise a different image than it reports)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.conditioning import colour_transfer, parametrisation


def test_colour_transfer_gives_the_style_s_colour_mean_and_covariance():
    rng = np.random.default_rng(0)
    content = np.clip(rng.normal(120, 20, (40, 50, 3)) @ np.array([[1, .3, 0], [0, 1, .2], [0, 0, 1]]), 0, 255)
    style = np.clip(rng.normal(90, 15, (30, 30, 3)) + np.array([40.0, 0, -20]), 0, 255)
    out = colour_transfer(content.astype(np.float32), style.astype(np.float32)).reshape(-1, 3)
    s = style.reshape(-1, 3)
    assert np.allclose(out.mean(0), s.mean(0), atol=0.5)
    assert np.allclose(np.cov(out.T), np.cov(s.T), rtol=0.02, atol=2.0)


@pytest.mark.parametrize("kind", ["pixels", "pyramid:3:0.5", "colour:1", "colour:-1"])
def test_parametrisations_start_at_the_image_and_fix_moves_it_by_d(kind):
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (24, 32, 3)).astype(np.float32)
    to_image, z0, fix = parametrisation(kind, image)
    np.testing.assert_allclose(np.asarray(to_image(z0)), image, atol=1e-3)
    z = [a + jnp.asarray(rng.normal(0, 5, a.shape), jnp.float32) for a in z0]
    d = jnp.asarray(rng.normal(0, 3, image.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(to_image(fix(z, d))), np.asarray(to_image(z) + d), atol=1e-3)
