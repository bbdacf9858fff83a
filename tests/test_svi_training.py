"""Checkpoints of mpe.SVI (``every``, ``callback``, ``heldout``), as for mpe.NGVI.

Truth: the MPE of the final guide's Gaussian recomputed independently — the guide's (mean, Σ⁻¹) taken from the
fit's final parameters by :func:`guide_extractor`, made a Fit by
:func:`numpyro_mpe.inference.training.fit_from_state`
(memories through the predictor at the mean, as ``checkpoint_memories="mean"``), and its ``site_mpe``
elpd_loo summed as the history does (N × mean over the valid observations).
"""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mpe as mpe
from numpyro_mpe.inference.svi import guide_extractor
from numpyro_mpe.inference.training import Checkpoint, fit_from_state

numpyro.enable_x64()


def logistic_model(X, y=None):
    c = numpyro.sample("c", dist.Normal(0, 3.0))
    w = numpyro.sample("w", dist.Normal(0, 3.0).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=c + X @ w), obs=y)


@pytest.fixture(scope="module")
def data():
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    idx = np.random.default_rng(0).permutation(len(d.target))
    X = d.data[idx, :4]
    X = (X - X.mean(0)) / X.std(0)
    y = d.target[idx].astype(float)
    return X[:80], y[:80], X[80:200], y[80:200]


@pytest.mark.slow  # > 20 s
def test_svi_history_matches_site_mpe_of_final_guide(data):
    X, y, Xt, yt = data
    seen = []
    fit = mpe.SVI(logistic_model, guide="full", num_steps=600, every=100, callback=seen.append,
                  heldout=((Xt,), {"y": yt}), checkpoint_memories="mean", progress=False,
                  memory_samples=64, average=0.0, polish=False).run(jax.random.PRNGKey(0), X, y=y)
    h = fit.info["history"]
    assert list(h.step) == [0, 100, 200, 300, 400, 500, 600]
    for col in ("step", "elpd_loo_mpe", "loo_nll_first_order", "train_nll", "heldout_nll"):
        assert col in h.columns
        assert np.all(np.isfinite(h[col]))
    assert h.attrs["num_obs"] == 80 and fit.info["steps"] == 600 and len(fit.info["losses"]) == 600
    # training helps: the last checkpoint beats the initial guide on train and held-out NLL
    assert h.train_nll.iloc[-1] < h.train_nll.iloc[0] and h.heldout_nll.iloc[-1] < h.heldout_nll.iloc[0]

    # callback: Checkpoint objects, increasing steps, the last one the final guide's Gaussian (the checkpoints
    # follow the optimizer's iterate: without averaging and polish the fit keeps the last one)
    assert all(isinstance(c, Checkpoint) for c in seen)
    assert [c.step for c in seen] == list(h.step)
    refit = fit.refit
    q = guide_extractor(refit.guide, fit.adapter)(refit.params).posterior()
    np.testing.assert_allclose(seen[-1].mean, q.mean, atol=1e-10)
    np.testing.assert_allclose(seen[-1].precision, q.precision, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(q.mean, fit.posterior.mean, atol=1e-12)

    # independent recomputation of the last elpd_loo_mpe
    ref = fit_from_state(fit.adapter, q.mean, q.precision, memories="ggn", progress=False).site_mpe()
    elpd = np.asarray(ref.elpd_loo)
    ok = np.isfinite(elpd)
    np.testing.assert_allclose(h.elpd_loo_mpe.iloc[-1], len(elpd) * elpd[ok].mean(), rtol=1e-8)
    np.testing.assert_allclose(seen[-1].outputs["elpd_loo"], elpd, atol=1e-8)


@pytest.mark.slow  # > 20 s
def test_svi_callback_stops_and_default_every(data):
    X, y, _, _ = data
    seen = []

    def callback(ck):
        seen.append(ck.step)
        return ck.step >= 40

    fit = mpe.SVI(logistic_model, guide="diag", num_steps=400, callback=callback,
                  progress=False, memory_samples=32).run(jax.random.PRNGKey(1), X, y=y)
    assert seen == [0, 20, 40]  # every defaults to num_steps // 20
    assert fit.info["steps"] == 40 and len(fit.info["losses"]) == 40
    assert np.isnan(fit.info["history"].heldout_nll).all()


def test_svi_without_checkpoints_has_no_history(data):
    X, y, _, _ = data
    fit = mpe.SVI(logistic_model, guide="diag", num_steps=300, progress=False,
                  memory_samples=32).run(jax.random.PRNGKey(0), X, y=y)
    assert fit.info["history"] is None and fit.info["steps"] == 300


def test_svi_bad_every_and_heldout(data):
    X, y, _, _ = data
    with pytest.raises(ValueError, match="every must be a positive integer"):
        mpe.SVI(logistic_model, every=0)
    with pytest.raises(ValueError, match="every must be a positive integer"):
        mpe.SVI(logistic_model, every=-5)
    with pytest.raises(TypeError, match="heldout must be a tuple"):
        mpe.SVI(logistic_model, num_steps=10, every=5, heldout=X,
                progress=False).run(jax.random.PRNGKey(0), X, y=y)
