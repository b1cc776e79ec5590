"""One engine: a single run is a batch of one, and a sweep point does all that a run does:
checkpoints and a resume inside a batch to the same bytes, multi-scale stages, intermediate images,
--replay; points that differ only in their images share one batch and one compiled program; a folder
of images is an axis. Real weights and images at 64 px, a few steps."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from nstjax import sweep as sw
from nstjax.cli import main
from nstjax.config import base_config
from nstjax.run import run, run_sweep
from tests.conftest import ROOT
from tests.test_sweep import _Compiles

STYLES = ("starry_night.jpg", "shipwreck.jpg", "woman-with-hat-matisse.jpg")


def eight_points(image_dir, **fields):
    """2 style images x 2 style weights x 2 style-layer sets, at 64 px."""
    c = base_config()
    c.content = str(image_dir / "tubingen.jpg")
    c.size, c.steps, c.chunk, c.log_every, c.progress = 64, 8, 2, 2, False
    c.content_layers = ("relu2_2",)
    c.checkpoint_every = 4
    c.sweep.axes = (("style", tuple(str(image_dir / s) for s in STYLES[:2])),
                    ("style_weight", (1e2, 1e4)),
                    ("style_layers", (("relu1_1",), ("relu1_1", "relu2_1"))))
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def _finals(workdir: Path) -> dict[str, bytes]:
    return {d.name: (d / "final.png").read_bytes() for d in sorted((workdir / "points").iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, image_dir, weights):
    workdir = tmp_path_factory.mktemp("whole")
    with _Compiles() as compiles:
        out = run_sweep(eight_points(image_dir), workdir, params=weights[0],
                        weights_info=weights[1], say=lambda m: None)
    return workdir, out, compiles.names


def test_points_that_differ_in_their_style_image_share_one_batch_and_one_compile(uninterrupted):
    _, out, compiles = uninterrupted
    assert len(out["batches"]) == 1 and out["batches"][0]["points"] == list(range(8))
    assert compiles.count("batched_steps") == 1, compiles


def test_a_sweep_killed_inside_a_batch_resumes_from_its_checkpoints_to_the_same_bytes(
        uninterrupted, image_dir, weights, tmp_path):
    """SIGKILL once every point has its checkpoint at step 4 (of 8): the rerun restores all 8 there,
    redoes none of the steps before it, and ends with every final.png byte-identical."""
    ref, _, _ = uninterrupted
    cfg_file = tmp_path / "eight.py"
    cfg_file.write_text("from pathlib import Path\nfrom tests.test_engine import eight_points\n"
                        f"def get_config():\n    return eight_points(Path({str(image_dir)!r}))\n")
    workdir = tmp_path / "w"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "nstjax", f"--config={cfg_file}",
                             f"--workdir={workdir}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            cks = list(workdir.glob("points/*/checkpoints/4/nstjax_files.json"))
            if len(cks) == 8 or proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(list(workdir.glob("points/*/checkpoints/4/nstjax_files.json"))) == 8, \
        proc.stderr.read()
    assert not list(workdir.glob("points/*/final.png"))  # killed inside the batch
    said = []
    out = run_sweep(eight_points(image_dir), workdir, params=weights[0], weights_info=weights[1],
                    say=said.append)
    assert [r["index"] for r in out["points"]] == list(range(8))
    assert any("resuming" in m and "from its checkpoint at step 4 of 8" in m for m in said), said
    assert _finals(workdir) == _finals(ref)
    for d in (workdir / "points").iterdir():
        m = json.loads((d / "manifest.json").read_text())
        assert [r["from_step"] for r in m["resumes"]] == [4]
        steps = [json.loads(line)["step"]
                 for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert steps == [0, 2, 4, 6, 8]  # each logged once: the resume truncated and went on


def test_a_sweep_point_replays_identically(uninterrupted, tmp_path, capsys):
    ref, out, _ = uninterrupted
    point = ref / "points" / out["sweep"].points[5].name
    assert main(["nstjax", f"--replay={point}", f"--workdir={tmp_path / 'again'}"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out


def test_a_single_run_is_a_batch_of_one_through_the_same_program(image_dir, weights, tmp_path):
    c = eight_points(image_dir, checkpoint_every=0, steps=2)
    c.sweep.axes = ()
    c.style = str(image_dir / STYLES[0])
    with _Compiles() as compiles:
        summary = run(c, tmp_path / "one", params=weights[0], weights_info=weights[1],
                      handle_signals=False)
    assert summary["steps_done"] == 2
    assert "batched_steps" in compiles.names and "steps" not in compiles.names


def test_a_sweep_with_scales_runs_to_the_end_with_intermediate_images(image_dir, weights, tmp_path):
    c = eight_points(image_dir, scales=(32,), scale_steps=(4,), steps=2, save_every=2)
    c.sweep.axes = (("style_weight", (1e2, 1e4)),)
    c.style = str(image_dir / STYLES[0])
    out = run_sweep(c, tmp_path / "w", params=weights[0], weights_info=weights[1],
                    say=lambda m: None)
    assert [r["status"] for r in out["points"]] == ["finished", "finished"]
    rows = list(csv.DictReader((tmp_path / "w" / "summary.csv").open()))
    assert [r["steps_done"] for r in rows] == ["6", "6"]
    assert Image.open(tmp_path / "w" / "grid.png").width > 0
    for d in (tmp_path / "w" / "points").iterdir():
        m = json.loads((d / "manifest.json").read_text())
        assert [s["size"] for s in m["stages"]] == [[24, 32], [48, 64]]
        assert [p.name for p in (d / "images").iterdir()] == ["step_000002.png"]  # within stage 1
        assert Image.open(d / "final.png").size == (64, 48)


def test_three_style_images_of_one_shape_are_one_batch_in_the_dry_run(image_dir):
    c = eight_points(image_dir)
    c.sweep.axes = (("style", tuple(str(image_dir / s) for s in STYLES)),)
    s = sw.expand(c)
    (batch,) = sw.plan(s, s.points, n_devices=1)
    assert [p.index for p in batch.points] == [0, 1, 2] and batch.n_chunks == 1


def test_a_content_folder_makes_one_point_per_image(image_dir, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("tubingen.jpg", "shipwreck.jpg"):
        shutil.copy(image_dir / name, photos / name)
    (photos / "notes.txt").write_text("not an image")
    c = eight_points(image_dir)
    c.sweep.axes = ()
    c.content = str(photos)
    assert sw.is_sweep(c)
    s = sw.expand(c)
    assert [p.values["content"] for p in s.points] == [str(photos / "shipwreck.jpg"),
                                                        str(photos / "tubingen.jpg")]
    assert [p.label for p in s.points] == ["content=shipwreck", "content=tubingen"]
    code = main(["nstjax", f"--config.content={photos}", "--config.size=64", "--dry_run",
                 f"--config.style={image_dir / STYLES[0]}"])
    out = capsys.readouterr().out
    assert code == 0 and "sweep: 2 points over content" in out and "batch 0" in out
    c.content = str(photos / "*.jpg")
    assert len(sw.expand(c).points) == 2


def test_print_every_prints_the_loss_and_every_weighted_term(image_dir, tmp_path, capsys):
    code = main(["nstjax", f"--workdir={tmp_path / 'w'}",
                 f"--config.content={image_dir / 'tubingen.jpg'}",
                 f"--config.style={image_dir / STYLES[0]}", "--config.size=32", "--config.steps=4",
                 "--config.progress=False", "--config.style_layers=('relu1_1','relu2_1')",
                 "--print_every=2"])
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("step ")]
    assert code == 0 and [line.split(":")[0] for line in lines] == ["step 0", "step 2", "step 4"]
    assert all("style/relu1_1" in line and "style/relu2_1" in line and "content/relu4_2" in line
               for line in lines)
    assert (tmp_path / "w" / "config.json").read_text().count('"print_every": 2') == 1
