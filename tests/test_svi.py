"""Gaussian SVI (NumPyro autoguides) as a Fit: exactness, refits, guide ordering, refusals.

Truths: closed forms in numpy for the linear-Gaussian model (as tests/test_exactness.py), brute-force SVI
refits without each observation (:func:`exact_loo_svi`, the same method), NumPyro's own guide sampling and
medians for the ordering of the flat latent vector.  Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from linear_gaussian import closed_form, linear_gaussian_model, simulate
from numpyro.distributions.transforms import biject_to
from numpyro.infer import SVI as NumPyroSVI
from numpyro.infer import Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from scipy.stats import spearmanr

import numpyro_mpe as mpe
from numpyro_mpe.errors import ModelError
from numpyro_mpe.inference.svi import guide_extractor, svi_refit
from numpyro_mpe.model.adapter import ModelAdapter

numpyro.enable_x64()
KEY = jax.random.PRNGKey(0)

# ===================================================================== linear-Gaussian: closed forms
SIGMA, TAU = 0.8, 1.5
linear_model = linear_gaussian_model(SIGMA, TAU)


@pytest.fixture(scope="module")
def linear():
    X, y, _ = simulate(0, 40, [1.0, -0.5, 0.3], SIGMA)
    y[7] += 3.0  # one outlier
    fit = mpe.SVI(linear_model, guide="full", num_steps=3000, num_particles=16, progress=False).run(
        KEY, jnp.asarray(X), y=jnp.asarray(y))
    return fit, X, y


def test_full_svi_reaches_exact_posterior(linear):
    fit, X, y = linear
    cf = closed_form(X, y, SIGMA, TAU)
    q = fit.info["q"]  # the guide's own Gaussian
    mean_err = np.max(np.abs(np.asarray(q.mean) - cf["m"]))
    cov_err = np.linalg.norm(np.asarray(q.covariance()) - cf["C"]) / np.linalg.norm(cf["C"])
    sd = np.sqrt(np.diag(cf["C"]))
    in_sd = np.max(np.abs(q.mean - cf["m"]) / sd)
    print(f"\n[SVI full, linear] max |m_q − m| = {mean_err:.2e} ({in_sd:.3f} sd); "
          f"‖Σ_q − Σ‖/‖Σ‖ = {cov_err:.3f}; precision_rel_diff = {fit.info['precision_rel_diff']:.3f}; "
          f"ELBO converged: {fit.info['converged']}")
    assert mean_err < 1e-2
    assert cov_err < 5e-2
    # the Fit's precision E_q[∇²U] is exact here (∇²U is constant)
    np.testing.assert_allclose(np.asarray(fit.posterior.precision), cf["S"], rtol=1e-10)
    assert fit.info["precision_rel_diff"] == pytest.approx(
        np.linalg.norm(np.asarray(q.precision) - cf["S"]) / np.linalg.norm(np.asarray(q.precision)), rel=1e-6)
    assert fit.info["converged"] and fit.info["losses"].shape == (3000,)


def test_full_svi_sensitivities_match_closed_forms(linear):
    fit, X, y = linear
    cf = closed_form(X, y, SIGMA, TAU)
    ds = fit.sensitivities()
    errs = {k: np.max(np.abs(ds[k].values - cf[k])) for k in ("elpd_loo", "leverage", "sensitivity")}
    print("\n[SVI full, linear] max abs error vs closed forms: "
          + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert ds.attrs["method"] == "svi"
    for k, v in errs.items():
        assert v < 1e-2, k


def test_svi_refit_matches_closed_form_weighted_posteriors(linear):
    """svi_refit: weight 0 gives the exact LOO posterior, weight 2 the posterior with i counted twice."""
    fit, X, y = linear
    for i, wi in [(7, 0.0), (3, 0.0), (3, 2.0)]:
        weights = np.ones(len(y))
        weights[i] = wi
        cf = closed_form(X, y, SIGMA, TAU, weights)
        q = svi_refit(fit, jnp.asarray(weights))
        err = np.max(np.abs(np.asarray(q.mean) - cf["m"]))
        shift = np.max(np.abs(cf["m"] - closed_form(X, y, SIGMA, TAU)["m"]))
        print(f"\n[svi_refit i={i}, w={wi}] max |m_w − exact| = {err:.2e} (true shift {shift:.2e})")
        assert err < 2e-2
        assert err < 0.3 * shift


def test_diag_guide_has_diagonal_memories(linear):
    """Mean-field q: diagonal precision and memories; S = diag E_q[∇²U] = diag of the exact S here."""
    fit_full, X, y = linear
    cf = closed_form(X, y, SIGMA, TAU)
    fit = mpe.SVI(linear_model, guide="diag", num_steps=1500, progress=False, memory_samples=32).run(
        KEY, jnp.asarray(X), y=jnp.asarray(y))
    ds = fit.sensitivities()
    assert np.all(np.isfinite(ds.sensitivity.values))
    err = np.max(np.abs(np.asarray(fit.posterior.mean) - cf["m"]))
    print(f"\n[SVI diag] max |m − m_exact| = {err:.2e}, "
          f"precision_rel_diff {fit.info['precision_rel_diff']:.3f}")
    assert err < 3e-2 and fit.info["guide"] == "AutoNormal"
    off = ~np.eye(3, dtype=bool)
    assert np.all(np.asarray(fit.posterior.precision)[off] == 0)
    assert np.all(np.asarray(fit.memories().hess)[:, off] == 0)
    np.testing.assert_allclose(np.diag(fit.posterior.precision), np.diag(cf["S"]), rtol=1e-10)
    assert fit.info["precision_rel_diff"] < 0.15


# ===================================================================== logistic: MPE vs SVI refits
def logistic_model(X, y=None):
    b0 = numpyro.sample("b0", dist.Normal(0, 2))
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=b0 + X @ b), obs=y)


@pytest.fixture(scope="module")
def logistic():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 3))
    p = 1 / (1 + np.exp(-(0.3 + X @ np.array([1.5, -1.0, 0.5]))))
    y = (rng.uniform(size=40) < p).astype(float)
    fit = mpe.SVI(logistic_model, guide="full", progress=False).run(KEY, jnp.asarray(X), y=jnp.asarray(y))
    return fit, X, y


@pytest.mark.slow  # exact_loo (SVI refits)
def test_logistic_sensitivity_rank_correlates_with_svi_refits(logistic):
    fit, X, y = logistic
    ds = fit.sensitivities()
    ex = mpe.exact_loo(fit, None, num_samples=2000, progress=False)  # dispatches to exact_loo_svi
    a, b = ds.sensitivity.values, ex.sensitivity.values
    rho = spearmanr(a, b)[0]
    rel = np.abs(a - b) / b
    d_elpd = np.abs(ds.elpd_loo.values - ex.elpd_loo.values)
    print(f"\n[SVI full, logistic, N={len(y)}] Spearman(sensitivity, SVI refits) = {rho:.4f}; "
          f"median rel err {np.median(rel):.3f}, max {rel.max():.3f}; "
          f"|Δ elpd_loo| median {np.median(d_elpd):.2e}, "
          f"max {d_elpd.max():.2e}; reference offset {ex.attrs['reference_shift']:.3f} sd; "
          f"refits converged {ex.converged.values.mean():.2f}")
    assert len(b) >= 30
    assert rho >= 0.95
    assert ex.attrs["method"] == "exact_loo_svi" and set(ex.data_vars) >= {"shift", "sensitivity", "elpd_loo"}


def test_svi_memories_plus_prior_add_up_to_precision(logistic):
    """MC memories under the guide's q plus the (constant) prior curvature give the Fit's precision."""
    fit, X, y = logistic
    total = np.asarray(fit.memories().hess).sum(0)
    prior = np.diag([1 / 2.0**2, 1.0, 1.0, 1.0])  # θ = (b, b0) in ModelAdapter's sorted order
    assert fit.adapter.param_labels() == ["b[0]", "b[1]", "b[2]", "b0"]
    prior = np.diag([1.0, 1.0, 1.0, 1 / 2.0**2])
    s = np.asarray(fit.posterior.precision)
    err = np.max(np.abs(total + prior - s)) / np.max(np.abs(s))
    print(f"\n[SVI full, logistic] max |ΣĤ_i + ∇²R − S| / max|S| = {err:.2e}; "
          f"S vs guide precision: {fit.info['precision_rel_diff']:.3f}")
    assert err < 1e-10
    assert fit.info["precision_rel_diff"] < 0.15


# ===================================================================== guide ordering (from_svi)
def multi_model(y=None):
    """Latent sites declared out of alphabetical order, of several shapes and constraints."""
    z = numpyro.sample("z", dist.Normal(0, 1).expand([3]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    w = numpyro.sample("w", dist.Dirichlet(2.0 * jnp.ones(3)))
    a = numpyro.sample("a", dist.Normal(0, 2))
    M = numpyro.sample("M", dist.Normal(0, 1).expand([2, 2]).to_event(2))
    loc = a + z @ jnp.array([1.0, 0.5, -0.5]) + w @ jnp.arange(3.0) + M[1, 0] - 0.5 * M[0, 1]
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(loc, sigma), obs=y)


SUPPORTS = {"z": (dist.constraints.real_vector, 1), "sigma": (dist.constraints.positive, 0),
            "w": (dist.constraints.simplex, 1), "a": (dist.constraints.real, 0),
            "M": (dist.constraints.real_matrix, 2)}


def _unconstrained_flat(values: dict) -> np.ndarray:
    """Constrained site values -> unconstrained, flattened as ModelAdapter does (ravel_pytree: sorted)."""
    unc = {k: biject_to(c).inv(values[k]) for k, (c, _) in SUPPORTS.items()}
    return np.asarray(ravel_pytree(unc)[0])


def _unconstrained_flat_batch(values: dict) -> np.ndarray:
    """The same for a batch of draws (leading axis), sites in sorted order."""
    parts = []
    for k in sorted(SUPPORTS):
        c, event_dim = SUPPORTS[k]
        u = biject_to(c).inv(values[k])
        n = u.shape[0]
        parts.append(np.reshape(np.asarray(u), (n, -1)))
    return np.concatenate(parts, axis=1)


def _check_against_guide(guide, params, mean, cov):
    """``mean``/``cov`` (adapter order) against the guide's median and NumPyro's own sampler of it."""
    np.testing.assert_allclose(mean, _unconstrained_flat(guide.median(params)), rtol=1e-6, atol=1e-8)
    samples = guide.sample_posterior(jax.random.PRNGKey(3), params, sample_shape=(4000,))
    emp = np.cov(_unconstrained_flat_batch(samples).T)
    sd = np.sqrt(np.diag(cov))
    err = np.max(np.abs(emp - cov) / np.outer(sd, sd))
    print(f"\n[{type(guide).__name__}] max |cov_emp − cov_q| / (sd sd) = {err:.3f} (4000 draws)")
    assert err < 0.15


@pytest.mark.slow  # > 20 s (each guide: 12-40 s)
@pytest.mark.parametrize("guide_cls", [AutoNormal, AutoMultivariateNormal, AutoLaplaceApproximation])
def test_from_svi_maps_guide_order_onto_adapter(guide_cls):
    """from_svi's mean is the guide's median mapped to unconstrained space and flattened as the adapter."""
    y = jnp.asarray(np.random.default_rng(2).normal(1.0, 0.7, size=50))
    guide = guide_cls(multi_model)
    svi = NumPyroSVI(multi_model, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
    res = svi.run(jax.random.PRNGKey(1), 600, y=y, progress_bar=False)
    fit = mpe.from_svi(multi_model, guide, res.params, y=y,
                       mpe_options={"progress": False, "memory_samples": 32})
    assert [s.name for s in fit.adapter.latent] == ["M", "a", "sigma", "w", "z"]
    assert fit.info["guide"] == guide_cls.__name__
    if guide_cls is AutoLaplaceApproximation:
        median = _unconstrained_flat(guide.median(res.params))
        np.testing.assert_allclose(np.asarray(fit.posterior.mean), median, rtol=1e-6, atol=1e-8)
        assert fit.method == "laplace" and fit.refit is None
        return
    _check_against_guide(guide, res.params, np.asarray(fit.posterior.mean),
                         np.asarray(fit.info["q"].covariance()))
    assert fit.method == "svi"


@pytest.fixture(scope="module")
def multi_adapter():
    y = jnp.asarray(np.random.default_rng(2).normal(1.0, 0.7, size=50))
    return ModelAdapter.build(multi_model, KEY, (), {"y": y}), y


@pytest.mark.parametrize("guide_cls", [AutoDiagonalNormal, AutoLowRankMultivariateNormal])
def test_guide_extractor_order_other_guides(guide_cls, multi_adapter):
    """The other Gaussian guides, at arbitrary (unfitted) parameters: same mapping checks."""
    adapter, y = multi_adapter
    guide = guide_cls(multi_model, **({"rank": 2} if guide_cls is AutoLowRankMultivariateNormal else {}))
    svi = NumPyroSVI(multi_model, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(1), y=y))
    rng = np.random.default_rng(5)
    params = {k: (jnp.asarray(rng.normal(size=np.shape(v))) if k.endswith("loc") or k.endswith("factor")
                  else jnp.asarray(rng.uniform(0.2, 1.0, size=np.shape(v)))) for k, v in params.items()}
    gauss = guide_extractor(guide, adapter)(params)
    _check_against_guide(guide, params, np.asarray(gauss.mean), np.asarray(gauss.posterior().covariance()))


# ===================================================================== refusals
def test_non_gaussian_guides_are_refused_by_name():
    y = jnp.ones(5)

    def my_custom_guide(y=None):
        numpyro.sample("a", dist.Normal(0, 1))

    for guide, name in [(AutoDelta(multi_model), "AutoDelta"), (AutoIAFNormal(multi_model), "AutoIAFNormal"),
                        (my_custom_guide, "my_custom_guide")]:
        with pytest.raises(ModelError, match=f"guide {name} is not a Gaussian guide"):
            mpe.from_svi(multi_model, guide, {}, y=y)
    with pytest.raises(ValueError, match="guide must be one of"):
        mpe.SVI(multi_model, guide="flow")
    with pytest.raises(ModelError, match="AutoDelta"):
        mpe.SVI(multi_model, guide=AutoDelta(multi_model))
    with pytest.raises(TypeError, match="unknown option"):
        mpe.SVI(multi_model, learning_rate=0.1)
    with pytest.raises(ValueError, match="rank"):
        mpe.SVI(multi_model, guide="full", rank=2)
