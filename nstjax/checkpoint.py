"""Checkpoints of a run's state with orbax, and restoring the newest good one.

A checkpoint holds a :class:`RunState`: the image, the optimiser state, the step and the RNG key,
everything the compiled loop carries from one chunk to the next, so a run restored from it goes on
exactly as if it had never stopped. Beside the arrays each checkpoint keeps a small JSON record
(``meta``): the step, a sha256 over every array's bytes (``digest``), the layout of the optimiser
state, and whatever the caller adds (``nstjax.run`` adds a fingerprint of the config, images and
weights, the elapsed time and the resume history).

Safety:

- orbax writes each checkpoint into ``<step>.orbax-checkpoint-tmp-<time>`` and renames it when
  complete, so a kill mid-save leaves a temporary directory, never a half-written step; such
  directories are reported and removed when a :class:`Checkpoints` opens the directory;
- once orbax has finalised a step, the sha256 of every file in it is written (atomically) to
  ``<step>/nstjax_files.json``; :meth:`Checkpoints.restore` tries the newest step first, checks its
  files against that list *before* orbax reads them (a damaged file would otherwise make
  tensorstore spill asynchronous errors onto stderr), then checks the restored arrays against the
  digest recorded at save time. A step that fails (a file changed or missing, no list because the
  run was killed right after orbax finalised it, wrong layout) is moved aside into
  ``<directory>.damaged/`` with a message, and the next older one is tried.

The optimiser state is saved as its flat list of leaves and rebuilt with the tree structure of a
template state (the caller's freshly initialised one), so any optax state round-trips.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

TMP_MARK = ".orbax-checkpoint-tmp"
FILES_LIST = "nstjax_files.json"


def _file_digests(step_dir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != FILES_LIST:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[p.relative_to(step_dir).as_posix()] = h.hexdigest()
    return out


def verify_files(step_dir: Path) -> None:
    """Raises ValueError unless every file listed in ``step_dir``'s file list is present and
    intact."""
    listing = step_dir / FILES_LIST
    if not listing.is_file():
        raise ValueError(f"{FILES_LIST} is missing (killed right after saving?)")
    try:
        expected = json.loads(listing.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{FILES_LIST} is unreadable ({e})") from None
    if not isinstance(expected, dict) or not expected:
        raise ValueError(f"{FILES_LIST} is not a file list")
    actual = _file_digests(step_dir)
    for name, sha in expected.items():
        if name not in actual:
            raise ValueError(f"file {name} is missing")
        if actual[name] != sha:
            raise ValueError(f"file {name} does not match its recorded sha256")


def _stderr(message: str) -> None:
    print(f"nstjax: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class RunState:
    """What the optimisation loop carries between chunks."""

    step: int
    image: Any  # (H, W, 3) float32
    opt_state: Any  # any optax state pytree
    rng: Any  # the run's PRNG key data (uint32)


def to_tree(state: RunState) -> dict:
    """The pytree orbax saves: plain dicts of arrays (the optimiser state as numbered leaves)."""
    leaves = jax.tree.leaves(state.opt_state)
    return {"image": state.image, "opt_state": {f"{i:04d}": x for i, x in enumerate(leaves)},
            "step": np.asarray(state.step, np.int64), "rng": state.rng}


def from_tree(tree: dict, template: RunState) -> RunState:
    treedef = jax.tree.structure(template.opt_state)
    leaves = [tree["opt_state"][k] for k in sorted(tree["opt_state"])]
    return RunState(int(np.asarray(tree["step"])), tree["image"],
                    jax.tree.unflatten(treedef, leaves), tree["rng"])


def layout(state: RunState) -> list:
    """[shape, dtype] of the image and every optimiser-state leaf: what a restore must match."""
    return [[list(np.shape(x)), str(getattr(x, "dtype", None) or np.asarray(x).dtype)]
            for x in [state.image, *jax.tree.leaves(state.opt_state)]]


def digest(state: RunState) -> str:
    """sha256 over the step and every array's dtype, shape and bytes."""
    h = hashlib.sha256(str(int(state.step)).encode())
    for x in [state.image, state.rng, *jax.tree.leaves(state.opt_state)]:
        a = np.ascontiguousarray(np.asarray(jax.device_get(x)))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class _quiet_asyncio:
    """Keeps tensorstore's orphaned-future reports ("Future exception was never retrieved") and
    orbax's per-thread error logs (through absl, with tracebacks) off stderr while a save or
    restore that failed is cleaned up; the failure itself is reported in one line."""

    LOGGERS = ("asyncio", "absl", "orbax", "tensorstore")

    def __enter__(self):
        self.levels = {name: logging.getLogger(name).level for name in self.LOGGERS}
        for name in self.LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        # tensorstore's threads call back into an event loop orbax has closed after a failed
        # write, and print each "RuntimeError: Event loop is closed" through sys.excepthook.
        self.hooks = sys.excepthook, sys.unraisablehook
        sys.excepthook = lambda *args: None
        sys.unraisablehook = lambda unraisable: None

    def __exit__(self, *exc):
        import gc

        gc.collect()  # orphaned futures report when collected: let that happen while quiet
        for name, level in self.levels.items():
            logging.getLogger(name).setLevel(level)
        sys.excepthook, sys.unraisablehook = self.hooks


class _OrphanedWriteFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" reports of orbax's writes into a temporary
    checkpoint directory: after a failed save they are garbage-collected whenever Python gets to
    them, long after the failure was reported in its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and TMP_MARK in message)


def _drop_orphaned_write_reports() -> None:
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedWriteFilter) for f in logger.filters):
        logger.addFilter(_OrphanedWriteFilter())


def _why(e: BaseException) -> str:
    """One short line for a failed write: the OS's words when it was one (a full disk, say)."""
    text = " ".join(str(e).split())
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if f"os_error_code='{code}'" in text or getattr(e, "errno", None) == code:
            return os.strerror(code)
    return text[:200] or type(e).__name__


class Checkpoints:
    """The checkpoints of one run in ``directory`` (an orbax ``CheckpointManager``), newest
    ``keep`` kept. ``log`` gets one-line messages (default: stderr)."""

    def __init__(self, directory: str | Path, keep: int = 2,
                 log: Callable[[str], None] | None = None):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.log = log or _stderr
        self.failed = 0  # saves that could not be written
        self.directory.mkdir(parents=True, exist_ok=True)
        for tmp in sorted(self.directory.glob(f"*{TMP_MARK}*")):
            self.log(f"removed a half-written checkpoint {tmp.name} (the run was killed while "
                     "saving)")
            shutil.rmtree(tmp, ignore_errors=True)
        alone = {}
        if jax.process_count() > 1:
            # A multi-host sweep: only process 0 keeps checkpoints (it alone writes the workdir;
            # nstjax/batch.py shares what it restores), so orbax must not wait in barriers for
            # processes that never open this directory (it would, for its 300 s timeout, on every
            # save). orbax refuses create=True with active_processes: the mkdir above does it.
            me = jax.process_index()
            alone = {"create": False, "multiprocessing_options": ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me})}
        options = ocp.CheckpointManagerOptions(**{"max_to_keep": max(1, keep), "create": True,
                                                  "enable_async_checkpointing": False,
                                                  "cleanup_tmp_directories": True, **alone})
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def save(self, state: RunState, meta: dict | None = None) -> bool:
        """Saves ``state`` (synchronously; finalised by rename). False if that step exists, or if
        it could not be written (a full disk): then what was half-written is removed, and the
        first such failure of this directory is reported in one warning line through ``log``
        (a run goes on without that checkpoint; its outputs matter more)."""
        if state.step in self.steps():
            return False
        try:
            with _quiet_asyncio():  # orbax's threads log every failed write with a traceback
                return self._save(state, meta)
        except Exception as e:  # noqa: BLE001 (orbax/tensorstore raise many kinds per failed write)
            _drop_orphaned_write_reports()
            self._discard(state.step)
            if not self.failed:
                self.log(f"warning: could not save the checkpoint at step {state.step} in "
                         f"{self.directory / str(state.step)} ({_why(e)}); going on without it "
                         "(later checkpoints that fail are not reported again)")
            self.failed += 1
            return False

    def _save(self, state: RunState, meta: dict | None) -> bool:
        ocp = self._ocp
        meta = {**(meta or {}), "step": int(state.step), "digest": digest(state),
                "layout": layout(state), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        saved = self._mgr.save(int(state.step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(to_tree(state)), meta=ocp.args.JsonSave(meta)))
        self._mgr.wait_until_finished()
        if saved:
            from nstjax.records import write_json

            step_dir = self.directory / str(state.step)
            write_json(step_dir / FILES_LIST, _file_digests(step_dir))
        return bool(saved)

    def _discard(self, step: int) -> None:
        """Removes what a failed save of ``step`` left: orbax's temporary directory, or the step
        itself when only its file list failed (unlisted, a resume would set it aside as damaged)."""
        for p in [*self.directory.glob(f"{step}{TMP_MARK}*"), self.directory / str(step)]:
            shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(Exception):
            self._mgr.reload()  # forget the step it may think it has

    def _restore_step(self, step: int, template: RunState, check_meta) -> tuple[RunState, dict]:
        ocp = self._ocp
        verify_files(self.directory / str(step))
        meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError("its record is missing or names another step")
        if meta.get("layout") != layout(template):
            raise ValueError("its arrays do not have this run's shapes (another optimiser or "
                             "size?)")
        if check_meta is not None:
            check_meta(meta)  # a UserError here is not damage: it propagates
        target = to_tree(dataclasses.replace(template, step=step))
        tree = self._mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        state = from_tree(tree, template)
        if state.step != step:
            raise ValueError(f"it holds step {state.step}")
        if digest(state) != meta.get("digest"):
            raise ValueError("its arrays do not match their recorded sha256")
        return state, meta

    def restore(self, template: RunState, check_meta: Callable[[dict], None] | None = None,
                steps: list[int] | None = None) -> tuple[RunState, dict] | None:
        """The newest checkpoint that reads back intact, restored into ``template``'s structure, and
        its meta; ``None`` if there is none. Damaged ones are moved aside with a message.
        ``check_meta(meta)`` may refuse a checkpoint by raising (e.g. one made from other inputs).
        ``steps``: only these steps are tried (the points of a batch resume at one step)."""
        from nstjax.errors import UserError

        for step in reversed(self.steps() if steps is None
                             else sorted(set(steps) & set(self.steps()))):
            try:
                with _quiet_asyncio():
                    return self._restore_step(step, template, check_meta)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on damage
                why = " ".join(str(e).split())[:200] or type(e).__name__
                moved = self._set_aside(step)
                self.log(f"checkpoint at step {step} is damaged ({why}); moved it to {moved} "
                         "and trying an earlier one")
        return None

    def _set_aside(self, step: int) -> Path:
        damaged = self.directory.parent / f"{self.directory.name}.damaged"
        damaged.mkdir(exist_ok=True)
        dest = damaged / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 0
        while dest.exists():
            n += 1
            dest = damaged / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
        shutil.move(str(self.directory / str(step)), dest)
        self._mgr.reload()
        return dest

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
