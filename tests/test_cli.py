"""The nstjax command as a user runs it: a real end-to-end run, and clean one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nstjax.cli import main
from tests.conftest import ROOT


def _small(image_dir, *extra):
    return ["nstjax", f"--config.content={image_dir / 'tubingen.jpg'}",
            f"--config.style={image_dir / 'starry_night.jpg'}", "--config.size=64",
            "--config.steps=20", "--config.progress=False", *extra]


def _run_cli(workdir: Path, image_dir: Path, compile_cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nstjax", f"--workdir={workdir}", *_small(image_dir)[1:],
           "--config.log_every=5", "--config.save_every=10"]
    env = {**os.environ, "NSTJAX_COMPILE_CACHE": "1",
           "NSTJAX_COMPILE_CACHE_DIR": str(compile_cache)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
                          check=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, image_dir):
    """One real run through the installed console script, in a subprocess, with an empty
    persistent compilation cache of its own."""
    workdir = tmp_path_factory.mktemp("run")
    r = _run_cli(workdir, image_dir, workdir.parent / "xla_cache")
    return workdir, r


def test_run_writes_every_output(finished_run):
    workdir, r = finished_run
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    for f in ("final.png", "config.json", "metrics.jsonl", "manifest.json",
              "images/step_000010.png"):
        assert (workdir / f).is_file(), f
    img = Image.open(workdir / "final.png")
    assert img.mode == "RGB" and max(img.size) == 64


def test_a_second_run_loads_its_programs_from_the_compilation_cache_with_identical_results(
        finished_run, image_dir, tmp_path):
    workdir, r = finished_run
    assert r.returncode == 0, r.stderr
    cache = workdir.parent / "xla_cache"
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "the first run left nothing in the compilation cache"
    manifest = json.loads((workdir / "manifest.json").read_text())
    assert manifest["environment"]["compilation_cache_dir"] == str(cache)
    again = _run_cli(tmp_path / "again", image_dir, cache)
    assert again.returncode == 0, again.stderr
    # Every program the second run needed was there: it added nothing (a changed program, compiler
    # option or cache key would add entries), and loading them changed no bit of the result.
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert (tmp_path / "again" / "final.png").read_bytes() == (workdir / "final.png").read_bytes()
    losses = [[json.loads(l)["loss"] for l in (w / "metrics.jsonl").read_text().splitlines()]
              for w in (workdir, tmp_path / "again")]
    assert losses[0] == losses[1]


def test_the_compilation_cache_can_be_turned_off_and_falls_back_when_unusable(
        tmp_path, monkeypatch, real_compile_cache):
    compile_cache = real_compile_cache
    monkeypatch.setenv("NSTJAX_COMPILE_CACHE", "0")
    assert compile_cache.directory() is None and compile_cache.enable() is None
    monkeypatch.setenv("NSTJAX_COMPILE_CACHE", "1")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NSTJAX_COMPILE_CACHE_DIR", str(blocker / "xla"))
    assert compile_cache.enable() is None  # cannot be created: runs compile as before
    import jax

    assert not jax.config.jax_compilation_cache_dir


def test_metrics_show_the_loss_more_than_halved(finished_run):
    workdir, _ = finished_run
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 5, 10, 15, 20]
    for l in lines:
        for k in ("loss", "content", "style", "tv", "elapsed_s", "style/relu3_1",
                  "content/relu4_2"):
            assert k in l
        assert l["loss"] == pytest.approx(l["content"] + l["style"] + l["tv"], rel=1e-5)
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert lines[-1]["elapsed_s"] > lines[0]["elapsed_s"]


def test_config_and_manifest_record_the_run(finished_run, image_dir):
    workdir, _ = finished_run
    cfg = json.loads((workdir / "config.json").read_text())
    assert cfg["size"] == 64 and cfg["steps"] == 20 and cfg["style_layers"][0] == "relu1_1"
    m = json.loads((workdir / "manifest.json").read_text())
    assert m["status"] == "finished" and m["seed"] == 0 and m["steps"] == 20
    assert m["weights"]["sha256"] == (
        "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6")
    assert m["images"]["output"] == [48, 64, 3]
    assert m["images"]["styles"][0]["path"].endswith("starry_night.jpg")
    env = m["environment"]
    assert env["packages"]["jax"] and env["backend"] == "cpu" and env["devices"]
    assert m["timing"]["wall_s"] > 0 and np.isfinite(m["final"]["loss"])


def _run_main(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.err.strip()


@pytest.mark.parametrize("override,message", [
    ("--config.style_layers=('relu1_1','relu9_9')",
     "unknown style layer 'relu9_9'; valid layers: conv1_1"),
    ("--config.content_layers=('conv4_2x',)", "unknown content layer 'conv4_2x'"),
    ("--config.style_weight=nan", "style_weight must be finite"),
    ("--config.content_weight=-1", "content_weight must be non-negative"),
    ("--config.tv_weight=inf", "tv_weight must be finite"),
    ("--config.no_such_field=3", "no_such_field"),
    ("--config.optimizer.name=sgd", "optimizer.name must be one of"),
    ("--config.pooling=median", "pooling must be 'max' or 'avg'"),
    ("--config.steps=-5", "steps must be an integer >= 0"),
    ("--config.style_layer_weights=(1.0,2.0)",
     "style_layer_weights has 2 weights for 5 style layers"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, image_dir, capsys, override, message):
    code, err = _run_main(_small(image_dir, override) + [f"--workdir={tmp_path / 'w'}"], capsys)
    assert code == 2
    assert err.startswith("nstjax: error: ") and "\n" not in err
    assert message in err, err
    assert "Traceback" not in err


def test_missing_and_corrupt_images(tmp_path, image_dir, capsys):
    code, err = _run_main(_small(image_dir, f"--config.content={tmp_path / 'nope.jpg'}")
                          + [f"--workdir={tmp_path / 'w1'}"], capsys)
    assert code == 2 and "nope.jpg: no such image file" in err
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((image_dir / "tubingen.jpg").read_bytes()[:2000])
    code, err = _run_main(_small(image_dir, f"--config.style={cut}")
                          + [f"--workdir={tmp_path / 'w2'}"], capsys)
    assert code == 2 and "cut.jpg" in err and "\n" not in err
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    code, err = _run_main(_small(image_dir, f"--config.content={text}")
                          + [f"--workdir={tmp_path / 'w3'}"], capsys)
    assert code == 2 and "not an image file" in err


def test_image_too_small_for_the_deepest_layer(tmp_path, image_dir, capsys):
    code, err = _run_main(_small(image_dir, "--config.size=8") + [f"--workdir={tmp_path / 'w'}"],
                          capsys)
    assert code == 2 and "too small for layer relu5_1" in err


def test_missing_config_file_and_workdir(tmp_path, capsys):
    code, err = _run_main(["nstjax", f"--config={tmp_path / 'nope.py'}", f"--workdir={tmp_path}"],
                          capsys)
    assert code == 2 and "nope.py" in err and "\n" not in err
    code, err = _run_main(["nstjax"], capsys)
    assert code == 2 and "--workdir is required" in err


def test_workdir_holding_a_run_is_refused_and_kept(finished_run, image_dir, capsys):
    workdir, _ = finished_run
    before = (workdir / "final.png").read_bytes()
    code, err = _run_main(_small(image_dir) + [f"--workdir={workdir}"], capsys)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (workdir / "final.png").read_bytes() == before


def test_non_finite_loss_stops_with_the_bad_term_named(tmp_path, image_dir, capsys):
    workdir = tmp_path / "w"
    code, err = _run_main(_small(image_dir, "--config.style_weight=1e38", "--config.steps=3")
                          + [f"--workdir={workdir}"], capsys)
    assert code == 2 and "non-finite" in err and "style" in err
    assert (workdir / "final.png").is_file()
    assert json.loads((workdir / "manifest.json").read_text())["status"].startswith("stopped")


def test_no_traceback_from_a_subprocess(tmp_path):
    """The installed entry point itself, as a user types it."""
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "nstjax", f"--workdir={tmp_path}",
                        "--config.style_layers=('relu6_1',)"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=300, check=False)
    assert r.returncode == 2
    assert (r.stderr.strip().count("\n") == 0 and "relu6_1" in r.stderr
            and "Traceback" not in r.stderr)


@pytest.mark.parametrize("name", ["default.py", "gatys2015.py"])
def test_shipped_configs_validate(name):
    import importlib.util

    from ml_collections import config_flags  # noqa: F401  (the loader the CLI uses)

    from nstjax.config import validate

    spec = importlib.util.spec_from_file_location("cfg", Path(ROOT / "configs" / name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = validate(mod.get_config())
    assert run.steps > 0
    if name == "gatys2015.py":
        assert run.objective.pooling == "avg" and run.init == "noise"
        assert run.content_weight / run.style_weight == pytest.approx(1e-3)
        assert run.style_layer_weights == (0.2,) * 5
        assert run.network == "vgg19_normalized"  # what the paper's alpha/beta are for


def test_output_into_a_pipe_closed_early_ends_quietly(tmp_path):
    """``nstjax --dry_run ... | head -1``: the reader goes away after one line. nstjax ends with
    exit 141 (128 + SIGPIPE, what a shell reports for a program killed by SIGPIPE) and nothing about
    it on stderr. The listing of 2500 points (about 100 KB, more than a pipe holds) makes sure it
    is still writing when the pipe closes."""
    cfg = tmp_path / "big.py"
    cfg.write_text("from nstjax.config import base_config\n"
                   "def get_config():\n    c = base_config()\n"
                   "    c.sweep.axes = (('seed', tuple(range(2500))),)\n    return c\n")
    with open(tmp_path / "stderr", "wb") as err_file:
        p = subprocess.Popen([sys.executable, "-m", "nstjax", f"--config={cfg}", "--dry_run"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=err_file, bufsize=0)
        try:
            first = p.stdout.readline()
            p.stdout.close()
            code = p.wait(timeout=300)
        finally:
            p.kill()
    err = (tmp_path / "stderr").read_text()
    assert first.startswith(b"sweep: 2500 points over seed"), first
    assert ("Traceback" not in err and "BrokenPipe" not in err
            and "Exception ignored" not in err), err
    assert code == 141, err


_HEAD = "from nstjax.config import base_config\n\ndef get_config():\n    c = base_config()\n"


@pytest.mark.parametrize("body,expected", [
    (_HEAD + "    c.size = undefined_name\n    return c\n",
     "NameError: name 'undefined_name' is not defined (line 5)"),
    ("from nstjax.config import base_config\n\ndef get_config(:\n    return base_config()\n",
     "SyntaxError: invalid syntax (line 3)"),
    (_HEAD + "    c.size = int('big')\n    return c\n",  # ml_collections put a whole traceback here
     "ValueError: invalid literal for int() with base 10: 'big' (line 5)"),
    # a traceback, exit 1, here
    (_HEAD + "    c.style = open('/nonexistent/x').read()\n    return c\n",
     "FileNotFoundError: [Errno 2] No such file or directory: '/nonexistent/x' (line 5)"),
], ids=["NameError", "SyntaxError", "ValueError", "OSError"])
def test_an_error_in_a_config_file_is_one_line_naming_file_and_line(tmp_path, body, expected):
    """``nstjax: error: <file>: <Type>: <message> (line N)``, exit 2, whatever the error; it used to
    be a squeezed traceback (TypeError, ValueError), a real one with exit 1 (OSError), or no file
    and line."""
    cfg = tmp_path / "mine.py"
    cfg.write_text(body)
    r = subprocess.run([sys.executable, "-m", "nstjax", f"--config={cfg}",
                        f"--workdir={tmp_path / 'w'}", "--config.steps=3"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"nstjax: error: {cfg}: {expected}\n"
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("body,expected", [
    ("x = 1\n", "mine.py: defines no get_config() function"),
    ("def get_config():\n    pass\n",
     "mine.py: get_config() returned NoneType, not an ml_collections.ConfigDict"),
    (_HEAD + "    c.nosuch.value = 1\n    return c\n", "mine.py: AttributeError: "),
    (_HEAD + "    return c\n", None),
], ids=["no get_config", "returns None", "AttributeError", "good"])
def test_config_files_without_a_config_are_one_line(tmp_path, capsys, body, expected):
    cfg = tmp_path / "mine.py"
    cfg.write_text(body)
    code, err = _run_main(["nstjax", f"--config={cfg}", "--dry_run"], capsys)
    if expected is None:  # a good file, for contrast
        assert code == 0 and err == ""
        return
    assert (code == 2 and err.startswith(f"nstjax: error: {tmp_path}/{expected}")
            and "\n" not in err), err
    if "AttributeError" in expected:
        assert err.endswith("(line 5)") and "unknown config field" not in err
