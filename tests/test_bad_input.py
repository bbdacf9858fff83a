"""Errors that point the right way (issue #14's list): each bad input raises or warns naming the site, the
argument or the option at fault and the remedy; and what is not an error (NaN under a mask) works."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mpe as mpe
from numpyro_mpe.loo.common import weighted_estimate

KEY = jax.random.PRNGKey(0)
RNG = np.random.default_rng(0)
X = RNG.normal(size=40)
Y = X + RNG.normal(size=40)


def laplace(model, *args, **kwargs):
    return mpe.Laplace(model, progress=False).run(KEY, *args, **kwargs)


def line(x, y=None, mask=None):
    b = numpyro.sample("b", dist.Normal(0, 1))
    s = numpyro.sample("s", dist.HalfNormal(1))
    with numpyro.plate("d", len(x)), numpyro.handlers.mask(mask=True if mask is None else mask):
        numpyro.sample("y", dist.Normal(b * x, s), obs=y)


def test_improper_posterior_of_separable_data_is_refused_naming_the_site():
    def flat_logit(x, y=None):  # separable data, flat prior: the likelihood rises forever along b
        b = numpyro.sample("b", dist.ImproperUniform(dist.constraints.real, (), ()))
        with numpyro.plate("d", len(x)):
            numpyro.sample("y", dist.Bernoulli(logits=b * x), obs=y)

    with pytest.raises(mpe.PosteriorError, match=r"improper.*'b'|'b'.*improper"):
        laplace(flat_logit, X, y=(X > 0).astype(float))
    # the same data with a proper prior is fine
    def logit(x, y=None):
        b = numpyro.sample("b", dist.Normal(0, 2.5))
        with numpyro.plate("d", len(x)):
            numpyro.sample("y", dist.Bernoulli(logits=b * x), obs=y)

    fit = laplace(logit, X, y=(X > 0).astype(float))
    assert np.isfinite(float(fit.posterior.mean[0]))


def test_observed_column_vector_is_refused_naming_the_argument():
    with pytest.raises(mpe.ModelError, match=r"'y'.*\(40, 1\)"):
        laplace(line, X, y=Y[:, None])


def test_enumerated_discrete_site_is_told_to_sum_it_out():
    def mixture(y=None):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(2)))
        mu = numpyro.sample("mu", dist.Normal(0, 5).expand([2]).to_event(1))
        with numpyro.plate("d", len(y)):
            z = numpyro.sample("z", dist.Categorical(w), infer={"enumerate": "parallel"})
            numpyro.sample("y", dist.Normal(mu[z], 1), obs=y)

    with pytest.raises(mpe.ModelError, match=r"'z'.*(sum|MixtureSameFamily)") as err:
        laplace(mixture, y=Y)
    assert "enumerat" in str(err.value)


def test_nan_under_a_mask_equals_zero_there():
    y = Y.copy()
    y[[3, 10]] = np.nan
    keep = ~np.isnan(y)
    with_nan = laplace(line, X, y=y, mask=keep)
    zeros = laplace(line, X, y=np.nan_to_num(y), mask=keep)
    np.testing.assert_allclose(with_nan.posterior.mean, zeros.posterior.mean, atol=1e-10)
    a = with_nan.sensitivities().elpd_loo.values
    b = zeros.sensitivities().elpd_loo.values
    np.testing.assert_allclose(a[keep], b[keep], atol=1e-10)
    # and the masked rows are out of the fit: same posterior as the model on the kept rows alone
    kept = laplace(line, X[keep], y=y[keep])
    np.testing.assert_allclose(with_nan.posterior.mean, kept.posterior.mean, atol=1e-8)


def test_nan_without_a_mask_is_told_to_mask():
    y = Y.copy()
    y[3] = np.nan
    with pytest.raises(mpe.ModelError, match=r"'y'.*NaN.*mask"):
        laplace(line, X, y=y)


def test_obs_mask_is_refused_with_the_handlers_mask_alternative():
    def imputed(x, y=None, mask=None):
        b = numpyro.sample("b", dist.Normal(0, 1))
        s = numpyro.sample("s", dist.HalfNormal(1))
        with numpyro.plate("d", len(x)):
            numpyro.sample("y", dist.Normal(b * x, s), obs=y, obs_mask=mask)

    y = Y.copy()
    y[3] = np.nan
    with pytest.raises(mpe.ModelError, match=r"obs_mask.*handlers\.mask"):
        laplace(imputed, X, y=y, mask=~np.isnan(y))


def test_collapsing_centred_hierarchy_suggests_non_centring():
    def centred(g, y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        tau = numpyro.sample("tau", dist.HalfCauchy(5))
        with numpyro.plate("G", 8):
            a = numpyro.sample("a", dist.Normal(mu, tau))
        with numpyro.plate("d", len(g)):
            numpyro.sample("y", dist.Normal(a[g], 10.0), obs=y)

    with pytest.raises(mpe.PosteriorError, match=r"tau") as err:
        laplace(centred, np.arange(40) % 8, y=RNG.normal(size=40))
    assert "LocScaleReparam" in str(err.value) or "non-centr" in str(err.value)


def test_mcse_of_one_effective_draw_is_infinite_not_tiny():
    # one draw carries all the weight: the delta method says 0, the truth is "unknown"
    smoothed = np.full((1, 1000), -np.inf)
    smoothed[0, 0] = 0.0
    ll = RNG.normal(size=(1, 1000))
    _, mcse, ess = weighted_estimate(smoothed, ll)
    assert ess[0] == pytest.approx(1.0) and mcse[0] == np.inf
    # and a k̂ above 0.7 makes any estimate's error unknown
    even = np.full((1, 1000), -np.log(1000))
    assert np.isfinite(weighted_estimate(even, ll)[1][0])
    assert weighted_estimate(even, ll, khat=np.array([0.9]))[1][0] == np.inf


def test_singleton_groups_equal_leave_one_out():
    fit = laplace(line, X, y=Y)
    groups = fit.sensitivities(groups=np.arange(40))
    loo = fit.sensitivities()
    np.testing.assert_allclose(groups.elpd_loo.values, loo.elpd_loo.values, rtol=1e-10)


def test_backend_options_are_checked_before_any_work():
    with pytest.raises(mpe.MPEError, match="Laplace needs a NumPyro model"):
        mpe.Laplace(None)
    with pytest.raises(mpe.MPEError, match="num_samples must be an integer >= 2, got 0"):
        mpe.Laplace(line, num_samples=0)


def test_cli_names_an_unknown_var_name_before_the_fit(capsys, tmp_path):
    from numpyro_mpe.io.cli import main

    root = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"
    code = main(["run", f"{root / 'user_model.py'}:model", "--data", str(root / "user_data.csv"),
                 "--var-name", "rate", "--no-nuts", "--out", str(tmp_path)])
    err = capsys.readouterr()
    assert code != 0
    assert "--var-name 'rate' is not an observed site" in err.err + err.out
    assert "Laplace fit" not in err.out  # refused before fitting
