"""Coarse-to-fine runs: most steps at low resolution, then refine at the full size.

With ``config.scales = (128, 256)`` and ``config.scale_steps = (100, 50)``, a run optimises 100
steps at a longer side of 128 px, upsamples the result to 256 px as the next stage's starting
image, runs 50 steps there, upsamples again and finishes with ``config.steps`` at ``config.size``.
Each stage recomputes its content and style targets at its own size (the style image keeps its size
relative to the output). A step at half the size costs about a quarter, so the coarse stages settle
the large-scale structure cheaply (Gatys et al. 2017, sec. 5; jcjohnson/neural-style's multires).

``metrics.jsonl`` counts ``step`` over all stages and tags each line with ``stage``, ``stage_step``
and ``size``. Both sides of a stage boundary are logged under one global step: stage K's last line
(its result at its own size and targets, ``stage_step`` = its steps) and stage K+1's first (the same
image upsampled, at the new size and targets, before any step there, ``stage_step`` = 0). Their
losses differ (other size, other targets); (``step``, ``stage``) strictly increases.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from nstjax.errors import ConfigError


def stages(spec) -> list:
    """The RunSpecs of each stage, coarse to fine; the last is ``spec`` itself."""
    if len(spec.scales) != len(spec.scale_steps):
        raise ConfigError(f"scales has {len(spec.scales)} sizes but scale_steps has "
                          f"{len(spec.scale_steps)} step counts")
    sizes = list(spec.scales) + [spec.size]
    if spec.scales and spec.size == 0:
        raise ConfigError("multi-scale runs need an explicit size (config.size > 0)")
    if any(s <= 0 for s in spec.scales) or any(a >= b for a, b in itertools.pairwise(sizes)):
        raise ConfigError(f"scales must be positive and increase up to size={spec.size}, not "
                          f"{tuple(spec.scales)}")
    out = [dataclasses.replace(spec, size=s, steps=n, scales=(), scale_steps=())
           for s, n in zip(spec.scales, spec.scale_steps)]
    return out + [dataclasses.replace(spec, scales=(), scale_steps=())]


def upsample(image: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Resizes an (H, W, 3) image in [0, 255] to ``shape`` = (H', W') (bicubic, clipped)."""
    out = jax.image.resize(jnp.asarray(image, jnp.float32), tuple(shape) + (3,), "cubic")
    return jnp.clip(out, 0.0, 255.0)
