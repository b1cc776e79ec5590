"""A run, or a sweep of runs, from config to files in a workdir: the edge of the program (signals,
locks, one-line errors). Both are batches (:mod:`nstjax.batch`): a single run is a batch of one
point whose directory is the workdir; a sweep is its batches of points, each point's directory
``points/<index>_<slug>/`` holding what a single run's workdir holds.

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

A workdir is resumed when it holds an unfinished run (no manifest, or one saying "interrupted")
whose ``config.json`` matches the new config in every field that changes the result
(:data:`RESULT_NEUTRAL_FIELDS` may differ). The run goes on from its newest good checkpoint and ends
with the same final image, bit for bit, as a run that never stopped: checkpoints are taken only at
chunk boundaries, and the chunk lengths depend only on the config, so the resumed run executes the
same compiled programs on the same inputs. Everything else that holds outputs is refused unless
``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from nstjax import hosts, memory, multiscale, records
from nstjax.batch import Context, Job, run_batch
from nstjax.config import validate
from nstjax.errors import RunInterrupted, UserError
from nstjax.network import load_network
from nstjax.output import check_output
from nstjax.problem import plan_rows
from nstjax.programs import Devices, Programs
from nstjax.sweep import NonFinitePoints, describe, expand, is_sweep, plan, ranges
from nstjax.sweep_files import point_dir, sweep_record, write_outputs
from nstjax.weights import WeightsInfo, load_vgg19_with_info
from nstjax.workdir import (
    LOCK_FILE,
    clear_run,
    inspect_workdir,
    is_done,
    prepare_dir,
    prepare_sweep_dir,
    workdir_lock,
)


def _stderr(message: str) -> None:
    print(f"nstjax: {message}", file=sys.stderr, flush=True)


def describe_bad_terms(bad: dict, step: int) -> str:
    names = [k for k, v in bad.items() if not math.isfinite(v)]
    if not names:
        return f"the gradient became non-finite at step {step} (every loss term was finite)"
    return f"the loss became non-finite at step {step} (bad terms: {', '.join(names)})"


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
# A single run: a batch of one


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, overwrite: bool = False,
        params=None, weights_info: WeightsInfo | None = None, handle_signals: bool = True,
        log: Callable[[str], None] | None = None, batch_context: dict | None = None) -> dict:
    """Runs one style transfer as configured, writing the workdir's files; resumes an unfinished run
    of the same config from its newest good checkpoint. Returns the summary: ``image`` (the result,
    float32 (H, W, 3)), ``steps_done``, ``final_terms``, ``bad_terms``, ``first_step_s``,
    ``state``, ``wall_s``, ``resumed_from``.

    Raises :class:`UserError` for bad input (before touching any earlier output in ``workdir``), for
    a non-finite loss (after writing the last good image), and :class:`RunInterrupted` after SIGINT
    or SIGTERM (after saving a checkpoint), when ``handle_signals``. ``log`` gets progress messages
    (resuming, damaged checkpoints; default: stderr). ``batch_context`` (``--replay`` of a sweep
    point: its manifest's ``sweep`` record) runs it as its batch did: over the batch's union of
    layers, in as many slots.
    """
    log = log or _stderr
    t_start = time.time()
    spec = validate(cfg)
    check_output(cfg)  # an unwritable --output fails now, not after the whole run
    workdir = Path(workdir)
    objective, slots = spec.objective, 1
    if batch_context:
        objective = dataclasses.replace(spec.objective, **{
            f: tuple(batch_context.get(f"union_{f}", getattr(spec.objective, f)))
            for f in ("content_layers", "style_layers", "hist_layers")})
        slots = int(batch_context.get("chunk_slots", 1))
    with StopSignals(handle_signals, log) as stop:
        created = prepare_dir(workdir)
        try:
            with workdir_lock(workdir):
                plan_ = inspect_workdir(workdir, cfg, overwrite)
                # The largest stage must fit, its rows split over devices if one does not hold it.
                planned = plan_rows(multiscale.stages(spec)[-1], len(jax.local_devices()), log)
                spec = dataclasses.replace(spec, devices_per_image=planned.devices_per_image)
                plain = load_network("vgg19", str(cfg.weights_path), params, weights_info)
                params, weights_info = load_network(spec.network, str(cfg.weights_path), *plain)
                if plan_ == "overwrite":
                    clear_run(workdir)
                rows = spec.devices_per_image
                ctx = Context(Programs(Devices(jax.local_devices()[:rows], rows)), params,
                              weights_info, log, progress=bool(cfg.progress), should_stop=stop,
                              t_start=t_start, judge_params=plain[0])
                result = run_batch([Job(cfg, spec, workdir, resume=plan_ == "resume")], ctx,
                                   objective, slots)
        except (UserError, OSError):  # OSError: a full disk, an unusable cache directory
            if created:  # leave no empty directory behind a refused run
                with contextlib.suppress(OSError):
                    (workdir / LOCK_FILE).unlink()
                    workdir.rmdir()
            raise
    out = result.outcomes[0]
    r, manifest = out.result, out.manifest
    step = r.steps_done
    total = sum(st.steps for st in multiscale.stages(spec))
    if result.interrupted:
        name = signal.Signals(stop.signum).name
        picture = workdir / "images" / f"step_{step:06d}.png"
        ck = manifest["checkpoints"]
        first = (manifest.get("stages") or [{"first_step": 0}])[-1]["first_step"]
        if ck["steps"] and max(ck["steps"]) == step - first:
            saved = (f"saved a checkpoint in {workdir / ck['dir']} and the image so far in "
                     f"{picture}; run the same command again to resume")
        else:
            saved = (f"saved the image so far in {picture}; no checkpoint (checkpoint_every=0), so "
                     "running the same command again starts over")
        raise RunInterrupted(f"stopped by {name} at step {step} of {total}: {saved}", stop.signum,
                             step)
    if r.bad_terms is not None:
        kept = [s for s in manifest["checkpoints"]["steps"] if s <= step]
        also = f" and the checkpoint at step {kept[-1]}" if kept else ""
        raise UserError(describe_bad_terms(r.bad_terms, step)
                        + "; stopped and kept the last good image in "
                          f"{workdir / 'final.png'}{also}")
    return {"image": r.image, "steps_done": step, "final_terms": r.final_terms, "bad_terms": None,
            "first_step_s": manifest["timing"].get("first_chunk_s"), "state": r.state,
            "interrupted": False, "wall_s": time.time() - t_start, "resumed_from": out.resumed_from}


# --------------------------------------------------------------------------------------------
# A sweep: batches of points


def _init_distributed() -> None:
    # JAX's runtime, by cluster auto-detection, and the lifelines that end every process in one line
    # when one dies (nstjax/hosts.py; one-line UserErrors, a timeout, never a hang). The command
    # line has usually started it already (--coordinator ...): then this does nothing.
    hosts.start()


class _AgreedStop:
    """``should_stop`` for the processes of a multi-host sweep: each asks at the same chunk boundary
    and they all stop when any of them got SIGINT/SIGTERM. A process stopping alone would leave the
    others waiting in the next chunk's collectives. ``signum``: this process's signal, else the
    first one another got (for the message and the exit code)."""

    def __init__(self, stop: StopSignals):
        self.stop, self.signum = stop, None

    def __call__(self) -> bool:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(
            np.int32(self.stop.signum or 0))).ravel()
        got = [int(s) for s in every if s]
        if got:
            self.signum = self.stop.signum or got[0]
        return bool(got)


def _point_job(p, workdir: Path, batch, n_devices: int, writer: bool) -> Job:
    """A sweep point as a run in its directory: resumed when it holds an unfinished run."""
    d = point_dir(workdir, p)
    resume = False
    if writer:
        d.mkdir(parents=True, exist_ok=True)
        try:
            resume = inspect_workdir(d, p.config, overwrite=False) == "resume"
        except UserError:  # what a kill before its config.json left: start the point afresh
            resume = False
        if not resume:
            clear_run(d)
    record = {"index": p.index, "values": p.values, "batch": batch.index,
              "points_in_chunk": None, "chunk_slots": batch.chunk_size, "devices": n_devices,
              "union_content_layers": list(batch.objective.content_layers),
              "union_style_layers": list(batch.objective.style_layers),
              "union_hist_layers": list(batch.objective.hist_layers)}
    return Job(p.config, p.spec, d, resume=resume, label=f"#{p.index}", sweep=record)


def run_sweep(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
              overwrite: bool = False, params=None, weights_info=None,
              say: Callable[[str], None] | None = None, write_figures: bool = True,
              devices: Sequence | None = None, handle_signals: bool = True) -> dict:
    """Runs every point of ``cfg``'s sweep not yet done in ``workdir`` (resuming the unfinished ones
    from their checkpoints); writes all the files.

    Returns ``{"points": [record per point run now], "skipped": [indices already done],
    "batches": [batch records], "wall_s": ..., "stopped": [indices of all points, of this
    invocation or an earlier one, stopped on a non-finite loss (on the writing process)]}``; each
    record holds the point's final ``image`` (float32 (H, W, 3)), ``final`` terms, ``steps``,
    ``status`` and ``seconds``. ``devices`` (default: all of them, on every host) are the devices
    the point axis is split over. Raises :class:`RunInterrupted` after SIGINT/SIGTERM, every
    unfinished point of the running batch checkpointed.
    """
    t_start = time.time()
    say = say or (lambda m: print(f"nstjax: {m}", flush=True))
    sweep = expand(cfg)
    if sweep.distributed:
        _init_distributed()
    workdir = Path(workdir)
    lock = contextlib.nullcontext()
    # Of several processes (sweep.distributed, or the command line's --coordinator ...), only
    # process 0 writes the workdir, so only it takes the lock; the others may not even see it.
    if not (sweep.distributed or hosts.active()) or jax.process_index() == 0:
        prepare_dir(workdir)
        lock = workdir_lock(workdir)
    with lock, StopSignals(handle_signals, say) as stop:
        return _run_sweep(cfg, sweep, workdir, overwrite, params, weights_info, say, write_figures,
                          devices, stop, t_start)


def _run_sweep(cfg, sweep, workdir: Path, overwrite, params, weights_info, say, write_figures,
               devices, stop, t_start) -> dict:
    rows = {max(1, p.spec.devices_per_image) for p in sweep.points}
    if len(rows) > 1:
        raise UserError("devices_per_image cannot differ between the points of a sweep (it shapes "
                        "the device mesh)")
    devs = Devices(devices, rows.pop())
    writer = jax.process_index() == 0
    if writer:
        prepare_sweep_dir(workdir, [p.config for p in sweep.points], overwrite)
    done_mask = np.array([writer and is_done(point_dir(workdir, p)) for p in sweep.points], bool)
    done_mask = devs.broadcast(done_mask)
    skipped = [p.index for p in sweep.points if done_mask[p.index]]
    todo = [p for p in sweep.points if not done_mask[p.index]]
    budget, shared, _ = memory.budget(sweep.memory_gb)
    if devs.multihost:  # one plan everywhere (the same chunks, so the same collectives): made
        # from process 0's measure of free memory, not from each host's own
        got = devs.broadcast(np.array([-1.0 if budget is None else budget, shared], np.float32))
        budget, shared = (None if got[0] < 0 else float(got[0])), float(got[1])
    batches = plan(sweep, todo, devs.slots, budget, shared, rows=devs.rows)

    record = sweep_record(sweep, devs.count, jax.process_count())
    if writer and (workdir / "sweep.json").exists():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            record["invocations"] = records.read_json(workdir / "sweep.json").get("invocations", [])
    invocation = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": skipped,
                  "batches": [b.record() for b in batches], "status": "running"}
    record["invocations"].append(invocation)
    if writer:
        records.write_json(workdir / "sweep.json", record)
    say(f"sweep: {len(sweep.points)} points, {len(skipped)} already done, {len(todo)} to run in "
        f"{len(batches)} batch{'es' * (len(batches) != 1)} on {devs.count} "
        f"device{'s' * (devs.count != 1)}")

    results: list[dict] = []
    if todo:
        if params is None:
            params, weights_info = load_vgg19_with_info(str(todo[0].config.weights_path) or None)
        ctx, programs = None, Programs(devs)
        for b in batches:
            # Each batch's network (a sweep axis over it changes the params: other batches)
            net = load_network(b.points[0].spec.network, None, params, weights_info)
            if ctx is None or ctx.params is not net[0]:
                ctx = Context(programs, *net, say, progress=bool(cfg.get("progress", False)),
                              writer=writer,
                              should_stop=_AgreedStop(stop) if devs.multihost else stop,
                              judge_params=params)
            if b.split_reason:
                say(f"batch {b.index} runs its {len(b.points)} points in {b.n_chunks} chunks of "
                    f"{b.chunk_size}, one compiled program ({b.split_reason})")
            for c, pts in enumerate(b.chunks()):
                t_c = time.time()
                jobs = [_point_job(p, workdir, b, devs.count, writer) for p in pts]
                for job in jobs:
                    job.sweep["points_in_chunk"] = len(pts)
                ctx.t_start = t_c
                res = run_batch(jobs, ctx, b.objective, b.chunk_size)
                if res.interrupted:
                    invocation.update(status="interrupted", wall_s=time.time() - t_start)
                    if writer:
                        records.write_json(workdir / "sweep.json", record)
                    signum = ctx.should_stop.signum  # _AgreedStop: maybe another process's signal
                    name = signal.Signals(signum).name
                    step = res.outcomes[0].result.steps_done
                    raise RunInterrupted(
                        f"stopped by {name} at step {step} of batch {b.index} (points "
                        f"{ranges([p.index for p in pts])}): checkpointed them; finished points "
                        "are kept; run the same command again to resume", signum, step)
                for p, o in zip(pts, res.outcomes):
                    if o.result.bad_terms is not None:
                        say(f"point {p.index} ({p.label}) stopped: "
                            + describe_bad_terms(o.result.bad_terms, o.result.steps_done))
                    results.append({"index": p.index, "name": p.name, "values": p.values,
                                    "status": o.status, "steps": o.result.steps_done,
                                    "final": o.result.final_terms, "image": o.result.image,
                                    "seconds": o.manifest["timing"]["wall_s"], "batch": b.index})
                say(f"batch {b.index}" + (f" chunk {c + 1}/{b.n_chunks}" if b.n_chunks > 1 else "")
                    + f": points {ranges([p.index for p in pts])} "
                      f"done in {time.time() - t_c:.1f} s")
    wall = time.time() - t_start
    invocation.update(status="finished", wall_s=wall, ran=[r["index"] for r in results])
    stopped = []
    if writer:
        records.write_json(workdir / "sweep.json", record)
        stopped = write_outputs(workdir, sweep, figures=write_figures)
    return {"points": results, "skipped": skipped, "batches": [b.record() for b in batches],
            "wall_s": wall, "sweep": sweep, "stopped": stopped}


def sweep_main(cfg: ml_collections.ConfigDict, workdir: str | None, *, overwrite: bool = False,
               dry_run: bool = False) -> int:
    """The CLI's sweep path: a dry-run listing, or the sweep. Raises :class:`UserError`."""
    if not is_sweep(cfg):
        spec = validate(cfg)
        if dry_run:
            total = sum(st.steps for st in multiscale.stages(spec))
            print(f"no sweep in this config: one run, {total} steps "
                  f"(add sweep.axes or sweep.points to sweep)")
            return 0
    sweep = expand(cfg)
    if dry_run:
        done = [p.index for p in sweep.points if workdir and is_done(point_dir(Path(workdir), p))]
        budget, shared, _ = memory.budget(sweep.memory_gb)
        devs = jax.devices()
        rows = max(1, sweep.points[0].spec.devices_per_image)
        batches = plan(sweep, [p for p in sweep.points if p.index not in done], len(devs) // rows,
                       budget, shared, rows=rows)
        print(describe(sweep, batches, done, len(devs), devs[0].platform))
        return 0
    if not workdir:
        raise UserError("--workdir is required (the directory for the sweep's outputs)")
    out = run_sweep(cfg, workdir, overwrite=overwrite)
    # Process 0 of a multi-host sweep writes the files; the others only computed their share.
    did = (f"sweep wrote {Path(workdir) / 'summary.csv'} and grid.png"
           if jax.process_index() == 0 else
           f"process {jax.process_index()} of {jax.process_count()} (process 0 writes the files)")
    print(f"nstjax: {did}: {len(out['points'])} points "
          f"run, {len(out['skipped'])} already done, {out['wall_s']:.1f} s", flush=True)
    # Every point's status, those finished in earlier invocations too (only the writing process
    # reads them): a resumed sweep whose stopped points were run before exits as the first did.
    stopped = out["stopped"]
    if stopped:
        raise NonFinitePoints(f"sweep point{'s' * (len(stopped) > 1)} {ranges(stopped)} stopped on "
                              "a non-finite loss (last good images kept; the other points "
                              "finished; see summary.csv)")
    return 0
