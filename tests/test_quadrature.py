"""Per-block rules (numpyro_mpe.engine.quadrature.expected_log_lik_block: the Taylor expansion, then
Gauss–Hermite
tiers) and streamed shifts.

Independent truths: the closed form E_{η~N(m, v)} N(y; η, σ²) = N(y; m, σ² + v); derivatives by repeated
jax.grad; the full 48-point rule on every row; the N×P shifts kept by the pass.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

import numpyro_mpe as mpe
import numpyro_mpe.engine.quadrature as quadrature
import numpyro_mpe.engine.site as site_engine
from numpyro_mpe.engine.quadrature import (
    GAUSS_HERMITE_TIERS,
    expected_log_lik_block,
    expected_log_lik_taylor,
    gauss_hermite,
    log_lik_series,
)
from numpyro_mpe.model.rows import row_plan

KEY = jax.random.PRNGKey(0)


def gaussian_block(v, sigma=1.0, seed=0):
    """A block of rows with N(y; η, σ²) likelihoods, η ~ N(m, v_i): values by the block rule and the
    closed form."""
    rng = np.random.default_rng(seed)
    n = v.shape[0]
    m = jnp.asarray(rng.normal(size=(n, 1)))
    y = jnp.asarray(rng.normal(size=n)) * np.sqrt(sigma**2 + v)

    def f(eta, y, aux):
        return norm.logpdf(y, eta[:, 0], sigma)

    cov = jnp.asarray(v)[:, None, None]
    e = (m[:, 0] - y)[:, None] / sigma**2  # −∂ log p / ∂η at m
    lam = jnp.full((n, 1, 1), 1.0 / sigma**2)
    vals, pts = jax.jit(lambda m, cov: expected_log_lik_block(
        f, m, cov, m, jnp.array([0]), y, {}, jnp.ones(n), e, lam, tol=1e-10))(m, cov)
    exact = norm.logpdf(y, m[:, 0], jnp.sqrt(sigma**2 + jnp.asarray(v)))
    return np.asarray(vals), int(pts), np.asarray(exact)


def test_block_rule_matches_the_closed_form_with_few_points_where_v_is_small():
    vals, pts, exact = gaussian_block(np.full(4096, 1e-5))
    assert pts <= 3
    np.testing.assert_allclose(vals, exact, atol=1e-10, rtol=0)
    # wider Gaussians need more points, and still match
    vals, pts_wide, exact = gaussian_block(np.full(4096, 0.5))
    assert pts_wide > pts
    np.testing.assert_allclose(vals, exact, atol=1e-9, rtol=0)


def test_block_rule_finds_one_hard_row_among_easy_ones():
    v = np.full(20_000, 1e-9)
    v[12_345] = 0.5  # one row whose Gaussian is wide: it decides the block's rule
    vals, pts, exact = gaussian_block(v, seed=1)
    assert pts > GAUSS_HERMITE_TIERS[1][0]
    np.testing.assert_allclose(vals, exact, atol=1e-9, rtol=0)
    assert abs(vals[12_345] - exact[12_345]) < 1e-9


def test_block_rule_rejects_a_rule_whose_nodes_all_miss_the_support():
    """log p = −inf on |η| < 0.5: the 2- and 3-point rules put every node there at v = 0.1 (log E p = −inf)
    while the mass outside is 0.11; such a rule must not pass as 'within tol'."""
    def f(eta, y, aux):
        return jnp.where(jnp.abs(eta[:, 0]) > 0.5, 0.0, -jnp.inf)

    n = 64
    m = jnp.zeros((n, 1))
    vals, pts = expected_log_lik_block(f, m, jnp.full((n, 1, 1), 0.1), m, jnp.array([0]), jnp.zeros(n), {},
                                       jnp.ones(n), jnp.zeros((n, 1)), jnp.ones((n, 1, 1)), tol=1e-10)
    assert int(pts) == GAUSS_HERMITE_TIERS[1][-1]
    assert np.all(np.isfinite(np.asarray(vals)))


def logistic(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)


def logistic_data(n, p=5, seed=0):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ rng.normal(size=p)))).astype(float)
    return X, y


def test_pass_with_block_rules_equals_the_full_rule_on_every_row():
    X, y = logistic_data(6000)
    fit = mpe.Laplace(logistic, curvature="ggn", chunk_size=1000, progress=False).run(KEY, X, y=y)
    fast = fit.site_mpe("y", quadrature_tol=1e-11)  # the tiers (the default above FULL_RULE_NODES)
    full = fit.site_mpe("y", quadrature_tol=0)
    assert "48 points per dimension" in full.method
    assert "K=1, 48 points" not in fast.method, fast.method
    # 6000 rows × 48 nodes are within FULL_RULE_NODES: the default is the full rule, one branch to compile
    assert fit.site_mpe("y").method == full.method
    for name in ("lpd", "elpd_loo"):
        np.testing.assert_allclose(getattr(fast, name), getattr(full, name), atol=1e-9, rtol=0)
    # a small data set (wide posterior) is integrated with more points than a large one
    Xs, ys = logistic_data(40, seed=2)
    small = mpe.Laplace(logistic, curvature="ggn", progress=False).run(KEY, Xs, y=ys)
    res = small.site_mpe("y", quadrature_tol=1e-11)
    ref = small.site_mpe("y", quadrature_tol=0)
    np.testing.assert_allclose(res.elpd_loo, ref.elpd_loo, atol=1e-9, rtol=0)


def _identity(d):
    return d


def test_shifts_streamed_when_not_kept(monkeypatch):
    X, y = logistic_data(700)
    fit = mpe.Laplace(logistic, curvature="ggn", chunk_size=128, progress=False).run(KEY, X, y=y)
    kept = np.asarray(fit.site_mpe("y", keep_shift=True).shift)
    streamed = np.asarray(site_engine.map_shifts(fit.site_data("y"), fit.posterior, _identity))
    np.testing.assert_allclose(streamed, kept, atol=1e-12, rtol=0)
    ref = mpe.parameter_shift(fit)

    monkeypatch.setattr(site_engine, "KEEP_SHIFT_LIMIT", 0)
    fit2 = mpe.Laplace(logistic, curvature="ggn", chunk_size=128, progress=False).run(KEY, X, y=y)
    assert fit2.site_mpe("y").shift is None
    ds = mpe.parameter_shift(fit2)
    np.testing.assert_allclose(ds["b"].values, ref["b"].values, atol=1e-10, rtol=0)
    # the shifts really move the posterior: the largest is about one posterior sd / sqrt(N) or more
    assert np.abs(ds["b"].values).max() > 1e-3


def test_row_plan_checks_the_model_on_single_rows():
    def odd(X, y=None):  # one row at a time gives other logits than the same row among several
        b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            shift = 1.0 if X.shape[0] == 1 else 0.0
            numpyro.sample("y", dist.Bernoulli(logits=X @ b + shift), obs=y)

    X, y = logistic_data(50)
    fit = mpe.Laplace(odd, progress=False).run(KEY, X, y=y)
    plan, reason = row_plan(fit.adapter, "y")
    assert plan is None and "does not reproduce" in reason
    plan, reason = row_plan(mpe.Laplace(logistic, progress=False).run(KEY, X, y=y).adapter, "y")
    assert plan is not None, reason


# ------------------------------------------------------------------ the Taylor tier
def bernoulli(eta, y, aux):
    return dist.Bernoulli(logits=eta[:, 0]).log_prob(y)


def poisson(eta, y, aux):  # xlogy inside has a custom_jvp that jet cannot trace: nested forward mode
    return dist.Poisson(jnp.exp(eta[:, 0])).log_prob(y)


def normal_fixed_scale(eta, y, aux):  # two components, the scale (component 1) not active
    return dist.Normal(eta[:, 0], jnp.exp(eta[:, 1])).log_prob(y)


def repeated_grads(f, eta_all, y, w, order=4):
    """a_k = w ℓ⁽ᵏ⁾/k! of every row by k nested jax.grad (the independent truth)."""
    out = []
    for ea, yy, ww in zip(np.asarray(eta_all), np.asarray(y), np.asarray(w)):
        def g(x, ea=ea, yy=yy, ww=ww):
            return f(jnp.asarray(ea).at[0].set(x)[None], jnp.asarray(yy)[None], {})[0] * ww
        row, h = [], g
        for k in range(order + 1):
            row.append(float(h(jnp.asarray(ea[0]))) / math.factorial(k))
            h = jax.grad(h)
        out.append(row)
    return np.array(out)


@pytest.mark.slow  # > 20 s
def test_log_lik_series_equals_repeated_derivatives(monkeypatch):
    rng = np.random.default_rng(3)
    n = 6
    cases = [(bernoulli, rng.normal(size=(n, 1)) * 2, (rng.random(n) < 0.5).astype(float)),
             (poisson, rng.normal(size=(n, 1)), rng.poisson(2.0, size=n).astype(float)),
             (normal_fixed_scale, np.column_stack([rng.normal(size=n), rng.normal(size=n) * 0.3]),
              rng.normal(size=n))]
    w = rng.uniform(0.5, 2.0, size=n)

    def series(f, eta, y):
        return np.stack([np.asarray(a) for a in jax.jit(lambda e, yy, ww: log_lik_series(
            f, 0, e, yy, {}, ww))(jnp.asarray(eta), jnp.asarray(y), jnp.asarray(w))], axis=1)

    for f, eta, y in cases:
        np.testing.assert_allclose(series(f, eta, y), repeated_grads(f, eta, y, w), rtol=1e-10, atol=1e-12)
    # the nested forward-mode fallback gives the same coefficients where jet works too
    def no_jet(*args):
        raise NotImplementedError("no jet rule")

    monkeypatch.setattr(quadrature, "_jet_derivatives", no_jet)
    f, eta, y = cases[0]
    np.testing.assert_allclose(series(f, eta, y), repeated_grads(f, eta, y, w), rtol=1e-10, atol=1e-12)


def test_taylor_expansion_is_third_order_accurate():
    # Gaussian likelihood: E N(y; η, 1), η ~ N(η̂ + Δ, s), is N(y; η̂ + Δ, 1 + s) exactly
    r = 0.7  # y − η̂
    a = tuple(jnp.array([x]) for x in (norm.logpdf(r), r, -0.5, 0.0, 0.0))
    errs = []
    for s in (1e-2, 1e-3):
        d = jnp.array([-s])
        exact = norm.logpdf(r, -s, jnp.sqrt(1 + s))
        errs.append(abs(float(expected_log_lik_taylor(a, d, jnp.array([s]))[0] - exact)))
    assert errs[1] < 1e-8 and errs[1] < errs[0] / 500, errs  # O(s³): a thousand times smaller per decade
    # logistic rows against the 48-point rule
    rng = np.random.default_rng(4)
    n = 200
    eta = jnp.asarray(rng.normal(size=(n, 1)) * 2)
    y = jnp.asarray((rng.random(n) < 0.5).astype(float))
    s, d = jnp.full(n, 1e-4), jnp.asarray(rng.normal(size=n) * 1e-4)
    taylor = expected_log_lik_taylor(log_lik_series(bernoulli, 0, eta, y, {}, jnp.ones(n)), d, s)
    full = expected_log_lik_block(bernoulli, eta + d[:, None], s[:, None, None], eta, jnp.array([0]), y, {},
                                  jnp.ones(n), jnp.zeros((n, 1)), jnp.zeros((n, 1, 1)), tol=0)[0]
    np.testing.assert_allclose(taylor, full, atol=1e-11, rtol=0)  # the tier's float64 tolerance


def test_block_takes_the_taylor_tier_only_where_it_is_finite_on_every_row():
    rng = np.random.default_rng(5)
    n = 4096
    eta = jnp.asarray(rng.normal(size=(n, 1)))
    y = jnp.asarray((rng.random(n) < 0.5).astype(float))
    w = jnp.ones(n)
    series = log_lik_series(bernoulli, 0, eta, y, {}, w)
    e, lam = -series[1][:, None], -2 * series[2][:, None, None]
    means = (eta, eta + 1e-6 * e)
    covs = (jnp.full((n, 1, 1), 1e-6), jnp.full((n, 1, 1), 2e-6))

    def block(series, e, tol=1e-11):
        return expected_log_lik_block(bernoulli, means, covs, eta, jnp.array([0]), y, {}, w, e, lam, tol=tol,
                                      rules=tuple(gauss_hermite(1, q) for q in GAUSS_HERMITE_TIERS[1]),
                                      series=series)

    (lpd, elpd), pts = block(series, e)
    (lpd_full, elpd_full), _ = block(series, e, tol=0)
    assert int(pts) == 0
    np.testing.assert_allclose(lpd, lpd_full, atol=1e-11, rtol=0)
    np.testing.assert_allclose(elpd, elpd_full, atol=1e-11, rtol=0)
    # a NaN coefficient on a row that is not probed (it has the smallest score) rules the expansion out
    row = 3000
    bad = (series[0].at[row].set(jnp.nan),) + series[1:]
    (lpd_bad, elpd_bad), pts_bad = block(bad, e.at[row].set(0.0))
    assert int(pts_bad) > 0
    np.testing.assert_allclose(lpd_bad, lpd_full, atol=1e-11, rtol=0)
    assert np.isfinite(np.asarray(elpd_bad)).all()


def poisson_model(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(X @ b)), obs=y)


def test_pass_at_large_n_takes_the_taylor_expansion_and_matches_the_full_rule():
    """N = 2·10⁵: V_i ≈ 1e-5, the expansion's O(V³) error is far below tol; every output equals the pass
    with the full 48-point rule (where e and Λ come from autodiff, not from the Taylor coefficients)."""
    rng = np.random.default_rng(6)
    n = 200_000
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    data = {"logistic": (logistic, (rng.random(n) < 1 / (1 + np.exp(-X @ [0.3, 1.0, -0.5]))).astype(float)),
            "poisson": (poisson_model, rng.poisson(np.exp(X @ [-0.5, 0.2, -0.1])).astype(float))}
    for name, (model, y) in data.items():
        fit = mpe.Laplace(model, curvature="ggn", progress=False).run(KEY, X, y=y)
        fast = fit.site_mpe("y")
        full = fit.site_mpe("y", quadrature_tol=0)
        # logistic: every block; Poisson (rates ≈ 0.6): blocks without large counts (e^η varies fast there)
        assert "taylor expansion" in fast.method, (name, fast.method)
        assert name != "logistic" or fast.method.startswith("taylor expansion"), fast.method
        assert "48 points" in full.method
        for field in ("lpd", "elpd_loo", "p_loo"):
            np.testing.assert_allclose(getattr(fast, field), getattr(full, field), atol=1e-10, rtol=0,
                                       err_msg=f"{name} {field}")
        for field in ("leverage", "sensitivity", "prediction_shift", "prediction_var"):
            np.testing.assert_allclose(getattr(fast, field), getattr(full, field), rtol=1e-10, atol=1e-15,
                                       err_msg=f"{name} {field}")
