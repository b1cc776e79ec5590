"""The compiled programs of a batch of points, and the devices they run on.

Every optimisation in nstjax, a single run or a sweep, is a *batch*: points that share one compiled
program, each with its own targets, loss weights, image and optimiser state along a leading point
axis; the VGG-19 params are shared. A single run is a batch of one. :class:`Devices` lays the point
axis over a ``"sweep"`` mesh of devices (of every host in a multi-host sweep) and :class:`Programs`
holds the three compiled functions of a batch:

- ``steps``: :func:`nstjax.optimize.batched_steps`, a chunk of optimiser steps, with the optimiser
  state donated (L-BFGS updates its history in place instead of copying it each chunk);
- ``init``: the optimiser states of a batch of images;
- ``evaluate``: every loss term of a batch of images.

Each is jitted with the point axis split over the mesh and the params replicated; explicit output
shardings keep every chunk's outputs laid out like its inputs, so all chunks of a batch hit one
compiled program. They are compiled ahead of time through :mod:`nstjax.aot`.

A batch of one costs what the unbatched chunk costs: measured side by side at 512x384
(experiments/batch_of_one.py, docs/performance.md), so there is no second, unbatched program.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nstjax import aot, optimize
from nstjax.optimize import unaliased as _unaliased
from nstjax.losses import Objective
from nstjax.optimize import OptimizerSpec


class Devices:
    """The ``"sweep"`` mesh over ``devices`` (default: every device of every host), and moving data
    onto and off it."""

    def __init__(self, devices: Sequence | None = None):
        self.devices = list(devices) if devices else jax.devices()
        self.count = len(self.devices)
        self.platform = self.devices[0].platform
        self.mesh = Mesh(np.array(self.devices), ("sweep",))
        self.split = NamedSharding(self.mesh, PartitionSpec("sweep"))
        self.same = NamedSharding(self.mesh, PartitionSpec())
        self.multihost = jax.process_count() > 1

    @staticmethod
    def _put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def shard(self, tree):
        """Host arrays with a leading point axis -> global arrays split over the devices."""
        return jax.tree.map(lambda x: self._put(x, self.split), tree)

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

    def steps(self, params, targets, weights, images, states, *, obj: Objective, spec: OptimizerSpec,
              n_steps: int):
        """``n_steps`` steps of every point; ``states`` is donated (continue from the returned)."""
        fn = _jitted(self.devices.mesh, "steps", (("obj", obj), ("spec", spec), ("n_steps", n_steps)))
        return aot.call(fn, params, targets, weights, images, _unaliased(states))

    def init(self, images, *, spec: OptimizerSpec):
        return _strong(_jitted(self.devices.mesh, "init", (("spec", spec),))(images))

    def evaluate(self, params, targets, weights, images, *, obj: Objective) -> dict:
        return _jitted(self.devices.mesh, "evaluate", (("obj", obj),))(params, targets, weights, images)


_CORE = {"steps": (optimize.batched_steps, 5, (4,)), "init": (optimize.batched_init, 1, ()),
         "evaluate": (optimize.batched_evaluate, 4, ())}


@functools.lru_cache(maxsize=64)
def _jitted(mesh: Mesh, kind: str, statics: tuple):
    """The batched core function ``kind`` with its static settings bound, jitted for ``mesh``: the
    point axis split, the params (the first argument of ``steps`` and ``evaluate``) replicated.
    Cached, so later batches and sweeps in the same process reuse the compiled programs."""
    fn, n_args, donate = _CORE[kind]
    split, same = NamedSharding(mesh, PartitionSpec("sweep")), NamedSharding(mesh, PartitionSpec())
    shardings = (split,) * n_args if kind == "init" else (same,) + (split,) * (n_args - 1)
    return jax.jit(functools.partial(fn, **dict(statics)), in_shardings=shardings, out_shardings=split,
                   donate_argnums=donate)
