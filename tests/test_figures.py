"""experiments/figures.py: a real (small) figure run end to end, its files, and a second run giving
the same losses.csv. The content-reconstruction figure at 64 px, 8 steps."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from PIL import Image

from nstjax import records
from tests.conftest import ROOT


def _figures():
    spec = importlib.util.spec_from_file_location("figures", ROOT / "experiments" / "figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ARGS = ["content_layers", "--quick", "--set", "size=64", "--set", "steps=8"]


@pytest.fixture(scope="module")
def figure(tmp_path_factory, image_dir):
    out = tmp_path_factory.mktemp("fig") / "content_layers"
    figures = _figures()
    assert figures.main(ARGS + ["--out", str(out), "--images", str(image_dir)]) == 0
    return figures, out


def test_a_figure_writes_its_figure_table_curves_and_manifest(figure):
    _, out = figure
    for name in ("figure.png", "losses.csv", "loss_curves.png", "manifest.json",
                 "sweep/summary.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [r["content_layers"] for r in rows] == ["relu1_2", "relu2_2", "relu3_2", "relu4_2",
                                                   "relu5_2"]
    assert all(r["status"] == "finished" and r["steps_done"] == "8" for r in rows)
    assert all(float(r["loss"]) == pytest.approx(float(r["content_loss"]) + float(r["style_loss"])
                                                 + float(r["tv_loss"]), rel=1e-5) for r in rows)
    assert "seconds" not in rows[0]  # timings would make two runs differ
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["figure"] == "content_layers" and manifest["weights"]["sha256"]
    assert manifest["environment"]["packages"]["jax"]
    for cell in manifest["cells"]:  # every cell's loss went down from white noise
        curve = records.read_metrics(out / cell["dir"] / "metrics.jsonl")
        assert curve[-1]["loss"] < 0.75 * curve[0]["loss"], cell["values"]
    im = Image.open(out / "figure.png")
    assert im.width > 5 * 64 and im.height > 64


def test_running_a_figure_again_gives_the_same_losses(figure, tmp_path, image_dir):
    figures, out = figure
    again = tmp_path / "again"
    assert figures.main(ARGS + ["--out", str(again), "--images", str(image_dir)]) == 0
    assert (again / "losses.csv").read_bytes() == (out / "losses.csv").read_bytes()


def test_a_missing_image_folder_is_one_line_and_exit_2(tmp_path, capsys):
    figures = _figures()
    code = figures.main(["styles", "--quick", "--images", str(tmp_path / "nope"), "--out",
                         str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no image folder" in err, err


# The paper's remaining figures (CVPR 2016 Figs. 5 and 6) and the two networks side by side: each
# one command writing its CSV and its image (64 px, 4 steps: what is checked is the plumbing).
NEW_FIGURES = {
    "init": ("init", ["content", "style", "noise", "noise", "noise", "noise"]),
    "content_layer": ("content_layers", ["relu2_2", "relu4_2"]),
    "networks": ("network", ["vgg19_normalized", "vgg19_normalized", "vgg19", "vgg19"]),
}


@pytest.mark.parametrize("name", sorted(NEW_FIGURES))
def test_each_new_figure_is_one_command_writing_its_csv_and_image(name, tmp_path, image_dir):
    column, values = NEW_FIGURES[name]
    out = tmp_path / name
    args = [name, "--quick", "--set", "size=64", "--set", "steps=4", "--out", str(out),
            "--images", str(image_dir)]
    assert _figures().main(args) == 0
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [r[column] for r in rows] == values
    assert all(r["status"] == "finished" and r["steps_done"] == "4" for r in rows)
    if name == "init":  # four white-noise images: four seeds
        assert [r["seed"] for r in rows if r["init"] == "noise"] == ["0", "1", "2", "3"]
    if name == "networks":  # each cell ran on (and recorded) its own network
        cells = json.loads((out / "manifest.json").read_text())["cells"]
        nets = [json.loads((out / c["dir"] / "manifest.json").read_text())["weights"]["network"]
                for c in cells]
        assert nets == values
    im = Image.open(out / "figure.png")
    assert im.width >= 2 * 64 and im.height > 64
