"""What a small run's compiled chunk costs to build, by what it is made of: the measurement behind
the test suite's choices (small chunks and shallow layers for tests of loop mechanics, the real
weights everywhere; docs/performance.md, "Start-up").

    python experiments/compile_costs.py [--size 64] [--chunk 5]

One process, one program after another: the batched chunk of ``--chunk`` L-BFGS steps as runs
compile it (``nstjax.optimize.batched_steps`` over a batch of one), for

- the default objective through relu5_1 with the real VGG-19 weights;
- the same with a VGG-19 of the same 16 layers but 8 to 16 channels and random weights (the small
  random-weight network issue 13 allows for tests of loop mechanics);
- shallow layers (relu1_1, relu2_1; content relu2_2) with the real weights;
- the default objective with Adam instead of L-BFGS;
- the default objective at a chunk of 1.

Prints, per variant, the seconds spent tracing and lowering, compiling, and running the first
chunk. Tracing and compiling scale with the number of operations (layers, unrolled steps, the
optimiser's own arithmetic), not with the channels, so a narrow network saves only the run.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import images, optimize, vgg
from nstjax.config import base_config, validate
from nstjax.problem import point_weights
from nstjax.targets import compute_targets
from nstjax.weights import CONV_LAYERS, load_vgg19

NARROW = (8, 8, 16, 16, 16)  # channels per block of the narrow network


def narrow_params(seed: int = 0) -> dict:
    """Random He-initialised params for VGG-19's layers with :data:`NARROW` channels."""
    rng, params, cin = np.random.default_rng(seed), {}, 3
    for ours, _, _, _ in CONV_LAYERS:
        cout = NARROW[int(ours[4]) - 1]
        params[ours] = {"kernel": rng.normal(0, (2 / (9 * cin)) ** 0.5, (3, 3, cin, cout))
                        .astype(np.float32), "bias": np.zeros(cout, np.float32)}
        cin = cout
    return {"params": params}


def measure(params, size: int, chunk: int, **fields) -> dict:
    cfg = base_config()
    cfg.size = size
    for k, v in fields.items():
        if k == "optimizer":
            cfg.optimizer.name = v
        else:
            setattr(cfg, k, v)
    spec = validate(cfg)
    obj, opt = spec.objective, spec.optimizer
    content = images.load_image("builtin:hopper", size)
    style = images.load_image("builtin:swirls", size)

    def one(tree):
        return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)

    targets = one(compute_targets(params, obj, content, [style]))
    weights, x = one(point_weights(obj, spec)), one(jnp.asarray(content, jnp.float32))
    state = optimize.batched_init(x, spec=opt)
    fn = jax.jit(lambda p, t, w, x, s: optimize.batched_steps(p, t, w, x, s, obj=obj, spec=opt,
                                                              n_steps=chunk))
    t0 = time.perf_counter()
    lowered = fn.lower(params, targets, weights, x, state)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    jax.block_until_ready(compiled(params, targets, weights, x, state))
    t3 = time.perf_counter()
    return {"trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "first_run_s": round(t3 - t2, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=5)
    args = ap.parse_args()
    real = load_vgg19()
    shallow = {"style_layers": ("relu1_1", "relu2_1"), "content_layers": ("relu2_2",)}
    out = {"real": measure(real, args.size, args.chunk)}
    wide, vgg.CHANNELS = vgg.CHANNELS, NARROW  # VGG19 builds its convs from this table
    try:
        out["narrow_random"] = measure(narrow_params(), args.size, args.chunk)
    finally:
        vgg.CHANNELS = wide
    out["shallow_layers"] = measure(real, args.size, args.chunk, **shallow)
    out["adam"] = measure(real, args.size, args.chunk, optimizer="adam")
    out["chunk_1"] = measure(real, args.size, 1)
    print(json.dumps({"size": args.size, "chunk": args.chunk, **out}, indent=1))


if __name__ == "__main__":
    main()
