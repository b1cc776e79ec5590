"""A persistent cache of compiled XLA programs: a run after the first skips most compilation.

JAX can keep compiled executables on disk, keyed by the program, the compiler options, the
backend and the jax/jaxlib versions; a later process that builds the same program loads it instead
of compiling it. The command line (and ``experiments/figures.py``) turn this on at start-up, an
edge-side effect; the functional core neither knows nor cares. A loaded executable is the same
program the compiler produced, so results are bit-identical with and without the cache
(``tests/test_cli.py`` checks this).

Where: ``$NSTJAX_COMPILE_CACHE_DIR``, else ``xla/`` in nstjax's cache directory (the weights'
one: ``$NSTJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/nstjax``, else ``~/.cache/nstjax``). Only
programs that took at least :data:`MIN_COMPILE_S` to compile are kept; an entry is 0.1-0.4 MB
(measured: a chunk at 64 and at 512 px). Nothing is evicted (JAX's size limit needs the
``filelock`` package, which nstjax does not depend on, and without it JAX silently caches
nothing), so the directory grows with each new size, layer set or chunk length; deleting it at any
time is safe. ``NSTJAX_COMPILE_CACHE=0`` turns it off; a cache
directory the user gave JAX itself (``JAX_COMPILATION_CACHE_DIR``) is left as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from nstjax.records import env_switch
from nstjax.weights import cache_dir

MIN_COMPILE_S = 1.0


def directory() -> Path | None:
    """Where the cache goes, or None when ``NSTJAX_COMPILE_CACHE=0``."""
    if not env_switch("NSTJAX_COMPILE_CACHE"):
        return None
    env = os.environ.get("NSTJAX_COMPILE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return cache_dir() / "xla"


def enable() -> str | None:
    """Turns JAX's persistent compilation cache on (before anything is compiled); returns the
    directory in use, or None when off. An unusable directory leaves the cache off: compiling
    every time is slower, not wrong."""
    import jax

    own = jax.config.jax_compilation_cache_dir
    if own:
        return str(own)
    where = directory()
    if where is None:
        return None
    try:
        where.mkdir(parents=True, exist_ok=True)
        if not os.access(where, os.W_OK):
            return None
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    return str(where)
