"""Gaussian posterior q = N(m, S⁻¹) over the flat unconstrained latent vector θ.

Three structures of the precision S: full (:class:`GaussianPosterior`, Cholesky factor), diagonal
(:class:`DiagGaussianPosterior`) and diagonal plus low rank (:class:`LowRankGaussianPosterior`).  All give
S⁻¹v (``cov_matvec``), whitening, draws and log q; the MPE needs no more.

Draws from q (and the whitened base draws of the importance sampling) are made on the host by NumPy from the
JAX key's words (:func:`host_generator`): JAX's threefry generator costs every program that draws about half a
second of XLA compilation on CPU, more than the rest of a small program.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln

from numpyro_mpe.model.rankone import RankOneBlock, block_project, join
from numpyro_mpe.model.rankone import dense as dense_block
from numpyro_mpe.programs import jit


def block_quadratic_form(blocks: list, weights: list) -> jax.Array:
    """Σ_b J_b diag(r_b) J_bᵀ per row, (c, K, K), for column blocks J_b (c, K, n_b) and weights r_b (n_b,):
    each entry a matrix-vector product (J_b,k ∘ J_b,l) r_b, which XLA on CPU runs ~2× faster than the
    same sum as a reduction over a long last axis; a :class:`~numpyro_mpe.model.rankone.RankOneBlock` by its
    outer-product form (one matrix product, no (c, K, n_b) array)."""
    rank_one = [b.quadratic_form(r) for b, r in zip(blocks, weights) if isinstance(b, RankOneBlock)]
    pairs = [(b, r) for b, r in zip(blocks, weights) if not isinstance(b, RankOneBlock)]
    total = sum(rank_one) if rank_one else 0.0
    if not pairs:
        return total
    k = pairs[0][0].shape[1]
    entry = {}
    for a in range(k):
        for b in range(a, k):
            entry[a, b] = sum((j[:, a, :] * j[:, b, :]) @ r for j, r in pairs)
    return total + jnp.stack([jnp.stack([entry[min(a, b), max(a, b)] for b in range(k)], -1)
                              for a in range(k)], -2)


def row_gram(b) -> jax.Array:
    """B_i B_iᵀ per row, (c, K, K), for rows B_i (c, K, r)."""
    return jnp.sum(b[:, :, None, :] * b[:, None, :, :], axis=-1)


class GaussianPosterior(NamedTuple):
    """q(θ) = N(mean, precision⁻¹), with ``chol`` the lower Cholesky factor L of the precision S = L Lᵀ.

    Draws are θ = m + L⁻ᵀ z with z ~ N(0, I); log q(θ) = −½‖Lᵀ(θ − m)‖² + Σ log L_jj − P/2 log 2π.
    """

    mean: jax.Array
    precision: jax.Array
    chol: jax.Array

    structure = "full"

    dim = property(lambda self: int(self.mean.shape[-1]))  # P

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

    def whiten_blocks(self, blocks: list, split) -> tuple[list, jax.Array]:
        """B_i = J_i L⁻ᵀ and V_i = B_i B_iᵀ = J_i S⁻¹ J_iᵀ for rows J_i given as column blocks
        (c, K, n_b) (``split`` cuts a θ-sized leading axis into the same blocks): a dense L mixes every
        column, so the blocks are joined and B comes back as one block."""
        jac = join(blocks)
        c, k, p = jac.shape
        b = jnp.reshape(self.whiten(jnp.reshape(jac, (c * k, p)).T).T, (c, k, p))  # L⁻¹ J_iᵀ = B_iᵀ
        return [b], row_gram(b)

    def solve(self, v):
        """S⁻¹ v."""
        return self.unwhiten(self.whiten(v))

    cov_matvec = solve

    def precision_matvec(self, v):
        """S v."""
        return self.precision @ v

    def cov_diag(self):
        """diag S⁻¹."""
        linv = solve_triangular(self.chol, jnp.eye(self.dim, dtype=self.mean.dtype), lower=True)
        return jnp.sum(linv**2, axis=0)

    def dense(self) -> GaussianPosterior:
        return self

    def sample(self, rng_key, num_samples: int):
        """``num_samples`` draws, shape ``(num_samples, P)`` (base draws: :func:`standard_normal`)."""
        z = standard_normal(rng_key, (num_samples, self.dim), self.mean.dtype)
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


#: Largest P for which a structured posterior materializes its dense precision on request.
DENSE_LIMIT = 8192


def _dense_guard(p: int, what: str) -> None:
    if p > DENSE_LIMIT:
        from numpyro_mpe.errors import PosteriorError

        raise PosteriorError(
            f"{what} needs the dense {p}x{p} precision of a structured posterior (P = {p} > {DENSE_LIMIT}); "
            "use the per-observation outputs (sensitivities, loo), which stay in prediction space, or fit "
            "with posterior='full' on a smaller model"
        )


class DiagGaussianPosterior(NamedTuple):
    """q(θ) = N(mean, diag(precision_diag)⁻¹): a diagonal precision, O(P) memory.

    ``precision``, ``chol`` and ``covariance()`` materialize dense P×P arrays for the features that need
    them (refused above ``DENSE_LIMIT``); the MPE itself uses :meth:`cov_matvec` only.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = DiagGaussianPosterior(jnp.zeros(3), jnp.array([1.0, 4.0, 16.0]))
    >>> q.cov_matvec(jnp.ones(3)).tolist()
    [1.0, 0.25, 0.0625]
    """

    mean: jax.Array
    precision_diag: jax.Array

    structure = "diag"

    dim = property(lambda self: int(self.mean.shape[-1]))  # P

    def cov_matvec(self, v):
        """S⁻¹ v for ``v`` of shape ``(P,)`` or ``(P, k)``."""
        d = self.precision_diag
        return v / (d if v.ndim == 1 else d[:, None])

    def cov_diag(self):
        return 1.0 / self.precision_diag

    def precision_matvec(self, v):
        d = self.precision_diag
        return v * (d if v.ndim == 1 else d[:, None])

    def whiten(self, v):
        d = jnp.sqrt(self.precision_diag)
        return v / (d if v.ndim == 1 else d[:, None])

    unwhiten = whiten

    def whiten_blocks(self, blocks: list, split) -> tuple[list, jax.Array]:
        """B_i = J_i D^{-1/2} and V_i = Σ_b J_b D_b⁻¹ J_bᵀ block by block (see
        :meth:`GaussianPosterior.whiten_blocks`): no (c, K, P) array unless the blocks are joined."""
        inv_d = split(1.0 / self.precision_diag)
        b = [dense_block(j) * jnp.sqrt(r) for j, r in zip(blocks, inv_d)]  # formed only where B is used
        return b, block_quadratic_form(blocks, inv_d)

    def solve(self, v):
        return self.cov_matvec(v)

    @property
    def precision(self):
        _dense_guard(self.dim, "this feature")
        return jnp.diag(self.precision_diag)

    @property
    def chol(self):
        _dense_guard(self.dim, "this feature")
        return jnp.diag(jnp.sqrt(self.precision_diag))

    def covariance(self):
        _dense_guard(self.dim, "covariance()")
        return jnp.diag(1.0 / self.precision_diag)

    def sample(self, rng_key, num_samples: int):
        z = standard_normal(rng_key, (num_samples, self.dim), self.mean.dtype)
        return self.mean + z / jnp.sqrt(self.precision_diag)

    def log_prob(self, theta):
        z = (theta - self.mean) * jnp.sqrt(self.precision_diag)
        logdet = 0.5 * jnp.sum(jnp.log(self.precision_diag))
        return -0.5 * jnp.sum(z**2, -1) + logdet - 0.5 * self.dim * jnp.log(2 * jnp.pi)

    def dense(self) -> GaussianPosterior:
        """The same q as a :class:`GaussianPosterior` (P×P)."""
        return from_precision(self.mean, self.precision)


class LowRankGaussianPosterior(NamedTuple):
    """q(θ) = N(mean, S⁻¹) with S = diag(d) + U Uᵀ, U of shape ``(P, r)``: O(P r) memory.

    With Ũ = D^{-1/2} U = Q R (thin QR) and R Rᵀ = Z diag(τ) Zᵀ, S = D^{1/2} A² D^{1/2} with the symmetric
    root A = I + Q Z diag(√(1+τ) − 1) Zᵀ Qᵀ; so S⁻¹ v, whitening, draws and log q cost O(P r).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = LowRankGaussianPosterior.build(jnp.zeros(3), jnp.ones(3), jnp.array([[1.0], [0.0], [0.0]]))
    >>> [round(x, 6) for x in q.cov_matvec(jnp.array([1.0, 0.0, 0.0])).tolist()]
    [0.5, 0.0, 0.0]
    """

    mean: jax.Array
    diag: jax.Array  # d, (P,)
    factor: jax.Array  # U, (P, r)
    basis: jax.Array  # Q Z, (P, r): orthonormal columns
    tau: jax.Array  # (r,): eigenvalues of Ũᵀ Ũ

    structure = "lowrank"

    @classmethod
    def build(cls, mean, diag, factor) -> LowRankGaussianPosterior:
        ut = factor / jnp.sqrt(diag)[:, None]
        q, r = jnp.linalg.qr(ut)
        tau, z = jnp.linalg.eigh(r @ r.T)
        return cls(mean, diag, factor, q @ z, jnp.clip(tau, 0.0, None))

    dim = property(lambda self: int(self.mean.shape[-1]))  # P

    def _root_pow(self, v, power):
        """A^power v for the symmetric root A (power = ±1, ±2)."""
        col = v.ndim == 1
        v2 = v[:, None] if col else v
        c = self.basis.T @ v2
        scale = (1.0 + self.tau) ** (power / 2.0) - 1.0
        out = v2 + self.basis @ (scale[:, None] * c)
        return out[:, 0] if col else out

    def _dscale(self, v, power):
        d = self.diag ** power
        return v * (d if v.ndim == 1 else d[:, None])

    def cov_matvec(self, v):
        """S⁻¹ v = D^{-1/2} A⁻² D^{-1/2} v for ``v`` of shape ``(P,)`` or ``(P, k)``."""
        return self._dscale(self._root_pow(self._dscale(v, -0.5), -2), -0.5)

    def precision_matvec(self, v):
        return self._dscale(self._root_pow(self._dscale(v, 0.5), 2), 0.5)

    def cov_diag(self):
        ut = self.basis / jnp.sqrt(self.diag)[:, None]
        shrink = 1.0 - 1.0 / (1.0 + self.tau)
        return 1.0 / self.diag - jnp.sum(ut**2 * shrink, axis=1)

    def whiten(self, v):
        """L⁻¹ v with L = D^{1/2} A (S = L Lᵀ)."""
        return self._root_pow(self._dscale(v, -0.5), -1)

    def unwhiten(self, u):
        """L⁻ᵀ u = D^{-1/2} A⁻¹ u."""
        return self._dscale(self._root_pow(u, -1), -0.5)

    def whiten_blocks(self, blocks: list, split) -> tuple[list, jax.Array]:
        """B_i and V_i block by block (see :meth:`GaussianPosterior.whiten_blocks`): with u_i = D^{-1/2} J_iᵀ
        and C_i = Qᵀ u_i (Q = ``basis``), B_iᵀ = u_i + Q diag((1+τ)^{-1/2} − 1) C_i and
        V_i = u_iᵀ u_i + C_iᵀ diag((1+τ)⁻¹ − 1) C_i, each a sum over the blocks."""
        inv_d = split(1.0 / self.diag)
        u = [dense_block(j) * jnp.sqrt(r) for j, r in zip(blocks, inv_d)]  # formed only where B is used
        q = split(self.basis)
        c = sum(block_project(b, jnp.sqrt(r)[:, None] * qb) for b, r, qb in zip(blocks, inv_d, q))  # Qᵀ u_i
        low_rank = jnp.einsum("ckr,r,clr->ckl", c, 1.0 / (1.0 + self.tau) - 1.0, c)
        v = block_quadratic_form(blocks, inv_d) + low_rank
        shrink = c * (1.0 / jnp.sqrt(1.0 + self.tau) - 1.0)
        return [x + jnp.einsum("ckr,nr->ckn", shrink, qb) for x, qb in zip(u, q)], v

    def solve(self, v):
        return self.cov_matvec(v)

    @property
    def precision(self):
        _dense_guard(self.dim, "this feature")
        return jnp.diag(self.diag) + self.factor @ self.factor.T

    @property
    def chol(self):
        _dense_guard(self.dim, "this feature")
        return jnp.linalg.cholesky(0.5 * (self.precision + self.precision.T))

    def covariance(self):
        _dense_guard(self.dim, "covariance()")
        return self.cov_matvec(jnp.eye(self.dim, dtype=self.mean.dtype))

    def sample(self, rng_key, num_samples: int):
        z = standard_normal(rng_key, (num_samples, self.dim), self.mean.dtype)
        return self.mean + self.unwhiten(z.T).T

    def log_prob(self, theta):
        z = self._root_pow(self._dscale((theta - self.mean).T, 0.5), 1).T
        logdet = 0.5 * (jnp.sum(jnp.log(self.diag)) + jnp.sum(jnp.log1p(self.tau)))
        return -0.5 * jnp.sum(z**2, -1) + logdet - 0.5 * self.dim * jnp.log(2 * jnp.pi)

    def dense(self) -> GaussianPosterior:
        return from_precision(self.mean, self.precision)


def structure_of(post) -> str:
    """``"full"``, ``"diag"`` or ``"lowrank"``."""
    return getattr(post, "structure", "full")


def draws(posterior, num_samples: int, rng_key=None, antithetic: bool = True) -> jax.Array:
    """``num_samples`` draws θ_s = m ± L⁻ᵀ z_s from q, shape ``(num_samples, P)``: antithetic pairs (exact
    means of odd functions of θ − m, and of quadratic potentials' gradients), or independent draws.

    The same ``rng_key`` gives the same draws: quantities computed from them (the memories of every site and
    the precision) use common random numbers.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = from_precision(jnp.zeros(2), jnp.eye(2))
    >>> th = draws(q, 4)
    >>> th.shape, bool(jnp.allclose(th.mean(0), 0.0))
    ((4, 2), True)
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    num_samples, dtype = int(num_samples), posterior.mean.dtype
    z = (antithetic_normal(rng_key, num_samples, posterior.dim, dtype) if antithetic else
         standard_normal(rng_key, (num_samples, posterior.dim), dtype))
    return _unwhitened(posterior, z)


@jit
def _unwhitened(posterior, z) -> jax.Array:
    """θ_s = m + L⁻ᵀ z_s for the rows of z."""
    return posterior.mean + posterior.unwhiten(z.T).T


def host_generator(rng_key) -> np.random.Generator:
    """NumPy's default generator seeded with the words of a concrete JAX key: the same key gives the same
    numbers, on any backend; another key, another sequence.

    Examples
    --------
    >>> import jax
    >>> a = host_generator(jax.random.PRNGKey(1)).standard_normal(2)
    >>> bool((a == host_generator(jax.random.PRNGKey(1)).standard_normal(2)).all())
    True
    >>> bool((a == host_generator(jax.random.PRNGKey(2)).standard_normal(2)).any())
    False
    """
    if jnp.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        rng_key = jax.random.key_data(rng_key)
    words = np.asarray(rng_key).astype(np.uint32).ravel().tolist()
    return np.random.default_rng(words)


def standard_normal(rng_key, shape: tuple, dtype=jnp.float64) -> jax.Array:
    """Standard-normal draws of ``shape`` from ``rng_key``: made on the host (:func:`host_generator`), no
    program compiled, for a concrete key; by ``jax.random.normal`` for a key traced inside ``jax.jit`` (other
    numbers, the same distribution).

    Examples
    --------
    >>> import jax
    >>> standard_normal(jax.random.PRNGKey(0), (3, 2)).shape
    (3, 2)
    """
    if isinstance(rng_key, jax.core.Tracer):
        return jax.random.normal(rng_key, shape, dtype)
    return jnp.asarray(host_generator(rng_key).standard_normal(shape, dtype=np.dtype(dtype)))


def antithetic_normal(rng_key, num_samples: int, dim: int, dtype=jnp.float64) -> jax.Array:
    """``num_samples`` standard-normal draws in ``dim`` dimensions as antithetic pairs z, −z (the first
    ⌈S/2⌉ from :func:`standard_normal`): odd functions of z average to exactly 0.

    Examples
    --------
    >>> import jax
    >>> z = antithetic_normal(jax.random.PRNGKey(0), 4, 2)
    >>> z.shape, bool((z[:2] == -z[2:]).all())
    ((4, 2), True)
    """
    z = standard_normal(rng_key, ((int(num_samples) + 1) // 2, int(dim)), dtype)
    return jnp.concatenate([z, -z])[: int(num_samples)]


def base_logpdf(z, df):
    """log density of whitened offsets z (..., P): N(0, I) (``df`` None) or the multivariate t_df(0, I).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> round(float(base_logpdf(jnp.zeros(2), None)), 4)  # −log 2π
    -1.8379
    """
    p = z.shape[-1]
    r2 = jnp.sum(z * z, -1)
    if df is None:
        return -0.5 * r2 - 0.5 * p * jnp.log(2 * jnp.pi)
    return (gammaln((df + p) / 2) - gammaln(df / 2) - 0.5 * p * jnp.log(df * jnp.pi)
            - 0.5 * (df + p) * jnp.log1p(r2 / df))


def base_draws(rng_key, num_samples: int, p: int, df, dtype=jnp.float64) -> jax.Array:
    """``num_samples`` whitened offsets from N(0, I), or from the multivariate t_df(0, I) (a Gaussian draw
    scaled by √(df/χ²_df)), made on the host from the concrete key ``rng_key`` (:func:`host_generator`).

    Examples
    --------
    >>> import jax
    >>> base_draws(jax.random.PRNGKey(0), 4, 3, df=5.0).shape
    (4, 3)
    """
    gen = host_generator(rng_key)
    z = gen.standard_normal((int(num_samples), int(p)))
    if df is not None:
        z = z * np.sqrt(df / gen.chisquare(df, int(num_samples)))[:, None]
    return jnp.asarray(z.astype(np.dtype(dtype)))


def from_state(mean, precision) -> GaussianPosterior:
    """The Gaussian q = N(mean, S⁻¹) of an optimizer state; ``precision``: S ``(P, P)`` or its diagonal.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from_state(jnp.zeros(2), jnp.array([4.0, 1.0])).precision.shape
    (2, 2)
    """
    precision = jnp.asarray(precision)
    if precision.ndim == 1:
        precision = jnp.diag(precision)
    return from_precision(jnp.asarray(mean), precision)
