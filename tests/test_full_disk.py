"""A full disk, anywhere: one line naming the path, nothing half-written left, earlier outputs
kept, an honest exit status. The faults are injected (an OSError(ENOSPC) where a full disk raises
one); the same cases on a real 2 MB tmpfs are described in docs/robustness.md."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import numpy as np
import pytest

from nstjax.cli import main

FAST = ["--config.size=32", "--config.steps=4", "--config.progress=False", "--config.chunk=2",
        "--config.log_every=2", "--config.style_layers=('relu1_1',)"]


def _argv(image_dir: Path, workdir: Path, *extra: str) -> list[str]:
    return ["nstjax", f"--workdir={workdir}", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", *FAST, *extra]


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_checkpoint_that_cannot_be_written_is_reported_once_and_leaves_nothing_half_written(
        tmp_path, caplog):
    from nstjax.checkpoint import TMP_MARK, Checkpoints, RunState

    messages: list[str] = []
    ckpts = Checkpoints(tmp_path / "checkpoints", log=messages.append)

    def full_disk_save(step, **kwargs):  # as orbax on a full disk: a temporary directory, noise
        (tmp_path / "checkpoints" / f"{step}{TMP_MARK}-1700000000" / "state").mkdir(parents=True)
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception: Traceback ...")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"image/0\" in OCDBT database: Failed "
                         "to write 508173 bytes to file 9: No space left on device "
                         "[os_error_code='28']")

    ckpts._mgr.save = full_disk_save
    state = RunState(10, np.zeros((4, 4, 3), np.float32), (), np.zeros(2, np.uint32))
    with caplog.at_level(logging.DEBUG):
        assert ckpts.save(state) is False
        assert ckpts.save(RunState(20, state.image, (), state.rng)) is False
    ckpts.close()
    assert len(messages) == 1, messages
    assert ("No space left on device" in messages[0]
            and str(tmp_path / "checkpoints" / "10") in messages[0])
    assert not [p for p in (tmp_path / "checkpoints").iterdir()], \
        "a half-written checkpoint was left"
    assert not [r for r in caplog.records if "SignalingThread" in r.getMessage()]


def test_a_full_disk_writing_an_output_names_it_and_leaves_no_temporary_file(tmp_path):
    from nstjax import records

    path = tmp_path / "manifest.json"
    records.write_json(path, {"old": True})

    def write(f):
        f.write("{")
        _full()

    with pytest.raises(OSError) as e:
        records.atomic_write(path, write)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert records.read_json(path) == {"old": True}  # the earlier file is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_full_disk_appending_metrics_names_the_file(tmp_path, monkeypatch):
    from nstjax import records

    log = records.MetricsLog(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(records.os, "write", _full)
    with pytest.raises(OSError) as e:
        log.write({"step": 0})
    log.close()
    assert e.value.filename == str(tmp_path / "metrics.jsonl")


def test_a_full_disk_while_writing_final_png_is_one_line_naming_it(tmp_path, image_dir, capsys,
                                                                     monkeypatch):
    import os

    from nstjax import records

    real_fsync = os.fsync

    def full_for_final(fd):  # the disk fills up just as final.png's bytes reach it
        if ".final.png." in os.readlink(f"/proc/self/fd/{fd}"):
            _full()
        return real_fsync(fd)

    monkeypatch.setattr(records.os, "fsync", full_for_final)
    wd = tmp_path / "w"
    assert main(_argv(image_dir, wd)) == 2
    err = capsys.readouterr().err
    assert _lines(err) == [f"nstjax: error: No space left on device ({wd / 'final.png'})"], err
    assert not (wd / "final.png").exists() and not list(wd.glob(".*.tmp"))
    assert (wd / "config.json").exists() and (wd / "metrics.jsonl").exists()  # kept: it can resume


def test_a_workdir_that_cannot_be_written_on_a_full_disk_is_not_left_behind(tmp_path, image_dir,
                                                                             capsys, monkeypatch):
    import nstjax.workdir as W

    monkeypatch.setattr(W, "open", _full, raising=False)  # the probe write in prepare_dir
    wd = tmp_path / "new" / "w"
    assert main(_argv(image_dir, wd)) == 2
    err = capsys.readouterr().err
    assert _lines(err) == [f"nstjax: error: workdir {wd} is not writable: No space left on device"]
    assert list(tmp_path.iterdir()) == []
