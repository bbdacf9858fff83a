"""Tempered SMC (``numpyro_mpe.inference.smc``) against the closed form of a linear-Gaussian model.

There the posterior is Gaussian and known: the particles must have its mean and covariance, and log Z its
evidence.  The adaptive moves must stop a stage once the particles have forgotten their start, and run to
the caps when the stopping rule never fires.
"""

from __future__ import annotations

import jax
import numpy as np
from linear_gaussian import log_evidence

import numpyro_mpe as mpe
from numpyro_mpe.inference import smc


def _fit(problem):
    return mpe.Laplace(problem.model, progress=False).run(jax.random.PRNGKey(0), problem.X, y=problem.y)


def test_particles_and_evidence_match_the_closed_form(linear_gaussian):
    lg, truth = linear_gaussian, linear_gaussian.truth
    fit = _fit(lg)
    inflate = 2.0
    res = smc.tempered_smc(fit.adapter, fit.posterior, jax.random.PRNGKey(1), inflate=inflate)
    p = truth["m"].shape[0]
    assert res.theta.shape == (4000, p) and res.stages >= 1
    sd = np.sqrt(np.diag(truth["C"]))
    # 4000 particles, correlated by resampling and at most 20 % by the moves: ~1000 effective is ample
    np.testing.assert_array_less(np.abs(res.theta.mean(0) - truth["m"]), 4 * sd / np.sqrt(1000))
    np.testing.assert_allclose(np.cov(res.theta.T), truth["C"], atol=0.15 * np.outer(sd, sd).max(), rtol=0.15)
    # log Z is the evidence of π_1(w) ∝ p(θ(w), y) in the whitened w, θ = m + inflate·L⁻ᵀw:
    # log p(y) − P log inflate + ½ log det S
    expected = (log_evidence(lg.X, lg.y, lg.sigma, lg.tau) - p * np.log(inflate)
                + 0.5 * np.linalg.slogdet(truth["S"])[1])
    assert abs(res.log_z - expected) < 0.1, (res.log_z, expected)


def test_moves_stop_once_the_particles_forget_their_start(linear_gaussian, monkeypatch):
    fit = _fit(linear_gaussian)
    kw = {"num_particles": 500, "num_mcmc": 20, "final_mcmc": 40}
    res = smc.tempered_smc(fit.adapter, fit.posterior, jax.random.PRNGKey(2), **kw)
    caps = [kw["num_mcmc"]] * (res.stages - 1) + [kw["final_mcmc"]]
    # q is the posterior here and the preconditioner its covariance: every stage decorrelates early
    assert all(smc.MOVE_BLOCK <= s < cap and s % smc.MOVE_BLOCK == 0 for s, cap in zip(res.steps, caps)), \
        res.steps
    # a rule that never fires: every stage runs to its cap
    monkeypatch.setattr(smc, "MAX_CORRELATION", (-1.0, -1.0))
    monkeypatch.setattr(smc, "JUMP_GROWTH", -1.0)
    capped = smc.tempered_smc(fit.adapter, fit.posterior, jax.random.PRNGKey(2), **kw)
    assert capped.steps == [kw["num_mcmc"]] * (capped.stages - 1) + [kw["final_mcmc"]], capped.steps
