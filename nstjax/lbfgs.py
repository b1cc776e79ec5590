"""L-BFGS for image optimisation, one loss+gradient evaluation per step, as an optax transform.

This is the method of torch's ``LBFGS(max_iter=1)`` that pastiche and jcjohnson/neural-style use:
the two-loop recursion over the last ``memory_size`` curvature pairs, the initial Hessian scaled by
``s.y / y.y`` of the newest pair, a first step of length ``lr * min(1, 1/|g|_1)``, and the unit step
after it, with no line search. Unlike ``optax.scale_by_lbfgs`` it *skips* pairs whose curvature
``s.y`` is not positive: after the image is projected back into [0, 255], or on a non-convex
stretch, such a pair would turn the preconditioner indefinite and send the next step uphill (we
measured a 20-fold loss jump within ten steps before this).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class LBFGSState(NamedTuple):
    count: jax.Array  # steps taken
    prev_params: jax.Array
    prev_grad: jax.Array
    s: jax.Array  # (m + 1, ...) parameter differences, a ring buffer of m and a scratch slot
    y: jax.Array  # (m + 1, ...) gradient differences
    rho: jax.Array  # (m,) 1 / (s.y)
    head: jax.Array  # next slot to write
    size: jax.Array  # valid pairs
    gamma: jax.Array  # initial inverse-Hessian scale


def pairwise_sum(x: jax.Array) -> jax.Array:
    """The sum of all elements of ``x`` by pairwise halving with elementwise adds.

    The summation order is part of the program, so the result is the same bit for bit whether the
    function is vmapped or not (a sweep optimises a batch of images; a single run one). XLA's
    reduce leaves the order to the backend, and XLA:CPU sums a batched reduction in another order
    than an unbatched one; L-BFGS amplifies that last-bit difference (its first step is tiny, so
    the curvature it measures from it is mostly rounding) into percent-level differences in the
    image after 20 steps. Pairwise summation is also more accurate than a running sum.
    """
    x = x.astype(jnp.float32).reshape(-1)
    n = x.shape[0]
    if n == 0:
        return jnp.float32(0.0)
    x = jnp.pad(x, (0, (1 << (n - 1).bit_length()) - n))
    level = 0
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = x[:half] + x[half:]
        level += 1
        if level % 4 == 0 and x.shape[0] > 1:
            # Materialise every 4 levels: an accelerator then runs a few wide kernels (each output
            # adding 16 inputs) rather than fusing the whole tree into one single-thread kernel.
            x = jax.lax.optimization_barrier(x)
    return x[0]


def _dot(a, b):
    return pairwise_sum(a.astype(jnp.float32) * b.astype(jnp.float32))


def scale_by_lbfgs(memory_size: int = 10,
                   curvature_eps: float = 1e-10) -> optax.GradientTransformation:
    """The L-BFGS direction ``-H g`` for a single array parameter (the image)."""
    m = memory_size

    def init(params):
        # Two distinct buffers (not one shared zero array), so the state can be donated; m slots
        # of pairs and a scratch slot for rejected ones.
        def zeros():
            return jnp.zeros((m + 1,) + params.shape, params.dtype)

        return LBFGSState(jnp.int32(0), jnp.zeros_like(params), jnp.zeros_like(params), zeros(),
                          zeros(), jnp.zeros((m,), jnp.float32), jnp.int32(0), jnp.int32(0),
                          jnp.float32(1.0))

    def update(grad, state, params):
        s_new, y_new = params - state.prev_params, grad - state.prev_grad
        ys = _dot(y_new, s_new)
        # A pair from a non-finite gradient is never stored (ys is NaN or inf then): the history
        # stays as it was, which select_state relies on.
        accept = (state.count > 0) & (ys > curvature_eps) & jnp.isfinite(ys)
        # Write one slot of the ring buffer (an in-place update when the state is donated): the
        # newest slot when the pair is accepted, else the scratch slot m, which is never read. A
        # select over the whole (m, ...) buffer would copy it (2 x 236 MB per step at m=100,
        # 512 px), and so would writing back the slot's old value: XLA then copies both
        # histories on entry to a chunk of several steps (0.19 GB at 1024x768, m=10; 1.9 GB at
        # m=100) so that the read precedes the write.
        slot = jnp.where(accept, state.head, m)
        s_mem = state.s.at[slot].set(s_new)
        y_mem = state.y.at[slot].set(y_new)
        rho = jnp.where(accept, state.rho.at[state.head].set(1.0 / jnp.where(accept, ys, 1.0)),
                        state.rho)
        head = jnp.where(accept, (state.head + 1) % m, state.head)
        size = jnp.where(accept, jnp.minimum(state.size + 1, m), state.size)
        gamma = jnp.where(accept, ys / jnp.maximum(_dot(y_new, y_new), 1e-30), state.gamma)

        # The two loops are lax.fori_loops: cheap vector work, and it keeps compile time flat in m.
        # They run over the ``size`` stored pairs only (a traced trip count), not all m slots: each
        # pass reads whole images, so empty slots would cost as much as full ones.
        def newest_first(j, carry):
            q, alphas = carry
            i = (head - 1 - j) % m
            a = rho[i] * _dot(s_mem[i], q)
            return q - a * y_mem[i], alphas.at[j].set(a)

        q, alphas = jax.lax.fori_loop(0, size, newest_first,
                                      (grad.astype(jnp.float32), jnp.zeros((m,), jnp.float32)))

        def oldest_first(k, r):
            j = size - 1 - k
            i = (head - 1 - j) % m
            b = rho[i] * _dot(y_mem[i], r)
            return r + (alphas[j] - b) * s_mem[i]

        r = jax.lax.fori_loop(0, size, oldest_first, gamma * q)
        first = jnp.minimum(1.0, 1.0 / jnp.maximum(pairwise_sum(jnp.abs(grad)), 1e-30)) * grad
        direction = jnp.where(state.count == 0, first, r).astype(grad.dtype)
        new_state = LBFGSState(state.count + 1, params, grad, s_mem, y_mem, rho, head, size, gamma)
        return direction, new_state

    return optax.GradientTransformation(init, update)


def select_state(ok, new: LBFGSState, old: LBFGSState) -> LBFGSState:
    """``new`` where ``ok``, else ``old``, without selecting between the histories ``s`` and ``y``.

    For ``new`` the result of an update from ``old`` with a non-finite gradient, the histories are
    already ``old``'s (such pairs are never stored), and a select of two (m, ...) buffers would
    copy them: the step's only traffic over the whole history besides the two loops."""
    keep = {f: jnp.where(ok, getattr(new, f), getattr(old, f))
            for f in LBFGSState._fields if f not in ("s", "y")}
    return new._replace(**keep)


def lbfgs(learning_rate: float = 1.0, memory_size: int = 10) -> optax.GradientTransformation:
    """Descent steps ``-learning_rate * H g`` (no line search)."""
    return optax.chain(scale_by_lbfgs(memory_size), optax.scale(-learning_rate))
