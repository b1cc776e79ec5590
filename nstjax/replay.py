"""Re-running a finished run from its manifest, and saying whether the result is bit-identical.

``nstjax --replay=WORKDIR [--workdir=NEW]`` reads ``WORKDIR/manifest.json``, runs its config again
(the same seed, the input images at the absolute paths it recorded) into ``NEW`` or a fresh
temporary directory, and compares ``final.png`` byte for byte and the final loss bit for bit. Before
running it warns about every recorded fact that differs now (package versions, Python, platform,
CPU, devices, XLA and JAX flags, the weights' and images' sha256), since any of them may change the
bits. It prints ``IDENTICAL`` or ``DIFFERENT`` with the details; the CLI exits 0 or 1.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_collections
import numpy as np
from PIL import Image

from nstjax import interrupts, records
from nstjax.config import base_config
from nstjax.errors import ConfigError, RunInterrupted, UserError

ENV_FIELDS = ("python", "platform", "machine", "cpu", "backend", "devices", "xla_flags",
              "jax_flags", "git_commit")


def _stdout(message: str) -> None:
    """Results on stdout, warnings on stderr."""
    print(f"nstjax: {message}", file=sys.stderr if message.startswith("warning") else sys.stdout,
          flush=True)


def config_from_manifest(recorded: dict) -> ml_collections.ConfigDict:
    """The run's config, from a manifest's ``config`` (lists back to tuples where the defaults
    have tuples)."""
    cfg = base_config()
    unknown = set(recorded) - set(cfg.keys())
    if unknown:
        raise ConfigError("the manifest's config has fields this nstjax does not know: "
                          f"{', '.join(sorted(unknown))}")
    with cfg.unlocked():
        for k, v in recorded.items():
            if isinstance(cfg[k], ml_collections.ConfigDict) and isinstance(v, dict):
                cfg[k] = ml_collections.ConfigDict(v)
            elif isinstance(cfg[k], tuple) and isinstance(v, list):
                cfg[k] = tuple(v)
            else:
                cfg[k] = v
    return cfg


def environment_differences(recorded: dict, now: dict) -> list[str]:
    out = []
    for name, version in (recorded.get("packages") or {}).items():
        current = (now.get("packages") or {}).get(name)
        if current != version:
            out.append(f"{name} {current} (recorded: {version})")
    for k in ENV_FIELDS:
        if k in recorded and recorded.get(k) != now.get(k):
            out.append(f"{k} {now.get(k)!r} (recorded: {recorded.get(k)!r})")
    return out


def _pin_inputs(cfg: ml_collections.ConfigDict, manifest: dict,
                warn: Callable[[str], None]) -> None:
    """Points the config at the absolute paths the manifest recorded (relative paths depended on
    the directory the run started in) and warns when an image's bytes changed since."""
    from nstjax.problem import describe_input

    imgs = manifest.get("images") or {}
    recorded = [("content", imgs.get("content") or {})]
    recorded += [(f"style image {i + 1}", s) for i, s in enumerate(imgs.get("styles") or [])]
    if imgs.get("init"):
        recorded.append(("init image", imgs["init"]))
    if recorded[0][1].get("abspath"):
        cfg.content = recorded[0][1]["abspath"]
    styles = [s.get("abspath") or s.get("path")
              for _, s in recorded[1:len(imgs.get("styles") or []) + 1]]
    if styles and all(styles):
        cfg.style = ",".join(styles)
    if imgs.get("init", {}).get("abspath"):
        cfg.init = imgs["init"]["abspath"]
    for what, rec in recorded:
        path = rec.get("abspath") or rec.get("path")
        if not path or not rec.get("sha256") or str(path).startswith("builtin:"):
            continue
        try:
            now = describe_input(path)["sha256"]
        except OSError:
            continue  # the run will report the missing file
        if now != rec["sha256"]:
            warn(f"warning: the {what} {path} changed since the run (sha256 {now[:12]} vs "
                 f"{rec['sha256'][:12]})")


def replay(source: str | Path, workdir: str | Path | None = None, *, overwrite: bool = False,
           log: Callable[[str], None] = _stdout) -> dict:
    """Re-runs the run recorded in ``source`` and compares; returns ``{"identical", "workdir",
    "differences"}``. Raises :class:`UserError` when ``source`` holds no finished run."""
    from nstjax.run import run

    source = Path(source)
    mpath = source / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"--replay: {mpath} does not exist (is {source} a finished run's workdir?)")
    try:
        manifest = records.read_json(mpath)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
            raise ValueError("no config in it")  # noqa: TRY004 - caught below, as a damaged file
    except (OSError, ValueError) as e:
        raise UserError(f"--replay: cannot read {mpath} ({e})") from None
    status = str(manifest.get("status", ""))
    if status.startswith("interrupted"):
        raise UserError(f"--replay: the run in {source} is unfinished ({status}); resume it first")
    old_final = source / "final.png"
    if not old_final.is_file():
        raise UserError(f"--replay: {old_final} does not exist, so there is nothing to compare "
                        "with")
    cfg = config_from_manifest(manifest["config"])
    cfg.output = ""  # the original run's extra output file is its own: a replay only compares
    _pin_inputs(cfg, manifest, log)
    for diff in environment_differences(manifest.get("environment") or {}, records.environment()):
        log(f"warning: {diff}; the result may differ")
    temporary = workdir is None
    out = Path(tempfile.mkdtemp(prefix="nstjax-replay-")) if temporary else Path(workdir)
    log(f"replaying {source} ({manifest.get('steps')} steps, seed {manifest.get('seed')}) into "
        f"{out}")
    if temporary:  # "run the same command again to resume" would be false: it replays afresh
        interrupts.set_stop_message(f"stopped at once by {{name}}; the replay's partial output is "
                                    f"left in {out}; run the same command again to replay from the "
                                    "start")
    try:
        summary = run(cfg, out, overwrite=overwrite, batch_context=manifest.get("sweep"))
    except RunInterrupted as e:
        if not temporary:  # the same command resumes the replay in its --workdir
            raise
        shutil.rmtree(out, ignore_errors=True)
        name = signal.Signals(e.signum).name
        raise RunInterrupted(f"stopped by {name} at step {e.step}: the replay was abandoned and "
                             f"its temporary directory {out} removed; run the same command again "
                             "to replay from the start", e.signum, e.step) from None
    except BaseException:
        if temporary:
            shutil.rmtree(out, ignore_errors=True)
        raise
    new_manifest = records.read_json(out / "manifest.json")
    weights = weights_difference(manifest.get("weights"), new_manifest.get("weights"))
    if weights:
        log(f"warning: {weights}")
    differences = compare_runs(source, out, manifest, new_manifest)
    if differences and weights:  # the likely cause, first
        differences.insert(0, weights)
    identical = not differences
    loss = (new_manifest.get("final") or {}).get("loss")
    if identical:
        log(f"IDENTICAL: {out / 'final.png'} is byte-identical to {old_final} "
            f"({summary['steps_done']} steps, final loss {loss!r})")
        if temporary:
            shutil.rmtree(out, ignore_errors=True)
    else:
        log(f"DIFFERENT: {'; '.join(differences)}; the replay is kept in {out}")
    return {"identical": identical, "workdir": None if (identical and temporary) else str(out),
            "differences": differences}


def weights_difference(recorded: dict | None, now: dict | None) -> str | None:
    """Says which VGG-19 weights each run used when they are not the same numbers (by the digest
    of their arrays where both manifests have it, else by the source file's sha256)."""
    recorded, now = recorded or {}, now or {}
    key = ("params_sha256" if recorded.get("params_sha256") and now.get("params_sha256")
           else "sha256")
    if not (recorded.get(key) and now.get(key)) or recorded[key] == now[key]:
        return None

    def named(w: dict) -> str:
        return f"{w.get('path')} ({w.get('source')}, sha256 {str(w.get('sha256'))[:12]})"

    return f"the VGG-19 weights differ: {named(now)} now, {named(recorded)} in the recorded run"


def compare_runs(old_dir: Path, new_dir: Path, old_manifest: dict, new_manifest: dict) -> list[str]:
    """What differs between two runs' results: final.png bytes (with pixel statistics), steps,
    final loss terms (exactly: JSON floats round-trip)."""
    out = []
    a, b = (old_dir / "final.png").read_bytes(), (new_dir / "final.png").read_bytes()
    if a != b:
        x = np.asarray(Image.open(old_dir / "final.png").convert("RGB"), np.int16)
        y = np.asarray(Image.open(new_dir / "final.png").convert("RGB"), np.int16)
        if x.shape != y.shape:
            out.append(f"final.png is {y.shape[1]}x{y.shape[0]}, was {x.shape[1]}x{x.shape[0]}")
        else:
            d = np.abs(x - y)
            out.append(f"final.png differs in {int((d.max(axis=-1) > 0).sum())} of "
                       f"{d.shape[0] * d.shape[1]} pixels "
                       f"(largest difference {int(d.max())} of 255)")
    if old_manifest.get("steps") != new_manifest.get("steps"):
        out.append(f"steps {new_manifest.get('steps')} vs {old_manifest.get('steps')}")
    old_final, new_final = old_manifest.get("final") or {}, new_manifest.get("final") or {}
    changed = [k for k in old_final if json.dumps(old_final.get(k)) != json.dumps(new_final.get(k))]
    if changed:
        k = "loss" if "loss" in changed else changed[0]
        out.append(f"final {k} {new_final.get(k)!r} vs {old_final.get(k)!r}"
                   + (f" ({len(changed)} terms differ)" if len(changed) > 1 else ""))
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: nstjax --replay=WORKDIR")
