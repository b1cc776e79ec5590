"""What a run leaves behind: atomic JSON files, the metrics log, and the manifest.

Every file is written to a temporary name beside its destination, flushed to disk and renamed, so a
killed run never leaves half a JSON file (:func:`atomic_write`, also used for PNGs).
``metrics.jsonl`` is appended one whole line per ``write`` system call; a line cut short anyway (a
full disk) is skipped by :func:`read_metrics`, and a resumed run rewrites the file, atomically, up
to the step it resumes from (:func:`truncate_metrics`).
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("nstjax", "jax", "jaxlib", "flax", "optax", "numpy", "pillow", "ml-collections",
            "orbax-checkpoint")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # "nan", "inf": JSON has no spelling for them
    return x


def dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps(obj) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Calls ``write(f)`` on a temporary file beside ``path``, then flushes, fsyncs and renames it
    over ``path``: readers (and a later run) see the old file or the new one, never half of one.
    The file gets the permissions a plain ``open`` would give (not ``mkstemp``'s 0600)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        # A failed write (a full disk) names no file, and it is the destination that matters to
        # the user, not our temporary name: say which output could not be written.
        raise _naming(e, path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _naming(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` with ``path`` as its file name, keeping its type and errno."""
    if e.errno is None:
        return OSError(f"{e} ({path})")
    return type(e)(e.errno, e.strerror or os.strerror(e.errno), str(path))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``, each line in a single ``write``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, record: dict) -> None:
        line = (json.dumps(_jsonable(record)) + "\n").encode()
        try:
            written = os.write(self._fd, line)
        except OSError as e:
            raise _naming(e, self.path) from None
        if written != len(line):  # only on a full disk; the cut line is skipped when read
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a line was cut short)",
                          str(self.path))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def truncate_metrics(path: str | os.PathLike, before_step: int,
                     before_stage: int | None = None) -> int:
    """Keeps the lines of ``metrics.jsonl`` for steps before ``before_step`` (rewriting the file
    atomically) and returns how many were kept: what a run resumed at that step starts from. With
    ``before_stage`` (multi-scale runs, resuming in that stage), every line of an earlier stage is
    kept too: a stage's last line (``stage_step`` = its steps) shares its global step with the next
    stage's first (``stage_step`` = 0), which a resume at the start of that next stage writes
    again."""
    path = Path(path)
    if not path.exists():
        return 0

    def earlier(r: dict) -> bool:
        return r["step"] < before_step or (
            before_stage is not None and isinstance(r.get("stage"), int)
            and r["stage"] < before_stage)

    keep = [r for r in read_metrics(path) if isinstance(r, dict) and isinstance(r.get("step"), int)
            and earlier(r)]
    write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut off by a kill: everything before it is good
    return out


def package_versions(names: Iterable[str] = PACKAGES) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "not installed"
    return out


def git_commit() -> str | None:
    """The commit of the nstjax checkout this code runs from, if it is one."""
    here = Path(__file__).resolve().parent.parent
    try:
        r = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10, check=False)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=False).stdout.strip()
        return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_switch(name: str) -> bool:
    """Whether the on/off environment variable ``name`` is on: it is unless set to 0, false, no or
    off (any case)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


JAX_FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
             "jax_threefry_partitionable", "jax_numpy_rank_promotion")


def jax_flags() -> dict:
    import jax

    out = {}
    for name in JAX_FLAGS:
        try:
            out[name] = _jsonable(getattr(jax.config, name))
        except AttributeError:
            pass
    return out


def environment() -> dict:
    """Software and hardware facts for the manifest: what a bit-identical re-run needs the same."""
    import jax

    devs = jax.devices()
    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devs],
        "device_count": len(devs),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_flags": jax_flags(),
        # Where compiled programs were loaded from or stored (nstjax/compile_cache.py); not a
        # result-changing flag, so --replay does not compare it.
        "compilation_cache_dir": _jsonable(getattr(jax.config, "jax_compilation_cache_dir", None)),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
