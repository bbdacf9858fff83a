"""Per-block Gauss–Hermite rules (numpyro_mpe.quadrature.expected_log_lik_block) and streamed shifts.

Independent truths: the closed form E_{η~N(m, v)} N(y; η, σ²) = N(y; m, σ² + v); the full 48-point rule
on every row; the N×P shifts kept by the pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.stats import norm

import numpyro_mpe as mpe
import numpyro_mpe.streaming as streaming
from numpyro_mpe.quadrature import GAUSS_HERMITE_TIERS, expected_log_lik_block
from numpyro_mpe.streaming import row_plan

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
    eng = fit.stream("y")
    fast = eng.site_mpe(fit.posterior)
    full = eng.site_mpe(fit.posterior, quadrature_tol=0)
    assert "48 points per dimension" in full.method
    used = int(fast.method.split("K=1, ")[1].split(" ")[0])
    assert used < 48, fast.method
    for name in ("lpd", "elpd_loo"):
        np.testing.assert_allclose(getattr(fast, name), getattr(full, name), atol=1e-9, rtol=0)
    # a small data set (wide posterior) is integrated with more points than a large one
    Xs, ys = logistic_data(40, seed=2)
    small = mpe.Laplace(logistic, curvature="ggn", progress=False).run(KEY, Xs, y=ys)
    res = small.stream("y").site_mpe(small.posterior)
    ref = small.stream("y").site_mpe(small.posterior, quadrature_tol=0)
    np.testing.assert_allclose(res.elpd_loo, ref.elpd_loo, atol=1e-9, rtol=0)


def test_shifts_streamed_when_not_kept(monkeypatch):
    X, y = logistic_data(700)
    fit = mpe.Laplace(logistic, curvature="ggn", chunk_size=128, progress=False).run(KEY, X, y=y)
    eng = fit.stream("y")
    kept = np.asarray(eng.site_mpe(fit.posterior, keep_shift=True).shift)
    streamed = np.asarray(eng.map_shifts(fit.posterior, lambda d: d))
    np.testing.assert_allclose(streamed, kept, atol=1e-12, rtol=0)
    ref = mpe.parameter_shift(fit)

    monkeypatch.setattr(streaming, "KEEP_SHIFT_LIMIT", 0)
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
