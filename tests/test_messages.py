"""Messages that say what went wrong: one line, in the user's words, naming what to change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nstjax.cli import main
from nstjax.errors import ConfigError, ImageError


def _error(argv: list[str], capsys) -> str:
    assert main(["nstjax", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nstjax: error: "), err
    return err.strip()[len("nstjax: error: "):]


def _run(image_dir: Path, workdir: Path) -> list[str]:
    return [f"--workdir={workdir}", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=32",
            "--config.steps=1", "--config.progress=False", "--config.style_layers=('relu1_1',)"]


@pytest.mark.parametrize("override, message", [
    ("--config.stlye_weight=1",
     "unknown config field 'stlye_weight' (did you mean \"style_weight\"?)"),
    ("--config.optimizer.nmae=adam",
     "unknown config field 'optimizer.nmae' (did you mean \"optimizer.name\"?)"),
])
def test_an_unknown_field_is_named_plainly_with_its_suggestion(override, message, capsys):
    assert _error(["--workdir=w", override], capsys) == message


@pytest.mark.parametrize("where", ["a file", "a path through a file"])
def test_an_unusable_cache_directory_names_the_cache_and_its_variable(where, tmp_path, image_dir,
                                                                      capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    cache = tmp_path / "f" if where == "a file" else tmp_path / "f" / "cache"
    monkeypatch.delenv("NSTJAX_WEIGHTS", raising=False)
    monkeypatch.setenv("NSTJAX_CACHE_DIR", str(cache))
    message = _error(_run(image_dir, tmp_path / "w"), capsys)
    assert message.startswith(f"cannot use the weights cache directory {cache} "
                              "(NSTJAX_CACHE_DIR): ")
    assert "NSTJAX_WEIGHTS" in message
    assert not (tmp_path / "w").exists()  # the refused run leaves no workdir


def test_layers_joined_by_commas_are_refused_with_the_tuple_syntax(capsys):
    message = _error(["--workdir=w", "--config.style_layers=relu1_1,relu2_1"], capsys)
    assert message == ("style_layers: 'relu1_1,relu2_1' is one name with commas in it; give "
                       "several layers as a tuple: --config.style_layers=\"('relu1_1', "
                       "'relu2_1')\"")


def test_a_layer_named_twice_is_refused_rather_than_logged_at_half_its_term():
    from nstjax.config import base_config, validate

    cfg = base_config()
    cfg.style_layers = ("relu1_1", "relu2_1", "relu1_1")
    with pytest.raises(ConfigError, match="style_layers names relu1_1 more than once"):
        validate(cfg)


def test_symbolic_links_that_lead_nowhere_say_so(tmp_path):
    from nstjax.images import load_pil

    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(ImageError, match="a: a loop of symbolic links, not an image file"):
        load_pil(tmp_path / "a")
    with pytest.raises(ImageError,
                       match="dangling.jpg: a symbolic link to .*gone.jpg, which does not exist"):
        load_pil(tmp_path / "dangling.jpg")


def test_a_weights_file_that_is_a_symlink_loop_says_so(tmp_path):
    from nstjax.errors import WeightsError
    from nstjax.weights import load_file

    os.symlink(tmp_path / "b.npz", tmp_path / "a.npz")
    os.symlink(tmp_path / "a.npz", tmp_path / "b.npz")
    with pytest.raises(WeightsError, match="a.npz: a loop of symbolic links, not a weights file"):
        load_file(str(tmp_path / "a.npz"))


def test_a_directory_given_as_config_says_it_is_one(tmp_path, capsys):
    message = _error(["--workdir=w", f"--config={tmp_path}"], capsys)
    assert message == (f"config file {tmp_path} is a directory, not a Python file defining "
                       "get_config()")
