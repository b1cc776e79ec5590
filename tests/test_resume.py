"""Kill a run (SIGTERM, SIGKILL) in a real process, start it again: the final image is
byte-identical to a run that never stopped. And --replay of a finished run says IDENTICAL, or
DIFFERENT when it is.

Small and fast on purpose: 64 px, two style layers, 60 steps in 5-step chunks, a checkpoint
every 10.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nstjax import records
from tests.conftest import ROOT

STEPS = 60


def _cmd(image_dir: Path, workdir: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "nstjax", f"--workdir={workdir}",
            f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=64",
            f"--config.steps={STEPS}", "--config.chunk=5", "--config.log_every=5",
            "--config.checkpoint_every=10", "--config.checkpoint_keep=3", "--config.progress=False",
            "--config.content_layers=('relu2_2',)", "--config.style_layers=('relu1_1','relu2_1')",
            *extra]


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                          **kw)


def _start_and_signal(cmd, workdir: Path, sig: int) -> tuple[int, str]:
    """Starts the run, waits for its first periodic checkpoint, then sends ``sig``."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "10").is_dir():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            _out, err = p.communicate()
            pytest.fail(f"the run ended before its first checkpoint: rc={p.returncode} {err}")
        time.sleep(0.01)
    p.send_signal(sig)
    _out, err = p.communicate(timeout=300)
    return p.returncode, err


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records.read_metrics(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_dir):
    """A run that never stopped."""
    workdir = tmp_path_factory.mktemp("resume") / "reference"
    r = _run(_cmd(image_dir, workdir))
    assert r.returncode == 0, r.stderr
    return workdir


def test_sigterm_saves_a_checkpoint_and_resuming_is_bit_identical(reference, image_dir, tmp_path):
    workdir = tmp_path / "w"
    code, err = _start_and_signal(_cmd(image_dir, workdir), workdir, signal.SIGTERM)
    if code == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    assert (last.startswith("nstjax: stopped by SIGTERM at step ")
            and "run the same command again to resume" in last)
    assert "Traceback" not in err
    stopped_at = int(last.split("at step ")[1].split()[0])
    assert 10 <= stopped_at < STEPS and stopped_at % 5 == 0
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
    assert (workdir / "images" / f"step_{stopped_at:06d}.png").is_file()
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["status"] == f"interrupted at step {stopped_at} (SIGTERM)"
    assert not (workdir / "final.png").exists()

    r = _run(_cmd(image_dir, workdir))
    assert r.returncode == 0, r.stderr
    assert f"from its checkpoint at step {stopped_at}" in r.stderr
    assert (workdir / "final.png").read_bytes() == (reference / "final.png").read_bytes()
    assert _losses(workdir) == _losses(reference)
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["resumes"][0]["from_step"] == stopped_at


def test_sigkill_then_a_damaged_newest_checkpoint_still_resumes_bit_identical(
        reference, image_dir, tmp_path):
    workdir = tmp_path / "w"
    code, _ = _start_and_signal(_cmd(image_dir, workdir), workdir, signal.SIGKILL)
    if code == 0:
        pytest.skip("the run finished before SIGKILL arrived")
    assert code == -signal.SIGKILL
    assert not (workdir / "manifest.json").exists()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    # Damage the newest checkpoint: the run must notice, say so, and use an older one (or none).
    newest = workdir / "checkpoints" / str(steps[-1])
    victim = max((p for p in newest.rglob("*") if p.is_file() and p.name != "nstjax_files.json"),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    r = _run(_cmd(image_dir, workdir))
    assert r.returncode == 0, r.stderr
    assert f"checkpoint at step {steps[-1]} is damaged" in r.stderr
    if len(steps) > 1:
        assert f"from its checkpoint at step {steps[-2]}" in r.stderr
    assert "Traceback" not in r.stderr
    assert (workdir / "final.png").read_bytes() == (reference / "final.png").read_bytes()
    assert _losses(workdir) == _losses(reference)


def test_a_finished_run_is_not_resumed(reference, image_dir, tmp_path):
    r = _run(_cmd(image_dir, reference))
    assert r.returncode == 2 and "already holds a run" in r.stderr


def test_replay_reports_identical_and_different(reference, image_dir, tmp_path, capsys):
    r = _run([sys.executable, "-m", "nstjax", f"--replay={reference}",
              f"--workdir={tmp_path / 'again'}"])
    assert r.returncode == 0, r.stderr
    assert "IDENTICAL" in r.stdout and "Traceback" not in r.stderr
    assert (tmp_path / "again" / "final.png").read_bytes() == (reference / "final.png").read_bytes()

    tampered = tmp_path / "tampered"
    shutil.copytree(reference, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["environment"]["packages"]["jax"] = "0.0.1"
    manifest["final"]["loss"] = manifest["final"]["loss"] * 2
    (tampered / "manifest.json").write_text(json.dumps(manifest))
    from nstjax.cli import main

    code = main(["nstjax", f"--replay={tampered}", f"--workdir={tmp_path / 'again2'}"])
    out = capsys.readouterr()
    assert code == 1
    assert "warning: jax" in out.err and "recorded: 0.0.1" in out.err
    assert "DIFFERENT: final loss" in out.out
    m2 = json.loads((tmp_path / "again2" / "manifest.json").read_text())
    assert m2["status"] == "finished"


def test_replay_refuses_what_it_cannot_replay(tmp_path, capsys):
    from nstjax.cli import main

    assert main(["nstjax", f"--replay={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "manifest.json does not exist" in err and "\n" not in err.strip()
