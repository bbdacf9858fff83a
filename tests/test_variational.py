"""Variational memories (DESIGN §2): expectations under q, and the precision consistent with them.

Truths used here, none computed by the code under test:

* the prior's Hessian from a prior-only copy of the model (observed sites blocked, NumPyro's own potential);
* per-draw Hessians of −log p(y_i | θ) by ``jax.hessian`` in a Python loop over the same draws;
* Gauss–Hermite quadrature in numpy for a logistic likelihood under a Gaussian q;
* for a linear-Gaussian model, E_q[∇ℓ_i] = ∇ℓ_i(m) and E_q[∇²ℓ_i] = ∇²ℓ_i exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from linear_gaussian import linear_gaussian_model, nll_grad_hess
from numpyro import handlers
from numpyro.infer.util import potential_energy

import numpyro_mpe as mpe
from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import draws, from_precision
from numpyro_mpe.inference.variational import consistent_precision, variational_memories

numpyro.enable_x64()
KEY = jax.random.PRNGKey(0)


# ------------------------------------------------------------------ models
def two_sites(X, y=None, counts=None):
    """Linear predictors (factored memories): a Normal with unknown scale and a Poisson with log link."""
    a = numpyro.sample("a", dist.Normal(0, 2))
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    c = numpyro.sample("c", dist.Normal(0, 1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(a + X @ b, sigma), obs=y)
        numpyro.sample("counts", dist.Poisson(jnp.exp(c + 0.5 * X @ b)), obs=counts)


def nonlinear(X, y=None):
    """A predictor that is not linear in θ (dense memories)."""
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(jnp.tanh(X @ b), 0.5), obs=y)


def logistic(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)


SIGMA, TAU = 0.8, 1.5
linear = linear_gaussian_model(SIGMA, TAU)


def _data(n=25, p=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    return rng, jnp.asarray(X)


@pytest.fixture(scope="module")
def two_sites_fit():
    rng, X = _data()
    y = jnp.asarray(0.3 + X @ np.array([1.0, -0.5]) + 0.7 * rng.normal(size=X.shape[0]))
    counts = jnp.asarray(rng.poisson(np.exp(0.2 + 0.5 * X @ np.array([1.0, -0.5]))).astype(float))
    fit = mpe.Laplace(two_sites, progress=False).run(KEY, X, y=y, counts=counts)
    return fit, two_sites, (X,), {"y": y, "counts": counts}


@pytest.fixture(scope="module")
def nonlinear_fit():
    rng, X = _data(seed=1)
    y = jnp.asarray(np.tanh(X @ np.array([0.8, -0.4])) + 0.5 * rng.normal(size=X.shape[0]))
    fit = mpe.Laplace(nonlinear, progress=False).run(KEY, X, y=y)
    return fit, nonlinear, (X,), {"y": y}


def prior_hessian_mean(model, args, kwargs, adapter, thetas):
    """E over ``thetas`` of ∇²R, R from a prior-only copy of the model (observed sites blocked)."""
    prior_model = handlers.block(model, hide_fn=lambda site: site.get("is_observed", False))

    def r(theta):
        return potential_energy(prior_model, args, kwargs, adapter.unravel(theta))

    hess = jax.jit(jax.vmap(jax.hessian(r)))(thetas)
    return np.asarray(hess).mean(0)


def sum_of_memories(fit_or_adapter, q, method, diagonal, num_samples=64):
    adapter = fit_or_adapter.adapter
    return sum(np.asarray(variational_memories(adapter, q, name, num_samples=num_samples, rng_key=KEY,
                                               method=method, diagonal=diagonal).hess).sum(0)
               for name in adapter.observed)


# ------------------------------------------------------------------ memories + prior = precision
@pytest.mark.parametrize("which", ["two_sites_fit", "nonlinear_fit"])
def test_laplace_memories_add_up_to_precision(which, request):
    """Laplace (delta method at the mode): Σ_sites Σ_i Ĥ_i + ∇²R(m) = S, to round-off."""
    fit, model, args, kwargs = request.getfixturevalue(which)
    total = sum(np.asarray(fit.memories(name).hess).sum(0) for name in fit.observed_names)
    prior = prior_hessian_mean(model, args, kwargs, fit.adapter, fit.posterior.mean[None])
    s = np.asarray(fit.posterior.precision)
    err = np.max(np.abs(total + prior - s)) / np.max(np.abs(s))
    print(f"\n[{which}, laplace] max |ΣH_i + ∇²R − S| / max|S| = {err:.2e}")
    assert err < 1e-10


@pytest.mark.parametrize("which", ["two_sites_fit", "nonlinear_fit"])
@pytest.mark.parametrize("method,diagonal", [("mc", False), ("mc", True), ("delta", False), ("delta", True)])
def test_variational_memories_add_up_to_precision(which, method, diagonal, request):
    """Any Gaussian q (not only an optimum): Σ_sites Σ_i E_q[∇²ℓ_i] + E_q[∇²R] = E_q[∇²U], same draws."""
    fit, model, args, kwargs = request.getfixturevalue(which)
    q = from_precision(fit.posterior.mean + 0.05, 0.7 * fit.posterior.precision)  # deliberately off-optimum
    est = consistent_precision(fit.adapter, q, num_samples=64, rng_key=KEY, method=method, diagonal=diagonal)
    total = sum_of_memories(fit, q, method, diagonal)
    thetas = draws(q, 64, KEY) if method == "mc" else q.mean[None]
    prior = prior_hessian_mean(model, args, kwargs, fit.adapter, thetas)
    if diagonal:
        prior = np.diag(np.diag(prior))
        assert np.all(np.asarray(est.precision)[~np.eye(q.dim, dtype=bool)] == 0)
        assert np.all(total[~np.eye(q.dim, dtype=bool)] == 0)
    s = np.asarray(est.precision)
    err = np.max(np.abs(total + prior - s)) / np.max(np.abs(s))
    print(f"\n[{which}, {method}, diagonal={diagonal}] max |ΣH_i + E∇²R − S| / max|S| = {err:.2e}")
    assert err < 1e-10


def test_factored_path_is_used_for_linear_predictors(two_sites_fit, nonlinear_fit):
    fit, *_ = two_sites_fit
    q = fit.posterior
    assert variational_memories(fit.adapter, q, "y", num_samples=8).factored
    assert variational_memories(fit.adapter, q, "counts", num_samples=8).factored
    fit2, *_ = nonlinear_fit
    assert not variational_memories(fit2.adapter, fit2.posterior, "y", num_samples=8).factored


# ------------------------------------------------------------------ memories against independent truths
@pytest.mark.parametrize("which,name", [
    pytest.param("two_sites_fit", "counts", marks=pytest.mark.slow),  # > 20 s
    ("nonlinear_fit", "y"),
])
def test_mc_memories_equal_per_draw_average(which, name, request):
    """The streamed MC memories equal a plain Python average of jax.hessian/jax.grad over the same draws."""
    fit, *_ = request.getfixturevalue(which)
    q = from_precision(fit.posterior.mean, 0.5 * fit.posterior.precision)
    mem = variational_memories(fit.adapter, q, name, num_samples=8, rng_key=KEY)
    thetas = draws(q, 8, KEY)
    n = fit.adapter.observed[name].num_obs
    idx = [0, 7, n - 1]
    for i in idx:
        def nll(t, i=i):
            return -fit.adapter.log_lik(t, name)[i]

        g = np.mean([np.asarray(jax.grad(nll)(t)) for t in thetas], 0)
        h = np.mean([np.asarray(jax.hessian(nll)(t)) for t in thetas], 0)
        np.testing.assert_allclose(np.asarray(mem.grad[i]), g, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(np.asarray(mem.hess_at(i)), h, rtol=1e-10, atol=1e-12)


def test_linear_gaussian_mc_memories_are_exact():
    """ℓ_i quadratic: E_q[∇ℓ_i] = ∇ℓ_i(m) (antithetic draws cancel exactly), E_q[∇²ℓ_i] = x_i x_iᵀ/σ²."""
    rng, X = _data(n=20, p=3, seed=3)
    y = jnp.asarray(X @ np.array([1.0, -0.5, 0.3]) + SIGMA * rng.normal(size=20))
    fit = mpe.Laplace(linear, progress=False).run(KEY, X, y=y)
    q = from_precision(fit.posterior.mean + 0.1, 2.0 * fit.posterior.precision)
    mem = variational_memories(fit.adapter, q, "y", num_samples=32, rng_key=KEY)
    g, h = nll_grad_hess(X, y, q.mean, SIGMA)
    np.testing.assert_allclose(np.asarray(mem.grad), g, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(mem.hess), h, rtol=1e-10, atol=1e-12)


def test_logistic_mc_memories_match_quadrature():
    """E_q[∇ℓ_i] = x_i E[σ(η) − y_i] and E_q[∇²ℓ_i] = x_i x_iᵀ E[σ'(η)], η ~ N(x_iᵀm, x_iᵀΣx_i), by
    Gauss–Hermite in numpy; Monte Carlo with 4096 antithetic draws agrees to its sampling error."""
    rng, X = _data(n=30, p=2, seed=4)
    y = jnp.asarray((rng.uniform(size=30) < 0.5).astype(float))
    fit = mpe.Laplace(logistic, progress=False).run(KEY, X, y=y)
    q = from_precision(fit.posterior.mean, 0.25 * fit.posterior.precision)  # a wide q: E_q ≠ value at m
    mem = variational_memories(fit.adapter, q, "y", num_samples=4096, rng_key=KEY)
    Xn, yn = np.asarray(X), np.asarray(y)
    cov = np.asarray(q.covariance())
    mu, sd = Xn @ np.asarray(q.mean), np.sqrt(np.einsum("np,pq,nq->n", Xn, cov, Xn))
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    eta = mu[:, None] + sd[:, None] * nodes[None]
    sig = 1 / (1 + np.exp(-eta))
    e_true = (sig * weights).sum(1) - yn
    lam_true = (sig * (1 - sig) * weights).sum(1)
    g_true = Xn * e_true[:, None]
    h_true = Xn[:, :, None] * Xn[:, None, :] * lam_true[:, None, None]
    g_err = np.max(np.abs(np.asarray(mem.grad) - g_true))
    scale = np.max(np.abs(h_true), axis=(1, 2))[:, None, None]
    h_err = np.max(np.abs(np.asarray(mem.hess) - h_true) / scale)
    # the delta method at m is far off for this wide q, so the check has teeth
    delta = variational_memories(fit.adapter, q, "y", method="delta")
    d_err = np.max(np.abs(np.asarray(delta.hess) - h_true) / scale)
    print(f"\n[logistic] MC vs quadrature: max |Δĝ| = {g_err:.2e}, max rel |ΔĤ| = {h_err:.2e} "
          f"(delta method: {d_err:.2e})")
    assert g_err < 1e-2
    assert h_err < 2e-2
    assert d_err > 5 * h_err


def test_bad_method_and_samples():
    rng, X = _data(n=5, p=1)
    fit = mpe.Laplace(linear, progress=False).run(KEY, X, y=jnp.ones(5))
    with pytest.raises(MPEError, match="method"):
        variational_memories(fit.adapter, fit.posterior, "y", method="laplace")
    with pytest.raises(MPEError, match="num_samples"):
        consistent_precision(fit.adapter, fit.posterior, num_samples=0)
