"""The judge: fixed reference metrics of every run and sweep point, independent of its own
objective, in the manifest, metrics.jsonl's last line (and every judge.every steps), summary.csv's
judge_* columns and judge.png. Real weights and images, 64 px runs judged at 128 px."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from nstjax.config import base_config
from nstjax.images import load_image
from nstjax.run import run, run_sweep


def _config(image_dir, **fields):
    c = base_config()
    c.content = str(image_dir / "tubingen.jpg")
    c.style = str(image_dir / "starry_night.jpg")
    c.size, c.steps, c.chunk, c.log_every, c.progress = 64, 6, 3, 3, False
    c.checkpoint_every = 0
    c.judge.enabled = True  # (tests/conftest.py starts configs without it)
    c.judge.size = 128
    for k, v in fields.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="module")
def judged_sweep(tmp_path_factory, image_dir, weights):
    """No steps at all (the result is the content photo) under four different objectives: two
    style-layer sets in one batch, two Gram normalisations in two."""
    c = _config(image_dir, steps=0)
    c.sweep.axes = (("style_layers", (("relu1_1",), ("relu3_1", "relu5_1"))),
                    ("gram_norm", ("paper", "chw")))
    workdir = tmp_path_factory.mktemp("judged")
    out = run_sweep(c, workdir, params=weights[0], weights_info=weights[1], say=lambda m: None)
    return workdir, out


def test_the_judge_does_not_depend_on_a_points_own_objective(judged_sweep):
    workdir, out = judged_sweep
    rows = list(csv.DictReader((workdir / "summary.csv").open()))
    assert len(rows) == 4 and len(out["batches"]) == 2
    for col in ("judge_style", "judge_content", "judge_color"):
        values = {r[col] for r in rows}
        # the same image, the same numbers
        assert len(values) == 1 and float(values.pop()) >= 0, col
    assert "judge_color_content" not in rows[0]  # only when colour is preserved
    assert (workdir / "judge.png").stat().st_size > 1000


def test_the_colour_distance_is_the_per_channel_wasserstein_distance_of_the_pixels(
        judged_sweep, image_dir):
    """Recomputed with numpy: the result resized to the judge's size against the painting's
    pixels."""
    import jax

    workdir, out = judged_sweep
    d = workdir / "points" / out["sweep"].points[0].name
    m = json.loads((d / "manifest.json").read_text())
    h, w = m["judge"]["size"]
    result = np.asarray(out["points"][0]["image"], np.float32)
    x = np.clip(np.asarray(jax.image.resize(result, (h, w, 3), "linear")), 0, 255).reshape(-1, 3)
    style = load_image(image_dir / "starry_night.jpg", max(h, w)).reshape(-1, 3)
    q = (np.arange(h * w) + 0.5) / (h * w)
    ref = np.mean([np.mean(np.abs(np.sort(x[:, c]) - np.quantile(style[:, c], q, method="hazen")))
                   for c in range(3)])
    assert m["judge"]["color"] == pytest.approx(ref, rel=2e-2)


def test_a_run_records_its_judge_in_the_manifest_and_metrics_and_every_n_steps(
        image_dir, weights, tmp_path):
    c = _config(image_dir, preserve_color="luminance")
    c.judge.every = 3
    summary = run(c, tmp_path / "w", params=weights[0], weights_info=weights[1],
                  handle_signals=False, log=lambda m: None)
    m = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert set(m["judge"]) == {"style", "content", "color", "color_content", "size"}
    assert m["judge"]["size"] == [96, 128]
    lines = [json.loads(x) for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [("judge_style" in r) for r in lines] == [False, True, True]  # steps 0, 3, 6 (the end)
    assert lines[-1]["judge_style"] == m["judge"]["style"] and summary["steps_done"] == 6


def test_more_style_weight_brings_the_judges_style_distance_down(image_dir, weights, tmp_path):
    c = _config(image_dir, steps=10, chunk=5, log_every=5)
    c.sweep.axes = (("style_weight", (0.0, 1e4)),)
    out = run_sweep(c, tmp_path / "w", params=weights[0], weights_info=weights[1],
                    say=lambda m: None, write_figures=False)
    rows = list(csv.DictReader((tmp_path / "w" / "summary.csv").open()))
    none, heavy = (float(r["judge_style"]) for r in rows)
    assert heavy < 0.75 * none, (none, heavy)  # measured: 0.51 after 10 steps
    assert float(rows[0]["judge_content"]) < float(rows[1]["judge_content"])  # and keeps less photo
    assert len(out["points"]) == 2


def test_the_judge_can_be_turned_off(image_dir, weights, tmp_path):
    c = _config(image_dir, steps=0)
    c.judge.enabled = False
    c.sweep.axes = (("style_weight", (1.0, 2.0)),)
    run_sweep(c, tmp_path / "w", params=weights[0], weights_info=weights[1], say=lambda m: None)
    header = (tmp_path / "w" / "summary.csv").read_text().splitlines()[0]
    assert "judge" not in header and not (tmp_path / "w" / "judge.png").exists()
