"""``fit.loo()`` (method="auto") against exact Bayesian leave-one-out from NUTS refits.

The truth is in ``tests/data/loo_truth/`` (``benchmarks/ground_truth.py``: NUTS refits without each
observation, and PSIS-LOO on the full NUTS fit).  Acceptance of issue #14, per data set: the total within
max(0.5 nats, |PSIS − exact|) of exact; every observation more than 0.5 nats off flagged; no unflagged
importance-sampling value with k̂ > 0.7; the global k̂ above 0.7 where Laplace is poor (hierarchical
models) and below it where it is good.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mpe as mpe
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import base_draws, from_precision
from numpyro_mpe.loo.arviz_compat import ARVIZ_1
from numpyro_mpe.loo.auto import auto_loo

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import loo_suite  # noqa: E402

pytestmark = pytest.mark.arviz  # ELPDData of the installed ArviZ

#: Laplace is good on these (global k̂ < 0.7) and poor on these (> 0.7).
GOOD, POOR = ("stackloss", "breast_cancer", "cpunish"), ("hier30",)


def field(res, *names):
    """A field of the installed ArviZ's ELPD object: a pandas Series entry (0.x) or an attribute (>= 1)."""
    for name in names:
        if ARVIZ_1 and hasattr(res, name):
            return getattr(res, name)
        if not ARVIZ_1 and name in res.index:
            return res[name]
    raise KeyError(names)


def truth(name):
    return json.loads((ROOT / "tests" / "data" / "loo_truth" / f"{name}.json").read_text())


def fitted(name):
    p = loo_suite.problem(name)
    return mpe.Laplace(p.model, progress=False).run(jax.random.PRNGKey(0), *p.args, **p.kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("name", GOOD + POOR)
def test_default_loo_is_as_close_to_exact_as_psis_on_nuts(name):
    t = truth(name)
    exact, psis = np.asarray(t["exact_elpd_i"]), np.asarray(t["psis_elpd_i"])
    fit = fitted(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the global check warns on the hierarchical model: that is the point
        res = fit.loo()
    elpd_i = np.asarray(field(res, "loo_i", "elpd_i")).ravel()
    total = float(field(res, "elpd_loo", "elpd"))
    flagged = np.asarray(field(res, "flagged_i")).ravel()
    khat = np.asarray(field(res, "pareto_k")).ravel()
    global_k = float(field(res, "global_k"))
    tol = max(0.5, abs(psis.sum() - exact.sum()))
    assert abs(total - exact.sum()) <= tol, (name, total, exact.sum())
    far = np.abs(elpd_i - exact) > 0.5
    assert not (far & ~flagged).any(), (name, np.flatnonzero(far & ~flagged))
    assert not ((khat > 0.7) & ~flagged).any()
    assert (global_k > 0.7) == (name in POOR), (name, global_k)
    # the closed form alone is worse than the default on every one of them
    assert abs(total - exact.sum()) < abs(float(fit.sensitivities().elpd_loo.sum()) - exact.sum())


def line_model(x, y=None):
    b = numpyro.sample("b", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    with numpyro.plate("d", len(x)):
        numpyro.sample("y", dist.Normal(b[0] + b[1] * x, 0.5), obs=y)


@pytest.fixture(scope="module")
def line_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=30)
    y = 1.0 + 0.5 * x + 0.5 * rng.normal(size=30)
    return mpe.Laplace(line_model, progress=False).run(jax.random.PRNGKey(0), x, y=y)


def test_gaussian_model_auto_matches_the_exact_closed_form(line_fit):
    # q is the posterior: the Gaussian k̂ is -inf (constant ratios) and the reweighted draws reproduce the
    # closed form (exact here) within their Monte Carlo error
    ds = auto_loo(line_fit)
    closed = line_fit.sensitivities().elpd_loo.values
    assert ds.attrs["global_k_gaussian"] == -np.inf and ds.attrs["global_k"] < 0.7
    assert not ds.flagged.any()
    err = ds.elpd_loo.values - closed
    assert np.all(np.abs(err) <= 4 * ds.elpd_loo_mcse.values + 1e-3)
    assert abs(err.sum()) < 0.1
    assert "global k̂" in repr(line_fit)


def test_nuts_refit_matches_the_exact_closed_form(line_fit):
    from numpyro_mpe.loo.nuts_refit import nuts_loo

    res = nuts_loo(line_fit, [0, 7], num_warmup=300, num_samples=1000)
    closed = line_fit.sensitivities().elpd_loo.values[[0, 7]]
    assert np.all(np.abs(res.elpd_loo.values - closed) < 4 * res.elpd_loo_mcse.values + 0.01)
    assert np.all(res.r_hat.values < 1.05)


def test_repair_refit_records_the_refit_observations():
    t = truth("cpunish")
    fit = fitted("cpunish")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = auto_loo(fit, obs_samples=50, num_samples=400, repair="refit", refit_count=2)
    # few draws leave observations flagged; the two worst were refit by NUTS and agree with the truth within
    # the refits' Monte Carlo error (a fixed 0.3 failed on one JAX version's draws: 0.35 off, with MCSE 0.30)
    refit = np.asarray(ds.attrs["refit"])
    assert refit.size == 2
    assert set(ds.method.values[refit]) == {"nuts-refit"}
    exact = np.asarray(t["exact_elpd_i"])[refit]
    err = np.abs(ds.elpd_loo.values[refit] - exact)
    assert np.all(err < 4 * ds.elpd_loo_mcse.values[refit] + 0.05)


def test_bad_options(line_fit):
    with pytest.raises(mpe.MPEError, match="refit_count must be a positive integer"):
        line_fit.loo(repair="refit", refit_count=0)
    with pytest.raises(mpe.MPEError, match=r"repair must be one of \(None, 'refit'\)"):
        line_fit.loo(repair="nuts")
    with pytest.raises(ValueError, match=r"method must be one of \('auto', 'mpe', 'mpe-is'\)"):
        line_fit.loo(method="psis")
    with pytest.raises(ValueError, match="repair='refit' needs method='auto'"):
        line_fit.loo(method="mpe", repair="refit")


def test_repair_refit_on_a_model_nuts_cannot_run():
    def rooted(x, y=None):  # sqrt(b): no value (NaN) below 0
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        numpyro.factor("root", 1e-3 * jax.numpy.sqrt(b))
        with numpyro.plate("d", len(x)):
            numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)

    x = np.linspace(-1, 1, 20)
    good = mpe.Laplace(rooted, progress=False).run(jax.random.PRNGKey(0), x, y=x)
    # the same model and data with a Gaussian at b = -1, where the log density is NaN
    bad = Fit(good.adapter, from_precision(-np.ones(1), np.eye(1)), "laplace")
    with pytest.raises(mpe.MPEError, match="NUTS cannot start.*potential is nan"):
        bad.loo("y", repair="refit")


def test_global_check_warns_where_laplace_is_poor():
    fit = fitted("hier30")  # Laplace puts the group scale far from NUTS's
    with pytest.warns(UserWarning, match="q of this fit is not the posterior") as rec:
        check = fit.posterior_check()
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert not check.reliable and check.khat > 0.7
    assert fit.info["posterior_check"] is check and "q is NOT the posterior" in repr(fit)


@pytest.mark.parametrize("df", [5, 4.5])
def test_base_draws_are_student_t(df):
    """The whitened t draws of the global check and the defensive mixtures: each coordinate is t_df (KS
    test against scipy), the coordinates share one χ² (the radius r²/p is F(p, df)), for an integer and a
    non-integer df."""
    from scipy import stats

    z = np.asarray(base_draws(jax.random.PRNGKey(3), 20000, 3, df))
    for j in range(3):
        assert stats.kstest(z[:, j], stats.t(df).cdf).pvalue > 1e-3, (df, j)
    assert stats.kstest(np.sum(z**2, axis=1) / 3, stats.f(3, df).cdf).pvalue > 1e-3, df
    # a Gaussian coordinate (df = ∞) fails the same test: it can tell the two apart
    assert stats.kstest(np.asarray(base_draws(jax.random.PRNGKey(3), 20000, 1, None))[:, 0],
                        stats.t(df).cdf).pvalue < 1e-3


def test_psis_loo_in_blocks_equals_arviz_loo():
    """``auto._psis_loo`` takes the observations PSIS_BLOCK at a time: over three blocks (the last partial)
    its elpd_i and k̂_i are ``az.loo``'s on the same log-likelihood matrix (shared draws from the posterior:
    zero base log-ratios), and the delta-method MCSE of the total is finite and below the spread of the
    terms."""
    import arviz as az
    import xarray as xr

    from numpyro_mpe.loo.arviz_compat import container, pointwise_elpd
    from numpyro_mpe.loo.auto import PSIS_BLOCK, _psis_loo

    rng = np.random.default_rng(5)
    s, n = 2000, 2 * PSIS_BLOCK + 37
    heavy = rng.random(n) < 0.1  # a tenth of the observations with long-tailed log-likelihoods
    ll = rng.normal(-1.0, 0.3, size=(s, n)) - heavy * rng.gamma(0.7, 3.0, size=(s, n))
    e, mcse, k, total_mcse = _psis_loo(np.zeros(s), ll)
    data = container({
        "posterior": xr.Dataset({"mu": (("chain", "draw"), np.zeros((1, s)))}),
        "log_likelihood": xr.Dataset({"y": (("chain", "draw", "obs"), ll[None])}),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = az.loo(data, pointwise=True, var_name="y", reff=1.0)
    np.testing.assert_allclose(e, np.asarray(pointwise_elpd(ref)), rtol=0, atol=1e-10)
    np.testing.assert_allclose(k, np.asarray(field(ref, "pareto_k")).ravel(), rtol=0, atol=1e-10)
    assert np.all(np.isfinite(mcse[k <= 0.7])) and 0 < total_mcse < np.sqrt(n) * ll.std()
