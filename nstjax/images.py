"""Reading, resizing and writing images; the built-in default content/style pair.

Images inside nstjax are float32 arrays (H, W, 3) of RGB pixels in [0, 255]. Loading accepts what
people actually have: EXIF-rotated photos (honoured), CMYK, grayscale, 16-bit, palette and alpha
images (converted, alpha composited onto white); it refuses with a one-line :class:`ImageError`
what cannot be used: missing files, directories, empty, truncated or non-image files, and
decompression bombs.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from nstjax.errors import ImageError, why_missing

MEMORY = "memory:"  # names of images held in memory (arrays from Python; see :func:`in_memory`)
BUILTIN_CONTENT = "builtin:hopper"
BUILTIN_STYLE = "builtin:swirls"
MAX_PIXELS = 178_956_970  # PIL's own bomb limit (2 x Image.MAX_IMAGE_PIXELS)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a / hi * 255.0, 0, 255).round().astype(np.uint8)
        im = Image.fromarray(a, "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def load_pil(path: str | os.PathLike) -> Image.Image:
    """Opens an image file fully into an RGB PIL image, honouring EXIF orientation.

    Raises :class:`ImageError`, and nothing else, for any file that cannot be used: PIL's decoders
    raise many kinds of exception on malformed data, and all of them mean the same to a user."""
    if str(path) == BUILTIN_CONTENT:
        return builtin_content().copy()
    if str(path) == BUILTIN_STYLE:
        return builtin_style().copy()
    if str(path).startswith(MEMORY):
        if str(path) not in _IN_MEMORY:
            raise ImageError(f"{path}: no such image in memory (names are valid during the call "
                             "that made them)")
        return _IN_MEMORY[str(path)]
    p = Path(path).expanduser()
    try:
        if not p.exists():  # also False for a symbolic link that leads nowhere: say which
            raise ImageError(f"{p}: {why_missing(p, 'image file')}")
        if p.is_dir():
            raise ImageError(f"{p}: is a directory, not an image file")
        if not p.is_file():
            raise ImageError(f"{p}: is not a regular file")
        if p.stat().st_size == 0:
            raise ImageError(f"{p}: file is empty")
    except OSError as e:  # e.g. a path through a file, or a name too long
        raise ImageError(f"{p}: cannot open ({e.strerror or e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data" and the like
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{p}: {im.width}x{im.height} pixels is too large to decode "
                                     "safely")
                im.load()
                im = _exif_upright(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{p}: refused as a decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file PIL can read") from None
    except MemoryError:
        raise ImageError(f"{p}: not enough memory to decode this image") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed data: OSError, SyntaxError,
        # ValueError, struct.error, ...
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"{p}: cannot read image ({detail})") from None


_IN_MEMORY: dict[str, Image.Image] = {}


def from_any(image, what: str = "image") -> Image.Image:
    """An RGB PIL image from what a notebook has: an (H, W, 3) or (H, W) array, uint8 in 0..255 or
    float in 0..1 (if its largest value is at most 1) or 0..255, a PIL image, or a path. Raises
    :class:`ImageError` in one line for anything else."""
    if isinstance(image, (str, os.PathLike)):
        return load_pil(image)
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    try:
        a = np.asarray(image)
    except Exception:  # noqa: BLE001 - whatever it is, it is not an image
        a = None
    if (a is None or a.dtype == object or a.ndim not in (2, 3)
            or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4))):
        shape = getattr(a, "shape", None)
        raise ImageError(f"{what}: expected an (H, W, 3) array, a PIL image or a path, not "
                         f"{type(image).__name__}{'' if shape is None else f' of shape {shape}'}")
    if a.size == 0 or not np.isfinite(a.astype(np.float64, copy=False)).all():
        raise ImageError(f"{what}: the array is empty or holds NaN or infinite values")
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        scale = 255.0 if a.max() <= 1.0 else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


class in_memory:
    """``with in_memory([a, b]) as names:`` makes images usable where nstjax takes paths: each gets
    a name ``memory:<sha256 of its pixels>`` for the duration of the block."""

    def __init__(self, images: list, what: str = "image"):
        import hashlib

        self.names = []
        self._new = []
        for i, image in enumerate(images):
            pil = from_any(image, f"{what} {i + 1}" if len(images) > 1 else what)
            if isinstance(image, (str, os.PathLike)):
                self.names.append(str(image))
                continue
            digest = hashlib.sha256(pil.tobytes() + str(pil.size).encode()).hexdigest()
            name = f"{MEMORY}{digest}"
            if name not in _IN_MEMORY:
                _IN_MEMORY[name] = pil
                self._new.append(name)
            self.names.append(name)

    def __enter__(self) -> list[str]:
        return self.names

    def __exit__(self, *exc) -> None:
        for name in self._new:
            _IN_MEMORY.pop(name, None)


def _exif_upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says; unchanged if the EXIF data is unreadable
    (a damaged tag should not make a good photo unusable)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a damaged tag raises any kind of error
        return im


def fit_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """(width, height) scaled so the longer side is ``long_side`` (0 keeps the size)."""
    if long_side <= 0:
        return width, height
    s = long_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def to_array(im: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB PIL image -> float32 (H, W, 3) in [0, 255], resized to ``size`` = (width, height)."""
    if size is not None and tuple(size) != im.size:
        im = im.resize(tuple(size), Image.LANCZOS)
    return np.asarray(im, dtype=np.float32)


def load_image(path: str | os.PathLike, long_side: int = 0) -> np.ndarray:
    """Reads an image as float32 (H, W, 3) RGB in [0, 255], longer side resized to ``long_side``."""
    im = load_pil(path)
    return to_array(im, fit_size(im.width, im.height, long_side))


def to_uint8(image) -> np.ndarray:
    return np.clip(np.rint(np.asarray(image, dtype=np.float32)), 0, 255).astype(np.uint8)


def save_png(path: str | os.PathLike, image) -> None:
    """Writes an (H, W, 3) image in [0, 255] as PNG, atomically (temporary file, then rename)."""
    from nstjax.records import atomic_write

    pixels = Image.fromarray(to_uint8(image), "RGB")
    atomic_write(path, lambda f: pixels.save(f, format="PNG"), "wb")


# --------------------------------------------------------------------------------------------
# The built-in pair: a photo that matplotlib ships, and a painting this code makes.


@functools.lru_cache(maxsize=1)
def builtin_content() -> Image.Image:
    """Grace Hopper's portrait (US Navy photo, public domain), shipped in matplotlib's sample
    data."""
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return _to_rgb(Image.open(f))


@functools.lru_cache(maxsize=2)  # drawn once per process: 0.6 s of Python, asked for twice a run
def builtin_style(size: int = 512, seed: int = 1889) -> Image.Image:
    """A swirling brush-stroke painting drawn here: short strokes that follow a field of vortices,
    in a night-sky palette of blues with bursts of yellow. Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), (18, 32, 78))
    draw = ImageDraw.Draw(im)
    vortices = rng.uniform(0, size, (7, 2))
    spins = rng.choice([-1.0, 1.0], 7) * rng.uniform(0.6, 1.4, 7)
    radii = rng.uniform(0.12, 0.3, 7) * size
    blues = [(24, 52, 128), (46, 88, 170), (88, 138, 204), (20, 38, 96), (64, 110, 160),
             (140, 180, 220)]
    warm = [(236, 204, 72), (250, 228, 120), (220, 160, 40), (245, 245, 210)]

    def field(x, y):
        vx, vy = 0.2, 0.05  # a gentle wind, so the strokes flow left to right between vortices
        for (cx, cy), s, r in zip(vortices, spins, radii):
            dx, dy = x - cx, y - cy
            w = s * math.exp(-(dx * dx + dy * dy) / (2 * r * r))
            vx += -dy / r * w
            vy += dx / r * w
        n = math.hypot(vx, vy) + 1e-6
        return vx / n, vy / n

    for _ in range(3200):
        x, y = rng.uniform(0, size, 2)
        near = min(math.hypot(x - cx, y - cy) / r for (cx, cy), r in zip(vortices, radii))
        palette = warm if (near < 0.35 and rng.random() < 0.8) or rng.random() < 0.06 else blues
        colour = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255))
                       for c in palette[rng.integers(len(palette))])
        width = int(rng.integers(3, 8))
        pts = [(x, y)]
        for _ in range(int(rng.integers(6, 16))):
            vx, vy = field(x, y)
            x, y = x + 4.0 * vx, y + 4.0 * vy
            pts.append((x, y))
        draw.line(pts, fill=colour, width=width, joint="curve")
    return im.filter(ImageFilter.SMOOTH)


def load_image_to_shape(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Reads an image resized to exactly (H, W) = ``shape`` (for init images)."""
    h, w = shape
    return to_array(load_pil(path), (w, h))
