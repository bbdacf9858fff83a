"""Linear algebra of one small matrix that is safe to map over rows: Cholesky, symmetric eigh and the
PSD square root from it.

The per-observation maths is written for one observation and mapped over rows, so a ``jnp.linalg``
factorization inside it becomes one batched LAPACK call per chunk.  jaxlib 0.10 splits such a call over
XLA's CPU thread pool and blocks the calling pool thread until the parts finish: when as many of them are
in flight as the pool has threads (two on a 2-core machine), they wait for each other forever.  Seen here
with batched LU (the digits softmax pass, K = 10, 1797 rows, at its first call, every time), Cholesky,
triangular solves and ``eigh`` (a K = 2 loc-scale pass over 200,000 rows).  Mapped over rows, the
functions below are elementwise array work or one unbatched LAPACK call per matrix, and nothing waits
on the pool.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cholesky(a):
    """Lower Cholesky factor of a symmetric positive definite ``a`` (n×n), column by column.

    NaN where ``a`` is not positive definite, as ``jnp.linalg.cholesky``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> a = jnp.array([[4.0, 2.0], [2.0, 5.0]])
    >>> cholesky(a).tolist()
    [[2.0, 0.0], [1.0, 2.0]]
    """
    n = a.shape[-1]
    chol = jnp.zeros_like(a)
    for j in range(n):
        col = a[j:, j] - chol[j:, :j] @ chol[j, :j]  # (n − j,): the pivot first
        chol = chol.at[j:, j].set(col / jnp.sqrt(col[0]))
    return chol


def _eigh2(a):
    """Closed-form eigh of one symmetric 2×2 matrix: the Jacobi rotation that zeroes a_01 (with
    τ = (a_11 − a_00) / 2a_01, t = sign(τ)/(|τ| + √(1 + τ²)), c = 1/√(1 + t²), s = tc, the eigenvalues are
    a_00 − t·a_01 and a_11 + t·a_01, the vectors (c, −s) and (s, c)), sorted ascending."""
    x, y, z = a[0, 0], 0.5 * (a[0, 1] + a[1, 0]), a[1, 1]
    tau = (z - x) / (2.0 * jnp.where(y == 0, 1.0, y))
    t = jnp.where(tau >= 0, 1.0, -1.0) / (jnp.abs(tau) + jnp.sqrt(1.0 + tau * tau))
    t = jnp.where(y == 0, 0.0, t)
    c = 1.0 / jnp.sqrt(1.0 + t * t)
    s = t * c
    lo, hi = x - t * y, z + t * y
    swap = hi < lo
    w = jnp.stack([jnp.where(swap, hi, lo), jnp.where(swap, lo, hi)])
    v0, v1 = jnp.stack([c, -s]), jnp.stack([s, c])
    vecs = jnp.stack([jnp.where(swap, v1, v0), jnp.where(swap, v0, v1)], axis=1)
    return w, vecs


def psd_root(a):
    """R = U·√max(D, 0) from ``eigh`` of a symmetric ``a`` = U D Uᵀ: R Rᵀ = a where ``a`` is PSD (its
    negative eigenvalues, round-off, clipped), singular allowed.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> r = psd_root(jnp.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> [[round(float(x), 5) for x in row] for row in r @ r.T]
    [[2.0, 1.0], [1.0, 2.0]]
    """
    vals, vecs = eigh(a)
    return vecs * jnp.sqrt(jnp.clip(vals, 0.0, None))


@jax.custom_batching.custom_vmap
def eigh(a):
    """Eigenvalues (ascending) and eigenvectors of one symmetric ``a`` (n×n), safe to map over rows.

    Alone it is ``jnp.linalg.eigh`` (one unbatched LAPACK call).  Mapped over a batch: 1×1 and 2×2 in
    closed form, elementwise over the batch; larger ones one matrix at a time (``lax.map``), so that no
    batched LAPACK call is ever formed (module docstring).  It has no derivative rule (``custom_vmap``);
    the MPE only uses eigendecompositions of curvature it has already formed, never differentiates them.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> w, v = jax.vmap(eigh)(jnp.array([[[2.0, 1.0], [1.0, 2.0]]]))
    >>> [round(float(x), 12) for x in w[0]]
    [1.0, 3.0]
    """
    w, v = jnp.linalg.eigh(a, symmetrize_input=True)
    return w, v


@eigh.def_vmap
def _eigh_rows(axis_size, in_batched, a):
    (batched,) = in_batched
    if not batched:
        w, v = eigh(a)
        return (jnp.broadcast_to(w, (axis_size,) + w.shape), jnp.broadcast_to(v, (axis_size,) + v.shape)), \
            (True, True)
    n = a.shape[-1]
    if n == 1:
        out = (a[..., 0], jnp.ones_like(a))
    elif n == 2:
        out = jax.vmap(_eigh2)(a)
    else:
        out = jax.lax.map(eigh, a)
    return out, (True, True)
