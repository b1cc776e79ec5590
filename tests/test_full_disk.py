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
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"image/0\" in OCDBT database: Failed to "
                         "write 508173 bytes to file 9: No space left on device [os_error_code='28']")

    ckpts._mgr.save = full_disk_save
    state = RunState(10, np.zeros((4, 4, 3), np.float32), (), np.zeros(2, np.uint32))
    with caplog.at_level(logging.DEBUG):
        assert ckpts.save(state) is False
        assert ckpts.save(RunState(20, state.image, (), state.rng)) is False
    ckpts.close()
    assert len(messages) == 1, messages
    assert "No space left on device" in messages[0] and str(tmp_path / "checkpoints" / "10") in messages[0]
    assert not [p for p in (tmp_path / "checkpoints").iterdir()], "a half-written checkpoint was left"
    assert not [r for r in caplog.records if "SignalingThread" in r.getMessage()]

