"""nstjax: neural style transfer (Gatys, Ecker & Bethge 2015) in JAX.

The public, pure API:

- :func:`load_vgg19` -> Flax params of the pretrained VGG-19 conv layers; :func:`load_network`
  -> those or Gatys et al.'s normalised network (``"vgg19_normalized"``), with their record;
- :func:`features` (params, image, layers, pooling) -> dict of activations;
- :func:`gram`, :func:`content_loss`, :func:`style_loss`, :func:`tv_loss`, :func:`loss_terms`;
- :func:`run_steps`, the compiled optimisation loop; :func:`run`, a whole run with its files;
- :func:`run_sweep`, a config's sweep as one compiled program per batch of points;
- :func:`stylize` (arrays in, an array out) and :func:`stylize_sweep`, for notebooks.

The names are imported on first use (PEP 562), not when the package is: the ``nstjax`` command
imports ``nstjax.cli`` through this package, and its SIGINT/SIGTERM handlers can only be installed
once the package is imported; importing JAX here would leave a second of start-up in which a
Ctrl-C surfaces as a traceback (nstjax/interrupts.py).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("Objective", "content_loss", "gram", "loss_terms", "objective_weights",
                     "style_loss", "tv_loss"), "nstjax.losses"),
    "compute_targets": "nstjax.targets",
    **dict.fromkeys(("OptimizerSpec", "init_image", "run_steps"), "nstjax.optimize"),
    **dict.fromkeys(("LAYERS", "features"), "nstjax.vgg"),
    **dict.fromkeys(("load_vgg19", "load_vgg19_with_info"), "nstjax.weights"),
    "load_network": "nstjax.network",
    **dict.fromkeys(("stylize", "stylize_sweep"), "nstjax.notebook"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'nstjax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def run(*args, **kwargs):
    """Runs one configured style transfer into a workdir; see :func:`nstjax.run.run`."""
    from nstjax.run import run as _run

    return _run(*args, **kwargs)


def run_sweep(*args, **kwargs):
    """Runs a config's sweep into a workdir; see :func:`nstjax.run.run_sweep`."""
    from nstjax.run import run_sweep as _run_sweep

    return _run_sweep(*args, **kwargs)


__all__ = ["LAYERS", "Objective", "OptimizerSpec", "compute_targets", "content_loss", "features",
           "gram", "init_image", "load_network", "load_vgg19", "load_vgg19_with_info", "loss_terms",
           "objective_weights", "run", "run_steps", "run_sweep", "style_loss", "stylize",
           "stylize_sweep", "tv_loss"]
