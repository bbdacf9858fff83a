"""Gaussian posterior q = N(m, S⁻¹) over the flat unconstrained latent vector θ."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular


class GaussianPosterior(NamedTuple):
    """q(θ) = N(mean, precision⁻¹), with ``chol`` the lower Cholesky factor L of the precision S = L Lᵀ.

    Draws are θ = m + L⁻ᵀ z with z ~ N(0, I); log q(θ) = −½‖Lᵀ(θ − m)‖² + Σ log L_jj − P/2 log 2π.
    """

    mean: jax.Array
    precision: jax.Array
    chol: jax.Array

    @property
    def dim(self) -> int:
        return int(self.mean.shape[-1])

    def covariance(self) -> jax.Array:
        """S⁻¹, formed explicitly (P×P)."""
        eye = jnp.eye(self.dim, dtype=self.mean.dtype)
        linv = solve_triangular(self.chol, eye, lower=True)
        return linv.T @ linv

    def whiten(self, v):
        """L⁻¹ v for ``v`` of shape ``(P,)`` or ``(P, k)``."""
        return solve_triangular(self.chol, v, lower=True)

    def unwhiten(self, u):
        """L⁻ᵀ u: maps whitened coordinates back to θ-space offsets."""
        return solve_triangular(self.chol.T, u, lower=False)

    def solve(self, v):
        """S⁻¹ v."""
        return self.unwhiten(self.whiten(v))

    def sample(self, rng_key, num_samples: int):
        """``num_samples`` draws, shape ``(num_samples, P)``."""
        z = jax.random.normal(rng_key, (num_samples, self.dim), self.mean.dtype)
        return self.mean + self.unwhiten(z.T).T

    def log_prob(self, theta):
        """log q(θ) for ``theta`` of shape ``(..., P)``."""
        z = (theta - self.mean) @ self.chol
        logdet = jnp.sum(jnp.log(jnp.diagonal(self.chol)))
        return -0.5 * jnp.sum(z**2, -1) + logdet - 0.5 * self.dim * jnp.log(2 * jnp.pi)


def from_precision(mean, precision) -> GaussianPosterior:
    """Build the posterior; the Cholesky factor is NaN if ``precision`` is not positive definite."""
    precision = 0.5 * (precision + precision.T)
    return GaussianPosterior(mean, precision, jnp.linalg.cholesky(precision))
