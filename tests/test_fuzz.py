"""Property-based fuzzing (hypothesis): the image loader and the config validator refuse garbage
with their one-line errors and never with anything else (which would reach the user as a
traceback)."""

from __future__ import annotations

import atexit
import io
import math
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nstjax import images
from nstjax.config import RunSpec, base_config, validate
from nstjax.errors import ConfigError, ImageError

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_TMP = tempfile.mkdtemp(prefix="nstjax-fuzz-")
atexit.register(shutil.rmtree, _TMP, True)


def _load(data: bytes, suffix: str = ".img"):
    path = os.path.join(_TMP, f"x{suffix}")
    with open(path, "wb") as f:
        f.write(data)
    try:
        return images.load_image(path)
    except ImageError:
        return None


def _check(result):
    if result is not None:  # whatever decoded must be a proper RGB image in range
        assert result.ndim == 3 and result.shape[2] == 3 and result.dtype == np.float32
        assert (result.size and np.isfinite(result).all() and result.min() >= 0
                and result.max() <= 255)


def _encoded(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


SAMPLES = [_encoded(f, m) for f, m in (("JPEG", "RGB"), ("JPEG", "CMYK"), ("PNG", "RGBA"),
                                       ("PNG", "P"), ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "RGB"),
                                       ("WEBP", "RGB"), ("PNG", "L"))]
MAGICS = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
          b"RIFF", b"P6\n", b"\x00\x00\x01\x00", b""]


@FUZZ
@given(magic=st.sampled_from(MAGICS), body=st.binary(max_size=600))
def test_loader_on_random_bytes(magic, body):
    _check(_load(magic + body))


@FUZZ
@given(sample=st.sampled_from(SAMPLES), cut=st.floats(0, 1), flips=st.lists(
    st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=6))
def test_loader_on_truncated_and_corrupted_real_images(sample, cut, flips):
    data = bytearray(sample[: max(1, int(len(sample) * cut))] if cut < 1 else sample)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    _check(_load(bytes(data)))


# --------------------------------------------------------------------------------------------
# Config

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["relu1_1", "relu4_2", "max", "avg", "mean", "paper", "chw", "l1", "l2",
                     "lbfgs", "adam", "noise", "content", "default", "builtin:hopper", ""]))
_values = st.one_of(_scalars, st.lists(_scalars, max_size=4), st.tuples(_scalars, _scalars),
                    st.dictionaries(
                        st.sampled_from(["name", "learning_rate", "memory_size", "b1", "x"]),
                        _scalars, max_size=3))
FIELDS = sorted(base_config().keys())
OPT_FIELDS = ["name", "learning_rate", "memory_size", "b1", "b2", "extra"]


@settings(max_examples=600, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), _values, min_size=1, max_size=4),
       opt_changes=st.dictionaries(st.sampled_from(OPT_FIELDS), _scalars, max_size=2),
       extra_field=st.booleans())
def test_validate_raises_only_config_errors(changes, opt_changes, extra_field):
    d = base_config().to_dict()
    d.update(changes)
    if isinstance(d.get("optimizer"), dict):
        d["optimizer"] = {**d["optimizer"], **opt_changes}
    if extra_field:
        d["surprise"] = 1
    try:
        spec = validate(ml_collections.ConfigDict(d))
    except ConfigError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert not extra_field
    assert isinstance(spec, RunSpec)
    for name in ("size", "seed", "steps", "log_every", "save_every", "chunk", "checkpoint_every"):
        assert isinstance(getattr(spec, name), int) and not isinstance(getattr(spec, name), bool)
    for w in (spec.content_weight, spec.style_weight, spec.tv_weight, spec.style_scale,
              *spec.style_layer_weights, *spec.content_layer_weights, *spec.style_blend):
        assert math.isfinite(w) and w >= 0
    assert spec.optimizer.memory_size >= 1 and math.isfinite(spec.optimizer.learning_rate)
