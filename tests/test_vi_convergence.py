"""Variational fits converge with their DEFAULT settings, to the exact posterior where it is known.

On the linear-Gaussian model (conftest's ``linear_gaussian``: 40 rows, 3 features, σ = 0.5, τ = 2) the
posterior N(m, S⁻¹) is the variational optimum of a full-covariance Gaussian family, in closed form (numpy).
``mpe.SVI(model, posterior="full")`` and ``mpe.NGVI(model, posterior="full")`` with nothing else set must end
within 0.05 posterior sd of m (Mahalanobis distance) with a precision within 2 % of S (relative Frobenius
norm), say so in ``fit.info["converged"]`` and not warn; for two seeds.  A run too short to converge must say
it has not, and warn.
"""

import warnings

import jax
import numpy as np
import pytest
from linear_gaussian import mahalanobis

import numpyro_mpe as mpe

MAX_MEAN_SD = 0.05  # Mahalanobis distance of the mean from m, in posterior sds
MAX_PRECISION_REL = 0.02  # ‖Ŝ − S‖_F / ‖S‖_F
NOT_CONVERGED = "has not converged"


def run_recording(backend, key, X, y):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit = backend.run(key, X, y=y)
    return fit, [str(w.message) for w in record]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", ["SVI", "NGVI"])
def test_default_full_run_reaches_the_exact_posterior(name, seed, linear_gaussian):
    lg = linear_gaussian
    backend = getattr(mpe, name)(lg.model, posterior="full", progress=False)
    fit, messages = run_recording(backend, jax.random.PRNGKey(seed), lg.X, lg.y)
    m, S = lg.truth["m"], lg.truth["S"]
    dist_sd = mahalanobis(np.asarray(fit.posterior.mean), m, S)
    prec = np.asarray(fit.posterior.precision)
    prec_rel = np.linalg.norm(prec - S) / np.linalg.norm(S)
    print(f"\n[{name} default, seed {seed}] |m̂ − m|_S = {dist_sd:.2e} sd, ‖Ŝ − S‖/‖S‖ = {prec_rel:.2e}, "
          f"converged {fit.info['converged']}; info: "
          + ", ".join(f"{k}={fit.info[k]:.3g}" for k in ("mean_drift", "mean_step", "elbo_drift")
                      if isinstance(fit.info.get(k), float)))
    assert fit.method == name.lower()
    assert dist_sd < MAX_MEAN_SD
    assert prec_rel < MAX_PRECISION_REL
    assert fit.info["converged"] is True
    assert not [msg for msg in messages if NOT_CONVERGED in msg], messages


@pytest.mark.parametrize("name,options", [
    ("SVI", dict(posterior="full", num_steps=5, polish=False)),
    ("NGVI", dict(num_steps=3)),
    ("NGVI", dict(posterior="full", num_steps=3)),
])
def test_a_run_too_short_to_converge_says_so(name, options, linear_gaussian):
    lg = linear_gaussian
    backend = getattr(mpe, name)(lg.model, progress=False, **options)
    with pytest.warns(UserWarning, match=f"{name} {NOT_CONVERGED}"):
        fit = backend.run(jax.random.PRNGKey(0), lg.X, y=lg.y)
    assert fit.info["converged"] is False
    # and it is indeed far from the optimum: the flag is not a formality
    assert mahalanobis(np.asarray(fit.posterior.mean), lg.truth["m"], lg.truth["S"]) > MAX_MEAN_SD
