"""Every bad input as a new user would try it: exit 2, one line, no traceback, earlier outputs
intact. Odd but valid images are converted, not refused. Plus the pieces behind that: atomic
writers, the memory estimator, checkpoints that survive damage, the workdir rules and the non-finite
guard."""

from __future__ import annotations

import fcntl
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nstjax import images, memory, records
from nstjax.cli import main
from nstjax.errors import ImageError, UserError
from nstjax.workdir import prepare_dir
from tests.conftest import ROOT

# A small, fast objective: the robustness of the edge does not need all of VGG-19.
FAST = ["--config.size=64", "--config.steps=4", "--config.progress=False",
        "--config.content_layers=('relu2_2',)", "--config.style_layers=('relu1_1','relu2_1')"]


def _argv(image_dir, workdir, *extra):
    return ["nstjax", f"--workdir={workdir}", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", *FAST, *extra]


def _main(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line_error(code, err):
    assert code == 2, err
    assert err.startswith("nstjax: error: ") and "\n" not in err, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Files that tests make


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG claiming width x height pixels with no pixel data: a bomb that costs nothing to
    make."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def _gradient(h=48, w=64) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[..., 2] = 100
    return a


@pytest.fixture
def finished_workdir(tmp_path):
    """A workdir holding a finished run (files with known bytes), to prove nothing touches it."""
    wd = tmp_path / "done"
    wd.mkdir()
    images.save_png(wd / "final.png", _gradient())
    records.write_json(wd / "manifest.json", {"status": "finished"})
    records.write_json(wd / "config.json", {"size": 64})
    (wd / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')
    return wd


def _snapshot(wd: Path) -> dict:
    """Every file's bytes, but for the lock file (bookkeeping, not output)."""
    return {p.relative_to(wd).as_posix(): p.read_bytes() for p in sorted(wd.rglob("*"))
            if p.is_file() and p.name != ".nstjax.lock"}


# --------------------------------------------------------------------------------------------
# Bad input through the CLI, in-process


def _bad_inputs(tmp: Path, image_dir: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra arguments, text the one-line error must contain)."""
    (tmp / "adir").mkdir()
    (tmp / "notes.jpg").write_text("not a picture")
    (tmp / "empty.jpg").write_bytes(b"")
    data = (image_dir / "tubingen.jpg").read_bytes()
    (tmp / "cut.jpg").write_bytes(data[: len(data) // 2])
    _png_header_only(tmp / "bomb.png", 100_000, 100_000)
    (tmp / "weights.bin").write_bytes(b"\x80\x02" + b"garbage" * 100)
    (tmp / "weights.txt").write_text("these are not weights")
    return {
        "missing file": ([f"--config.content={tmp / 'nope.jpg'}"], "nope.jpg: no such image file"),
        # A folder is an axis of its images (docs/sweeps.md): one without any is refused.
        "directory": ([f"--config.content={tmp / 'adir'}"], "holds no images"),
        "non-image": ([f"--config.style={tmp / 'notes.jpg'}"], "not an image file"),
        "truncated jpeg": ([f"--config.content={tmp / 'cut.jpg'}"], "cut.jpg: cannot read image"),
        "empty file": ([f"--config.content={tmp / 'empty.jpg'}"], "file is empty"),
        "decompression bomb": ([f"--config.content={tmp / 'bomb.png'}"], "decompression bomb"),
        "too small": (["--config.size=1"], "too small for layer relu2_2"),
        "unknown layer": (["--config.style_layers=('relu1_1','relu9_9')"],
                          "unknown style layer 'relu9_9'; valid layers: conv1_1, relu1_1"),
        "negative weight": (["--config.content_weight=-1"], "content_weight must be non-negative"),
        "nan weight": (["--config.style_weight=nan"], "style_weight must be finite"),
        "inf weight": (["--config.tv_weight=inf"], "tv_weight must be finite"),
        "weight beyond float32": (["--config.style_weight=1e39"], "style_weight must be at most"),
        "negative layer weight": (["--config.style_layer_weights=(1.0,-1.0)"],
                                  "style_layer_weights must hold"),
        "unknown field": (["--config.no_such_field=3"], "no_such_field"),
        "wrong type": (["--config.size=big"], "--config.size"),
        "corrupt weights": ([f"--config.weights_path={tmp / 'weights.bin'}"], "sha256"),
        "weights of the wrong kind": ([f"--config.weights_path={tmp / 'weights.txt'}"],
                                      "unrecognised weights file"),
        "an image as weights": ([f"--config.weights_path={image_dir / 'tubingen.jpg'}"],
                                "unrecognised weights file"),
        "memory": (["--config.size=40000"], "largest --config.size that fits is about"),
    }


BAD = ["missing file", "directory", "non-image", "truncated jpeg", "empty file",
       "decompression bomb", "too small", "unknown layer", "negative weight", "nan weight",
       "inf weight", "weight beyond float32", "negative layer weight", "unknown field",
       "wrong type", "corrupt weights", "weights of the wrong kind", "an image as weights",
       "memory"]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_exit_2_and_earlier_outputs_survive(name, tmp_path, image_dir, capsys,
                                                                   finished_workdir):
    extra, expected = _bad_inputs(tmp_path, image_dir)[name]
    before = _snapshot(finished_workdir)
    # --overwrite: even a run told to replace the old one must not lose it to a bad input.
    code, err = _main(_argv(image_dir, finished_workdir, *extra, "--overwrite"), capsys)
    _one_line_error(code, err)
    assert expected in err, err
    assert _snapshot(finished_workdir) == before
    # And into a fresh workdir: refused without leaving an empty directory behind.
    fresh = tmp_path / "fresh"
    code, err = _main(_argv(image_dir, fresh, *extra), capsys)
    _one_line_error(code, err)
    assert not fresh.exists()


def test_memory_refusal_names_a_size_that_fits(tmp_path, image_dir, capsys):
    code, err = _main(_argv(image_dir, tmp_path / "w", "--config.size=40000"), capsys)
    _one_line_error(code, err)
    best = int(err.split("fits is about ")[1].split()[0])
    available, platform = memory.available_bytes()
    kw = {"optimizer": "lbfgs", "memory_size": 10, "chunk_steps": 4, "platform": platform}
    h = round(best * 3 / 4)  # tubingen is 4:3
    assert 64 < best < 40000
    assert memory.estimate_bytes(h, best, ["relu2_2", "relu1_1", "relu2_1"],
                                 style_shapes=[(best, best)],
                                 **kw) <= 1.1 * available  # it fluctuates


def test_weights_named_by_the_environment(tmp_path, image_dir, capsys, monkeypatch):
    (tmp_path / "w.npz").write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.setenv("NSTJAX_WEIGHTS", str(tmp_path / "w.npz"))
    code, err = _main(_argv(image_dir, tmp_path / "out"), capsys)
    _one_line_error(code, err)
    assert "w.npz" in err


@pytest.mark.parametrize("where", ["under a file", "is a file", "read-only filesystem"])
def test_unwritable_workdir(tmp_path, image_dir, capsys, where):
    (tmp_path / "file").write_text("x")
    workdir = {"under a file": tmp_path / "file" / "w", "is a file": tmp_path / "file",
               "read-only filesystem": Path("/proc/nstjax-test-workdir")}[where]
    code, err = _main(_argv(image_dir, workdir), capsys)
    _one_line_error(code, err)
    assert "workdir" in err


def test_prepare_dir_writes_to_prove_writability(tmp_path, monkeypatch):
    """os.access says yes to root everywhere; a failed write is what counts."""

    real_open = open

    def refusing_open(path, *a, **k):
        if ".nstjax-probe-" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", refusing_open)
    with pytest.raises(UserError, match="not writable: Permission denied"):
        prepare_dir(tmp_path / "w")


def test_finished_run_refused_and_kept(finished_workdir, image_dir, capsys):
    before = _snapshot(finished_workdir)
    code, err = _main(_argv(image_dir, finished_workdir), capsys)
    _one_line_error(code, err)
    assert "already holds a run" in err and "--overwrite" in err
    assert _snapshot(finished_workdir) == before


def test_unfinished_run_of_another_config_is_refused(tmp_path, image_dir, capsys):
    from nstjax.config import base_config

    wd = tmp_path / "w"
    wd.mkdir()
    cfg = base_config()
    cfg.size = 32
    records.write_json(wd / "config.json", cfg.to_dict())
    (wd / "checkpoints").mkdir()
    before = _snapshot(wd)
    code, err = _main(_argv(image_dir, wd), capsys)
    _one_line_error(code, err)
    assert ("unfinished run with a different config" in err and "size" in err
            and "--overwrite" in err)
    assert _snapshot(wd) == before


def test_config_differences_ignore_fields_that_do_not_change_the_result():
    from nstjax.config import base_config
    from nstjax.workdir import config_differences

    a, b = base_config(), base_config()
    b.progress, b.checkpoint_every, b.checkpoint_keep = False, 7, 5
    assert config_differences(a.to_dict(), b.to_dict()) == []
    b.optimizer.memory_size = 3
    b.style_weight = 1.0
    assert config_differences(a.to_dict(), b.to_dict()) == ["optimizer.memory_size", "style_weight"]


def test_a_workdir_in_use_is_refused(tmp_path, image_dir, capsys):
    wd = tmp_path / "w"
    wd.mkdir()
    fd = os.open(wd / ".nstjax.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        code, err = _main(_argv(image_dir, wd), capsys)
    finally:
        os.close(fd)
    _one_line_error(code, err)
    assert "in use by another nstjax process (pid 4242)" in err


def test_bad_inputs_from_a_real_process(tmp_path, image_dir):
    """The installed entry point, as a user types it: no traceback, one line, exit 2."""
    data = (image_dir / "tubingen.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:3000])
    env = {**os.environ, "NSTJAX_WEIGHTS": str(tmp_path / "cut.jpg")}
    for extra, env_ in ((["--config.size=40000"], None),
                        ([f"--config.content={tmp_path / 'cut.jpg'}"], None), ([], env)):
        r = subprocess.run([sys.executable, "-m", "nstjax",
                            *_argv(image_dir, tmp_path / "w", *extra)[1:]],
                           capture_output=True, text=True, cwd=ROOT, env=env_, timeout=300,
                           check=False)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("nstjax: error: "), r.stderr
        assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------
# Odd images are converted correctly


def test_cmyk_jpeg(tmp_path):
    ref = _gradient()
    Image.fromarray(ref).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = images.load_image(tmp_path / "c.jpg")
    assert got.shape == ref.shape and np.abs(got - ref).mean() < 2 and np.abs(got - ref).max() <= 8


def test_grayscale_and_16_bit(tmp_path):
    ref = _gradient()[..., 0]
    Image.fromarray(ref, "L").save(tmp_path / "g.png")
    got = images.load_image(tmp_path / "g.png")
    assert got.shape == (48, 64, 3)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], ref)
    sixteen = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = images.load_image(tmp_path / "g16.png")
    assert np.abs(got[..., 0] - sixteen / 65535 * 255).max() <= 1.0  # scaled, not clipped at 255


def test_palette_and_alpha(tmp_path):
    ref = _gradient()
    Image.fromarray(ref).convert("P").save(tmp_path / "p.png")
    got = images.load_image(tmp_path / "p.png")
    np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "p.png").convert("RGB")))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 200, 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = images.load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(got[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(got[7, 7], [255, 255, 255])  # composited onto white, not black
    la = np.zeros((4, 4, 2), np.uint8)
    la[..., 0], la[..., 1] = 10, 128
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert abs(images.load_image(tmp_path / "la.png")[0, 0, 0] - (10 * 128 + 255 * 127) / 255) <= 1


def test_exif_rotation_is_honoured(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = [255, 0, 0]  # stored landscape, left half red
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    got = images.load_image(tmp_path / "r.jpg")
    assert got.shape == (40, 20, 3)  # portrait
    assert got[3, 10, 0] > 200 and got[-3, 10, 0] < 50  # the left half is now on top


def test_damaged_exif_does_not_refuse_a_good_photo(tmp_path, monkeypatch):
    Image.fromarray(_gradient()).save(tmp_path / "x.jpg")

    def broken(im):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    assert images.load_image(tmp_path / "x.jpg").shape == (48, 64, 3)


def test_bomb_limit_follows_pil(tmp_path, monkeypatch):
    Image.fromarray(_gradient()).save(tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        images.load_pil(tmp_path / "ok.png")


# --------------------------------------------------------------------------------------------
# Atomic outputs


def test_atomic_writes_keep_the_old_file_when_interrupted(tmp_path):
    path = tmp_path / "x.json"
    records.write_json(path, {"a": 1})

    def dies_half_way(f):
        f.write('{"a": ')
        raise KeyboardInterrupt  # what a kill mid-write looks like from inside

    with pytest.raises(KeyboardInterrupt):
        records.atomic_write(path, dies_half_way)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_outputs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        images.save_png(tmp_path / "f.png", _gradient())
        records.write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o644


def test_metrics_log_survives_a_cut_line_and_truncates_for_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = records.MetricsLog(path)
    for s in (0, 5, 10, 15):
        log.write({"step": s, "loss": float(s)})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 20, "lo')  # a kill mid-line
    assert [r["step"] for r in records.read_metrics(path)] == [0, 5, 10, 15]
    assert records.truncate_metrics(path, 10) == 2
    assert [r["step"] for r in records.read_metrics(path)] == [0, 5]
    assert path.read_text().endswith("\n")


# --------------------------------------------------------------------------------------------
# Memory estimate


def test_memory_estimate_matches_measurements_and_inverts():
    layers = ("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    assert memory.act_bytes_per_pixel(layers) == 1280.0
    # Peak RSS of whole default runs on CPU (MiB; /usr/bin/time), 10-step chunks at 512, 768 and
    # 1024 px, 1-step chunks at 1024 px: the estimate may err high a little, never low.
    for side, chunk, measured_mb in ((512, 10, 1171), (768, 10, 1625), (1024, 10, 2424),
                                     (1024, 1, 2034)):
        est = memory.estimate_bytes(side * 3 // 4, side, layers, chunk_steps=chunk) / 2**20
        assert measured_mb < est < 1.15 * measured_mb, (side, chunk, est)
    assert (memory.estimate_bytes(48, 64, layers, chunk_steps=2)
            < memory.estimate_bytes(48, 64, layers, chunk_steps=10))
    assert memory.estimate_bytes(48, 64, ("relu1_1",)) < memory.estimate_bytes(48, 64, ("relu5_1",))
    for available in (1.5e9, 8e9, 64e9):
        best = memory.largest_size_that_fits(4 / 3, layers, available)
        def fits(s, available=available):
            return memory.estimate_bytes(round(s * 3 / 4), s, layers,
                                         style_shapes=[(s, s)]) <= available

        assert fits(best) and not fits(best + 1)
    # below the fixed base: nothing fits
    assert memory.largest_size_that_fits(1.0, layers, 1e6) == 0
    assert np.isfinite(memory.estimate_bytes(10**12, 10**12, layers))


def test_the_memory_estimate_covers_compiling_long_chunks(monkeypatch):
    """Compiling a chunk unrolls its steps: measured peaks at 64 px (experiments/chunk_memory.py)
    were 710, 987, 1,562 and 2,731 MB for chunks of 1, 10, 25 and 50 steps. The estimate covers
    them, and a chunk that cannot compile in the memory there is is refused naming the chunk."""
    layers = ("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
    for chunk, measured_mb in ((1, 710), (10, 987), (25, 1562), (50, 2731)):
        est = memory.estimate_bytes(48, 64, layers, chunk_steps=chunk) / 2**20
        assert measured_mb < est < 1.3 * measured_mb, (chunk, est)
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (2.0e9, "cpu"))
    with pytest.raises(UserError,
                       match="compiling 100 unrolled steps is what needs it; lower --config.chunk"):
        memory.check_fits(48, 64, layers, chunk_steps=100)
    memory.check_fits(48, 64, layers, chunk_steps=10)


def test_memory_check_can_be_skipped(monkeypatch):
    with pytest.raises(UserError, match="largest --config.size that fits"):
        memory.check_fits(30000, 40000, ["relu5_1"])
    monkeypatch.setenv("NSTJAX_MEMORY_CHECK", "0")
    memory.check_fits(30000, 40000, ["relu5_1"])


# --------------------------------------------------------------------------------------------
# Checkpoints


def _states():
    import jax
    import jax.numpy as jnp

    from nstjax.checkpoint import RunState
    from nstjax.optimize import OptimizerSpec

    img = jax.random.uniform(jax.random.PRNGKey(1), (6, 5, 3), jnp.float32, 0, 255)
    key = jax.random.key_data(jax.random.PRNGKey(7))
    out = {}
    for name in ("lbfgs", "adam", "lbfgs_zoom"):
        st = OptimizerSpec(name, 1.0, 3).build().init(img)
        st = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, st)
        out[name] = RunState(0, img, st, key)
    return out


def test_checkpoints_round_trip_every_optimiser_bit_for_bit(tmp_path):
    import dataclasses

    import jax

    from nstjax.checkpoint import Checkpoints, digest

    for name, state in _states().items():
        ck = Checkpoints(tmp_path / name, keep=2, log=lambda m: None)
        for step in (10, 20, 30):
            ck.save(dataclasses.replace(state, step=step, image=state.image + step), {"who": name})
        assert ck.steps() == [20, 30]  # keep=2
        ck.close()
        ck = Checkpoints(tmp_path / name, keep=2)
        got, meta = ck.restore(state)
        assert got.step == 30 and meta["who"] == name
        assert digest(got) == digest(dataclasses.replace(state, step=30, image=state.image + 30))
        assert jax.tree.structure(got.opt_state) == jax.tree.structure(state.opt_state)
        ck.close()


def test_damaged_and_half_written_checkpoints_fall_back_with_a_message(tmp_path):
    import dataclasses

    from nstjax.checkpoint import FILES_LIST, Checkpoints

    state = _states()["lbfgs"]
    d = tmp_path / "checkpoints"
    ck = Checkpoints(d, keep=5)
    for step in (10, 20, 30):
        ck.save(dataclasses.replace(state, step=step))
    ck.close()
    victim = max((p for p in (d / "30").rglob("*") if p.is_file() and p.name != FILES_LIST),
                 key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    (d / "20" / FILES_LIST).unlink()  # as if killed right after orbax finalised it
    (d / "40.orbax-checkpoint-tmp-123").mkdir()  # as if killed while saving
    messages = []
    ck = Checkpoints(d, keep=5, log=messages.append)
    got, _ = ck.restore(state)
    assert got.step == 10
    assert any("half-written" in m for m in messages)
    assert any("step 30 is damaged" in m and "sha256" in m for m in messages)
    assert any("step 20 is damaged" in m and FILES_LIST in m for m in messages)
    assert ck.steps() == [10] and len(list((tmp_path / "checkpoints.damaged").iterdir())) == 2
    ck.save(dataclasses.replace(state, step=20))  # the step can be saved again
    assert ck.steps() == [10, 20]


def test_checkpoints_from_other_inputs_are_refused_not_discarded(tmp_path):
    from nstjax.checkpoint import Checkpoints

    state = _states()["adam"]
    ck = Checkpoints(tmp_path / "c")
    ck.save(state, {"fingerprint": "old"})

    def check(meta):
        raise UserError("made from other inputs")

    with pytest.raises(UserError, match="other inputs"):
        ck.restore(state, check)
    assert ck.steps() == [0]


# --------------------------------------------------------------------------------------------
# The non-finite guard keeps the last good image and checkpoint


def test_non_finite_loss_stops_at_once_keeping_image_and_checkpoint(tmp_path, image_dir,
                                                                    monkeypatch, capsys):
    import jax.numpy as jnp

    from nstjax.programs import Programs

    real = Programs.steps
    calls = []

    def poisoned(self, params, targets, weights, image, state, **kw):
        """The third chunk (steps 10..14) meets a NaN at its second step."""
        calls.append(kw["n_steps"])
        image, state, terms, done, ok = real(self, params, targets, weights, image, state, **kw)
        if len(calls) == 3:
            terms = {k: v.at[:, 1].set(jnp.nan) if k in ("style", "style/relu2_1", "loss") else v
                     for k, v in terms.items()}
            return image, state, terms, jnp.ones_like(done), jnp.zeros_like(ok)
        return image, state, terms, done, ok

    monkeypatch.setattr(Programs, "steps", poisoned)
    wd = tmp_path / "w"
    code, err = _main(_argv(image_dir, wd, "--config.steps=30", "--config.chunk=5",
                            "--config.log_every=5", "--config.checkpoint_every=5"), capsys)
    _one_line_error(code, err)
    assert ("non-finite at step 11" in err and "style/relu2_1" in err
            and "checkpoint at step 10" in err)
    assert len(calls) == 3  # stopped at once
    m = json.loads((wd / "manifest.json").read_text())
    assert m["status"].startswith("stopped") and m["steps"] == 11
    assert m["checkpoints"]["steps"] == [5, 10]
    assert (wd / "final.png").is_file()
    steps = [r["step"] for r in records.read_metrics(wd / "metrics.jsonl")]
    assert steps == [0, 5, 10]


# --------------------------------------------------------------------------------------------
# Signals


def test_stop_signals_set_a_flag_and_a_second_one_stops_at_once():
    import signal

    from nstjax.run import StopSignals

    # Python's own Ctrl-C handler, whatever this process inherited: started in the background by
    # a non-interactive shell (`cmd &`), it starts with SIGINT ignored and Python keeps it so.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        messages = []
        with pytest.raises(KeyboardInterrupt), StopSignals(log=messages.append) as stop:
            assert not stop()
            signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: a flag, no exception
            assert stop() and stop.signum == signal.SIGINT
            signal.raise_signal(signal.SIGINT)  # the second: the old handler, KeyboardInterrupt
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert "stopping after the current chunk" in messages[0] and "second SIGINT" in messages[1]


def test_sigterm_during_setup_checkpoints_step_0_exits_143_and_resumes(tmp_path, image_dir, capsys,
                                                                       monkeypatch):
    import signal

    import nstjax.batch as R

    real = R.load_problem

    def then_sigterm(*a, **k):
        problem = real(*a, **k)
        signal.raise_signal(signal.SIGTERM)
        return problem

    monkeypatch.setattr(R, "load_problem", then_sigterm)
    wd = tmp_path / "w"
    argv = _argv(image_dir, wd, "--config.size=32")
    assert main(argv) == 143
    err = capsys.readouterr().err
    assert ("stopped by SIGTERM at step 0 of 4" in err
            and "run the same command again to resume" in err)
    assert (wd / "checkpoints" / "0").is_dir()
    assert (json.loads((wd / "manifest.json").read_text())["status"]
            == "interrupted at step 0 (SIGTERM)")
    monkeypatch.setattr(R, "load_problem", real)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "from its checkpoint at step 0" in out.err and "resumed from step 0" in out.out
    assert json.loads((wd / "manifest.json").read_text())["status"] == "finished"
