"""Hyperparameter selection by MPE leave-one-out (tune_prior) against the closed-form exact LOO."""

import jax
import numpy as np
import pytest
from linear_gaussian import elpd_loo_refit, linear_gaussian_model

import numpyro_mpe as mpe
from numpyro_mpe.io.plots import plot_tuning
from numpyro_mpe.loo.tuning import TUNING_COLUMNS

SIGMA = 1.0
SCALES = [0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


model = linear_gaussian_model(SIGMA, 1.0)  # model(X, y=None, prior_scale=1.0)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 8))
    beta = 0.3 * rng.normal(size=8)
    y = X @ beta + SIGMA * rng.normal(size=60)
    Xh = rng.normal(size=(400, 8))
    yh = Xh @ beta + SIGMA * rng.normal(size=400)
    return X[:30], y[:30], Xh, yh


def exact_elpd_loo(X, y, scale):
    """Σ_i log p(y_i | y₋i) of the conjugate Gaussian linear model, in numpy (a refit without each row)."""
    return float(elpd_loo_refit(X, y, SIGMA, scale).sum())


@pytest.fixture(scope="module")
def table(data):
    X, y, Xh, yh = data
    return mpe.tune_prior(model, "prior_scale", SCALES, jax.random.PRNGKey(0), X, y=y,
                          heldout=((Xh,), {"y": yh}), exact_at=[0.1, 1.0], progress=False)


@pytest.mark.slow  # tune_prior with exact_at (the table fixture)
def test_tune_prior_picks_the_exact_loo_optimum(data, table):
    X, y, *_ = data
    exact = np.array([exact_elpd_loo(X, y, s) for s in SCALES])
    assert list(table.columns) == list(TUNING_COLUMNS)
    np.testing.assert_allclose(table["elpd_loo"], exact, atol=1e-6)  # Laplace is exact here
    assert table.attrs["best"] == SCALES[int(np.argmax(exact))]
    assert table["best"].sum() == 1 and table.loc[table["best"], "value"].item() == table.attrs["best"]
    np.testing.assert_allclose(table["loo_nll"], -table["elpd_loo"] / 30)
    assert table.attrs["num_obs"] == 30 and table.attrs["arg_name"] == "prior_scale"


@pytest.mark.slow  # tune_prior with exact_at
def test_brute_force_refits_at_exact_at(data, table):
    X, y, *_ = data
    rows = table[table["elpd_loo_exact"].notna()]
    assert list(rows["value"]) == [0.1, 1.0]
    for _, r in rows.iterrows():
        truth = exact_elpd_loo(X, y, r.value)
        assert abs(r.elpd_loo_exact - truth) < 4 * r.elpd_loo_exact_mcse + 1e-6
        assert r.elpd_loo_subset == pytest.approx(r.elpd_loo, abs=1e-9)
    assert table.attrs["best_exact"] in (0.1, 1.0)


@pytest.mark.slow  # tune_prior with exact_at (the table fixture)
def test_heldout_column(table):
    h = table["heldout_nll"].to_numpy()
    assert np.all(np.isfinite(h)) and h.min() > 1.0  # σ = 1: the NLL is at least log(2π)/2 + 1/2 ≈ 1.42
    assert table.attrs["best_heldout"] in SCALES
    ax = plot_tuning(table)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "prior_scale"
    assert {line.get_gid() for line in ax.lines} >= {"loo_nll", "heldout_nll", "exact", "best_loo"}


@pytest.mark.slow  # tune_prior with exact_at
def test_factory_form_and_subset(data):
    X, y, *_ = data
    t = mpe.tune_prior(lambda s: (lambda X, y=None: model(X, y, prior_scale=s)), None, [0.1, 1.0],
                       jax.random.PRNGKey(0), X, y=y, exact_at=[1.0], exact_indices=[0, 5, 7], progress=False)
    exact = np.array([exact_elpd_loo(X, y, s) for s in (0.1, 1.0)])
    np.testing.assert_allclose(t["elpd_loo"], exact, atol=1e-6)
    assert np.isnan(t["elpd_loo_exact"].iloc[0]) and np.isfinite(t["elpd_loo_subset"].iloc[1])
    assert t.attrs["exact_indices"] == [0, 5, 7]


def test_bad_input(data):
    X, y, *_ = data
    with pytest.raises(ValueError, match="exact_at value 2.0 is not among"):
        mpe.tune_prior(model, "prior_scale", [1.0], jax.random.PRNGKey(0), X, y=y, exact_at=[2.0])
    with pytest.raises(TypeError, match="heldout must be a tuple"):
        mpe.tune_prior(model, "prior_scale", [1.0], jax.random.PRNGKey(0), X, y=y, heldout=X)
    with pytest.raises(ValueError, match="at least one"):
        mpe.tune_prior(model, "prior_scale", [], jax.random.PRNGKey(0), X, y=y)
    with pytest.raises(ValueError, match="method must be one of"):
        mpe.tune_prior(model, "prior_scale", [1.0], jax.random.PRNGKey(0), X, y=y, method="mcmc",
                       progress=False)
