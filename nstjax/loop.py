"""The one host loop: a batch of points (a single run is a batch of one) through one stage of
compiled chunks, with everything the host does between chunks.

Between chunks the host writes each point's metrics lines (every ``log_every`` steps, and with
``print_every`` a line of weighted terms on stdout), moves the progress bar, stops a point whose
loss or gradient became non-finite (keeping its last good image; the others go on), saves
intermediate images (``save_every``) and checkpoints (at the first chunk boundary at or after each
multiple of ``checkpoint_every``), and checks ``should_stop`` (SIGINT/SIGTERM). At the end every
point is evaluated once more and gets a last metrics line. Everything it writes goes through the
callbacks of each point's :class:`Sink`: this module reads and writes no file.

Chunk lengths depend only on the config (:func:`nstjax.config.chunk_length`), and a checkpoint is
taken only at a chunk boundary, so a run resumed from one executes the same compiled programs on
the same inputs as a run that never stopped: the same bits.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from nstjax.checkpoint import RunState
from nstjax.losses import Objective
from nstjax.optimize import OptimizerSpec
from nstjax.programs import Programs


@dataclasses.dataclass
class Sink:
    """Where one point's records go; any callback may be None."""

    term_names: tuple[str, ...]  # the point's own terms (of the batch's union objective's)
    output: Callable[[np.ndarray], np.ndarray]  # optimised image -> result (colour handling)
    log: Callable[[dict], None] | None = None
    image: Callable[[int, np.ndarray], None] | None = None
    checkpoint: Callable[[RunState], None] | None = None
    label: str = ""  # for print_every lines of a batch of several
    judge_names: tuple[str, ...] = ()  # the judge metrics it reports (nstjax.judge.names)


@dataclasses.dataclass
class JudgeInputs:
    """The judge's per-point targets on the devices, its objective and reference shape."""

    targets: Any
    obj: Objective
    shape: tuple[int, int]
    every: int = 0  # also judge every N steps of the stage (0: at the end only)
    params: Any = None  # the plain VGG-19's (replicated), whatever network the points run on


@dataclasses.dataclass
class StageInputs:
    """A stage's inputs on the devices: every array has a leading axis of ``slots`` points, the
    real ones first, then padding (repeats of the last real point)."""

    obj: Objective
    opt: OptimizerSpec
    params: Any  # replicated
    targets: Any
    weights: Any
    images: Any
    states: Any
    rngs: list  # each real point's PRNG key data
    steps: int  # this stage's steps
    chunk: int  # steps per compiled chunk
    start: int = 0  # the step the states are at (a resume)
    judge: JudgeInputs | None = None


@dataclasses.dataclass
class PointResult:
    image: np.ndarray  # the result (the output of the last good image)
    state: RunState  # where it ended (the raw image and optimiser state)
    steps_done: int
    final_terms: dict | None  # every term of the last image; None when interrupted
    bad_terms: dict | None  # the non-finite evaluation's terms, if it stopped on one
    judge: dict | None = None  # the judge's metrics of the result (nstjax/judge.py), if judged


@dataclasses.dataclass
class StageResult:
    points: list[PointResult]
    interrupted: bool
    first_chunk_s: float | None


@dataclasses.dataclass
class Timing:
    """Whether to print progress, and when the run started (``elapsed_s`` of metrics lines)."""

    t_start: float
    progress: bool = False
    log_every: int = 10
    save_every: int = 0
    checkpoint_every: int = 0
    print_every: int = 0


class _Progress:
    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        if enabled and sys.stderr.isatty():  # a bar is for a person: no noise in pipes and logs
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                        "[{elapsed}<{remaining}{postfix}]")

    def update(self, n: int, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss={loss:.4g}, {rate:.2f} steps/s", refresh=False)
            self.bar.update(n)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _slot(tree, j: int):
    return jax.tree.map(lambda a: a[j], tree)


def print_line(step: int, terms: dict, label: str = "") -> str:
    """jcjohnson/neural-style's ``-print_iter`` line: the total and each weighted term."""
    parts = [f"{k} {v:.4g}" for k, v in terms.items() if k != "loss"]
    return (f"{label + ': ' if label else ''}step {step}: loss {terms['loss']:.6g} "
            f"({', '.join(parts)})")


def _judge(programs: Programs, batch: StageInputs, sinks: list[Sink],
           x_h: np.ndarray) -> list[dict]:
    """The judge's metrics of every point's result (its output: after colour handling)."""
    devs, j = programs.devices, batch.judge
    outs = [sink.output(x_h[i]) for i, sink in enumerate(sinks)]
    outs += outs[-1:] * (x_h.shape[0] - len(outs))  # the padding slots
    got = programs.judge(j.params, j.targets, devs.shard(np.stack(outs).astype(np.float32)),
                         obj=j.obj, shape=j.shape)
    got = {k: devs.host(v) for k, v in got.items()}
    return [{k: float(got[k][i]) for k in sink.judge_names} for i, sink in enumerate(sinks)]


def optimise(programs: Programs, batch: StageInputs, sinks: list[Sink], timing: Timing,
             should_stop: Callable[[], bool] | None = None) -> StageResult:
    """Runs ``batch`` from step ``batch.start`` to ``batch.steps`` in chunks; see the module doc.
    ``sinks`` has one entry per real point."""
    devs = programs.devices
    k = len(sinks)
    step, total = batch.start, batch.steps
    x, state = batch.images, batch.states
    stopped: list[tuple[int, dict, np.ndarray] | None] = [None] * k
    bar = _Progress(total, timing.progress, initial=step)
    first_s, interrupted, deferred = None, False, False
    judged: dict[int, list[dict]] = {}  # step -> every point's judge metrics, until logged
    judge_every = batch.judge.every if batch.judge is not None else 0
    every, t_prev = timing.checkpoint_every, time.time()

    def host_states():
        return devs.host(x), jax.tree.map(devs.host, state)

    def checkpoint_all() -> None:
        x_h, s_h = host_states()
        for j, sink in enumerate(sinks):  # a stopped point is finished: its files say so
            if sink.checkpoint is not None and stopped[j] is None:
                sink.checkpoint(RunState(step, x_h[j], _slot(s_h, j), batch.rngs[j]))

    try:
        while step < total:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            n = min(batch.chunk, total - step)
            t0 = time.time()
            x, state, terms, done, ok = programs.steps(batch.params, batch.targets, batch.weights,
                                                       x, state, obj=batch.obj, spec=batch.opt,
                                                       n_steps=n)
            terms_h = {t: devs.host(v) for t, v in terms.items()}
            done_h, ok_h = devs.host(done), devs.host(ok)
            t1 = time.time()
            first_s = t1 - t0 if first_s is None else first_s
            rate = n / max(t1 - t0, 1e-9)
            x_h = None
            for j, sink in enumerate(sinks):
                if stopped[j] is not None:
                    continue
                d = int(done_h[j])
                for i in range(d):
                    s = step + i
                    rec = {t: float(terms_h[t][j, i]) for t in sink.term_names}
                    if s % timing.log_every == 0 and sink.log is not None:
                        extra = {f"judge_{m}": v for m, v in judged.get(s, [{}] * k)[j].items()}
                        sink.log({"step": s, **rec, **extra, "elapsed_s": t_prev - timing.t_start,
                                  "steps_per_s": rate})
                    if timing.print_every and s % timing.print_every == 0:
                        bar.write(print_line(s, rec, sink.label))
                if not bool(ok_h[j]):
                    x_h = devs.host(x) if x_h is None else x_h
                    stopped[j] = (step + d, {t: float(terms_h[t][j, d]) for t in sink.term_names},
                                  x_h[j])
            before, step, t_prev = step, step + n, t1
            running = [j for j in range(k) if stopped[j] is None]
            bar.update(n,
                       min((float(terms_h["loss"][j, n - 1]) for j in running), default=math.nan),
                       rate)
            if not running:
                break
            judged.pop(before, None)
            if judge_every and step % judge_every == 0 and step < total:
                x_h = devs.host(x) if x_h is None else x_h
                judged[step] = _judge(programs, batch, sinks, x_h)
            if timing.save_every and step % timing.save_every == 0 and step < total:
                x_h = devs.host(x) if x_h is None else x_h
                for j in running:
                    if sinks[j].image is not None:
                        sinks[j].image(step, sinks[j].output(x_h[j]))
            if every and step // every > before // every:
                if step < total:
                    checkpoint_all()
                else:
                    # after the last metrics lines (below), which a resume from it would not
                    # rewrite
                    deferred = True
    finally:
        bar.close()
    final = None
    if not interrupted:
        final = {t: devs.host(v) for t, v in programs.evaluate(
            batch.params, batch.targets, batch.weights, x, obj=batch.obj).items()}
    x_h, s_h = host_states()
    scores = (_judge(programs, batch, sinks, x_h) if final is not None and batch.judge
              else [None] * k)
    out = []
    for j, sink in enumerate(sinks):
        terms = None if final is None else {t: float(final[t][j]) for t in sink.term_names}
        if stopped[j] is not None:
            s, bad, image = stopped[j]  # the image kept is the one whose evaluation was bad
            out.append(PointResult(sink.output(image),
                                   RunState(s, image, _slot(s_h, j), batch.rngs[j]), s,
                                   terms or bad, bad, scores[j]))
            continue
        if terms is not None and sink.log is not None:
            extra = {f"judge_{m}": v for m, v in (scores[j] or {}).items()}
            sink.log({"step": step, **terms, **extra, "elapsed_s": time.time() - timing.t_start,
                      "steps_per_s": None})
        if terms is not None and timing.print_every and step % timing.print_every == 0:
            print(print_line(step, terms, sink.label), flush=True)
        out.append(PointResult(sink.output(x_h[j]),
                               RunState(step, x_h[j], _slot(s_h, j), batch.rngs[j]), step, terms,
                               None, scores[j]))
    if deferred:
        checkpoint_all()
    return StageResult(out, interrupted, first_s)
