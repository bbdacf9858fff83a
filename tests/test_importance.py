"""MPE importance sampling (DESIGN §2, issue 5 item 1) against independent truths.

* Gaussian linear model with known noise: the MPE leave-one-out Gaussian is the exact LOO posterior, so the
  importance weights are constant and the estimate is plain Monte Carlo of the closed form, whose Monte Carlo
  variance is known in closed form too.
* Real data where PSIS-LOO fails (stackloss, observation 21 = flat index 20, Normal with unknown scale): the
  exact Bayesian LOO by a brute-force NUTS refit without the observation, checked against a semi-analytic
  value (β and α integrated out in closed form, one-dimensional quadrature over σ), then PSIS-LOO, plain MPE
  and MPE-IS side by side.  Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import warnings

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from linear_gaussian import closed_form, linear_gaussian_model, simulate
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from scipy.special import logsumexp
from scipy.stats import halfnorm, norm

import numpyro_mpe as mpe
from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS, load_stackloss, stackloss_model
from numpyro_mpe.loo.arviz_compat import container as _container
from numpyro_mpe.loo.arviz_compat import pointwise_elpd

pytestmark = pytest.mark.arviz  # az.loo, ELPDData

numpyro.enable_x64()
KEY = jax.random.PRNGKey(0)

# ===================================================================== Gaussian linear model, known noise
SIGMA, TAU = 0.7, 2.0
linear_model = linear_gaussian_model(SIGMA, TAU)


@pytest.fixture(scope="module")
def linear():
    X, y, _ = simulate(3, 30, [1.0, -0.5, 0.3], SIGMA, scale_first=4.0, df=4)  # row 0: high leverage
    fit = mpe.Laplace(linear_model, progress=False, gtol=1e-12).run(KEY, X, y=y)
    cf = closed_form(X, y, SIGMA, TAU)
    mu, v = cf["loo_mean"], cf["loo_var"]  # η_i under the exact LOO posterior: N(mu, v)
    # p = N(y_i; η, σ²) with η ~ N(mu, v): E p = N(y_i; mu, σ² + v) and
    # E p² = (2πσ²)⁻¹ √(σ²/(σ² + 2v)) exp(−(y_i − mu)²/(σ² + 2v)).
    log_e1 = cf["elpd_loo"]
    log_e2 = (-np.log(2 * np.pi * SIGMA**2) + 0.5 * np.log(SIGMA**2 / (SIGMA**2 + 2 * v))
              - (y - mu) ** 2 / (SIGMA**2 + 2 * v))
    return fit, {"elpd": log_e1, "relvar": np.expm1(log_e2 - 2 * log_e1)}  # relvar: Var p / (E p)²


def test_gaussian_weights_constant_and_closed_form(linear):
    fit, t = linear
    num = 2000
    ds = mpe.importance_loo(fit, None, num_samples=num)
    # the proposal is the exact LOO posterior: log-weights −U₋i − log q₋i are constant, nothing to smooth
    np.testing.assert_allclose(ds.ess.values, num, rtol=1e-9)
    assert np.all(np.isneginf(ds.pareto_k.values))
    # so the estimate is log of a plain Monte Carlo mean of p(y_i | θ_s), θ_s ~ exact LOO posterior: its sd
    # is √(Var p / (E p)² / S) to first order.  Bound: 5 such sds for each of the 30 observations.
    sd = np.sqrt(t["relvar"] / num)
    z = np.abs(ds.elpd_loo.values - t["elpd"]) / sd
    print(f"\n[MPE-IS, linear-Gaussian] ess = {ds.ess.values.min():.1f} of {num}, k-hat = "
          f"{ds.pareto_k.values.max()}, max |Δ elpd| = {np.abs(ds.elpd_loo.values - t['elpd']).max():.2e}, "
          f"max |Δ|/sd = {z.max():.2f} (bound 5)")
    assert z.max() < 5.0
    # the estimator's own standard error agrees with the closed-form one
    np.testing.assert_allclose(ds.elpd_loo_mcse.values, sd, rtol=0.25)
    # a Student-t proposal around the same Gaussian: weights no longer constant, but bounded and consistent
    dt = mpe.importance_loo(fit, [0, 1, 2], num_samples=4000, df=10)
    assert dt.pareto_k.values.max() < 0.5 and dt.ess.values.min() > 1000
    assert np.all(np.abs(dt.elpd_loo.values - t["elpd"][:3]) < 5 * dt.elpd_loo_mcse.values)


def test_loo_mpe_is_elpd_data(linear):
    fit, t = linear
    base = fit.loo(method="mpe")
    res = fit.loo(method="mpe-is")
    lev = fit.sensitivities().leverage.values
    flagged = np.flatnonzero(lev > 0.5)
    assert flagged.tolist() == [0]  # the scaled-up row
    k = np.asarray(res["pareto_k"])
    assert np.isneginf(k[0]) and np.allclose(k[1:], lev[1:])  # MPE-IS k-hat where flagged, leverage elsewhere
    loo_i, base_i = np.asarray(pointwise_elpd(res)), np.asarray(pointwise_elpd(base))
    np.testing.assert_array_equal(loo_i[1:], base_i[1:])
    assert abs(loo_i[0] - t["elpd"][0]) < 5 * np.sqrt(t["relvar"][0] / 2000)
    assert not bool(res["warning"])


def test_mpe_is_warns_on_high_khat(linear, monkeypatch):
    fit, _ = linear
    import numpyro_mpe.loo.importance as imp

    def fake(fit, indices, **kw):
        idx = np.asarray(indices)
        return xr.Dataset({"elpd_loo": ("obs", np.full(idx.size, -1.0)),
                           "pareto_k": ("obs", np.full(idx.size, 0.9))}, coords={"obs": idx})

    monkeypatch.setattr(imp, "importance_loo", fake)
    with pytest.warns(UserWarning, match=r"still have Pareto k-hat > 0.7 \(flat indices \[0\]"):
        res = fit.loo(method="mpe-is")
    assert bool(res["warning"]) and float(np.asarray(res["pareto_k"])[0]) == 0.9


def test_bad_input(linear):
    fit, _ = linear
    with pytest.raises(IndexError, match=r"out of range for the 30 observations of 'y'.*\[0, 30\)"):
        mpe.importance_loo(fit, [2, 30])
    with pytest.raises(IndexError, match=r"\[0, 30\)"):
        mpe.importance_loo(fit, -31)
    with pytest.raises(ValueError, match="'flagged'"):
        mpe.importance_loo(fit, "worst")
    with pytest.raises(ValueError, match="integers"):
        mpe.importance_loo(fit, [1.5])
    with pytest.raises(IndexError, match="one entry per observation"):
        mpe.importance_loo(fit, np.ones(5, bool))
    with pytest.raises(ValueError, match="num_samples"):
        mpe.importance_loo(fit, [0], num_samples=1)
    with pytest.raises(ValueError, match="psis has 3 Pareto k values"):
        mpe.importance_loo(fit, "flagged", psis=np.zeros(3))
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'mpe', 'mpe-is'\).*got 'psis'"):
        fit.loo(method="psis")
    with pytest.raises(ValueError, match="with groups= use method='mpe'"):
        fit.loo(method="mpe-is", groups=np.arange(30) % 3)
    # indices accepted: int, negative, mask, "flagged" with a PSIS result
    assert mpe.importance_loo(fit, -1, num_samples=50).obs.values.tolist() == [29]
    mask = np.zeros(30, bool)
    mask[[4, 7]] = True
    assert mpe.importance_loo(fit, mask, num_samples=50).obs.values.tolist() == [4, 7]
    khat = np.zeros(30)
    khat[12] = 0.8
    assert mpe.importance_loo(fit, "flagged", num_samples=50, psis=khat).obs.values.tolist() == [0, 12]
    assert mpe.importance_loo(fit, [], num_samples=50).sizes["obs"] == 0


# ===================================================================== stackloss: PSIS-LOO fails
OBS = 20  # observation 21, the classic influential point


def stackloss_exact_quadrature(i: int) -> float:
    """log p(y_i | y₋i) for ``stackloss_model``: α, β integrated in closed form given σ, σ by quadrature."""
    df = load_stackloss()
    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df["stack.loss"].to_numpy(float)
    A = np.c_[np.ones(len(y)), (X - X.mean(0)) / X.std(0)]  # standardized with all rows, as in the model
    mu0, S0 = np.array([20.0, 0, 0, 0]), np.diag([400.0, 100, 100, 100])

    def log_evidence(rows):
        a, yr = A[rows], y[rows]
        d, V = np.linalg.eigh(a @ S0 @ a.T)
        r2 = (V.T @ (yr - a @ mu0)) ** 2
        s = np.linspace(0, 80, 40001)[1:]  # σ grid; the integrand vanishes at both ends
        var = np.maximum(d, 0)[None] + s[:, None] ** 2
        ll = -0.5 * np.sum(r2 / var + np.log(2 * np.pi * var), 1) + halfnorm.logpdf(s, scale=10)
        return logsumexp(ll) + np.log(s[1] - s[0])

    rows = np.arange(len(y))
    return float(log_evidence(rows) - log_evidence(rows[rows != i]))


def _stackloss_loglik(samples, Z, y):
    return norm.logpdf(y, np.asarray(samples["alpha"])[:, None] + np.asarray(samples["beta"]) @ Z.T,
                       np.asarray(samples["sigma"])[:, None])


@pytest.mark.slow  # NUTS
def test_stackloss_mpe_is_beats_psis_and_mpe():
    df = load_stackloss()
    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df["stack.loss"].to_numpy(float)
    Z = (X - X.mean(0)) / X.std(0)
    chains = 4

    def sampler(model, draws):
        return MCMC(NUTS(model), num_warmup=500, num_samples=draws, num_chains=chains,
                    chain_method="vectorized", progress_bar=False)

    def nuts(mc, seed, args):
        mc.run(jax.random.PRNGKey(seed), *args)
        return mc.get_samples()

    # --- exact Bayesian LOO: brute-force NUTS refit without observation 20 (the same standardized Z)
    def z_model(Z, y=None):
        alpha = numpyro.sample("alpha", dist.Normal(20.0, 20.0))
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([Z.shape[1]]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
        with numpyro.plate("obs", Z.shape[0]):
            numpyro.sample("y", dist.Normal(alpha + Z @ beta, sigma), obs=y)

    keep = np.arange(len(y)) != OBS
    draws_exact = 3000
    s = nuts(sampler(z_model, draws_exact), 100, (Z[keep], y[keep]))
    ll_ex = _stackloss_loglik(s, Z[OBS : OBS + 1], y[OBS : OBS + 1])[:, 0]
    exact = float(logsumexp(ll_ex) - np.log(ll_ex.size))
    p = np.exp(ll_ex - ll_ex.max()).reshape(chains, draws_exact)
    ess = float(effective_sample_size(p))
    mcse_exact = float(np.std(p) / np.mean(p) / np.sqrt(ess))
    quad = stackloss_exact_quadrature(OBS)
    assert abs(exact - quad) < 4 * mcse_exact + 1e-3  # the NUTS refit agrees with the semi-analytic value
    # Errors below are measured against the semi-analytic value (exact to 1e-6), which the refit confirms:
    # the refit's own Monte Carlo error (~0.03) is of the size of the differences being ranked.

    # --- PSIS-LOO from full-data NUTS.  Its k-hat and error vary from run to run: 4 chains x 2500 draws gave
    # k-hat 0.65-1.04 over 12 runs (both arviz lines), 4 x 5000 draws 0.73-0.90 over 8; so three independent
    # runs of 4 x 5000 draws, and the median k-hat and error.
    draws_psis = 5000
    psis_k, psis_elpd = [], []
    mc = sampler(stackloss_model, draws_psis)  # compiled once, run three times
    for seed in range(3):
        s = nuts(mc, seed, (X, y))
        ll = _stackloss_loglik(s, Z, y).reshape(chains, draws_psis, len(y))
        data = _container({
            "posterior": xr.Dataset({"alpha": (("chain", "draw"), np.reshape(s["alpha"], (chains, -1)))}),
            "log_likelihood": xr.Dataset({"y": (("chain", "draw", "obs"), ll)}),
        })
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lo = az.loo(data, pointwise=True, var_name="y")
        psis_k.append(float(np.asarray(lo["pareto_k"])[OBS]))
        psis_elpd.append(float(np.asarray(pointwise_elpd(lo))[OBS]))
    psis_err = np.abs(np.asarray(psis_elpd) - quad)

    # --- MPE and MPE-IS from one Laplace fit
    fit = mpe.Laplace(stackloss_model, progress=False).run(KEY, X, y=y)
    sens = fit.sensitivities()
    is_t = mpe.importance_loo(fit, [OBS], num_samples=50000, df=10)  # Student-t proposal around q₋i
    is_g = mpe.importance_loo(fit, [OBS], num_samples=50000)  # the Gaussian q₋i itself
    table = {  # name: (k-hat, elpd_i, |elpd_i - exact|)
        "PSIS (3 NUTS runs)": (np.round(psis_k, 2).tolist(), np.round(psis_elpd, 3).tolist(),
                               float(np.median(psis_err))),
        "MPE": (f"leverage {float(sens.leverage[OBS]):.2f}", float(sens.elpd_loo[OBS]), None),
        "MPE-IS (t, df=10)": (float(is_t.pareto_k[0]), float(is_t.elpd_loo[0]), None),
        "MPE-IS (Gaussian)": (float(is_g.pareto_k[0]), float(is_g.elpd_loo[0]), None),
    }
    table = {k: (kh, e, abs(e - quad) if d is None else d) for k, (kh, e, d) in table.items()}
    print(f"\n[stackloss obs 21] exact Bayesian LOO (NUTS refit without it, {chains}x{draws_exact} draws, "
          f"ESS {ess:.0f}) = {exact:.3f} ± {mcse_exact:.3f}; semi-analytic {quad:.4f}")
    print(f"  {'method':<20}{'k-hat':<22}{'elpd_i':<26}|elpd_i - exact| (semi-analytic; NUTS refit)")
    for name, (kh, e, d) in table.items():
        kh = f"{kh:.2f}" if isinstance(kh, float) else str(kh)
        e = f"{e:.3f}" if isinstance(e, float) else str(e)
        psis = name.startswith("PSIS")
        d_nuts = float(np.median(np.abs(np.asarray(psis_elpd) - exact))) if psis else abs(float(e) - exact)
        print(f"  {name:<20}{kh:<22}{e:<26}{d:.3f}; {d_nuts:.3f}" + ("  (medians)" if psis else ""))
    print(f"  MPE-IS mcse {float(is_t.elpd_loo_mcse[0]):.3f} (t) / {float(is_g.elpd_loo_mcse[0]):.3f} "
          "(Gaussian)")
    err_is = table["MPE-IS (t, df=10)"][2]
    assert np.median(psis_k) > 0.7  # PSIS-LOO fails its own diagnostic
    # The Gaussian proposal is printed, not asserted: this posterior (n = 21, unknown σ) has Student-t tails,
    # and over 10 seeds its k-hat was 0.46-0.69 and its error 0.14 rms at 20000 draws; the t proposal's
    # k-hat 0.14-0.24 and error 0.03 rms (max 0.05) at 20000 draws.
    assert float(is_t.pareto_k[0]) < 0.7
    assert err_is < float(np.median(psis_err)) and err_is < table["MPE"][2]
    assert err_is < 4 * float(is_t.elpd_loo_mcse[0])
