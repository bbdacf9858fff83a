"""Rules for E_{η ~ N(μ, V)}[p(y | η)] in the K-dimensional predictor space.

A rule is a set of standard-normal nodes ξ_q ∈ R^K with log-weights; the expectation is
log Σ_q w_q p(y | μ + V^{1/2} ξ_q).  Gauss–Hermite tensor rules for small K (exact for polynomials of
high degree, and to round-off for the Gaussian likelihoods of linear models), Monte Carlo with common
random numbers for larger K.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: Gauss–Hermite points per dimension for K = 1, 2, 3; larger K uses Monte Carlo.
GAUSS_HERMITE_POINTS = {1: 48, 2: 20, 3: 10}


class Rule(NamedTuple):
    """Nodes ``(Q, K)`` of N(0, I) and their log-weights ``(Q,)`` (summing to one)."""

    nodes: jax.Array
    log_weights: jax.Array
    kind: str


def gauss_hermite(dim: int, points: int, dtype=jnp.float64) -> Rule:
    """Tensor-product Gauss–Hermite rule for N(0, I_dim) with ``points`` nodes per dimension."""
    x, w = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-x^2/2)
    w = w / w.sum()
    nodes = np.array(list(itertools.product(x, repeat=dim)))
    weights = np.prod(np.array(list(itertools.product(w, repeat=dim))), axis=1)
    return Rule(jnp.asarray(nodes, dtype), jnp.asarray(np.log(weights), dtype), "gauss-hermite")


def monte_carlo(dim: int, num_samples: int, rng_key, dtype=jnp.float64) -> Rule:
    """``num_samples`` standard-normal draws (antithetic pairs), equal weights."""
    half = (num_samples + 1) // 2
    z = jax.random.normal(rng_key, (half, dim), dtype)
    nodes = jnp.concatenate([z, -z])[:num_samples]
    return Rule(nodes, jnp.full((num_samples,), -np.log(num_samples), dtype), "monte-carlo")


def default_rule(dim: int, rng_key, dtype=jnp.float64, num_samples: int = 2000) -> Rule:
    """Gauss–Hermite for ``dim`` ≤ 3, Monte Carlo with ``num_samples`` common draws above."""
    if dim in GAUSS_HERMITE_POINTS:
        return gauss_hermite(dim, GAUSS_HERMITE_POINTS[dim], dtype)
    return monte_carlo(dim, num_samples, rng_key, dtype)


def psd_sqrt(cov):
    """A square root C with C Cᵀ = cov for a symmetric PSD ``cov`` (singular allowed).

    Closed form for 1×1; otherwise a Cholesky factor with a jitter of 1e-13·trace (far below the
    quadrature's error), falling back to the eigendecomposition where the factorization fails.
    """
    k = cov.shape[-1]
    if k == 1:
        return jnp.sqrt(jnp.clip(cov, 0.0, None))
    sym = 0.5 * (cov + cov.T)
    jitter = 1e-13 * jnp.trace(sym) / k + jnp.finfo(cov.dtype).tiny
    chol = jnp.linalg.cholesky(sym + jitter * jnp.eye(k, dtype=cov.dtype))

    def by_eigh(_):
        vals, vecs = jnp.linalg.eigh(sym)
        return vecs * jnp.sqrt(jnp.clip(vals, 0.0, None))

    return jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda _: chol, by_eigh, None)
