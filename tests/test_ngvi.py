"""Natural-gradient VI (NGVI): exactness on the Gaussian linear model, same-method refits, MPE during
training (the paper's Fig. 1b in miniature), and bad input."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from linear_gaussian import closed_form, linear_gaussian_model, posterior, simulate
from scipy.stats import spearmanr

import numpyro_mpe as mpe
from numpyro_mpe.errors import PosteriorError
from numpyro_mpe.inference.training import CheckpointMPE, fit_from_state

SIGMA, TAU = 0.7, 2.0
linear_model = linear_gaussian_model(SIGMA, TAU)


def logistic_model(X, y=None, prior_scale=3.0):
    c = numpyro.sample("c", dist.Normal(0, prior_scale))
    w = numpyro.sample("w", dist.Normal(0, prior_scale).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=c + X @ w), obs=y)


@pytest.fixture(scope="module")
def linear_data():
    X, y, _ = simulate(0, 40, [1.0, -0.5, 0.3], SIGMA, scale_first=4.0)  # row 0: high leverage
    return X, y


@pytest.fixture(scope="module")
def cancer():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import PolynomialFeatures

    d = load_breast_cancer()
    X0 = d.data[:, :4]
    X0 = (X0 - X0.mean(0)) / X0.std(0)
    X = PolynomialFeatures(2, include_bias=False).fit_transform(X0)
    X = (X - X.mean(0)) / X.std(0)
    idx = np.random.default_rng(0).permutation(len(X))
    return X[idx], d.target[idx].astype(float)


def test_full_ngvi_reaches_exact_posterior_and_mpe(linear_data):
    X, y = linear_data
    fit = mpe.NGVI(linear_model, num_steps=300, lr=0.5, beta2=0.5, precision="full", antithetic=True,
                   progress=False).run(jax.random.PRNGKey(0), X, y=y)
    cf = closed_form(X, y, SIGMA, TAU)
    m, s, lev, sens, elpd = (cf[k] for k in ("m", "S", "leverage", "sensitivity", "elpd_loo"))
    np.testing.assert_allclose(fit.posterior.mean, m, atol=1e-6)
    np.testing.assert_allclose(fit.posterior.precision, s, rtol=1e-8)
    ds = fit.sensitivities()
    np.testing.assert_allclose(ds.leverage.values, lev, atol=1e-3)
    np.testing.assert_allclose(ds.sensitivity.values, sens, atol=1e-3)
    np.testing.assert_allclose(ds.elpd_loo.values, elpd, atol=1e-3)
    assert fit.method == "ngvi" and fit.info["diverged_at"] is None
    assert fit.info["memories"].split(":")[0] in ("mc", "delta")


def test_memories_add_up_to_the_precision(linear_data):
    X, y = linear_data
    fit = mpe.NGVI(linear_model, num_steps=100, lr=0.5, beta2=0.5, precision="full", antithetic=True,
                   precision_from="memories", memories="mc", memory_samples=64,
                   progress=False).run(jax.random.PRNGKey(1), X, y=y)
    prior = np.eye(3) / TAU**2
    total = np.asarray(fit.memories().hess).sum(0) + prior
    np.testing.assert_allclose(total, fit.posterior.precision, rtol=1e-10)


@pytest.mark.slow  # exact_loo (NGVI refits)
def test_logistic_sensitivity_matches_ngvi_refits():
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    X = (d.data[:, :6] - d.data[:, :6].mean(0)) / d.data[:, :6].std(0)
    idx = np.random.default_rng(0).permutation(len(X))[:150]
    X, y = X[idx], d.target[idx].astype(float)
    ngvi = mpe.NGVI(logistic_model, num_steps=500, lr=0.5, precision="full", antithetic=True, progress=False,
                    refit_steps=200)
    fit = ngvi.run(jax.random.PRNGKey(0), X, y=y, prior_scale=1.0)
    ds = fit.sensitivities()
    idx = np.arange(40)
    ex = mpe.exact_loo(fit, idx, num_samples=0, progress=False)  # dispatches to exact_loo_ngvi
    rho = spearmanr(ds.sensitivity.values[idx], ex.sensitivity.values)[0]
    assert rho >= 0.95, rho
    assert bool(ex.converged.all())


def test_fig1b_miniature_loo_tracks_heldout():
    """The MPE LOO-NLL computed from the optimizer's state at checkpoints tracks the held-out NLL."""
    from jax.example_libraries.optimizers import exponential_decay
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    X = (d.data[:, :6] - d.data[:, :6].mean(0)) / d.data[:, :6].std(0)
    idx = np.random.default_rng(0).permutation(len(X))
    X, y = X[idx], d.target[idx].astype(float)
    tr, te = slice(0, 100), slice(100, None)
    fit = mpe.NGVI(logistic_model, num_steps=300, lr=exponential_decay(0.05, 300, 0.1), precision="full",
                   antithetic=True, every=15, progress=False, memories="delta",
                   heldout=((X[te],), {"y": y[te], "prior_scale": 10.0}),
                   ).run(jax.random.PRNGKey(0), X[tr], y=y[tr], prior_scale=10.0)
    h = fit.info["history"]
    assert list(h.step) == list(range(0, 301, 15)) and h.attrs["num_obs"] == 100
    rho = spearmanr(h.loo_nll, h.heldout_nll)[0]
    rho1 = spearmanr(h.loo_nll_first_order, h.heldout_nll)[0]
    assert rho >= 0.9 and rho1 >= 0.9, (rho, rho1)
    np.testing.assert_allclose(h.loo_nll, -h.elpd_loo_mpe / 100)
    # at the end the LOO estimate is closer to the held-out NLL than the training NLL is
    last = h.iloc[-1]
    assert abs(last.loo_nll - last.heldout_nll) < abs(last.train_nll - last.heldout_nll)

    from numpyro_mpe.io.plots import plot_training

    ax = plot_training(h)
    assert ax.get_xlabel() == "step"


def test_checkpoint_equals_fit_from_state(cancer):
    X, y = cancer[0][:60], cancer[1][:60]
    seen = []

    def callback(ck):
        seen.append(ck)
        return ck.step >= 40  # stop early

    fit = mpe.NGVI(logistic_model, num_steps=200, lr=0.1, every=20, callback=callback,
                   checkpoint_memories="mean", progress=False).run(jax.random.PRNGKey(0), X, y=y)
    assert [c.step for c in seen] == [0, 20, 40] and fit.info["steps"] == 40
    ck = seen[-1]
    res = ck.fit.site_mpe()  # memories through the predictor at the mean, as the compiled checkpoint
    np.testing.assert_allclose(ck.outputs["elpd_loo"], res.elpd_loo, atol=1e-10)
    np.testing.assert_allclose(ck.outputs["sensitivity"], res.sensitivity, atol=1e-10)
    np.testing.assert_allclose(ck.outputs["prediction_shift"], res.prediction_shift, atol=1e-10)
    # first order: Δη ≈ v e, here e = σ(η) − y
    v = ck.outputs["prediction_var"][:, 0]
    d1 = ck.outputs["prediction_shift_first_order"][:, 0]
    eta = np.asarray(ck.fit.predictor_state().eta)[:, 0]
    np.testing.assert_allclose(d1, v * (1 / (1 + np.exp(-eta)) - y), atol=1e-10)


def test_checkpoint_without_heldout_and_diag(linear_data):
    X, y = linear_data
    ad = mpe.ModelAdapter.build(linear_model, jax.random.PRNGKey(0), (X,), {"y": y})
    ck = CheckpointMPE(ad, diagonal=True)
    out, rec = ck(jnp.zeros(3), jnp.full(3, 50.0), step=3)
    assert rec["step"] == 3 and np.isnan(rec["heldout_nll"]) and np.isfinite(rec["elpd_loo_mpe"])
    fit = fit_from_state(ad, jnp.zeros(3), jnp.full(3, 50.0), memories="ggn", progress=False)
    np.testing.assert_allclose(ck(jnp.zeros(3), jnp.full(3, 50.0))[0]["lpd"], fit.site_mpe().lpd, atol=1e-10)


def test_diag_minibatch_and_schedule(linear_data):
    from jax.example_libraries.optimizers import exponential_decay

    X, y = linear_data
    fit = mpe.NGVI(linear_model, num_steps=1500, lr_schedule=exponential_decay(0.2, 1500, 0.1),
                   subsample_size=10, memories="delta", progress=False).run(jax.random.PRNGKey(0), X, y=y)
    m, s = posterior(X, y, SIGMA, TAU)
    sd = 1 / np.sqrt(np.diag(s))
    assert np.all(np.abs(np.asarray(fit.posterior.mean) - m) < 0.5 * sd)
    assert fit.info["subsample_size"] == 10
    assert fit.info["lr_final"] == pytest.approx(0.2 * 0.1 ** (1499 / 1500))


def test_divergence_stops_with_step_and_keeps_last_finite_state(linear_data):
    X, y = linear_data  # Newton steps overshot 10⁶ times: the error grows ~10⁶x per step until overflow
    ngvi = mpe.NGVI(linear_model, num_steps=500, lr=1e6, precision="full", beta2=0.5, progress=False,
                    memories="delta")
    with pytest.warns(UserWarning, match=r"NGVI diverged at step (\d+)") as rec:
        fit = ngvi.run(jax.random.PRNGKey(0), X, y=y)
    step = fit.info["diverged_at"]
    assert step is not None and f"step {step}" in str(rec[0].message)
    assert fit.info["steps"] == step - 1
    assert np.all(np.isfinite(np.asarray(fit.posterior.mean)))
    assert np.all(np.isfinite(np.asarray(fit.posterior.precision)))
    raising = mpe.NGVI(linear_model, num_steps=500, lr=1e6, precision="full", beta2=0.5, progress=False,
                       memories="delta", on_divergence="raise")
    with pytest.raises(PosteriorError, match=f"diverged at step {step}") as err:
        raising.run(jax.random.PRNGKey(0), X, y=y)
    assert err.value.fit.info["diverged_at"] == step


def test_bad_input(linear_data):
    X, y = linear_data
    with pytest.raises(ValueError, match=r"subsample_size=41 is larger than the 40 observations of site 'y'"):
        mpe.NGVI(linear_model, subsample_size=41, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    with pytest.raises(ValueError, match="precision must be 'diag' or 'full'"):
        mpe.NGVI(linear_model, precision="lowrank")
    with pytest.raises(TypeError, match="unknown option"):
        mpe.NGVI(linear_model, learning_rate=0.1)
    with pytest.raises(TypeError, match="either lr"):
        mpe.NGVI(linear_model, lr=0.1, lr_schedule=lambda t: 0.1)
    with pytest.raises(TypeError, match="heldout must be a tuple"):
        mpe.NGVI(linear_model, every=10, heldout=X, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    fit = mpe.Laplace(linear_model, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    with pytest.raises(TypeError, match="made by mpe.NGVI"):
        mpe.exact_loo_ngvi(fit, [0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ngvi = mpe.NGVI(linear_model, num_steps=20, progress=False, memories="delta")
        nfit = ngvi.run(jax.random.PRNGKey(0), X, y=y)
    with pytest.raises(ValueError, match=r"weights must have shape \(40,\)"):
        ngvi.refit(nfit, np.ones(39))
