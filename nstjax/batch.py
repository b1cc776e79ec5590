"""A batch of points, each a whole run with its own workdir, optimised together: through their
stages (``scales``), from their checkpoints when resumed, into each point's files. A single run is
a batch of one; a sweep is batches of points that share a compiled program (nstjax/sweep.py).

Each point's directory gets what a single run's workdir gets (nstjax/run.py's module doc):
``config.json``, ``metrics.jsonl``, ``images/``, ``checkpoints/`` (``checkpoints/stage_K/`` in a
multi-scale run), ``final.png`` and ``manifest.json`` (written last). The points of a batch are
checkpointed together, at the same steps; a resumed batch restores every point at the newest
(stage, step) that all of them have intact, so it goes on with the same compiled programs on the
same inputs as a batch that never stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nstjax import images, multiscale, records
from nstjax import judge as judging
from nstjax.checkpoint import Checkpoints, RunState
from nstjax.config import RunSpec, chunk_length
from nstjax.errors import UserError, WeightsError
from nstjax.loop import JudgeInputs, PointResult, Sink, StageInputs, Timing, optimise
from nstjax.losses import Objective
from nstjax.output import write_output
from nstjax.problem import Problem, judge_shape, load_judge, load_problem
from nstjax.programs import Devices, Programs
from nstjax.workdir import CHECKPOINT_DIR, RESULT_NEUTRAL_FIELDS, remove_stale_temporaries


@dataclasses.dataclass
class Job:
    """One point of a batch: a run config and the directory it writes."""

    config: ml_collections.ConfigDict
    spec: RunSpec
    dir: Path
    resume: bool = False  # look for this point's checkpoints (an unfinished run of this config)
    label: str = ""
    sweep: dict | None = None  # the manifest's "sweep" record (index, values, ...)
    on_record: Callable[[dict], None] | None = None  # also gets each metrics.jsonl record


@dataclasses.dataclass
class Outcome:
    """What became of one point."""

    job: Job
    result: PointResult  # steps_done counted over all stages
    status: str
    manifest: dict
    resumed_from: int | None


@dataclasses.dataclass
class Context:
    """What every batch of a run or sweep shares."""

    programs: Programs
    params: Any  # on the host
    weights_info: Any
    log: Callable[[str], None]
    progress: bool = False
    writer: bool = True  # this process writes the files (process 0 of a multi-host sweep)
    should_stop: Callable[[], bool] | None = None
    t_start: float = dataclasses.field(default_factory=time.time)

    # The plain VGG-19's params, which the judge scores every point with (so that a sweep over
    # ``network`` is judged by one network); None = ``params``.
    judge_params: Any = None

    def __post_init__(self):
        self.params_on_devices = self.programs.devices.replicate(self.params)
        if self.judge_params is None or self.judge_params is self.params:
            self.judge_params, self.judge_on_devices = self.params, self.params_on_devices
        else:
            self.judge_on_devices = self.programs.devices.replicate(self.judge_params)


def fingerprint(cfg: ml_collections.ConfigDict, problem: Problem) -> dict:
    """What a checkpoint must have been made from to be resumed here: the result-changing config,
    the input images' and the weights' sha256, the chunk length."""
    conf = {k: v for k, v in json.loads(records.dumps(cfg.to_dict())).items()
            if k not in RESULT_NEUTRAL_FIELDS}
    return {
        "config": hashlib.sha256(json.dumps(conf, sort_keys=True).encode()).hexdigest(),
        "content": problem.inputs.get("content", {}).get("sha256"),
        "styles": [s.get("sha256") for s in problem.inputs.get("styles", [])],
        "init": problem.inputs.get("init", {}).get("sha256"),
        "weights": problem.weights_info.sha256 if problem.weights_info else None,
        "chunk_length": chunk_length(problem.spec),
    }


_FINGERPRINT_WORDS = {"config": "the config", "content": "the content image",
                      "styles": "the style images", "init": "the init image",
                      "weights": "the VGG-19 weights", "chunk_length": "the chunk length"}


def _checker(directory: Path, expected: dict, spec: RunSpec):
    def check(meta: dict) -> None:
        theirs = meta.get("fingerprint") or {}
        changed = [_FINGERPRINT_WORDS.get(k, k) for k in expected if theirs.get(k) != expected[k]]
        if changed:
            raise UserError(f"the checkpoints in {directory} were made from other inputs "
                            f"({', '.join(changed)} changed since); pass --overwrite to start over")
        step = meta.get("step", -1)
        if not (step == spec.steps or step % expected["chunk_length"] == 0) or step > spec.steps:
            raise UserError(f"the checkpoint at step {step} in {directory} is not at a "
                            "chunk boundary of this config; pass --overwrite to start over")
    return check


def _stack(trees: list):
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _padded(items: list, slots: int) -> list:
    return items + items[-1:] * (slots - len(items))


def build_manifest(cfg: ml_collections.ConfigDict, problem: Problem, result: PointResult,
                   timing: dict, status: str, extra: dict | None = None) -> dict:
    """The record of a finished (or stopped) run: enough to re-run it and to trust its numbers."""
    spec = problem.spec
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
                       zip(spec.styles, problem.styles,
                           inputs.get("styles", [{}] * len(spec.styles)))],
            **({"init": inputs["init"]} if "init" in inputs else {}),
            "output": list(problem.content.shape),
        },
        "steps": result.steps_done,
        "chunk_length": chunk_length(spec),
        "final": result.final_terms,
        "timing": timing,
        **(extra or {}),
        "environment": records.environment(),
    }


class _Point:
    """A job's per-run state while its batch runs: its stages, checkpoints and metrics file."""

    def __init__(self, job: Job, ctx: Context):
        self.job, self.ctx = job, ctx
        self.stages = multiscale.stages(job.spec)
        self.multi = len(self.stages) > 1
        self.offsets = [sum(st.steps for st in self.stages[:k]) for k in range(len(self.stages))]
        self.total = self.offsets[-1] + self.stages[-1].steps
        self.use_ckpts = bool(job.spec.checkpoint_every) or (job.dir / CHECKPOINT_DIR).exists()
        self.resumes: list = []
        self.elapsed_before = 0.0
        self.stage_records: list = []
        self.fingerprint: dict | None = None
        self.ckpts: Checkpoints | None = None
        self.log_file = None

    def ckpt_dir(self, k: int) -> Path:
        root = self.job.dir / CHECKPOINT_DIR
        return root / f"stage_{k}" if self.multi else root

    def open_stage(self, k: int, fresh: bool) -> None:
        self.close_checkpoints()
        if not (self.use_ckpts and self.ctx.writer):
            return
        if fresh and self.multi and k > 0:
            shutil.rmtree(self.ckpt_dir(k), ignore_errors=True)  # left by an earlier attempt
        self.ckpts = Checkpoints(self.ckpt_dir(k), self.job.spec.checkpoint_keep, self.ctx.log)

    def close_checkpoints(self) -> None:
        if self.ckpts is not None:
            self.ckpts.close()
            self.ckpts = None

    def save(self, state: RunState) -> None:
        if self.ckpts is None:
            return
        meta = {"fingerprint": self.fingerprint, "resumes": self.resumes,
                "elapsed_s": self.elapsed_before + time.time() - self.ctx.t_start}
        try:
            self.ckpts.save(state, meta)
        except Exception as e:  # noqa: BLE001 - a full disk must not end the run:
            # its outputs matter more
            self.ctx.log(f"warning: could not save a checkpoint at step {state.step} in "
                         f"{self.ckpts.directory} ({' '.join(str(e).split())[:200]}); going on")

    def sink(self, k: int, problem: Problem, h: int, w: int) -> Sink:
        job, off = self.job, self.offsets[k]

        def log(rec: dict) -> None:
            if self.multi:
                rec = {**rec, "step": rec["step"] + off, "stage": k, "stage_step": rec["step"],
                       "size": [h, w]}
            if self.log_file is not None:
                self.log_file.write(rec)
            if job.on_record is not None:
                job.on_record(rec)

        def image(s: int, im: np.ndarray) -> None:
            images.save_png(job.dir / "images" / f"step_{off + s:06d}.png", im)

        writer = self.ctx.writer
        return Sink(job.spec.objective.term_names, problem.output,
                    log if writer or job.on_record else None, image if writer else None,
                    self.save if writer else None, job.label,
                    judging.names(job.spec.preserve_color) if job.spec.judge else ())


def _restore(points: list[_Point], problems: list[Problem]):
    """Every point's state at the newest step of stage ``k`` that all of them have intact, or None.
    A damaged checkpoint is moved aside (with a message) and the next common step tried."""
    cks = [p.ckpts for p in points]
    if any(c is None for c in cks):
        return None
    templates = [RunState(0, np.asarray(pr.image),
                          pr.spec.optimizer.build().init(jnp.asarray(pr.image)),
                          pr.rng) for pr in problems]
    while True:
        common = set.intersection(*(set(c.steps()) for c in cks))
        if not common:
            return None
        step = max(common)
        found = []
        for p, c, tmpl, pr in zip(points, cks, templates, problems):
            got = c.restore(tmpl, _checker(c.directory, p.fingerprint, pr.spec), steps=[step])
            if got is None:
                break
            found.append(got)
        else:
            return found


@dataclasses.dataclass
class BatchResult:
    outcomes: list[Outcome]
    interrupted: bool = False  # stopped by ctx.should_stop: every point checkpointed, nothing final


def _problems(points: list[_Point], k: int, ctx: Context, objective: Objective, prev: list | None,
              cache: dict) -> list[Problem]:
    problems = [load_problem(p.stages[k], ctx.params, ctx.weights_info, objective=objective,
                             cache=cache, init_array=None if prev is None else prev[j])
                for j, p in enumerate(points)]
    for pr in problems:  # load_problem converts params of another network: then the steps would not
        if pr.params is not ctx.params:  # run on the params the targets came from
            raise WeightsError(f"the batch's params are not the {pr.spec.network} network its "
                               "points use (nstjax.network.load_network makes them)")
    return problems


def _find_start(points: list[_Point], ctx: Context, objective: Objective, cache: dict):
    """(stage, its problems, restored (state, meta) per point or None, the metas of the newest
    checkpoints read or None) to start from: a resume goes through the stages whose checkpoints
    all points have, a finished stage's result starting the next."""
    problems = _problems(points, 0, ctx, objective, None, cache)
    for p, pr in zip(points, problems):
        p.fingerprint = fingerprint(p.job.config, pr)
    resume = any(p.job.resume for p in points) and all(p.use_ckpts for p in points)
    last, prev, metas = len(points[0].stages) - 1, None, None
    for k in range(last + 1):
        if k > 0:
            problems = _problems(points, k, ctx, objective, prev, cache)
        found = None
        if resume and all(p.ckpt_dir(k).is_dir() for p in points):
            for p in points:
                p.open_stage(k, fresh=False)
            found = _restore(points, problems)
        found = _shared(found, problems, ctx)  # multi-host: process 0's decision, everywhere
        if found is None:
            return k, problems, None, metas
        metas = [m for _, m in found]
        if found[0][0].step == points[0].stages[k].steps and k < last:  # a finished stage
            prev = [state.image for state, _ in found]
            for p, pr in zip(points, problems):
                p.stage_records.append(_stage_record(p, k, pr))
            continue
        return k, problems, found, metas
    return last, problems, None, metas


def _shared(found, problems: list[Problem], ctx: Context):
    """Process 0's restored (state, meta) per point, or None, on every process of a multi-host
    sweep (else ``found`` as it is). Only process 0 opens checkpoints (it alone writes the workdir,
    which the other hosts need not see), so without this the others would start from step 0 while
    it resumed, and their collectives would stop matching (a hang). The others receive the step,
    images and optimiser states into arrays of the same shapes (a fresh state); their metas are
    None (only process 0 writes manifests)."""
    devs = ctx.programs.devices
    if not devs.multihost:
        return found
    if not int(devs.broadcast(np.int32(found is not None))):
        return None
    if found is None:
        found = [(RunState(0, np.asarray(pr.image),
                           pr.spec.optimizer.build().init(jnp.asarray(pr.image)), pr.rng),
                  None) for pr in problems]
    sent = devs.broadcast([(np.int32(st.step), np.asarray(st.image),
                            jax.tree.map(np.asarray, st.opt_state))
                           for st, _ in found])
    return [(dataclasses.replace(st, step=int(step), image=image, opt_state=opt), meta)
            for (st, meta), (step, image, opt) in zip(found, sent)]


def _stage_record(p: _Point, k: int, pr: Problem) -> dict:
    h, w = pr.content.shape[:2]
    return {"stage": k, "size": [h, w], "steps": p.stages[k].steps, "first_step": p.offsets[k]}


def run_batch(jobs: list[Job], ctx: Context, objective: Objective, slots: int | None = None,
              ) -> BatchResult:
    """Runs ``jobs`` as one batch of ``slots`` points (default: as many as jobs; the rest padding)
    over their stages, resuming them from their checkpoints when their jobs say so, and writes each
    point's files. Stops early, after checkpointing every point, when ``ctx.should_stop()``."""
    t_batch = time.time()
    slots = slots or len(jobs)
    points = [_Point(j, ctx) for j in jobs]
    cache: dict = {}
    k0, problems, found, metas = _find_start(points, ctx, objective, cache)
    start = found[0][0].step if found else 0
    for p, meta in zip(points, metas or [None] * len(points)):
        if meta is not None:
            p.resumes = list(meta.get("resumes", [])) + [
                {"from_step": p.offsets[k0] + start, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
            p.elapsed_before = float(meta.get("elapsed_s", 0.0))
        if ctx.writer:
            remove_stale_temporaries(p.job.dir)
            records.write_json(p.job.dir / "config.json", p.job.config.to_dict())
            records.truncate_metrics(p.job.dir / "metrics.jsonl", p.offsets[k0] + start,
                                     before_stage=k0 if p.multi else None)
            p.log_file = records.MetricsLog(p.job.dir / "metrics.jsonl")
    _say_resumed(points, ctx, k0, start, metas is not None, problems)

    judge_in = _judge_inputs(points, ctx, slots, cache)
    timing = Timing(ctx.t_start, ctx.progress, jobs[0].spec.log_every, jobs[0].spec.save_every,
                    jobs[0].spec.checkpoint_every, int(jobs[0].config.print_every))
    ended: list[PointResult | None] = [None] * len(points)  # stopped on a non-finite loss
    first_chunk_s, last, prev = None, len(points[0].stages) - 1, None
    try:
        for k in range(k0, last + 1):
            if k > k0:
                problems = _problems(points, k, ctx, objective, prev, cache)
                found, start = None, 0
                for p in points:
                    p.open_stage(k, fresh=True)
            elif found is None:
                for p in points:
                    p.open_stage(k, fresh=True)
            for p, pr in zip(points, problems):
                p.stage_records.append(_stage_record(p, k, pr))
            batch = stage_inputs(ctx.programs, ctx.params_on_devices, problems, slots,
                                 [st for st, _ in found] if found else None)
            h, w = problems[0].content.shape[:2]
            sinks = [p.sink(k, pr, h, w) if ended[j] is None else
                     dataclasses.replace(p.sink(k, pr, h, w), log=None, image=None, checkpoint=None)
                     for j, (p, pr) in enumerate(zip(points, problems))]
            res = optimise(ctx.programs, dataclasses.replace(batch, start=start, judge=judge_in),
                           sinks, timing, ctx.should_stop)
            first_chunk_s = res.first_chunk_s if first_chunk_s is None else first_chunk_s
            for j, r in enumerate(res.points):
                if ended[j] is None and r.bad_terms is not None:
                    ended[j] = dataclasses.replace(r,
                                                   steps_done=points[j].offsets[k] + r.steps_done)
            if res.interrupted:
                return BatchResult(_interrupted(points, problems, res.points, ended, k, ctx), True)
            if k == last:
                break
            for j, (p, r) in enumerate(zip(points, res.points)):
                if ended[j] is None:  # the stage's result, for a resume after the next stage starts
                    p.save(r.state)
            prev = [r.state.image for r in res.points]
            ctx.log(f"stage {k + 1} of {last + 1} ({w}x{h}, {points[0].stages[k].steps} steps) "
                    "done; upsampling")
    finally:
        for p in points:
            p.close_checkpoints()
            if p.log_file is not None:
                p.log_file.close()
    wall = time.time() - t_batch
    outcomes = []
    for j, (p, pr, r) in enumerate(zip(points, problems, res.points)):
        if ended[j] is not None:
            r = dataclasses.replace(ended[j], final_terms=ended[j].final_terms or r.final_terms)
        else:
            r = dataclasses.replace(r, steps_done=p.offsets[k] + r.steps_done)
        t = {"wall_s": p.elapsed_before + wall / len(points), "batch_wall_s": wall,
             "first_chunk_s": first_chunk_s}
        outcomes.append(_finish(p, pr, r, t, k, ctx))
    return BatchResult(outcomes)


def _finish(p: _Point, pr: Problem, r: PointResult, timing: dict, k: int, ctx: Context,
            status: str | None = None) -> Outcome:
    """Writes a point's result: final.png, then manifest.json (last: it marks the point done)."""
    status = status or ("finished" if r.bad_terms is None else "stopped: non-finite loss")
    extra = _extra(p, k)
    if r.judge is not None:
        extra["judge"] = {**r.judge, "size": list(judge_shape(p.job.spec))}
    manifest = build_manifest(p.job.config, pr, r, timing, status, extra)
    if ctx.writer:
        if status.startswith("interrupted"):
            images.save_png(p.job.dir / "images" / f"step_{r.steps_done:06d}.png", r.image)
        else:
            images.save_png(p.job.dir / "final.png", r.image)
            write_output(p.job.config, r.image)  # --output=FILE, when set (single runs)
        records.write_json(p.job.dir / "manifest.json", manifest)
    return Outcome(p.job, r, status, manifest, p.resumes[-1]["from_step"] if p.resumes else None)


def _say_resumed(points, ctx, k0, start, resumed, problems) -> None:
    p = points[0]
    where = (f" (stage {k0 + 1} of {len(p.stages)}, {problems[0].content.shape[1]}x"
             f"{problems[0].content.shape[0]})" if p.multi else "")
    dirs = p.job.dir if len(points) == 1 else f"{len(points)} points of the batch"
    if resumed:
        ctx.log(f"resuming the unfinished run in {dirs} from its checkpoint at step "
                f"{p.offsets[k0] + start} of {p.total}{where}")
    elif any(q.job.resume for q in points):
        ctx.log(f"found an unfinished run in {dirs} with no usable checkpoint: starting it again "
                "from step 0")


def _judge_inputs(points: list[_Point], ctx: Context, slots: int,
                  cache: dict) -> JudgeInputs | None:
    """The judge's targets of every point on the devices (None when the config turns it off)."""
    spec = points[0].job.spec
    if spec.judge is None:
        return None
    targets = [load_judge(p.job.spec, ctx.judge_params, cache) for p in points]
    return JudgeInputs(ctx.programs.devices.shard(_stack(_padded(targets, slots))),
                       judging.objective(spec.objective.regions), judge_shape(spec),
                       spec.judge.every, ctx.judge_on_devices)


def stage_inputs(programs: Programs, params_on_devices, problems: list[Problem], slots: int,
                 restored: list[RunState] | None = None) -> StageInputs:
    """A stage's problems (all of one stage spec but for their data) on the devices, padded to
    ``slots``; starting from ``restored`` states (a resume) or from the problems' images."""
    devs, spec = programs.devices, problems[0].spec
    imgs = [np.asarray(st.image if restored else pr.image) for st, pr in
            zip(restored or problems, problems)]
    x = devs.shard(np.stack(_padded(imgs, slots)), imgs[0].shape)
    if restored:
        states = devs.shard(_stack(_padded([st.opt_state for st in restored], slots)),
                            imgs[0].shape)
    else:
        states = programs.init(x, spec=spec.optimizer)
    return StageInputs(
        obj=problems[0].objective, opt=spec.optimizer, params=params_on_devices,
        targets=devs.shard(_stack(_padded([pr.targets for pr in problems], slots))),
        weights=devs.shard(_stack(_padded([pr.weights for pr in problems], slots))),
        images=x, states=states, rngs=[pr.rng for pr in problems], steps=spec.steps,
        chunk=chunk_length(spec))


def optimise_problem(problem: Problem, *, progress: bool = False,
                     on_log: Callable[[dict], None] | None = None) -> PointResult:
    """``problem`` optimised in memory for its spec's steps: a batch of one on the first device,
    through the same compiled chunk and loop as every run, writing no file."""
    programs = Programs(Devices(jax.local_devices()[:1]))
    spec = problem.spec
    inputs = stage_inputs(programs, programs.devices.replicate(problem.params), [problem], 1)
    sink = Sink(spec.objective.term_names, problem.output, log=on_log)
    return optimise(programs, inputs, [sink],
                    Timing(time.time(), progress, spec.log_every)).points[0]


def _extra(p: _Point, k: int) -> dict:
    extra = {"resumes": p.resumes, "checkpoints": {
        "every": p.job.spec.checkpoint_every, "keep": p.job.spec.checkpoint_keep,
        "dir": str(p.ckpt_dir(k).relative_to(p.job.dir)),
        "steps": p.ckpts.steps() if p.ckpts else
        _steps_on_disk(p.ckpt_dir(k)) if p.ctx.writer else []},
        "fingerprint": p.fingerprint}
    if p.multi:
        extra["stages"] = p.stage_records
    if p.job.sweep is not None:
        extra["sweep"] = p.job.sweep
    return extra


def _steps_on_disk(d: Path) -> list[int]:
    return sorted(int(c.name) for c in d.iterdir() if c.name.isdigit()) if d.is_dir() else []


def _interrupted(points, problems, results, ended, k, ctx) -> list[Outcome]:
    """Checkpoints every point where it stopped and saves its image so far and an "interrupted"
    manifest (a resume reads the checkpoint; the manifest says what happened). A point already
    stopped on a non-finite loss is finished: its files are written as at the end."""
    name = signal.Signals(getattr(ctx.should_stop, "signum", None) or signal.SIGINT).name
    out = []
    for j, (p, pr, r) in enumerate(zip(points, problems, results)):
        t = {"wall_s": p.elapsed_before + time.time() - ctx.t_start}
        if ended[j] is not None:
            out.append(_finish(p, pr, ended[j], t, k, ctx))
            continue
        p.save(r.state)
        r = dataclasses.replace(r, steps_done=p.offsets[k] + r.steps_done)
        out.append(_finish(p, pr, r, t, k, ctx,
                           status=f"interrupted at step {r.steps_done} ({name})"))
    return out
