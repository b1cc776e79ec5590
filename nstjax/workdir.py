"""Workdirs: the one set of rules for where a run or a sweep writes, for both.

A run's workdir (and each sweep point's directory, ``points/<index>_<slug>/``, which is a run's
workdir) holds ``config.json``, ``metrics.jsonl``, ``final.png``, ``manifest.json``, ``images/``
and ``checkpoints/``. A sweep's workdir holds ``sweep.json``, ``summary.csv``, ``grid.png``,
``loss_curves.png`` and ``points/``. Rules:

- a workdir is created if needed and proven writable by writing into it (:func:`prepare_dir`;
  ``os.access`` says yes to everything as root);
- one process writes a workdir at a time (:func:`workdir_lock`, released by the kernel on death);
- a run's workdir is new, resumed (an unfinished run of the same config, see
  :func:`inspect_workdir`), or refused unless ``overwrite``; a sweep's is new, the same sweep
  (whose unfinished points are resumed, its finished ones kept), or refused unless ``overwrite``
  (:func:`prepare_sweep_dir`); neither kind is taken for the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

import ml_collections

from nstjax import records
from nstjax.errors import UserError

OUTPUT_FILES = ("config.json", "metrics.jsonl", "final.png", "manifest.json")
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".nstjax.lock"
# Config fields that do not change a run's result: a run may be resumed with other values of these.
# (The judge scores a result without changing it; judge.every changes the chunk length, which the
# checkpoints' fingerprint holds apart.)
RESULT_NEUTRAL_FIELDS = ("progress", "checkpoint_every", "checkpoint_keep", "print_every", "output",
                         "output_bits", "judge")
SWEEP_FILES = ("sweep.json", "summary.csv", "grid.png", "loss_curves.png")
POINTS_DIR = "points"


def prepare_dir(workdir: Path) -> bool:
    """Creates ``workdir`` if needed and proves it writable by writing into it; returns whether it
    was created. Raises a one-line :class:`UserError` otherwise (this works as root too, where
    ``os.access`` says yes to everything)."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} exists and is not a directory")
    created = not workdir.exists()
    made = [p for p in (workdir, *workdir.parents) if not p.exists()]  # to remove if refused
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    probe = workdir / f".nstjax-probe-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("x")
    except OSError as e:
        with contextlib.suppress(OSError):  # a full disk: leave no empty directories behind
            probe.unlink(missing_ok=True)
            for p in made:
                p.rmdir()
        raise UserError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return created


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """Holds an exclusive lock on ``workdir`` (released by the kernel even after SIGKILL), so two
    processes never write one run."""
    path = workdir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot lock workdir {workdir}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise UserError(f"workdir {workdir} is in use by another nstjax process "
                            f"(pid {other})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def _normalised(d: dict) -> dict:
    return json.loads(records.dumps(d))


def config_differences(old: dict, new: dict) -> list[str]:
    """Fields (``a`` or ``a.b``) whose values differ, ignoring :data:`RESULT_NEUTRAL_FIELDS`."""
    old, new = _normalised(old), _normalised(new)
    out = []
    for k in sorted(set(old) | set(new)):
        if k in RESULT_NEUTRAL_FIELDS:
            continue
        a, b = old.get(k, "<missing>"), new.get(k, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif a != b:
            out.append(k)
    return out


def read_manifest(workdir: Path) -> dict | None:
    try:
        m = records.read_json(workdir / "manifest.json")
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else {}


def _run_files(workdir: Path) -> list[str]:
    present = [f for f in OUTPUT_FILES if (workdir / f).exists()]
    if (workdir / CHECKPOINT_DIR).exists():
        present.append(CHECKPOINT_DIR + "/")
    return present


def inspect_workdir(workdir: Path, cfg: ml_collections.ConfigDict, overwrite: bool) -> str:
    """What to do with ``workdir``: ``"new"`` (nothing there), ``"overwrite"`` (something there,
    replace it) or ``"resume"`` (an unfinished run of this same config). Raises a one-line
    :class:`UserError` for a workdir holding a finished run or another config's run. Changes
    nothing on disk."""
    if (workdir / "sweep.json").exists() or (workdir / "points").is_dir():
        raise UserError(f"workdir {workdir} holds a sweep (sweep.json, points/); choose another "
                        "--workdir for a single run")
    present = _run_files(workdir)
    if not present:
        return "new"
    if overwrite:
        return "overwrite"
    manifest = read_manifest(workdir)
    status = str((manifest or {}).get("status", ""))
    if (workdir / "manifest.json").exists() and not status.startswith("interrupted"):
        kind = "finished" if status == "finished" else (status or "finished")
        raise UserError(f"workdir {workdir} already holds a run ({kind}; {', '.join(present)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    try:
        old = records.read_json(workdir / "config.json")
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004 - caught below, as a damaged file
    except FileNotFoundError:
        raise UserError(f"workdir {workdir} already holds a run ({', '.join(present)}) without the "
                        "config.json needed to resume it; pass --overwrite to replace it or choose "
                        "another --workdir") from None
    except (OSError, ValueError) as e:
        raise UserError(f"workdir {workdir} holds an unfinished run whose config.json is "
                        f"unreadable ({e}); pass --overwrite to replace it") from None
    diff = config_differences(old, cfg.to_dict())
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UserError(f"workdir {workdir} holds an unfinished run with a different config "
                        f"({shown} differ); run the same config again to resume it, pass "
                        "--overwrite to start over, or choose another --workdir")
    return "resume"


def clear_run(workdir: Path) -> None:
    """Removes a previous run's files (outputs, checkpoints, intermediate images, stale
    temporaries)."""
    for f in OUTPUT_FILES:
        (workdir / f).unlink(missing_ok=True)
    for d in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".damaged"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    for p in (workdir / "images").glob("step_*.png"):
        p.unlink(missing_ok=True)
    remove_stale_temporaries(workdir)


def remove_stale_temporaries(workdir: Path) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.final.png.xxxx.tmp``)."""
    for d in (workdir, workdir / "images"):
        for p in d.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def is_done(directory: Path) -> bool:
    """A run (or sweep point) is done when its manifest (written last) says it finished or stopped
    on a non-finite loss, and its final.png is there."""
    m = read_manifest(directory) or {}
    status = str(m.get("status", ""))
    return ((status == "finished" or status.startswith("stopped"))
            and (directory / "final.png").is_file())


def _config_record(cfg: ml_collections.ConfigDict) -> dict:
    d = _normalised(cfg.to_dict())
    d.pop("progress", None)
    return d


def prepare_sweep_dir(workdir: Path, point_configs: list, overwrite: bool) -> None:
    """Creates (or proves writable) a sweep's workdir; refuses one holding a single run or another
    sweep (unless ``overwrite``, which clears it). ``point_configs``: every point's config."""
    prepare_dir(workdir)
    single = [f for f in OUTPUT_FILES if (workdir / f).exists()]
    if single and not overwrite:
        raise UserError(f"workdir {workdir} holds a single run ({', '.join(single)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    if overwrite:
        clear_run(workdir)
        for f in SWEEP_FILES:
            (workdir / f).unlink(missing_ok=True)
        shutil.rmtree(workdir / POINTS_DIR, ignore_errors=True)
        return
    if (workdir / "sweep.json").exists():
        try:
            old = records.read_json(workdir / "sweep.json")
            old_points = [q["config"] for q in old["points"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"workdir {workdir} has an unreadable sweep.json; pass --overwrite to "
                            "start the sweep afresh") from None
        def result_changing(d: dict) -> dict:  # as a run's resume compares them
            return {k: v for k, v in d.items() if k not in RESULT_NEUTRAL_FIELDS}

        if ([result_changing(d) for d in old_points]
                != [result_changing(_config_record(c)) for c in point_configs]):
            raise UserError(f"workdir {workdir} holds a different sweep (sweep.json); pass "
                            "--overwrite to replace it or choose another --workdir")


def sweep_config_record(cfg: ml_collections.ConfigDict) -> dict:
    """A point's config as sweep.json records it (what :func:`prepare_sweep_dir` compares)."""
    return _config_record(cfg)
