"""Image loading and the built-in pair."""

from __future__ import annotations

import numpy as np
from PIL import Image

from nstjax import images
from nstjax.config import base_config, validate
from nstjax.problem import load_problem


def test_builtin_pair_is_deterministic_and_usable():
    a, b = images.builtin_style(), images.builtin_style()
    assert a.size == (512, 512) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    arr = np.asarray(a, np.float32)
    assert arr.std() > 30  # a painting, not a flat field
    photo = images.load_image(images.BUILTIN_CONTENT, 128)
    assert photo.shape == (128, 109, 3) and photo.dtype == np.float32


def test_resize_keeps_aspect_and_range(image_dir):
    x = images.load_image(image_dir / "tubingen.jpg", 100)
    assert x.shape == (75, 100, 3)
    assert 0 <= x.min() and x.max() <= 255


def test_init_from_a_file_is_resized_to_the_output(params, image_dir, tmp_path):
    Image.new("RGB", (30, 20), (10, 200, 30)).save(tmp_path / "init.png")
    c = base_config()
    c.content, c.style, c.size = (str(image_dir / "tubingen.jpg"),
                                  str(image_dir / "starry_night.jpg"), 64)
    c.init = str(tmp_path / "init.png")
    problem = load_problem(validate(c), params)
    assert problem.image.shape == (48, 64, 3)
    np.testing.assert_allclose(np.asarray(problem.image)[10, 10], [10, 200, 30], atol=1)


def test_save_png_is_atomic_and_rounds(tmp_path):
    img = np.full((4, 5, 3), 100.6, np.float32)
    img[0, 0] = [-5, 300, 254.4]
    images.save_png(tmp_path / "x.png", img)
    back = np.asarray(Image.open(tmp_path / "x.png"))
    assert back[0, 0].tolist() == [0, 255, 254] and back[1, 1].tolist() == [101] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary left behind
