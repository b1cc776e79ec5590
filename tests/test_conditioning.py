"""experiments/conditioning.py's parametrisations: each starts at the given image, and its clipping
correction moves the image by exactly the clipped amount (else a variant would optimise a different
image than it reports)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.conditioning import parametrisation


@pytest.mark.parametrize("kind", ["pixels", "pyramid:3:0.5", "colour:1", "colour:-1"])
def test_parametrisations_start_at_the_image_and_fix_moves_it_by_d(kind):
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, (24, 32, 3)).astype(np.float32)
    to_image, z0, fix = parametrisation(kind, image)
    np.testing.assert_allclose(np.asarray(to_image(z0)), image, atol=1e-3)
    z = [a + jnp.asarray(rng.normal(0, 5, a.shape), jnp.float32) for a in z0]
    d = jnp.asarray(rng.normal(0, 3, image.shape), jnp.float32)
    np.testing.assert_allclose(np.asarray(to_image(fix(z, d))), np.asarray(to_image(z) + d),
                               atol=1e-3)
