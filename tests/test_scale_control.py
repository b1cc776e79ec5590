"""Scale control (Gatys et al. 2017): ``style_layer_images`` gives each style layer the style
image its statistics come from."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from nstjax.config import STYLE_LAYERS_5, base_config, validate
from nstjax.errors import ConfigError
from nstjax.images import load_image
from nstjax.losses import Objective
from nstjax.problem import load_problem
from nstjax.targets import compute_targets

FINE_FROM_0 = {"relu1_1": 0, "relu2_1": 0, "relu3_1": 1, "relu4_1": 1, "relu5_1": 1}


@pytest.fixture(scope="module")
def shipwreck(image_dir):
    return load_image(image_dir / "shipwreck.jpg", 64)


@pytest.mark.parametrize("stat", ["gram", "mean_std"])
def test_each_style_layer_takes_its_statistics_from_its_own_image(params, tubingen, starry,
                                                                   shipwreck, stat):
    obj = Objective(("relu4_2",), STYLE_LAYERS_5, style_stat=stat)
    mixed = compute_targets(params, obj, tubingen, [starry, shipwreck],
                            style_layer_images=FINE_FROM_0)
    alone = [compute_targets(params, obj, tubingen, [s]) for s in (starry, shipwreck)]
    blend = compute_targets(params, obj, tubingen, [starry, shipwreck])
    for layer, i in FINE_FROM_0.items():
        got = jax.tree.leaves(mixed["style"][layer])
        want = jax.tree.leaves(alone[i]["style"][layer])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-6, err_msg=layer)
    # ... which is not the blend (so the comparison above can fail)
    assert not np.allclose(jax.tree.leaves(blend["style"]["relu1_1"])[0],
                           jax.tree.leaves(mixed["style"]["relu1_1"])[0], rtol=1e-3)


def _cfg(image_dir, **kw):
    c = base_config()
    c.content = str(image_dir / "tubingen.jpg")
    c.style = f"{image_dir / 'starry_night.jpg'},{image_dir / 'shipwreck.jpg'}"
    c.size, c.progress = 64, False
    for k, v in kw.items():
        c[k] = v
    return c


def test_style_layer_images_is_a_checked_config_field(image_dir):
    assert validate(_cfg(image_dir)).style_layer_images == ()
    spec = validate(_cfg(image_dir, style_layer_images=(0, 0, 1, 1, 1)))
    assert spec.style_layer_images == (0, 0, 1, 1, 1)
    for bad, match in (((0, 1), "2 entries for 5 style layers"),
                       ((0, 0, 1, 1, 2), "names style image 2, but there are 2"),
                       ((0, 0, -1, 1, 1), "non-negative integers")):
        with pytest.raises(ConfigError, match=match):
            validate(_cfg(image_dir, style_layer_images=bad))
    with pytest.raises(ConfigError, match="cannot be combined with content_masks"):
        validate(_cfg(image_dir, style_layer_images=(0, 0, 1, 1, 1), content_masks="a.png,b.png"))
    with pytest.raises(ConfigError, match="cannot be combined with style_blend"):
        validate(_cfg(image_dir, style_layer_images=(0, 0, 1, 1, 1), style_blend=(1.0, 1.0)))


def test_points_differing_only_in_style_layer_images_share_a_batch_not_targets(params, image_dir):
    from nstjax import sweep

    c = _cfg(image_dir)
    c.sweep.axes = (("style_layer_images", ((0, 0, 1, 1, 1), (1, 1, 0, 0, 0))),)
    s = sweep.expand(c)
    assert len(sweep.plan(s, s.points, 1)) == 1  # one compiled program
    cache: dict = {}
    a, b = (load_problem(p.spec, params, cache=cache) for p in s.points)
    assert not np.allclose(a.targets["style"]["relu1_1"], b.targets["style"]["relu1_1"])


def test_the_scale_control_figure_is_one_command_writing_its_csv_and_grid(image_dir, tmp_path):
    import csv
    import importlib.util

    from tests.conftest import ROOT

    path = ROOT / "experiments" / "extensions.py"
    spec = importlib.util.spec_from_file_location("extensions", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "scale"
    assert mod.main(["--only", "scale", "--size", "64", "--steps", "4", "--out", str(out),
                     "--content", str(image_dir / "tubingen.jpg")]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["panel"] for r in rows] == ["scale: fine 1, coarse 2", "scale: fine 2, coarse 1"]
    configs = [json.loads((out / r["workdir"] / "config.json").read_text()) for r in rows]
    assert [c["style_layer_images"] for c in configs] == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert (out / "grid.png").is_file()
