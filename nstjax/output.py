"""The extra output file (``config.output``, ``--output=FILE``): the final image written once more,
in the format its extension names, besides ``WORKDIR/final.png``.

- ``.png``: PNG, 8 bits per channel, or 16 with ``config.output_bits=16``;
- ``.jpg``, ``.jpeg``: JPEG, 8 bits, quality 95;
- ``.webp``: WebP, 8 bits, quality 95;
- ``.tif``, ``.tiff``: uncompressed TIFF, 16 bits per channel, or 8 with ``config.output_bits=8``.

16-bit files are made from the float image, not from the 8-bit ``final.png`` (value ``x`` in
[0, 255] becomes ``round(x * 257)``), so they keep the precision the optimiser found. Pillow writes
16 bits only for one-channel images, so 16-bit RGB PNG and TIFF are written here by two small
writers of our own. The content photo's ICC profile, if it has an RGB one, is embedded: the pixels
were read without colour management, so the result is in the photo's colour space.

Everything is checked before a run does any work (:func:`output_format` from config validation,
:func:`check_output` from :func:`nstjax.run.run`), and written atomically with
:func:`nstjax.records.atomic_write`, like ``final.png``.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from nstjax.errors import ConfigError, UserError
from nstjax.images import to_uint8
from nstjax.records import atomic_write

# Extension -> (Pillow's format name, the bit depths it may have, the first being the default).
FORMATS: dict[str, tuple[str, tuple[int, ...]]] = {
    ".png": ("PNG", (8, 16)),
    ".jpg": ("JPEG", (8,)),
    ".jpeg": ("JPEG", (8,)),
    ".webp": ("WEBP", (8,)),
    ".tif": ("TIFF", (16, 8)),
    ".tiff": ("TIFF", (16, 8)),
}
LOSSY_QUALITY = 95  # JPEG and WebP


def output_format(path: str | os.PathLike, bits: int = 0) -> tuple[str, int]:
    """(Pillow format name, bits per channel) for an output file named ``path``; ``bits`` 0 means
    the format's default. Raises :class:`ConfigError` for an unknown extension or a depth the
    format cannot hold. Looks only at the name, never at the disk."""
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        known = ", ".join(FORMATS)
        got = f"extension {ext!r}" if ext else "no extension"
        raise ConfigError(f"output {str(path)!r} has {got}: name a file ending in one of {known}")
    fmt, depths = FORMATS[ext]
    if isinstance(bits, bool) or bits not in (0, *depths):
        allowed = " or ".join(str(d) for d in depths)
        raise ConfigError(f"output_bits={bits!r} does not suit {fmt} (output {str(path)!r}): "
                          f"use 0 (the default) or {allowed}")
    return fmt, bits or depths[0]


def check_output_path(path: str | os.PathLike) -> None:
    """Proves that ``path`` can be written, leaving nothing behind; raises a one-line
    :class:`UserError` otherwise. The probe creates and removes a file in the directory (or, for a
    directory yet to be made, in its nearest existing ancestor, where the write will create it):
    the process may run as root, for whom ``os.access`` says yes to everything."""
    where = ""
    try:
        p = Path(path).expanduser()
        if p.is_dir():
            raise UserError(f"output {p} is a directory; name a file")
        if p.exists() and not p.resolve().is_file():  # renaming onto it would replace a device node
            raise UserError(f"output {p} exists and is not a regular file")
        d = p.resolve().parent
        while not d.exists() and d != d.parent:
            d = d.parent
        if not d.is_dir():
            raise UserError(f"cannot write output {p}: {d} is not a directory")
        # Named as atomic_write names its temporary, so that this proves what that will need.
        where = f" (directory {d})"
        fd, probe = tempfile.mkstemp(dir=d, prefix=f".{p.name}.", suffix=".tmp")
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot write output {path}: {reason}{where}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except (OSError, ValueError):
        return False


def check_output(cfg) -> None:
    """The checks of ``cfg.output`` that need the disk (nothing when it is empty): writable, and not
    one of the run's input images, which it would replace."""
    path = str(cfg.get("output", ""))
    if not path:
        return
    styles = cfg.style.split(",") if isinstance(cfg.style, str) else list(cfg.style)
    for other in [cfg.content, *styles, cfg.init]:
        other = str(other).strip()
        if other and not other.startswith("builtin:") and _same_file(path, other):
            raise UserError(f"output {path} is the input image {other}; it would be overwritten")
    check_output_path(path)


def write_output(cfg, image) -> None:
    """Writes the final ``image`` to ``cfg.output`` (nothing when it is empty), with the content
    image's ICC profile."""
    path = str(cfg.get("output", ""))
    if path:
        save_output(path, image, int(cfg.get("output_bits", 0)), icc_profile(cfg.content))


def icc_profile(path: str | os.PathLike) -> bytes | None:
    """The RGB ICC profile embedded in the image file ``path``, or None (no profile, an unreadable
    file, a built-in image). A CMYK or grey profile is left out: it cannot describe RGB output."""
    if str(path).startswith("builtin:"):
        return None
    try:
        with Image.open(Path(path).expanduser()) as im:
            icc = im.info.get("icc_profile")
    except Exception:  # noqa: BLE001 -- any unreadable profile: a nicety, not a need
        return None
    # Bytes 16-19 of an ICC header name the colour space of the data it describes.
    if not isinstance(icc, bytes) or len(icc) < 128 or icc[16:20] != b"RGB ":
        return None
    return icc


def to_uint16(image) -> np.ndarray:
    """(H, W, 3) in [0, 255] -> uint16 in [0, 65535] (x * 257 maps 255 to 65535 exactly)."""
    return np.clip(np.rint(np.asarray(image, dtype=np.float64) * 257.0), 0, 65535).astype(np.uint16)


def save_output(path: str | os.PathLike, image, bits: int = 0,
                icc_profile: bytes | None = None) -> None:
    """Writes an (H, W, 3) float image in [0, 255] to ``path`` atomically, in the format and depth
    :func:`output_format` gives for its name, embedding ``icc_profile`` when given."""
    fmt, bits = output_format(path, bits)
    # replace a link's target, not the link
    target = Path(os.path.realpath(Path(path).expanduser()))
    if bits == 16:
        pixels = to_uint16(image)
        data = _png16(pixels, icc_profile) if fmt == "PNG" else _tiff16(pixels, icc_profile)
        atomic_write(target, lambda f: f.write(data), "wb")
        return
    im = Image.fromarray(to_uint8(image), "RGB")
    options: dict = {"quality": LOSSY_QUALITY} if fmt in ("JPEG", "WEBP") else {}
    if icc_profile:
        options["icc_profile"] = icc_profile
    atomic_write(target, lambda f: im.save(f, format=fmt, **options), "wb")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png16(pixels: np.ndarray, icc: bytes | None) -> bytes:
    """A 16-bit RGB PNG (colour type 2, depth 16) of uint16 (H, W, 3) ``pixels``."""
    h, w, _ = pixels.shape
    rows = pixels.astype(">u2").view(np.uint8).reshape(h, w * 6)
    # Filter "Sub" on every row: each byte minus the same byte of the pixel to its left (mod 256);
    # neighbouring pixels are alike, so this compresses far better than unfiltered rows.
    sub = rows.copy()
    sub[:, 6:] -= rows[:, :-6]
    filtered = np.concatenate([np.ones((h, 1), np.uint8), sub], axis=1)
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    out += [_png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 6)), _png_chunk(b"IEND", b"")]
    return b"".join(out)


def _tiff16(pixels: np.ndarray, icc: bytes | None) -> bytes:
    """A baseline little-endian TIFF: one uncompressed strip of 3 x 16-bit RGB samples, 72 dpi."""
    h, w, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    if len(data) > 2**32 - 2**20:
        raise UserError(f"output image {w}x{h} is too large for a TIFF file (4 GiB at most)")
    # Layout: header, pixels, then the values too long for their IFD entries, then the IFD; every
    # offset even, as TIFF asks.
    extra, entries = bytearray(), []
    base = 8 + len(data) + len(data) % 2

    def stored(value: bytes) -> int:
        offset = base + len(extra)
        extra.extend(value + b"\x00" * (len(value) % 2))
        return offset

    short, long_, rational, undefined = 3, 4, 5, 7
    entries += [(256, long_, 1, w), (257, long_, 1, h),
                (258, short, 3, stored(struct.pack("<3H", 16, 16, 16))),
                (259, short, 1, 1), (262, short, 1, 2), (273, long_, 1, 8), (277, short, 1, 3),
                (278, long_, 1, h), (279, long_, 1, len(data)),
                (282, rational, 1, stored(struct.pack("<2I", 72, 1))),
                (283, rational, 1, stored(struct.pack("<2I", 72, 1))),
                (284, short, 1, 1), (296, short, 1, 2)]
    if icc:
        entries.append((34675, undefined, len(icc), stored(icc)))
    ifd_offset = base + len(extra)
    ifd = bytearray(struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        packed = struct.pack("<H", value) + b"\x00\x00" if kind == short and count == 1 else \
            struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)  # no next IFD
    header = b"II" + struct.pack("<HI", 42, ifd_offset)
    return header + data + b"\x00" * (len(data) % 2) + bytes(extra) + bytes(ifd)
