"""Style statistics other than the Gram matrix, for ablations against it.

Each statistic is computed from one layer's activations F (M positions x C channels) with
position weights w (M,) that sum to 1: uniform for a whole image, a normalised mask for a region
(the guided statistics of Gatys et al. 2017; see :mod:`nstjax.masks`).

- ``"gram"``: the per-position Gram F^T diag(w) F (the Gatys et al. 2015 statistic, in
  :mod:`nstjax.losses`).
- ``"mean_std"``: each channel's mean and standard deviation; the loss is
  (1/C) (||mu - mu_s||^2 + ||sigma - sigma_s||^2), the style loss of Huang & Belongie (2017, AdaIN)
  and Li et al. (2017, "Demystifying Neural Style Transfer", BN statistics).
- ``"w2"``: the mean and covariance, i.e. the Gaussian fitted to the activations; the loss is the
  squared Wasserstein-2 distance between the two Gaussians, divided by C:
  ||mu - mu_s||^2 + tr(S + S_s - 2 (S_s^{1/2} S S_s^{1/2})^{1/2}).

The cross term tr((S_s^{1/2} S S_s^{1/2})^{1/2}) is the nuclear norm of B = diag(sqrt(w)) Fc
S_s^{1/2} (Fc the centred activations), computed from the eigenvalues of the smaller of B^T B and B
B^T (so a deep layer with fewer positions than channels costs an M x M eigendecomposition). Its
gradient comes from a custom rule, B (B^T B)^{-1/2} with the eigenvalues floored, which is bounded
(the polar factor of B) where the textbook derivative through eigenvectors divides by eigenvalue
gaps and breaks on the rank-deficient covariances of small images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST
STD_EPS = 1e-5  # added to variances, so the std's gradient is finite for dead channels


def _wsum(w: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.einsum("m,mc->c", w, x, precision=HIGHEST)


def uniform_weights(m: int) -> jax.Array:
    return jnp.full((m,), 1.0 / m, jnp.float32)


def weighted_mean_std(f: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and standard deviation (C,) of ``f`` (M, C) under weights ``w`` (M,)."""
    mu = _wsum(w, f)
    d = f - mu
    var = _wsum(w, d * d)
    return mu, jnp.sqrt(var + STD_EPS)


def weighted_mean_cov(f: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean (C,) and covariance (C, C) of ``f`` (M, C) under weights ``w`` (M,) summing to 1."""
    mu = _wsum(w, f)
    d = f - mu
    cov = jnp.einsum("mc,m,md->cd", d, w, d, precision=HIGHEST)
    return mu, 0.5 * (cov + cov.T)


def sqrtm_psd(a: jax.Array) -> jax.Array:
    """Symmetric square root of a symmetric positive semi-definite matrix, via eigh (negative
    round-off eigenvalues are clipped to zero)."""
    a = 0.5 * (a + a.T)
    lam, v = jnp.linalg.eigh(a)
    return jnp.matmul(v * jnp.sqrt(jnp.maximum(lam, 0.0)), v.T, precision=HIGHEST)


@jax.custom_vjp
def trace_sqrtm_psd(p: jax.Array) -> jax.Array:
    """tr(P^{1/2}) of a symmetric PSD matrix P: the sum of the square roots of its eigenvalues.

    Gradient: 1/2 P^{-1/2}, with eigenvalues floored at 1e-8 of the largest (see module doc)."""
    lam = jnp.linalg.eigvalsh(0.5 * (p + p.T))
    return jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0)))


def _trace_sqrtm_fwd(p):
    lam, v = jnp.linalg.eigh(0.5 * (p + p.T))
    floor = 1e-8 * jnp.maximum(jnp.max(lam), 1e-30)
    grad = jnp.matmul(v * (0.5 / jnp.sqrt(jnp.maximum(lam, floor))), v.T, precision=HIGHEST)
    return jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0))), grad


def _trace_sqrtm_bwd(grad, ct):
    return (ct * grad,)


trace_sqrtm_psd.defvjp(_trace_sqrtm_fwd, _trace_sqrtm_bwd)


def nuclear_norm(b: jax.Array) -> jax.Array:
    """Sum of the singular values of ``b`` (M, C), from the smaller of its two Gram matrices."""
    m, c = b.shape
    if m < c:
        return trace_sqrtm_psd(jnp.einsum("mc,nc->mn", b, b, precision=HIGHEST))
    return trace_sqrtm_psd(jnp.einsum("mc,md->cd", b, b, precision=HIGHEST))


# ---- targets and losses -------------------------------------------------------------------------


def mean_std_target(f: jax.Array, w: jax.Array) -> dict:
    mu, sd = weighted_mean_std(f, w)
    return {"mean": mu, "std": sd}


def mean_std_loss(f: jax.Array, w: jax.Array, target: dict) -> jax.Array:
    """(1/C) (||mu - mu_s||^2 + ||sigma - sigma_s||^2) for activations ``f`` (M, C)."""
    mu, sd = weighted_mean_std(f, w)
    dm, ds = mu - target["mean"], sd - target["std"]
    return (jnp.sum(dm * dm) + jnp.sum(ds * ds)) / f.shape[-1]


def w2_target(f: jax.Array, w: jax.Array) -> dict:
    mu, cov = weighted_mean_cov(f, w)
    return w2_target_from_moments(mu, cov)


def w2_target_from_moments(mu: jax.Array, cov: jax.Array) -> dict:
    """The stored form of a Gaussian style target: mean, S^{1/2}, tr S."""
    return {"mean": mu, "cov_sqrt": sqrtm_psd(cov), "cov_trace": jnp.trace(cov)}


def w2_loss(f: jax.Array, w: jax.Array, target: dict) -> jax.Array:
    """Squared Wasserstein-2 distance / C between the Gaussian fitted to ``f`` (M, C) under
    weights ``w`` and the target Gaussian (mean, S_s^{1/2}, tr S_s)."""
    mu = _wsum(w, f)
    d = f - mu
    cov_trace = jnp.sum(_wsum(w, d * d))
    # B^T B = S_s^{1/2} S S_s^{1/2}
    b = jnp.matmul(jnp.sqrt(w)[:, None] * d, target["cov_sqrt"], precision=HIGHEST)
    cross = nuclear_norm(b)
    dm = mu - target["mean"]
    w2 = jnp.sum(dm * dm) + jnp.maximum(cov_trace + target["cov_trace"] - 2.0 * cross, 0.0)
    return w2 / f.shape[-1]


def gaussian_w2(mu1, cov1, mu2, cov2) -> jax.Array:
    """Squared Wasserstein-2 distance between N(mu1, cov1) and N(mu2, cov2) (a reference)."""
    r2 = sqrtm_psd(cov2)
    cross = trace_sqrtm_psd(jnp.linalg.multi_dot([r2, cov1, r2], precision=HIGHEST))
    dm = mu1 - mu2
    return jnp.sum(dm * dm) + jnp.trace(cov1) + jnp.trace(cov2) - 2.0 * cross
