"""Is a single run as fast as a batch of one? The measurement behind routing single runs through
the sweep's batched program (nstjax/programs.py, docs/performance.md).

    python experiments/batch_of_one.py [--size 512] [--reps 5]

Side by side in one process, alternating: the unbatched chunk (``optimize.steps`` jitted alone,
state donated) and the same chunk vmapped over a batch of one, jitted with shardings over a
one-device mesh, state donated (what nstjax runs). Both at 512x384, the default objective,
L-BFGS, chunks of 10 steps. Prints seconds per step (median over reps) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nstjax import images, optimize
from nstjax.config import base_config, validate
from nstjax.problem import point_weights
from nstjax.targets import compute_targets
from nstjax.weights import load_vgg19


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cfg = base_config()
    cfg.size = args.size
    spec = validate(cfg)
    obj, opt = spec.objective, spec.optimizer
    params = load_vgg19()
    content = images.load_image("builtin:hopper", args.size)
    style = images.load_image("builtin:swirls", args.size)
    targets = compute_targets(params, obj, content, [style])
    weights = point_weights(obj, spec)
    x0 = jnp.asarray(content, jnp.float32)

    one = jax.jit(optimize.steps, static_argnames=("obj", "spec", "n_steps"), donate_argnums=(4,))
    mesh = Mesh(np.array(jax.devices()[:1]), ("sweep",))
    split, same = NamedSharding(mesh, PartitionSpec("sweep")), NamedSharding(mesh, PartitionSpec())

    def batched(p, t, w, x, s):
        return jax.vmap(lambda t1, w1, x1, s1: optimize.steps(p, t1, w1, x1, s1, obj=obj, spec=opt,
                                                              n_steps=args.steps))(t, w, x, s)

    many = jax.jit(batched, in_shardings=(same, split, split, split, split), out_shardings=split,
                   donate_argnums=(4,))
    def stack(tree):
        return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)

    c_one = one.lower(params, targets, weights, x0, opt.build().init(x0), obj=obj, spec=opt,
                      n_steps=args.steps).compile()
    tb, wb, xb = stack(targets), stack(weights), stack(x0)
    c_many = many.lower(params, tb, wb, xb, jax.vmap(opt.build().init)(xb)).compile()
    times = {"unbatched": [], "batch_of_one": []}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = c_one(params, targets, weights, x0, opt.build().init(x0))
        jax.block_until_ready(out)
        times["unbatched"].append((time.perf_counter() - t0) / args.steps)
        t0 = time.perf_counter()
        out = c_many(params, tb, wb, xb, jax.vmap(opt.build().init)(xb))
        jax.block_until_ready(out)
        times["batch_of_one"].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"size": args.size, "steps_per_chunk": args.steps, "reps": args.reps,
                      "s_per_step": med, "all": times,
                      "ratio_batch_of_one_over_unbatched": med["batch_of_one"] / med["unbatched"]},
                     indent=1))


if __name__ == "__main__":
    main()
