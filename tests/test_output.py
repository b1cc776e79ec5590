"""--output=FILE: the final image once more, in the format its extension names
(nstjax/output.py)."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageCms

from nstjax import output
from nstjax.cli import main
from nstjax.config import base_config, validate
from nstjax.errors import ConfigError, UserError
from nstjax.images import to_uint8
from tests.conftest import ROOT


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    """A smooth float image in [0, 255] with fractional values (so 16 bits keep more than 8)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([x * 255 / (w - 1), y * 255 / (h - 1), (x + y) * 255 / (h + w - 2)], -1)


def _profile(kind: str = "sRGB") -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile(kind)).tobytes()


def _tiff_samples(path: Path) -> np.ndarray:
    """The 16-bit samples of a one-strip uncompressed RGB TIFF, found where PIL's own parse of the
    header says they are (so the header is checked by PIL, not by the writer's author)."""
    with Image.open(path) as im:
        assert im.tag_v2[258] == (16, 16, 16) and im.tag_v2[259] == 1 and im.tag_v2[262] == 2
        (offset,), (count,), (w, h) = im.tag_v2[273], im.tag_v2[279], im.size
    raw = path.read_bytes()[offset:offset + count]
    return np.frombuffer(raw, "<u2").reshape(h, w, 3)


def _png16_samples(path: Path) -> np.ndarray:
    """A 16-bit RGB PNG's samples, decoded here for every PNG filter type (PIL reads only the high
    bytes of 16-bit RGB)."""
    data = path.read_bytes()
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert (depth, colour) == (16, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw, stride, bpp = zlib.decompress(idat), w * 6, 6
    rows, prev = [], bytearray(stride)
    for r in range(h):
        f, line = raw[r * (stride + 1)], bytearray(raw[r * (stride + 1) + 1:(r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return np.frombuffer(b"".join(rows), ">u2").reshape(h, w, 3)


# --------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("name, bits, expected", [
    ("a.png", 0, ("PNG", 8)), ("a.PNG", 16, ("PNG", 16)), ("a.jpg", 0, ("JPEG", 8)),
    ("a.jpeg", 8, ("JPEG", 8)), ("a.webp", 0, ("WEBP", 8)), ("a.tif", 0, ("TIFF", 16)),
    ("a.tiff", 8, ("TIFF", 8))])
def test_the_extension_names_the_format_and_its_default_depth(name, bits, expected):
    assert output.output_format(name, bits) == expected


@pytest.mark.parametrize("name, bits, message", [
    ("x.bmpz", 0, "extension '.bmpz'"), ("noextension", 0, "no extension"),
    ("x.jpg", 16, "does not suit JPEG"), ("x.webp", 16, "does not suit WEBP")])
def test_unknown_extensions_and_impossible_depths_are_config_errors(name, bits, message):
    with pytest.raises(ConfigError, match=message):
        output.output_format(name, bits)


def test_16_bit_tiff_holds_the_float_image_to_a_16_bit_step(tmp_path):
    image = _gradient()
    output.save_output(tmp_path / "o.tif", image)
    samples = _tiff_samples(tmp_path / "o.tif")
    assert np.abs(samples / 257.0 - image).max() <= 0.5 / 257 + 1e-6
    with Image.open(tmp_path / "o.tif") as im:  # Pillow reads it (keeping the high bytes)
        assert im.format == "TIFF" and im.mode == "RGB" and im.size == (60, 40)
        assert np.array_equal(np.asarray(im), (samples >> 8).astype(np.uint8))


def test_16_bit_png_holds_the_float_image_to_a_16_bit_step(tmp_path):
    image = _gradient()
    output.save_output(tmp_path / "o.png", image, bits=16)
    samples = _png16_samples(tmp_path / "o.png")
    assert np.abs(samples / 257.0 - image).max() <= 0.5 / 257 + 1e-6
    with Image.open(tmp_path / "o.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), (samples >> 8).astype(np.uint8))


@pytest.mark.parametrize("name, fmt, tolerance", [
    ("o.png", "PNG", 0), ("o.tiff", "TIFF", 0), ("o.jpg", "JPEG", 6), ("o.jpeg", "JPEG", 6),
    ("o.webp", "WEBP", 8)])
def test_8_bit_formats_are_written_and_read_back(tmp_path, name, fmt, tolerance):
    image = _gradient()
    bits = 8 if fmt == "TIFF" else 0
    output.save_output(tmp_path / name, image, bits=bits)
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt and im.mode == "RGB" and im.size == (60, 40)
        assert np.abs(np.asarray(im, np.int16) - np.rint(image)).max() <= tolerance


# --------------------------------------------------------------------------------------------
# ICC profiles


@pytest.mark.parametrize("name, bits", [("o.png", 0), ("o.png", 16), ("o.jpg", 0), ("o.webp", 0),
                                        ("o.tif", 0), ("o.tif", 8)])
def test_the_content_photos_icc_profile_is_embedded_in_each_format(tmp_path, name, bits):
    photo, profile = tmp_path / "photo.jpg", _profile()  # made once: a profile holds its time
    Image.fromarray(to_uint8(_gradient()), "RGB").save(photo, icc_profile=profile)
    icc = output.icc_profile(photo)
    assert icc == profile
    output.save_output(tmp_path / name, _gradient(), bits=bits, icc_profile=icc)
    with Image.open(tmp_path / name) as im:
        assert im.info.get("icc_profile") == icc
        assert ImageCms.getProfileName(ImageCms.getOpenProfile(io.BytesIO(im.info["icc_profile"])))


def test_no_profile_is_read_from_images_without_an_rgb_one(tmp_path):
    plain, lab = tmp_path / "plain.png", tmp_path / "lab.jpg"
    Image.new("RGB", (8, 8)).save(plain)
    Image.new("RGB", (8, 8)).save(lab, icc_profile=_profile("LAB"))  # not an RGB colour space
    assert output.icc_profile(plain) is None
    assert output.icc_profile(lab) is None
    assert output.icc_profile("builtin:hopper") is None
    assert output.icc_profile(tmp_path / "missing.jpg") is None


# --------------------------------------------------------------------------------------------
# Paths and atomic writes


def test_a_write_replaces_the_file_atomically_and_a_failed_one_leaves_it_alone(
        tmp_path, monkeypatch):
    target = tmp_path / "o.jpg"
    output.save_output(target, _gradient())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jpg"]  # no temporary left
    before = target.read_bytes()

    def broken_save(self, fp, format=None, **kw):
        fp.write(b"half a JPEG")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        output.save_output(target, _gradient() / 2)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jpg"]


def test_a_writable_path_is_proved_without_leaving_anything(tmp_path):
    output.check_output_path(tmp_path / "o.png")
    output.check_output_path(tmp_path / "new" / "dir" / "o.png")  # made when written
    assert list(tmp_path.iterdir()) == []


def test_unwritable_paths_are_one_line_user_errors(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for path, message in [(afile / "o.png", "not a directory"), (tmp_path, "is a directory"),
                          ("/dev/null", "not a regular file"),
                          ("/proc/nstjax-out.png", "cannot write output")]:
        with pytest.raises(UserError, match=message) as e:
            output.check_output_path(path)
        assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_output_may_not_be_an_input_image(tmp_path):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    c = base_config()
    c.content, c.output = str(photo), str(tmp_path / "." / "photo.png")
    with pytest.raises(UserError, match="input image"):
        output.check_output(c)


# --------------------------------------------------------------------------------------------
# The config and the command


@pytest.mark.parametrize("field, value",
                         [("output", "out.bmpz"), ("output", 3), ("output_bits", 12),
                                          ("output_bits", True), ("output_bits", 16)])
def test_config_validation_refuses_a_bad_output_or_depth(field, value):
    d = {**base_config().to_dict(), "output": "out.jpg", field: value}  # a dict: any type
    with pytest.raises(ConfigError, match="output"):
        validate(ml_collections.ConfigDict(d))


def test_config_validation_accepts_each_format():
    for name in ("o.png", "o.jpg", "o.jpeg", "o.webp", "o.tif", "o.tiff"):
        c = base_config()
        c.output = name
        validate(c)


def _refusing_weights(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the network was loaded before the output path was checked")

    # nstjax.run the module (the package's ``run`` attribute is the function), and the source.
    monkeypatch.setattr(importlib.import_module("nstjax.run"), "load_vgg19_with_info", refuse)
    monkeypatch.setattr("nstjax.weights.load_vgg19_with_info", refuse)


@pytest.mark.parametrize("name, message", [
    ("x.bmpz", "extension '.bmpz'"), ("afile/x.png", "not a directory"),
    ("/proc/nstjax/x.png", "cannot write output")])
def test_a_bad_output_fails_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, name,
                                                        message):
    _refusing_weights(monkeypatch)
    (tmp_path / "afile").write_text("x")
    workdir = tmp_path / "run"
    out = name if name.startswith("/") else str(tmp_path / name)
    code = main(["nstjax", f"--workdir={workdir}", f"--output={out}", "--config.size=64",
                 "--config.steps=3", "--config.progress=False"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nstjax: error: ") and err.count("\n") == 1 and message in err
    assert not workdir.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write into: mode 0500, or for root (whom modes do not stop)
    the immutable attribute, where chattr can set it."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o500)
        yield ro
        ro.chmod(0o700)
        return
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+i", str(ro)], capture_output=True, check=False).returncode != 0:
        pytest.skip("root, and no chattr +i here to make a directory read-only")
    try:
        yield ro
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)


def test_a_read_only_directory_fails_in_one_line_before_any_work(read_only_dir, tmp_path, capsys,
                                                                 monkeypatch):
    with pytest.raises(UserError, match="cannot write output"):
        output.check_output_path(read_only_dir / "o.png")
    _refusing_weights(monkeypatch)
    workdir = tmp_path / "run"
    code = main(["nstjax", f"--workdir={workdir}", f"--output={read_only_dir / 'sub' / 'o.tif'}",
                 "--config.size=64", "--config.steps=3", "--config.progress=False"])
    err = capsys.readouterr().err
    assert (code == 2 and err.startswith("nstjax: error: cannot write output")
            and err.count("\n") == 1)
    assert not workdir.exists() and list(read_only_dir.iterdir()) == []


def test_the_command_refuses_an_unknown_extension_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nstjax", f"--workdir={tmp_path / 'run'}",
                        f"--output={tmp_path / 'x.bmpz'}"], capture_output=True, text=True,
                       cwd=ROOT, check=False, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr.startswith("nstjax: error: output") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_output_cannot_be_combined_with_replay_or_a_sweep(tmp_path, capsys):
    assert main(["nstjax", f"--replay={tmp_path}", f"--output={tmp_path / 'x.png'}"]) == 2
    assert "--replay" in capsys.readouterr().err
    from nstjax import sweep

    c = base_config()
    c.output = str(tmp_path / "x.png")
    c.sweep.axes = (("seed", (0, 1)),)
    with pytest.raises(ConfigError, match="single run"):
        sweep.expand(c)


def test_a_run_may_be_resumed_with_another_output():
    from nstjax.workdir import config_differences

    old = base_config().to_dict()
    del old["output"], old["output_bits"]  # a run started before these fields existed
    new = base_config()
    new.output, new.output_bits = "a.tif", 8
    assert config_differences(old, new.to_dict()) == []


@pytest.fixture(scope="module")
def tiff_run(tmp_path_factory):
    """A real run (64 px, 3 steps) of a photo with an sRGB profile, through the command, with
    --output=.../result.tif: (workdir, the tif, the profile, exit code, stderr)."""
    tmp = tmp_path_factory.mktemp("tiff_run")
    photo, profile = tmp / "photo.jpg", _profile()  # made once: a profile holds its time
    Image.fromarray(to_uint8(_gradient(48, 64)), "RGB").save(photo, quality=95, icc_profile=profile)
    workdir, tif = tmp / "run", tmp / "out" / "result.tif"
    code = main(["nstjax", f"--workdir={workdir}", f"--output={tif}", f"--config.content={photo}",
                 "--config.size=64", "--config.steps=3", "--config.progress=False",
                 "--config.checkpoint_every=0"])
    return workdir, tif, profile, code


def test_a_run_writes_a_16_bit_tiff_equal_to_final_png_with_the_photos_profile(tiff_run):
    workdir, tif, profile, code = tiff_run
    assert code == 0
    final = np.asarray(Image.open(workdir / "final.png"), np.float64)
    samples = _tiff_samples(tif)
    assert samples.shape == final.shape
    assert np.abs(samples / 257.0 - final).max() <= 0.5 + 0.5 / 257 + 1e-9
    assert np.any(samples % 257 != 0)  # the extra bits came from the float image, not final.png
    with Image.open(tif) as im:
        assert im.info.get("icc_profile") == profile
    assert sorted(p.name for p in tif.parent.iterdir()) == ["result.tif"]


def test_a_replay_leaves_the_original_runs_output_file_alone(tiff_run, tmp_path, capsys):
    workdir, tif, _, code = tiff_run
    assert code == 0
    before = tif.stat()
    assert main(["nstjax", f"--replay={workdir}", f"--workdir={tmp_path / 'replay'}"]) == 0
    assert "IDENTICAL" in capsys.readouterr().out
    after = tif.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
