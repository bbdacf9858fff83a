"""numpyro_mpe.engine.rowlinalg against NumPy's LAPACK: Cholesky and symmetric eigh of one small matrix,
alone,
mapped over rows (the closed-form 2×2 and the one-matrix-at-a-time batching rules) and mapped twice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numpyro_mpe.engine import rowlinalg


def symmetric(n, size=64, seed=0):
    rng = np.random.default_rng(seed + n)
    a = rng.normal(size=(size, n, n))
    a = a + np.swapaxes(a, 1, 2)
    a[0], a[1] = 0.0, np.eye(n)  # repeated eigenvalues
    a[2] = np.diag(np.arange(n, 0, -1.0))  # diagonal, descending
    if n == 2:
        a[3] = [[1.0, 1e-300], [1e-300, 1.0]]  # an off-diagonal that underflows τ
        a[4] = [[1e150, 1.0], [1.0, -1e150]]  # τ² overflows
        a[5] = [[-3.0, 0.0], [0.0, 2.0]]  # already diagonal, ascending
    return a


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_eigh_mapped_over_rows_equals_lapack(n):
    a = symmetric(n)
    w, v = jax.jit(jax.vmap(rowlinalg.eigh))(a)
    w, v = np.asarray(w), np.asarray(v)
    w_ref = np.linalg.eigvalsh(a)
    scale = 1.0 + np.abs(w_ref).max(axis=1)
    assert np.all(np.abs(w - w_ref).max(axis=1) <= 1e-14 * scale)
    assert np.all(np.diff(w, axis=1) >= 0)  # ascending, as jnp.linalg.eigh
    assert np.abs(np.einsum("bij,bik->bjk", v, v) - np.eye(n)).max() < 1e-13
    recon = np.einsum("bij,bj,bkj->bik", v, w, v)
    assert np.all(np.abs(recon - a).max(axis=(1, 2)) <= 1e-14 * scale)


def test_eigh_alone_and_mapped_twice():
    a = symmetric(3, size=12).reshape(3, 4, 3, 3)
    w2, _ = jax.vmap(jax.vmap(rowlinalg.eigh))(a)
    w1 = jnp.stack([rowlinalg.eigh(m)[0] for m in a.reshape(-1, 3, 3)])
    np.testing.assert_allclose(np.asarray(w2).reshape(-1, 3), np.asarray(w1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(w1), np.linalg.eigvalsh(a.reshape(-1, 3, 3)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("n", [2, 3, 10])
def test_cholesky_equals_lapack_and_is_nan_where_not_positive_definite(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(50, n, n))
    a = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(n)
    chol = np.asarray(jax.vmap(rowlinalg.cholesky)(a))
    np.testing.assert_allclose(chol, np.linalg.cholesky(a), rtol=0, atol=1e-12)
    bad = a.copy()
    bad[:, -1, -1] = -1.0  # the last pivot negative
    assert np.all(np.isnan(np.asarray(jax.vmap(rowlinalg.cholesky)(bad))).any(axis=(1, 2)))
