"""How much memory a run needs, and whether it fits: refuse a size that cannot fit before trying.

:func:`estimate_bytes` predicts the peak memory of a run from its sizes alone (pure; no JAX):

- the VGG-19 activations of the output image up to the deepest requested layer, the size of what
  the backward pass works through: ``act_bytes_per_pixel(layers)`` (4 bytes per float, each conv
  and pool output of ``C`` channels at stride ``s`` costing ``C / s**2`` floats per input pixel:
  1,280 bytes up to ``relu5_1``), times ``FIXED_FACTOR + PER_STEP_FACTOR * chunk_steps``. The
  backward pass keeps ReLU and pooling masks as bits and bytes (nstjax/vgg.py), so a step's
  temporaries are about one such set; each step of an unrolled chunk adds a little (its own
  image-sized buffers). Fitted to whole default runs' peak RSS on CPU, chunks of 10: 1.20 GB at
  512x384, 1.66 GB at 768x576, 2.48 GB at 1024x768 (2.08 GB with chunks of 1);
- the optimiser state: L-BFGS keeps ``2 * memory_size`` images of curvature pairs plus a few,
  Adam two moments;
- computing the targets: a forward pass over each style image at its own size;
- a fixed base: the JAX runtime, the compiler and the weights (``BASE_BYTES``: about 0.8 GB of
  RSS on CPU);
- compiling a chunk (:func:`compile_bytes`): its steps are unrolled, so the compiler's memory
  grows with the chunk length (about 41 MB per step through relu5_1), which is what long chunks
  at small sizes run into (``--config.chunk=50`` at 64 px peaks at 2.7 GB).

The factors were measured on CPU; on GPUs XLA's scheduler frees buffers sooner, so the estimate errs
on the generous side there. :func:`largest_size_that_fits` inverts the estimate;
:func:`available_bytes` asks the machine; :func:`check_fits` is what a run calls (set
``NSTJAX_MEMORY_CHECK=0`` to skip it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

from nstjax import records, vgg
from nstjax.errors import UserError

FLOAT_BYTES = 4
BASE_BYTES = {"cpu": 800 * 2**20, "gpu": 300 * 2**20, "other": 300 * 2**20}
FIXED_FACTOR = 1.1  # activation sets independent of the chunk length (fit: 1.04)
PER_STEP_FACTOR = 0.05  # activation sets per unrolled step of a chunk (fit: 0.043)
TARGET_FACTOR = 1.5  # forward pass only, for the style targets
# The compiler's own memory while it builds a chunk: the chunk's steps are unrolled (nstjax/
# optimize.py), so it grows with the steps, about 41 MB per step through relu5_1 (13 convolutions),
# whatever the image size. Measured (experiments/chunk_memory.py, 64 px, the default config): peak
# RSS 710, 987, 1,562 and 2,731 MB for chunks of 1, 10, 25 and 50 steps, compiling in 1.8, 8.5,
# 24 and 65 s. It is handed back before the chunk runs (nstjax/aot.py), so it counts against the
# run's own peak, not on top of it.
COMPILE_BYTES_PER_CONV_STEP = 3.3 * 2**20
OPT_IMAGES = {"lbfgs": lambda m: 2 * m + 4, "lbfgs_zoom": lambda m: 2 * m + 8, "adam": lambda m: 5}


def act_bytes_per_pixel(layers: Iterable[str]) -> float:
    """Bytes of VGG-19 activations per input pixel, through the deepest of ``layers``."""
    layers = tuple(layers)
    if not layers:
        return 0.0
    last = vgg.LAYER_INDEX[vgg.deepest(layers)]
    floats = 0.0
    for name in vgg.LAYERS[:last + 1]:
        if name.startswith(("conv", "pool")):  # a ReLU shares its conv's buffer
            floats += vgg.layer_channels(name) / vgg.layer_stride(name) ** 2
    return floats * FLOAT_BYTES


def point_bytes(height: int, width: int, layers: Iterable[str], optimizer: str = "lbfgs", *,
                memory_size: int = 10, chunk_steps: int = 10) -> float:
    """Predicted bytes one point adds to a batch while it is optimised: its activations and
    temporaries through a chunk of ``chunk_steps`` unrolled steps, and its optimiser state. A point
    of a sweep costs what a single run's optimisation costs: both are batches (nstjax/batch.py)."""
    act = act_bytes_per_pixel(tuple(layers))
    pixels = float(height) * float(width)
    opt = OPT_IMAGES.get(optimizer, OPT_IMAGES["lbfgs"])(memory_size) * 3 * FLOAT_BYTES * pixels
    return pixels * act * (FIXED_FACTOR + PER_STEP_FACTOR * max(1, chunk_steps)) + opt


def estimate_bytes(height: int, width: int, layers: Iterable[str], optimizer: str = "lbfgs", *,
                   memory_size: int = 10, chunk_steps: int = 10,
                   style_shapes: Sequence[tuple[int, int]] = (), platform: str = "cpu",
                   points: int = 1) -> float:
    """Predicted peak bytes of a batch of ``points`` runs with outputs of ``height`` x ``width``
    pixels (a single run: ``points=1``).

    ``layers``: every content and style layer; ``chunk_steps``: steps per compiled chunk
    (:func:`nstjax.config.chunk_length`, at most ``steps``); ``style_shapes``: (height, width) of
    each style image as used. Returns a float (it may be astronomically large; never overflows).
    """
    layers = tuple(layers)
    act = act_bytes_per_pixel(layers)
    pixels = float(height) * float(width)
    optimise = points * point_bytes(height, width, layers, optimizer, memory_size=memory_size,
                                    chunk_steps=chunk_steps)
    targets = max([float(h) * float(w) * act * TARGET_FACTOR for h, w in style_shapes]
                  + [pixels * act * TARGET_FACTOR])
    base = BASE_BYTES.get(platform, BASE_BYTES["other"])
    return base + max(optimise, targets + points * 3 * FLOAT_BYTES * pixels,
                      compile_bytes(layers, chunk_steps))


def compile_bytes(layers: Iterable[str], chunk_steps: int) -> float:
    """The compiler's peak while it builds a chunk of ``chunk_steps`` unrolled steps through the
    deepest of ``layers`` (see :data:`COMPILE_BYTES_PER_CONV_STEP`)."""
    layers = tuple(layers)
    if not layers:
        return 0.0
    last = vgg.LAYER_INDEX[vgg.deepest(layers)]
    convs = sum(1 for name in vgg.LAYERS[:last + 1] if name.startswith("conv"))
    return COMPILE_BYTES_PER_CONV_STEP * convs * max(1, chunk_steps)


def largest_size_that_fits(aspect: float, layers: Iterable[str], available: float, *,
                           style_scale: float = 1.0, n_styles: int = 1, **kwargs) -> int:
    """The largest longer side (pixels) whose run fits in ``available`` bytes; 0 if none does.

    ``aspect`` is the output's width / height; style images are taken as squares of side
    ``style_scale`` times the longer side (the worst case). ``kwargs`` go to :func:`estimate_bytes`.
    """
    layers = tuple(layers)

    def fits(side: int) -> bool:
        w, h = ((side, max(1, round(side / aspect))) if aspect >= 1
                else (max(1, round(side * aspect)), side))
        s = max(1, round(side * style_scale))
        return estimate_bytes(h, w, layers, style_shapes=[(s, s)] * n_styles, **kwargs) <= available

    lo, hi = 0, 1
    while hi < 2**24 and fits(hi):
        lo, hi = hi, hi * 2
    if hi >= 2**24:
        return lo
    while hi - lo > 1:  # fits(lo) or lo == 0; not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _meminfo_available() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> float | None:
    """Room left under a cgroup memory limit (containers), if there is one."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = float(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or float(limit) >= 2**60:
            return None
        return max(0.0, float(limit) - usage)
    return None


def _own_rss() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0.0


def available_bytes(device=None) -> tuple[float | None, str]:
    """(bytes a run could still use, platform) for ``device`` (default: JAX's first device).

    On CPU: this process's resident memory plus what the system could give it (``MemAvailable``,
    capped by a cgroup limit; physical memory where neither is known). On an accelerator: the
    device's ``bytes_limit`` less ``bytes_in_use``. ``None`` when the device does not say.
    """
    import jax

    device = device or jax.devices()[0]
    if device.platform == "cpu":
        room = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
        if not room:
            try:
                room = [float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))]
            except (OSError, ValueError):
                return None, "cpu"
        return min(room) + _own_rss(), "cpu"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some backends do not implement it
        stats = {}
    if "bytes_limit" not in stats:
        return None, "gpu" if device.platform == "gpu" else "other"
    platform = "gpu" if device.platform in ("gpu", "cuda", "rocm") else "other"
    return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0)), platform


def budget(memory_gb: float = 0.0) -> tuple[float | None, float, str]:
    """(bytes per device to plan a batch with, the fixed base that is not per point, where the
    number came from): ``memory_gb`` if given, else :func:`available_bytes` (cgroup-aware on CPU)
    shared among the local devices (forced host devices share the host's memory)."""
    import jax

    available, platform = available_bytes()
    base = BASE_BYTES.get(platform, BASE_BYTES["other"])
    if memory_gb > 0:
        return memory_gb * 2**30, base, "sweep.memory_gb"
    if available is None:
        return None, base, "unknown"
    share = jax.local_device_count() if platform == "cpu" else 1
    return available / share, base, f"{platform} memory available"


def release_free_memory() -> None:
    """Hands memory that this process has freed back to the system (glibc's ``malloc_trim``; a
    no-op elsewhere). The allocator otherwise keeps what the compiler and the targets' forward
    passes used (0.3-0.5 GB at 1024x768) and a run's optimisation then sits on top of it."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def base_bytes(platform: str) -> float:
    return BASE_BYTES.get(platform, BASE_BYTES["other"])


def format_bytes(n: float) -> str:
    if not math.isfinite(n) or n >= 1e18:
        return "an astronomical amount"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def per_device(need: float, devices: int, platform: str) -> float:
    """What each of ``devices`` holds of a run needing ``need`` bytes on one, its image's rows split
    over them: the fixed base on each, the rest shared (the halo rows they exchange are a few rows
    per layer, left out)."""
    base = base_bytes(platform)
    return base + max(0.0, need - base) / max(1, devices)


def check_fits(height: int, width: int, layers: Sequence[str], optimizer: str = "lbfgs", *,
               memory_size: int = 10, chunk_steps: int = 10,
               style_shapes: Sequence[tuple[int, int]] = (), style_scale: float = 1.0,
               devices: int = 1) -> None:
    """Raises a one-line :class:`UserError` naming the largest size that fits when a run of these
    sizes would not fit in memory (with its rows split over ``devices``: each holds its share, and
    on a CPU the devices share the host's memory). Skipped when ``NSTJAX_MEMORY_CHECK=0``."""
    if not records.env_switch("NSTJAX_MEMORY_CHECK"):
        return
    available, platform = available_bytes()
    if available is None:
        return
    if platform == "cpu":  # forced host devices share one process and the host's memory
        devices = 1
    kw = {"optimizer": optimizer, "memory_size": memory_size, "chunk_steps": chunk_steps,
          "platform": platform}
    need = per_device(estimate_bytes(height, width, layers, style_shapes=style_shapes, **kw),
                      devices, platform)
    if need <= available:
        return
    budget = base_bytes(platform) + (available - base_bytes(platform)) * devices
    best = largest_size_that_fits(width / height, layers, budget, style_scale=style_scale,
                                  n_styles=len(style_shapes), **kw)
    where = "this machine" if platform == "cpu" else (
        "the accelerator" if devices == 1 else f"each of the {devices} accelerators")
    # the compiler is what does not fit
    if need - base_bytes(platform) <= compile_bytes(layers, chunk_steps):
        advice = f"compiling {chunk_steps} unrolled steps is what needs it; lower --config.chunk"
    else:
        advice = (f"the largest --config.size that fits is about {best}" if best
                  else "no size fits; lower --config.optimizer.memory_size or --config.chunk")
    raise UserError(f"a {width}x{height} output needs about {format_bytes(need)} of memory but "
                    f"{where} has about {format_bytes(available)} available; {advice} "
                    "(set NSTJAX_MEMORY_CHECK=0 to try anyway)")
