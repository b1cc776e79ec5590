"""What a run leaves behind: atomic JSON files, the metrics log, and the manifest.

Every file is written to a temporary name beside its destination and renamed, so a killed run never
leaves half a JSON file; ``metrics.jsonl`` is appended a whole line at a time and flushed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

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


def write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(_jsonable(record)) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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
                           text=True, timeout=10)
        if r.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def environment() -> dict:
    """Software and hardware facts for the manifest."""
    import jax

    devs = jax.devices()
    return {
        "packages": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind}" for d in devs],
        "device_count": len(devs),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": git_commit(),
        "argv": sys.argv,
    }
