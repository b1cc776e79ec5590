"""Coarse-to-fine runs (config.scales / config.scale_steps): stages at growing sizes, each starting
from the previous one's result; logged with global steps; resumable across stage boundaries with a
bit-identical result. Small on purpose: 32 px then 64 px, two style layers."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from nstjax import config as config_lib
from nstjax import multiscale, records
from nstjax.cli import main as cli_main
from nstjax.errors import ConfigError
from nstjax.run import run


def _cfg(image_dir: Path, **over):
    c = config_lib.get_config()
    c.content = str(image_dir / "tubingen.jpg")
    c.style = str(image_dir / "starry_night.jpg")
    c.size, c.steps, c.chunk, c.log_every = 64, 6, 2, 1
    c.scales, c.scale_steps = (32,), (6,)
    c.checkpoint_every, c.checkpoint_keep = 2, 3
    c.progress = False
    c.content_layers = ("relu2_2",)
    c.style_layers = ("relu1_1", "relu2_1")
    for k, v in over.items():
        c[k] = v
    return c


@pytest.mark.parametrize("over, message", [
    ({"scales": (32, 48), "scale_steps": (5,)}, "scale_steps has 1"),
    ({"scales": (64,), "scale_steps": (5,)}, "increase up to size=64"),
    ({"scales": (48, 32), "scale_steps": (5, 5)}, "increase"),
    ({"size": 0}, "explicit size"),
])
def test_bad_scales_are_config_errors(image_dir, over, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.validate(_cfg(image_dir, **over))


def test_bad_scales_on_the_command_line_exit_2_in_one_line(image_dir, tmp_path, capsys):
    code = cli_main(["nstjax", f"--workdir={tmp_path / 'w'}", "--config.scales=(128,)",
                     "--config.scale_steps=(5,)", "--config.size=64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "scales" in err, err
    assert not (tmp_path / "w").exists()


def test_stages_are_coarse_to_fine():
    spec = config_lib.validate(_cfg(Path("x"), scales=(16, 32), scale_steps=(3, 4), steps=5))
    st = multiscale.stages(spec)
    assert [(s.size, s.steps) for s in st] == [(16, 3), (32, 4), (64, 5)]
    img = np.linspace(0, 255, 8 * 6 * 3, dtype=np.float32).reshape(8, 6, 3)
    up = np.asarray(multiscale.upsample(img, (16, 12)))
    assert up.shape == (16, 12, 3) and up.min() >= 0 and up.max() <= 255


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_dir, weights):
    workdir = tmp_path_factory.mktemp("ms") / "ref"
    params, info = weights
    summary = run(_cfg(image_dir), workdir, params=params, weights_info=info, handle_signals=False,
                  log=lambda m: None)
    return workdir, summary


def test_a_multiscale_run_logs_each_stage_and_ends_at_full_size(reference):
    workdir, summary = reference
    recs = records.read_metrics(workdir / "metrics.jsonl")
    stages = [r["stage"] for r in recs]
    assert stages == sorted(stages) and set(stages) == {0, 1}
    sizes = {r["stage"]: tuple(r["size"]) for r in recs}
    assert sizes[0] == (24, 32) and sizes[1] == (48, 64)
    first = next(r for r in recs if r["stage"] == 1)
    assert first["step"] == 6 and recs[-1]["step"] == 12 and summary["steps_done"] == 12
    # Each stage lowers its own loss.
    for k in (0, 1):
        losses = [r["loss"] for r in recs if r["stage"] == k]
        assert losses[-1] < losses[0]
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["steps"] == 12
    assert [s["size"] for s in manifest["stages"]] == [[24, 32], [48, 64]]
    assert manifest["images"]["output"] == [48, 64, 3]
    from PIL import Image

    assert Image.open(workdir / "final.png").size == (64, 48)


def _check_boundary_steps(recs: list[dict], manifest: dict) -> None:
    """The documented invariant of a multi-scale metrics.jsonl: step = the stage's first_step +
    stage_step; (step, stage) strictly increases; a step repeats only at a stage boundary, as the
    stage's last line (its result, stage_step = its steps) and the next stage's first
    (stage_step 0)."""
    first = {s["stage"]: s["first_step"] for s in manifest["stages"]}
    steps = {s["stage"]: s["steps"] for s in manifest["stages"]}
    assert all(r["step"] == first[r["stage"]] + r["stage_step"] for r in recs)
    keys = [(r["step"], r["stage"]) for r in recs]
    assert all(a < b for a, b in itertools.pairwise(keys)), keys
    for a, b in itertools.pairwise(recs):
        if a["step"] == b["step"]:
            assert (b["stage"] == a["stage"] + 1 and a["stage_step"] == steps[a["stage"]]
                    and b["stage_step"] == 0)
            assert a["size"] != b["size"] and a["loss"] != b["loss"]  # two evaluations, both kept
    one_per_step = [r["step"] for r in recs if r["stage_step"] > 0 or r["stage"] == 0]
    assert len(set(one_per_step)) == len(one_per_step)


def test_a_stage_boundary_logs_the_result_and_its_upsampled_start_under_one_step(reference):
    workdir, _ = reference
    recs = records.read_metrics(workdir / "metrics.jsonl")
    manifest = json.loads((workdir / "manifest.json").read_text())
    _check_boundary_steps(recs, manifest)
    at_six = [(r["stage"], r["stage_step"]) for r in recs if r["step"] == 6]
    assert at_six == [(0, 6), (1, 0)]
    assert [r["step"] for r in recs] == list(range(7)) + list(range(6, 13))


def test_the_coarse_stage_gives_the_fine_stage_a_better_start(reference, image_dir, weights,
                                                              tmp_path):
    """The upsampled coarse result starts the full-size stage below where the content photo
    starts."""
    workdir, _ = reference
    recs = records.read_metrics(workdir / "metrics.jsonl")
    fine_start = next(r for r in recs if r["stage"] == 1)["loss"]
    params, info = weights
    single = run(_cfg(image_dir, scales=(), scale_steps=(), steps=1), tmp_path / "single",
                 params=params, weights_info=info, handle_signals=False, log=lambda m: None)
    photo_start = records.read_metrics(tmp_path / "single" / "metrics.jsonl")[0]["loss"]
    assert single["steps_done"] == 1
    assert fine_start < 0.75 * photo_start


def _killed_copy(reference: Path, dest: Path, keep_stage1: list[int] | None) -> Path:
    """The workdir as a SIGKILL would leave it: no final.png or manifest, checkpoints up to a
    point."""
    shutil.copytree(reference, dest)
    (dest / "final.png").unlink()
    (dest / "manifest.json").unlink()
    s1 = dest / "checkpoints" / "stage_1"
    if keep_stage1 is None:
        shutil.rmtree(s1)
    else:
        for d in s1.iterdir():
            if d.name.isdigit() and int(d.name) not in keep_stage1:
                shutil.rmtree(d)
    return dest


@pytest.mark.parametrize("keep_stage1, from_step", [(None, 6), ([2], 8)])
def test_resume_across_and_within_stages_is_bit_identical(reference, weights, tmp_path, keep_stage1,
                                                          from_step):
    ref, _ = reference
    workdir = _killed_copy(ref, tmp_path / "killed", keep_stage1)
    params, info = weights
    msgs = []
    c = json.loads((ref / "config.json").read_text())
    summary = run(config_lib.get_config().__class__(c), workdir, params=params, weights_info=info,
                  handle_signals=False, log=msgs.append)
    assert summary["resumed_from"] == from_step, msgs
    assert any(f"from its checkpoint at step {from_step} of 12 (stage 2 of 2" in m
               for m in msgs), msgs
    assert (workdir / "final.png").read_bytes() == (ref / "final.png").read_bytes()
    ref_losses = [(r["step"], r["stage"], r["stage_step"], r["loss"])
                  for r in records.read_metrics(ref / "metrics.jsonl")]
    recs = records.read_metrics(workdir / "metrics.jsonl")
    got = [(r["step"], r["stage"], r["stage_step"], r["loss"]) for r in recs]
    assert got == ref_losses
    manifest, ref_manifest = (json.loads((w / "manifest.json").read_text()) for w in (workdir, ref))
    # every stage, not only those run after the resume
    assert manifest["stages"] == ref_manifest["stages"]
    _check_boundary_steps(recs, manifest)


def test_a_stage_logs_its_last_line_before_checkpointing_its_last_step(image_dir, weights, tmp_path,
                                                                       monkeypatch):
    """A resume takes a coarse stage whose checkpoint is at its last step as finished and does not
    log that stage again, so the stage's last metrics line must be on disk before that checkpoint:
    a kill between the two would otherwise lose the line for good. Stage 0 has 6 steps and
    checkpoint_every=2, so its last step is also a checkpoint step."""
    from nstjax import checkpoint

    events = []
    write, save = records.MetricsLog.write, checkpoint.Checkpoints.save

    def logged(self, rec):
        events.append(("log", rec["stage"], rec["stage_step"]))
        return write(self, rec)

    def saved(self, state, meta=None):
        events.append(("checkpoint", int(self.directory.name.split("_")[-1]), state.step))
        return save(self, state, meta)

    monkeypatch.setattr(records.MetricsLog, "write", logged)
    monkeypatch.setattr(checkpoint.Checkpoints, "save", saved)
    params, info = weights
    run(_cfg(image_dir), tmp_path / "w", params=params, weights_info=info, handle_signals=False,
        log=lambda m: None)
    assert ("checkpoint", 0, 6) in events and ("log", 0, 6) in events, events
    assert events.index(("log", 0, 6)) < events.index(("checkpoint", 0, 6)), events
    assert events.index(("log", 1, 6)) < events.index(("checkpoint", 1, 6)), events
