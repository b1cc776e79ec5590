"""Which VGG-19 a run uses (``config.network``): the ImageNet weights as trained (``"vgg19"``), or
the normalised network of Gatys, Ecker & Bethge (``"vgg19_normalized"``).

The paper rescales the network so that each conv filter's mean activation over a set of natural
images and all positions is 1; with rectifying non-linearities this changes no layer's pattern of
active units, only the relative scale of the layers, and with it how the style layers' Gram losses
weigh against each other and against the content loss (the paper's alpha/beta assume it).

The rescaling: with a_l the mean activation of conv layer l's filters (after its ReLU, over every
position of every image, as the plain network computes them) and a_0 = 1 for the pixels,

    W'_l[..., i, o] = W_l[..., i, o] * a_{l-1}[i] / a_l[o],    b'_l[o] = b_l[o] / a_l[o].

Every activation of the normalised network, before and after each ReLU, is then the plain one
divided by a_l channel by channel (ReLU and pooling, max or average, commute with positive
per-channel scales), so the signs are the plain network's and each filter's mean over the image
set is exactly 1. The same identity means all a_l come from one forward pass of the plain network:
the numbers a layer-by-layer procedure (normalise layer l-1, then measure layer l) would measure.
A filter never active on the image set (a_l = 0) keeps scale 1 (any scale leaves a zero mean zero).

The means are measured with max pooling, the network as trained. Average pooling (the paper's
choice for synthesis) passes on smaller activations, so under it the means fall to about 0.8
(block 2) to 0.2 (block 5). Factors measured with average pooling instead were tried and are not
safe: a conv2_1 filter that max pooling never activates on the image set is active under average
pooling at a mean of 7.4e-6, so its factor would be 1.4e5, and on the shared test photographs it
then averages about 1e6, which would swamp relu2_1's Gram matrix. Max pooling has no such filter
(its smallest active mean is 0.003, in conv5_4, a layer the paper does not use).

The a_l ship in ``nstjax/data/vgg19_normalization.npz`` (one float64 vector per conv layer, and a
``__meta__`` JSON record of the image set: names, sha256s, size, pooling), made by
``experiments/normalize_vgg.py`` from the photographs scikit-image bundles (docs/extensions.md
says which, and how this differs from the published network, computed on ImageNet).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nstjax import vgg
from nstjax.errors import ConfigError, WeightsError
from nstjax.weights import (
    CONV_LAYERS,
    WeightsInfo,
    load_vgg19_with_info,
    params_sha256,
    sha256_file,
)

NETWORKS = ("vgg19", "vgg19_normalized")
NORMALIZATION_FILE = Path(__file__).resolve().parent / "data" / "vgg19_normalization.npz"
CONVS = tuple(ours for ours, _, _, _ in CONV_LAYERS)


def check_network(name: str) -> str:
    if name not in NETWORKS:
        raise ConfigError(f"network must be one of {', '.join(NETWORKS)}, not {name!r}")
    return name


def channel_means(params: dict, images: Iterable[np.ndarray], pooling: str = "max") -> dict:
    """Each conv filter's mean activation after its ReLU, over every position of every image:
    ``{conv layer: (C,) float64}``. ``images`` are (H, W, 3) RGB in [0, 255], of any sizes (an
    image weighs by its number of positions)."""
    relus = tuple(c.replace("conv", "relu") for c in CONVS)
    sums = {c: 0.0 for c in CONVS}
    counts = {c: 0 for c in CONVS}
    for image in images:
        feats = vgg.features(params, image, relus, pooling)
        for c, r in zip(CONVS, relus):
            f = np.asarray(feats[r][0], np.float64)
            sums[c] = sums[c] + f.reshape(-1, f.shape[-1]).sum(axis=0)
            counts[c] += f.shape[0] * f.shape[1]
    if not counts[CONVS[0]]:
        raise ValueError("channel_means needs at least one image")
    return {c: sums[c] / counts[c] for c in CONVS}


def divisors(means: dict) -> dict:
    """What each filter is divided by: its mean, or 1 for a filter never active (mean 0)."""
    out = {}
    for c in CONVS:
        m = np.asarray(means[c], np.float64)
        out[c] = np.where(m > 0, m, 1.0)
    return out


def normalize(params: dict, means: dict) -> dict:
    """New params whose every activation is the plain network's divided by ``means`` (see the
    module doc); pure: ``params`` are not changed."""
    a = divisors(means)
    out, previous = {}, np.ones(3)
    for c in CONVS:
        k = np.asarray(params["params"][c]["kernel"], np.float64)  # HWIO
        b = np.asarray(params["params"][c]["bias"], np.float64)
        if a[c].shape != b.shape:
            raise WeightsError(f"normalisation factors for {c} have shape {a[c].shape}, "
                               f"expected {b.shape}")
        out[c] = {"kernel": (k * previous[:, None] / a[c]).astype(np.float32),
                  "bias": (b / a[c]).astype(np.float32)}
        previous = a[c]
    return {"params": out}


def load_normalization(path: str | os.PathLike = NORMALIZATION_FILE) -> tuple[dict, dict]:
    """The shipped mean activations ``{conv layer: (C,)}`` and their ``__meta__`` record."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            means = {c: np.asarray(z[c], np.float64) for c in CONVS}
    except Exception as e:  # noqa: BLE001 - numpy/zipfile raise many kinds on a damaged archive
        raise WeightsError(f"{path}: not nstjax's VGG-19 normalisation factors ({e})") from None
    for (c, _, _, cout) in CONV_LAYERS:
        if means[c].shape != (cout,) or not np.all(np.isfinite(means[c])) or np.any(means[c] < 0):
            raise WeightsError(f"{path}: the factors of {c} are not {cout} finite non-negative "
                               "numbers")
    return means, meta


def save_normalization(path: str | os.PathLike, means: dict, meta: dict) -> None:
    """Writes the factors and their record atomically (``experiments/normalize_vgg.py``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            record = json.dumps(meta, sort_keys=True).encode()
            np.savez(f, __meta__=np.frombuffer(record, np.uint8),
                     **{c: np.asarray(means[c], np.float64) for c in CONVS})
        os.chmod(tmp, 0o644)  # package data: readable by all, as a file written by hand would be
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_NORMALIZED: dict = {}  # (plain params' digest, factors' sha256) -> (params, info): the last one


def load_network(name: str, weights_path: str | None = None, params: dict | None = None,
                 info: WeightsInfo | None = None) -> tuple[dict, WeightsInfo | None]:
    """The params of network ``name`` and their record: ``params`` given (with their ``info``;
    without one they are taken to be the plain VGG-19) are converted when they are not that
    network already; none given, they are loaded from ``weights_path`` (or ``$NSTJAX_WEIGHTS``,
    or the cache). The normalised params are kept for the next call with the same weights."""
    check_network(name)
    if params is None:
        params, info = load_vgg19_with_info(weights_path or None)
    if (info.network == name) if info is not None else (name == "vgg19"):
        return params, info
    if info is None:
        info = WeightsInfo("params given by the caller", "", "", params_sha256(params))
    if info.network != "vgg19":
        raise WeightsError(f"cannot make the {name} network from {info.network} params; pass the "
                           "plain VGG-19 weights")
    digest = sha256_file(NORMALIZATION_FILE) if NORMALIZATION_FILE.is_file() else ""
    if not digest:
        raise WeightsError(f"{NORMALIZATION_FILE}: the normalisation factors are missing (make "
                           "them with experiments/normalize_vgg.py)")
    key = (info.params_sha256 or params_sha256(params), digest)
    if key not in _NORMALIZED:
        means, meta = load_normalization()
        new = normalize(params, means)
        made_for = meta.get("weights_params_sha256")
        note = "" if made_for == key[0] else "; factors computed for other weights"
        new_info = dataclasses.replace(
            info, source=f"{info.source}, normalised to mean activation 1 per filter{note}",
            params_sha256=params_sha256(new), network=name, normalization_sha256=digest)
        _NORMALIZED.clear()  # hold one normalised copy (80 MB), not one per weights ever seen
        _NORMALIZED[key] = (new, new_info)
    return _NORMALIZED[key]
