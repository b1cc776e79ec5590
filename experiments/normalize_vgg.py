"""Computes (or checks) the normalised VGG-19's scale factors: nstjax/data/vgg19_normalization.npz.

    python experiments/normalize_vgg.py            # fetch the image set, compute, check, write
    python experiments/normalize_vgg.py --check    # check the shipped factors on the image set
        [--wheel PATH] [--size 256] [--out FILE]

The image set: the colour photographs of everyday scenes that scikit-image bundles in its wheel's
``skimage/data`` (:data:`PHOTOS`; not the grayscale ones, the textures, the microscopy, retina and
telescope images, nor motorcycle_right.png, the other half of a stereo pair). The script fetches
the wheel with ``pip download --no-deps scikit-image==0.26.0`` (or reads ``--wheel``) and reads the
PNG/JPEG files out of it with zipfile: scikit-image is never installed, nor a dependency.

Each photo is read as nstjax reads any image (nstjax.images: upright, RGB) and resized (Lanczos) to
a longer side of ``--size`` (256: the scale of the network's ImageNet training crops, 224). The mean
activation of every conv filter after its ReLU is taken over every position of every photo, with
max pooling (the network as trained), from one pass of the plain network (nstjax/network.py says
why one pass gives the layer-by-layer numbers); a filter never active keeps scale 1. The check
runs the normalised network over the same photos and prints, per layer, the largest distance of a
filter's mean from 1 (must be below 1e-3), and, for information, the same with average pooling
(the paper's choice for synthesis; its pooled averages differ from the max-pooled ones, so those
means are not 1).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nstjax import images, network  # noqa: E402 - after sys.path
from nstjax.weights import load_vgg19_with_info  # noqa: E402 - after sys.path

SKIMAGE = "scikit-image==0.26.0"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg")
TOLERANCE = 1e-3


def fetch_wheel(directory: Path) -> Path:
    """scikit-image's wheel for this Python, downloaded with pip (no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(directory), SKIMAGE]
    subprocess.run(cmd, check=True)
    wheels = sorted(directory.glob("scikit_image-*.whl"))
    if not wheels:
        raise SystemExit(f"normalize_vgg: pip did not fetch a {SKIMAGE} wheel into {directory}")
    return wheels[0]


def read_photos(wheel: Path, size: int, tmp: Path) -> tuple[list[np.ndarray], list[dict]]:
    """The photos of :data:`PHOTOS`, resized, and their record (name, sha256, sizes)."""
    arrays, record = [], []
    with zipfile.ZipFile(wheel) as z:
        for name in PHOTOS:
            data = z.read(f"skimage/data/{name}")
            path = tmp / name
            path.write_bytes(data)
            pil = images.load_pil(path)
            arr = images.load_image(path, size)
            arrays.append(arr)
            record.append({"name": f"skimage/data/{name}",
                           "sha256": hashlib.sha256(data).hexdigest(),
                           "size": [pil.width, pil.height], "used": [arr.shape[1], arr.shape[0]]})
    return arrays, record


def report(params: dict, photos: list[np.ndarray], pooling: str) -> float:
    """Prints each layer's largest |mean - 1| over its active filters; returns the largest."""
    means = network.channel_means(params, photos, pooling)
    worst = 0.0
    for c in network.CONVS:
        m = means[c]
        active = m > 0
        err = float(np.max(np.abs(m[active] - 1.0))) if active.any() else 0.0
        worst = max(worst, err)
        print(f"  {c:8s} {m.size:4d} filters, {int((~active).sum()):3d} never active, "
              f"mean of means {m[active].mean():.6f}, largest |mean - 1| {err:.2e}")
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="check the shipped factors, write nothing")
    ap.add_argument("--wheel", default="", help=f"a {SKIMAGE} wheel (default: fetched with pip)")
    ap.add_argument("--size", type=int, default=256, help="longer side of the photos (default 256)")
    ap.add_argument("--out", default=str(network.NORMALIZATION_FILE))
    a = ap.parse_args(argv)
    params, info = load_vgg19_with_info()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(a.wheel) if a.wheel else fetch_wheel(Path(tmp))
        wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        photos, record = read_photos(wheel, a.size, Path(tmp))
    print(f"image set: {len(photos)} photographs from {wheel.name} (sha256 {wheel_sha[:16]}...), "
          f"longer side {a.size} px: {', '.join(r['name'].split('/')[-1] for r in record)}")
    if a.check:
        means, meta = network.load_normalization(a.out)
        same = [r["sha256"] for r in meta["images"]] == [r["sha256"] for r in record]
        if not same or meta["long_side"] != a.size:
            print("warning: these are not the photos (or the size) the factors were computed from")
    else:
        means = network.channel_means(params, photos, "max")
        dead = {c: [int(i) for i in np.flatnonzero(means[c] <= 0)] for c in network.CONVS}
        meta = {
            "what": "mean activation (after the ReLU) of each conv filter of the plain VGG-19 over "
                    "every position of every image; the normalised network divides by it",
            "images": record, "wheel": wheel.name, "wheel_sha256": wheel_sha, "long_side": a.size,
            "resample": "lanczos", "pooling": "max",
            "weights": info.source, "weights_params_sha256": info.params_sha256,
            "never_active": {c: d for c, d in dead.items() if d},
            "never_active_rule": "scale 1 (kept as they are)",
            "made_by": "experiments/normalize_vgg.py",
        }
        small = min(float(means[c][means[c] > 0].min()) for c in network.CONVS)
        print(f"smallest mean of an active filter: {small:.3g}; never active: "
              f"{sum(len(d) for d in dead.values())} filters")
    normalized = network.normalize(params, means)
    print("normalised network, max pooling (the factors' own setting):")
    worst = report(normalized, photos, "max")
    print("normalised network, average pooling (for information):")
    report(normalized, photos, "avg")
    ok = worst < TOLERANCE
    print(f"{'OK' if ok else 'FAILED'}: every active filter's mean activation is 1 within "
          f"{worst:.2e} (tolerance {TOLERANCE:g})")
    if ok and not a.check:
        network.save_normalization(a.out, means, meta)
        print(f"wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
