"""The cavity of one observation whose memory touches few coordinates of θ (``cavity_support``), against
NumPy's dense linear algebra in all P coordinates, and the pass that takes it against the P-dimensional one.

Truths: the leverage is the largest eigenvalue of Ã = L⁻¹ĤL⁻ᵀ (``numpy.linalg.eigvalsh``), u = (I − Ã)⁻¹L⁻¹ĝ,
log det(I − Ã) and V₋ = B(I − Ã)⁻¹Bᵀ by ``numpy.linalg.solve`` / ``slogdet``; for a hierarchical model whose
rows touch 6 of 16 coordinates (the mean and scale of the group effects, the row's group, three slopes),
every output of the pass equals the pass with P × P cavities.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpyro_mpe as mpe
from numpyro_mpe.engine import site as site_module
from numpyro_mpe.engine.cavity import cavity_support, row_support

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_latency import hier_model as hier  # noqa: E402  (the latency benchmark's hierarchical logistic)


def dense_truth(linv, g, h, b):
    """Every output of the cavity in all P coordinates, by NumPy."""
    p = h.shape[0]
    a = linv @ h @ linv.T
    a = 0.5 * (a + a.T)
    lev = float(np.linalg.eigvalsh(a)[-1])
    bw = b @ linv.T
    out = {"leverage": lev, "valid": lev < 1.0, "v": bw @ bw.T}
    if lev < 1.0:
        u = np.linalg.solve(np.eye(p) - a, linv @ g)
        out.update(u=u, sensitivity=np.linalg.norm(u), dEta=bw @ u,
                   v_cav=bw @ np.linalg.solve(np.eye(p) - a, bw.T),
                   logdet=np.linalg.slogdet(np.eye(p) - a)[1])
    return out


@pytest.mark.parametrize("case", ["valid", "negative", "invalid"])
def test_cavity_on_a_support_equals_dense_linear_algebra(case):
    rng = np.random.default_rng({"valid": 0, "negative": 1, "invalid": 2}[case])
    p, k = 12, 2
    support = np.array([7, 2, 9, 4])  # the last one untouched: a zero row and column, a zero gradient
    f = rng.normal(size=(3, 3))
    h_s = np.zeros((4, 4))
    h_s[:3, :3] = f @ np.diag([0.8, -0.3, 0.5]) @ f.T  # indefinite
    if case == "negative":
        h_s[:3, :3] = -f @ f.T  # all eigenvalues of Ã ≤ 0: the leverage is 0 (the P − r zero ones)
    if case == "invalid":
        h_s[:3, :3] = 40.0 * f @ f.T  # leverage above 1
    g_s = np.concatenate([rng.normal(size=3), [0.0]])
    s = rng.normal(size=(p, p))
    prec = s @ s.T / p + np.eye(p)  # S = L Lᵀ
    linv = np.linalg.inv(np.linalg.cholesky(prec))
    b = rng.normal(size=(k, p))  # the predictor's Jacobian J_i
    g, h = np.zeros(p), np.zeros((p, p))
    g[support], h[np.ix_(support, support)] = g_s, h_s
    truth = dense_truth(linv, g, h, b)
    out = jax.jit(cavity_support)(g_s, h_s, linv[:, support].T, b @ linv.T)
    assert bool(out["valid"]) == truth["valid"] == (case != "invalid")
    np.testing.assert_allclose(out["leverage"], truth["leverage"], rtol=1e-12, atol=1e-13)
    if case == "negative":
        assert truth["leverage"] == pytest.approx(0.0, abs=1e-13)
    np.testing.assert_allclose(out["v"], truth["v"], rtol=1e-12)
    for name in ("u", "sensitivity", "dEta", "v_cav", "logdet"):
        if truth["valid"]:
            np.testing.assert_allclose(out[name], truth[name], rtol=1e-10, atol=1e-12, err_msg=name)
        else:
            assert np.all(np.isnan(np.asarray(out[name]))), name


def test_row_support_lists_the_touched_coordinates_first():
    g = np.zeros((3, 8))
    h = np.zeros((3, 8, 8))
    h[0, 2, 5] = h[0, 5, 2] = 1.0
    g[1, 6] = 1.0  # a gradient alone counts
    h[2, 1, 1] = 2.0
    h[2, 7, 7] = 3.0
    idx = row_support(g, h)
    assert idx.shape == (3, 2) and idx.dtype == np.int32
    assert [set(row) for row in idx.tolist()] == [{2, 5}, {6, 0}, {1, 7}]
    assert idx[1, 0] == 6  # touched first, then the first untouched one
    h[0, :5, :5] = 1.0  # a row touching 6 of 8 coordinates: P-dimensional work is no dearer
    assert row_support(g, h) is None


def test_pass_on_supports_equals_the_pass_in_all_coordinates(monkeypatch):
    # the exact Hessian of σ·z_g is not J'ΛJ: dense memories, each touching μ, log σ, z_g and the 3 slopes
    rng = np.random.default_rng(3)
    n, groups = 240, 11
    X = rng.normal(size=(n, 3))
    g = rng.permutation(np.arange(n) % groups).astype(np.int32)
    logits = -0.3 + 0.9 * rng.normal(size=groups)[g] + X @ np.array([0.8, -0.5, 0.3])
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(float)
    key = jax.random.PRNGKey(0)
    fit = mpe.Laplace(hier, progress=False).run(key, X, g, groups, y=y)
    mem = fit.memories("y")
    assert not mem.factored and fit.adapter.num_params == 16
    idx = row_support(mem.grad, mem.dense)
    assert idx.shape == (n, 6)
    at = {site.name: site.start for site in fit.adapter.latent}
    for i in range(n):
        expect = {at["mu_a"], at["sigma_a"], at["z"] + g[i], at["beta"], at["beta"] + 1, at["beta"] + 2}
        assert set(idx[i].tolist()) == expect, i
    taken = []
    monkeypatch.setattr(site_module, "row_support", lambda grad, hess: taken.append(row_support(grad, hess))
                        or taken[-1])
    ours = fit.site_mpe("y")
    assert len(taken) == 1 and taken[0].shape == (n, 6)  # the pass solved its cavities on the supports
    monkeypatch.setattr(site_module, "row_support", lambda grad, hess: None)
    dense = mpe.Laplace(hier, progress=False).run(key, X, g, groups, y=y).site_mpe("y")
    for name in ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage", "valid", "shift", "prediction_shift",
                 "prediction_var"):
        a, b = np.asarray(getattr(ours, name), float), np.asarray(getattr(dense, name), float)
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.all(np.asarray(ours.valid)) and float(jnp.max(ours.leverage)) > 0.01
