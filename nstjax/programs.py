"""The compiled programs of a batch of points, and the devices they run on.

Every optimisation in nstjax, a single run or a sweep, is a *batch*: points that share one compiled
program, each with its own targets, loss weights, image and optimiser state along a leading point
axis; the VGG-19 params are shared. A single run is a batch of one. :class:`Devices` lays the point
axis over a ``"sweep"`` mesh of devices (of every host in a multi-host sweep) and :class:`Programs`
holds the three compiled functions of a batch:

- ``steps``: :func:`nstjax.optimize.batched_steps`, a chunk of optimiser steps, with the optimiser
  state donated (L-BFGS updates its history in place instead of copying it each chunk);
- ``init``: the optimiser states of a batch of images;
- ``evaluate``: every loss term of a batch of images;
- ``judge``: the fixed reference metrics of a batch of results (nstjax/judge.py).

Each is jitted with the point axis split over the mesh and the params replicated; explicit output
shardings keep every chunk's outputs laid out like its inputs, so all chunks of a batch hit one
compiled program. They are compiled ahead of time through :mod:`nstjax.aot`.

A batch of one costs what the unbatched chunk costs: measured side by side at 512x384
(experiments/batch_of_one.py, docs/performance.md), so there is no second, unbatched program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nstjax import aot, judge, optimize
from nstjax.errors import UserError
from nstjax.losses import Objective
from nstjax.optimize import OptimizerSpec
from nstjax.optimize import unaliased as _unaliased


class Devices:
    """The mesh over ``devices`` (default: every device of every host), and moving data onto and
    off it. Its axes: ``"sweep"``, the points, and ``"rows"``, ``rows`` devices per image: with
    more than one, each image's rows are split over them (spatial partitioning, the GSPMD way: XLA
    partitions the convolutions, exchanging the halo rows, and reduces Grams and losses across the
    devices). Per-point data is split along ``"sweep"``; image-shaped data (the images, the
    optimiser states' image-shaped leaves, L-BFGS's history) also along ``"rows"``."""

    def __init__(self, devices: Sequence | None = None, rows: int = 1):
        self.devices = list(devices) if devices else jax.devices()
        self.count = len(self.devices)
        if rows < 1 or self.count % rows:
            raise UserError(f"devices_per_image={rows} must divide the {self.count} devices in use")
        self.rows = rows
        self.slots = self.count // rows  # points computed side by side: batches are multiples
        self.platform = self.devices[0].platform
        self.mesh = Mesh(np.array(self.devices).reshape(self.slots, rows), ("sweep", "rows"))
        self.split = NamedSharding(self.mesh, PartitionSpec("sweep"))
        self.same = NamedSharding(self.mesh, PartitionSpec())
        self.multihost = jax.process_count() > 1

    def sharding(self, shape: tuple, image_shape: tuple | None = None) -> NamedSharding:
        """A leaf's sharding: along the points, and along ``"rows"`` at the image's row axis when
        it ends with the image's (H, W, 3)."""
        if (self.rows > 1 and image_shape and len(shape) >= 4
                and tuple(shape[-3:]) == tuple(image_shape)):
            spec = ["sweep"] + [None] * (len(shape) - 1)
            spec[len(shape) - 3] = "rows"
            return NamedSharding(self.mesh, PartitionSpec(*spec))
        return self.split

    def layout(self, tree, image_shape: tuple) -> tuple | None:
        """The shardings of ``tree``'s leaves (arrays or shape structs) as a hashable layout, or
        None when images are not split (the point axis alone)."""
        if self.rows == 1:
            return None
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, tuple(self.sharding(np.shape(x), image_shape) for x in leaves)

    @staticmethod
    def _put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def shard(self, tree, image_shape: tuple | None = None):
        """Host arrays with a leading point axis -> global arrays split over the devices (image-
        shaped ones over ``"rows"`` too, given ``image_shape`` = (H, W, 3))."""
        return jax.tree.map(lambda x: self._put(x, self.sharding(np.shape(x), image_shape)), tree)

    def replicate(self, tree):
        return jax.tree.map(lambda x: self._put(x, self.same), tree)

    def host(self, x) -> np.ndarray:
        if self.multihost:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    def broadcast(self, x):
        """Process 0's value of ``x``, an array or a pytree of arrays of the same shapes on every
        process, on every process (what it read from the workdir)."""
        if not self.multihost:
            return x
        from jax.experimental import multihost_utils

        # tree.map: a pytree too (nstjax/batch.py shares restored states); an array as before
        return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(x))


def _strong(tree):
    """The same arrays with no weakly-typed leaves, so the first chunk compiles to the same program
    whether its state was just initialised or restored from a checkpoint (restored arrays are
    never weakly typed; optax's zoom line search initialises some that are)."""
    return jax.tree.map(lambda x: jax.lax.convert_element_type(x, x.dtype)
                        if getattr(x, "weak_type", False) else x, tree)


class Programs:
    """The compiled step chunk, state init and evaluation of batches on ``devices``' mesh."""

    def __init__(self, devices: Devices):
        self.devices = devices

    def steps(self, params, targets, weights, images, states, *, obj: Objective,
              spec: OptimizerSpec, n_steps: int):
        """``n_steps`` steps of every point; ``states`` is donated (continue from the returned)."""
        states = _unaliased(states)
        layout = self.devices.layout((images, states), images.shape[1:])
        fn = _jitted(self.devices.mesh, "steps",
                     (("obj", obj), ("spec", spec), ("n_steps", n_steps)), layout)
        return aot.call(fn, params, targets, weights, images, states)

    def init(self, images, *, spec: OptimizerSpec):
        shapes = jax.eval_shape(functools.partial(optimize.batched_init, spec=spec), images)
        layout = self.devices.layout((images, shapes), images.shape[1:])
        return _strong(_jitted(self.devices.mesh, "init", (("spec", spec),), layout)(images))

    def evaluate(self, params, targets, weights, images, *, obj: Objective) -> dict:
        layout = self.devices.layout(images, images.shape[1:])
        return _jitted(self.devices.mesh, "evaluate", (("obj", obj),), layout)(
            params, targets, weights, images)

    def judge(self, params, targets, images, *, obj: Objective, shape: tuple[int, int]) -> dict:
        """The judge's metrics of every point's result (nstjax/judge.py)."""
        return _jitted(self.devices.mesh, "judge", (("obj", obj), ("shape", tuple(shape))), None)(
            params, targets, images)


_CORE = {"steps": (optimize.batched_steps, 5, (4,)), "init": (optimize.batched_init, 1, ()),
         "evaluate": (optimize.batched_evaluate, 4, ()), "judge": (judge.batched_score, 3, ())}


@functools.lru_cache(maxsize=64)
def _jitted(mesh: Mesh, kind: str, statics: tuple, layout: tuple | None):
    """The batched core function ``kind`` with its static settings bound, jitted for ``mesh``: the
    point axis split, the params (the first argument of ``steps`` and ``evaluate``) replicated, and
    with images split over rows, the image-shaped arguments and results as ``layout`` says (the
    shardings of ``steps``' (images, states), ``init``'s (images, states) or ``evaluate``'s
    images). Cached, so later batches and sweeps in the same process reuse the compiled programs."""
    fn, n_args, donate = _CORE[kind]
    split, same = NamedSharding(mesh, PartitionSpec("sweep")), NamedSharding(mesh, PartitionSpec())
    shardings = (split,) * n_args if kind == "init" else (same,) + (split,) * (n_args - 1)
    out = split
    if layout is not None:
        treedef, leaves = layout
        tree = jax.tree.unflatten(treedef, leaves)
        if kind == "steps":  # (images, states) in; (images, states, terms, done, ok) out
            shardings = shardings[:3] + tuple(tree)
            out = (tree[0], tree[1], split, split, split)
        elif kind == "init":  # images in, states out
            shardings, out = (tree[0],), tree[1]
        else:  # evaluate: images in, the terms out
            shardings = shardings[:3] + (tree,)
    return jax.jit(functools.partial(fn, **dict(statics)), in_shardings=shardings,
                   out_shardings=out, donate_argnums=donate)
