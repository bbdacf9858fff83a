"""MPE leave-one-out against PSIS-LOO: logistic regression by Laplace and by NUTS.

Independent truths: ``az.loo`` called here on the same posterior, log-mean-exp of its log-likelihood computed
with numpy, and the NUTS posterior itself (the MPE pointwise elpd must track PSIS-LOO on NUTS draws).
"""

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from numpyro.infer import MCMC, NUTS
from scipy.special import logsumexp
from scipy.stats import spearmanr

import numpyro_mpe as mpe
from numpyro_mpe.loo.arviz_compat import ARVIZ_1, pointwise_elpd
from numpyro_mpe.loo.arviz_compat import container as _container

numpyro.enable_x64()

pytestmark = pytest.mark.arviz

N, P = 200, 5
SUMMARY_KEYS = {
    "var_name", "n_obs", "n_compared", "elpd_loo_mpe", "se_elpd_loo_mpe", "elpd_loo_psis", "se_elpd_loo_psis",
    "elpd_diff", "se_elpd_diff", "p_loo_mpe", "p_loo_psis", "corr_elpd_pearson", "corr_elpd_spearman",
    "corr_k_pearson", "corr_k_spearman", "k_threshold", "n_high_leverage", "n_high_khat", "n_invalid",
    "n_draws", "posterior_from_q", "posterior_source", "method",
}
COLUMNS = ["elpd_loo_mpe", "elpd_loo_psis", "p_loo_mpe", "p_loo_psis", "pareto_k", "leverage", "sensitivity"]


def logistic(X, y=None):
    a = numpyro.sample("a", dist.Normal(0, 2.5))
    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ b), obs=y)


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, P))
    X[:3] *= 3.0  # a few high-leverage rows
    logits = 0.3 + X @ np.array([1.0, -1.0, 0.5, 0.0, 1.5])
    y = (rng.uniform(size=N) < 1 / (1 + np.exp(-logits))).astype(float)
    fit = mpe.Laplace(logistic, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    mcmc = MCMC(NUTS(logistic), num_warmup=500, num_samples=1000, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), X, y=y)
    idata = az.from_numpyro(mcmc, log_likelihood=True)
    return fit, idata, mpe.compare_psis(fit, idata)


@pytest.mark.slow  # NUTS (the problem fixture)
def test_columns_are_the_pointwise_values(problem):
    fit, idata, df = problem
    assert len(df) == N and list(df.columns[:1]) == ["data"]
    assert set(COLUMNS) <= set(df.columns)
    np.testing.assert_array_equal(df["data"].values, np.arange(N))
    ds = fit.sensitivities()
    for col, var in (("elpd_loo_mpe", "elpd_loo"), ("p_loo_mpe", "p_loo"), ("leverage", "leverage"),
                     ("sensitivity", "sensitivity")):
        np.testing.assert_array_equal(df[col].values, ds[var].values)
    psis = az.loo(idata, pointwise=True, var_name="y")
    np.testing.assert_allclose(df["elpd_loo_psis"].values, pointwise_elpd(psis).values, rtol=1e-12)
    np.testing.assert_allclose(df["pareto_k"].values, psis["pareto_k"].values, rtol=1e-12)
    ll = idata["log_likelihood"]["y"].values.reshape(-1, N)  # (chain*draw, N)
    lpd = logsumexp(ll, axis=0) - np.log(ll.shape[0])
    np.testing.assert_allclose(df["p_loo_psis"].values, lpd - pointwise_elpd(psis).values, rtol=1e-10)
    p_total = psis["p"] if ARVIZ_1 else psis["p_loo"]
    np.testing.assert_allclose(df["p_loo_psis"].sum(), p_total, rtol=1e-8)


@pytest.mark.slow  # NUTS
def test_mpe_tracks_psis_on_nuts(problem):
    _, _, df = problem
    good = df["pareto_k"].values < 0.7
    assert good.sum() >= 0.9 * N
    r = np.corrcoef(df["elpd_loo_mpe"].values[good], df["elpd_loo_psis"].values[good])[0, 1]
    assert r >= 0.95, r
    # and the totals agree within their Monte Carlo / approximation error
    s = df.attrs["summary"]
    assert abs(s["elpd_diff"]) < 1.0 + 2 * s["se_elpd_diff"]


@pytest.mark.slow  # NUTS (the problem fixture)
def test_summary(problem):
    _, idata, df = problem
    s = df.attrs["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert s["n_obs"] == N and s["n_compared"] == N and s["n_invalid"] == 0
    assert s["n_draws"] == 1000 and s["posterior_from_q"] is False
    assert "user-supplied" in s["posterior_source"] and df.attrs["posterior_source"] == s["posterior_source"]
    np.testing.assert_allclose(s["elpd_loo_mpe"], df["elpd_loo_mpe"].sum(), rtol=1e-12)
    np.testing.assert_allclose(s["elpd_loo_psis"], df["elpd_loo_psis"].sum(), rtol=1e-12)
    np.testing.assert_allclose(s["elpd_diff"], s["elpd_loo_mpe"] - s["elpd_loo_psis"], rtol=1e-10, atol=1e-10)
    ddof = 1 if ARVIZ_1 else 0
    d = df["elpd_loo_mpe"].values - df["elpd_loo_psis"].values
    np.testing.assert_allclose(s["se_elpd_diff"], np.sqrt(N * np.var(d, ddof=ddof)), rtol=1e-10)
    psis = az.loo(idata, pointwise=True)
    np.testing.assert_allclose(s["elpd_loo_psis"], psis["elpd"] if ARVIZ_1 else psis["elpd_loo"], rtol=1e-10)
    np.testing.assert_allclose(s["se_elpd_loo_psis"], psis["se"], rtol=1e-10)
    np.testing.assert_allclose(s["corr_elpd_pearson"],
                               np.corrcoef(df["elpd_loo_mpe"], df["elpd_loo_psis"])[0, 1], rtol=1e-10)
    np.testing.assert_allclose(s["corr_k_spearman"], spearmanr(df["leverage"], df["pareto_k"])[0], rtol=1e-10)
    assert s["n_high_leverage"] == int((df["leverage"] > 0.7).sum())
    assert s["n_high_khat"] == int((df["pareto_k"] > 0.7).sum())
    text = str(s)
    assert text == mpe.format_summary(df) == mpe.format_summary(s)
    assert f"{s['elpd_loo_mpe']:.2f}" in text and f"{s['elpd_loo_psis']:.2f}" in text
    assert "user-supplied" in text


@pytest.mark.slow  # NUTS (the problem fixture)
def test_without_idata_psis_runs_on_draws_from_q(problem):
    fit, _, ref = problem
    df = mpe.compare_psis(fit, num_samples=1000, rng_key=jax.random.PRNGKey(5))
    s = df.attrs["summary"]
    assert s["posterior_from_q"] is True and s["n_draws"] == 1000
    assert "draws from q" in df.attrs["posterior_source"] and "draws from q" in str(s)
    np.testing.assert_array_equal(df["elpd_loo_mpe"].values, ref["elpd_loo_mpe"].values)
    # PSIS on q estimates the LOO of q itself, which the MPE computes in closed form.
    good = df["pareto_k"].values < 0.7
    assert np.corrcoef(df["elpd_loo_mpe"][good], df["elpd_loo_psis"][good])[0, 1] > 0.99


# ------------------------------------------------------------------ nested plates, wrong posterior
G, M = 3, 4


def nested(Y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    with numpyro.plate("group", G, dim=-2):
        th = numpyro.sample("theta", dist.Normal(mu, 1.0))
        with numpyro.plate("member", M, dim=-1):
            numpyro.sample("Y", dist.Normal(th, 1.0), obs=Y)


@pytest.fixture(scope="module")
def nested_fit():
    Y = np.random.default_rng(2).normal(size=(G, M)) + np.arange(G)[:, None]
    return mpe.Laplace(nested, progress=False).run(jax.random.PRNGKey(0), Y=Y)


def test_observation_coordinates_are_columns(nested_fit):
    df = mpe.compare_psis(nested_fit, num_samples=300)
    assert list(df.columns[:2]) == ["group", "member"] and len(df) == G * M
    ds = nested_fit.sensitivities()
    for _, row in df.iterrows():
        cell = ds.sel(group=int(row["group"]), member=int(row["member"]))
        assert row["elpd_loo_mpe"] == float(cell["elpd_loo"])
        assert row["leverage"] == float(cell["leverage"])


def test_posterior_of_other_observations_is_refused(nested_fit):
    rng = np.random.default_rng(0)
    ll = xr.Dataset({"Y": (("chain", "draw", "obs"), rng.normal(size=(1, 100, 7)))})
    post = xr.Dataset({"mu": (("chain", "draw"), rng.normal(size=(1, 100)))})
    other = _container({"posterior": post, "log_likelihood": ll})
    with pytest.raises(ValueError, match="observation dims"):
        mpe.compare_psis(nested_fit, other)
