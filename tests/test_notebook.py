"""From a notebook: nstjax.stylize on arrays (README's three-line example, run as written), a second
call reusing the compiled programs, bad input raised as the CLI's one-line UserError, a workdir on
request, and stylize_sweep returning the points' images and rows."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

import nstjax
from nstjax.errors import UserError
from tests.conftest import ROOT


def _readme_example() -> str:
    """The first code block of README's "From a notebook" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### From a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def test_the_readme_example_runs_on_arrays_and_lowers_the_loss(image_dir, tmp_path, monkeypatch):
    import shutil

    shutil.copy(image_dir / "tubingen.jpg", tmp_path / "photo.jpg")
    shutil.copy(image_dir / "starry_night.jpg", tmp_path / "painting.jpg")
    monkeypatch.chdir(tmp_path)
    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) == 3, code
    assert "size=384, steps=200" in code
    scope: dict = {}
    # the README's own lines
    exec(code.replace("size=384, steps=200", "size=64, steps=8"), scope)  # noqa: S102 - README code
    image = scope["image"]
    assert (isinstance(image, np.ndarray) and image.dtype == np.float32
            and image.shape == (48, 64, 3))
    assert 0.0 <= image.min() and image.max() <= 255.0
    photo, painting = scope["load_image"]("photo.jpg"), scope["load_image"]("painting.jpg")
    again, terms = nstjax.stylize(photo, painting, size=64, steps=8, return_terms=True)
    np.testing.assert_array_equal(again, image)
    assert terms[-1]["step"] == 8 and terms[-1]["loss"] < 0.5 * terms[0]["loss"]
    np.testing.assert_array_equal(nstjax.stylize(photo / 255.0, painting, size=64, steps=8), image)


def test_a_second_call_of_the_same_shapes_compiles_nothing(image_dir):
    from nstjax.images import load_image

    photo = load_image(image_dir / "tubingen.jpg", 128)
    painting = load_image(image_dir / "shipwreck.jpg", 128)
    kw = {"size": 128, "steps": 3, "style_layers": ("relu1_1", "relu2_1", "relu3_1"), "seed": 5}
    t = time.perf_counter()
    first = nstjax.stylize(photo, painting, **kw)
    t_first = time.perf_counter() - t
    t = time.perf_counter()
    second = nstjax.stylize(photo, painting, **kw)
    t_second = time.perf_counter() - t
    np.testing.assert_array_equal(first, second)
    assert t_second * 3 <= t_first, (t_first, t_second)


@pytest.mark.parametrize("kwargs,message", [
    ({"style_layers": ("relu9_9",)}, "unknown style layer 'relu9_9'"),
    ({"style_weight": float("nan")}, "style_weight must be finite"),
    ({"no_such_field": 1}, "unknown config field 'no_such_field'"),
    ({"size": 3}, "too small for layer"),
])
def test_bad_input_raises_the_one_line_user_error(image_dir, kwargs, message):
    with pytest.raises(UserError) as e:
        nstjax.stylize(image_dir / "tubingen.jpg", image_dir / "starry_night.jpg", steps=1,
                       **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_what_is_not_an_image_is_refused_in_one_line():
    with pytest.raises(UserError, match="content: expected an .H, W, 3. array"):
        nstjax.stylize(np.zeros((4, 4, 7)), np.zeros((8, 8, 3)), steps=1)
    with pytest.raises(UserError, match="NaN"):
        nstjax.stylize(np.full((8, 8, 3), np.nan), np.zeros((8, 8, 3)), steps=1)


def test_with_a_workdir_it_is_a_run_with_all_its_files(image_dir, tmp_path):
    from nstjax.images import load_image

    photo = load_image(image_dir / "tubingen.jpg", 64)
    image = nstjax.stylize(photo, image_dir / "starry_night.jpg", size=32, steps=2,
                           workdir=tmp_path / "w")
    for f in ("final.png", "manifest.json", "metrics.jsonl", "inputs/content.png"):
        assert (tmp_path / "w" / f).is_file(), f
    assert image.shape == (24, 32, 3)


def test_stylize_sweep_returns_every_points_image_and_row(image_dir):
    from nstjax.images import load_image

    photo = load_image(image_dir / "tubingen.jpg", 64)
    paintings = [load_image(image_dir / n, 64) for n in ("starry_night.jpg", "shipwreck.jpg")]
    out = nstjax.stylize_sweep({"size": 32, "steps": 2, "style_layers": ("relu1_1", "relu2_1")},
                               content=photo,
                               axes=[("style", paintings), ("style_weight", (1e2, 1e3))])
    assert out["images"].shape == (4, 24, 32, 3) and out["images"].dtype == np.float32
    assert [r["index"] for r in out["rows"]] == [0.0, 1.0, 2.0, 3.0]
    assert all(r["status"] == "finished" and r["loss"] > 0 for r in out["rows"])
    assert [p["style_weight"] for p in out["points"]] == [1e2, 1e3, 1e2, 1e3]
    assert not np.array_equal(out["images"][0], out["images"][2])  # two paintings, two results
