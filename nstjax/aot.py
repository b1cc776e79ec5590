"""Compile ahead of time, hand the compiler's memory back, then run: the one machine-specific trick
between a jitted program and its execution, kept here so the step itself reads as the step.

On XLA:CPU the memory the compiler frees stays with the process unless handed back (about 0.4 GB
for a 10-step chunk at 512 px), and a chunk's own buffers then come on top of it; ``jax.jit``
compiles and runs in one call, with no point in between to release it. :func:`call` lowers and
compiles a jitted function explicitly, calls :func:`nstjax.memory.release_free_memory`, keeps the
executable (the 16 newest, by function, static arguments and argument types and shardings) and
runs it. Elsewhere the release is a no-op and this is jit's own cache in front of jit's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import memory

_COMPILED: dict = {}
MAX_KEPT = 16


def _signature(args) -> tuple:
    leaves = jax.tree.leaves(args)
    return (jax.tree.structure(args),
            tuple((np.shape(x), jnp.result_type(x), bool(getattr(x, "weak_type", False)),
                   str(getattr(x, "sharding", ""))) for x in leaves))


def call(fn: Callable, *args) -> Any:
    """``fn(*args)`` for a ``jax.jit``-ed ``fn``, compiled ahead of time with the compiler's memory
    released before the first execution."""
    key = (fn, _signature(args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = fn.lower(*args).compile()
        memory.release_free_memory()
        if len(_COMPILED) >= MAX_KEPT:
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = compiled
    return compiled(*args)


def compiles() -> int:
    """How many programs :func:`call` holds (tests check that a batch compiles once)."""
    return len(_COMPILED)
