"""SIGINT and SIGTERM at any moment of the ``nstjax`` command (nstjax/interrupts.py): one line on
stderr, exit 128 + signum, never a traceback, and what the line says is true."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    # This checkout's nstjax, whatever is installed; no compile cache shared with other tests.
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "NSTJAX_COMPILE_CACHE": "0"}


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd=ROOT)


def _run_args(image_dir: Path, workdir: Path) -> list[str]:
    return ["-m", "nstjax", f"--workdir={workdir}",
            f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=32",
            "--config.steps=4", "--config.chunk=2", "--config.log_every=2",
            "--config.checkpoint_every=2", "--config.style_layers=('relu1_1',)"]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("delay", [0.1, 0.3, 0.5, 1.0, 1.5])
def test_a_ctrl_c_at_any_moment_of_start_up_ends_in_one_line_with_exit_130(delay, tmp_path,
                                                                           image_dir):
    workdir = tmp_path / "w"
    p = _start(_run_args(image_dir, workdir))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err  # 0 when the Ctrl-C was swallowed and the run went on
    assert len(_lines(err)) == 1 and "Traceback" not in err and "Exception ignored" not in err, err
    if workdir.exists():  # the run had started: it kept a checkpoint, as it always has
        assert "stopped by SIGINT at step" in err and "run the same command again to resume" in err
    else:
        assert "stopped by SIGINT before the run started; nothing was written" in err


def test_sigterm_before_the_run_exits_143_and_writes_nothing(tmp_path, image_dir):
    workdir = tmp_path / "w"
    p = _start(_run_args(image_dir, workdir))
    time.sleep(0.3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    assert _lines(err) == ["nstjax: stopped by SIGTERM before the run started; nothing was written"]
    assert not workdir.exists()


_SLOW_EXIT = """
import atexit, sys, time
from nstjax import cli

def slow_clean_up():  # stands in for JAX's and orbax's atexit functions
    print("exiting", file=sys.stderr, flush=True)
    time.sleep(60)

atexit.register(slow_clean_up)
sys.argv = ["nstjax", *sys.argv[1:]]
cli.entry()
"""


@pytest.mark.parametrize("args, code, last", [
    (["--help"], 130, "nstjax: stopped by SIGINT while exiting, after its work was done"),
    (["--workdir=w", "--config.no_such_field=1"], 2, "nstjax: error: unknown config field"),
])
def test_a_ctrl_c_while_the_process_exits_ends_it_at_once_without_a_traceback(args, code, last):
    p = _start(["-c", _SLOW_EXIT, *args])
    before = []
    while (line := p.stderr.readline()) != "exiting\n":
        assert line, "the process ended before its clean-up"
        before.append(line)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    lines = _lines("".join(before) + err)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert len(lines) == 1 and lines[0].startswith(last), lines  # an error's line was already out


def test_an_interrupted_replay_into_a_temporary_directory_does_not_promise_a_resume(
        tmp_path, monkeypatch):
    import numpy as np

    import nstjax.run as R
    from nstjax import images, replay
    from nstjax.config import base_config
    from nstjax.errors import RunInterrupted

    source = tmp_path / "finished"
    source.mkdir()
    images.save_png(source / "final.png", np.zeros((8, 8, 3)))
    (source / "manifest.json").write_text(json.dumps(
        {"status": "finished", "config": base_config().to_dict(), "steps": 4, "seed": 0}))
    used = []

    def interrupted_run(cfg, workdir, **kwargs):
        used.append(Path(workdir))
        (Path(workdir) / "checkpoints").mkdir(parents=True)
        raise RunInterrupted(f"stopped by SIGINT at step 2 of 4: saved a checkpoint in {workdir}; "
                             "run the same command again to resume", signal.SIGINT, 2)

    monkeypatch.setattr(R, "run", interrupted_run)
    with pytest.raises(RunInterrupted) as e:
        replay.replay(source, log=lambda m: None)
    message = str(e.value)
    assert e.value.exit_code == 130 and not used[0].exists()
    assert "resume" not in message and f"{used[0]} removed" in message
    assert "run the same command again to replay from the start" in message
