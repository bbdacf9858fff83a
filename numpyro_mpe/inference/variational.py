"""The precision that goes with the memories of a variational Gaussian posterior.

For a Gaussian q = N(m, Σ) fitted by variational inference the memories of observation i are expectations
under q, ĝ_i = E_q[∇ℓ_i(θ)] and Ĥ_i = E_q[∇²ℓ_i(θ)] (:func:`numpyro_mpe.engine.memories.expected_memories`),
and the precision that goes with them is S = E_q[∇²U(θ)] = Σ_i Ĥ_i + E_q[∇²R(θ)] (all observed sites, R the
prior in unconstrained space).  At a stationary point of the ELBO with a full-covariance q, S = Σ⁻¹ exactly
(Opper & Archambeau 2009); with a diagonal q, diag S = diag Σ⁻¹.  Estimating S and the Ĥ_i from the *same*
draws keeps the identity Σ_i Ĥ_i + E_q[∇²R] = S to round-off, so that removing every memory returns the
prior's curvature and the MPE is consistent whatever the Monte Carlo error.

* ``method="mc"``: Monte Carlo with ``num_samples`` antithetic draws from q, common to all observations and
  sites (common random numbers), streamed over draws;
* ``method="delta"``: values at the mean (ĝ_i = ∇ℓ_i(m), Ĥ_i = ∇²ℓ_i(m), S = ∇²U(m)): the Laplace memories;
* ``diagonal=True`` (mean-field q): Ĥ_i, S and E_q[∇²R] keep only their diagonals, so they still add up.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.engine.memories import DEFAULT_MEMORY_SAMPLES, MemorySpec, stream_mean
from numpyro_mpe.errors import MPEError, PosteriorError
from numpyro_mpe.gaussian import GaussianPosterior, draws, from_precision
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit

METHODS = ("mc", "delta")
#: Default number of draws from q for the Monte Carlo memories and precision.
DEFAULT_SAMPLES = DEFAULT_MEMORY_SAMPLES


class PrecisionEstimate(NamedTuple):
    """S = E_q[∇²U] and E_q[∇U] (their values at the mean for ``method="delta"``)."""

    precision: jax.Array  # (P, P); diagonal matrix when ``diagonal``
    grad: jax.Array  # (P,): E_q[∇U], zero at a stationary point of the ELBO (up to MC error)
    method: str
    num_samples: int
    diagonal: bool


def check_method(method: str, num_samples: int, names: tuple = ("method", "num_samples")) -> None:
    """Refuse an unknown method of expectation or a number of draws below 1, naming the options."""
    if method not in METHODS:
        raise MPEError(f"{names[0]} must be one of {METHODS}, got {method!r}")
    if int(num_samples) < 1:
        raise MPEError(f"{names[1]} must be a positive integer, got {num_samples}")


@partial(jit, static_argnames=("diagonal",))
def _expected_curvature(adapter: ModelAdapter, thetas, diagonal: bool):
    def at(theta):
        g = jax.grad(adapter.potential)(theta)
        h = jax.hessian(adapter.potential)(theta)
        h = 0.5 * (h + h.T)
        return g, (jnp.diagonal(h) if diagonal else h)

    return stream_mean(at, thetas)


def consistent_precision(adapter: ModelAdapter, posterior: GaussianPosterior, *,
                         num_samples: int = DEFAULT_SAMPLES, rng_key=None, method: str = "mc",
                         diagonal: bool = False) -> PrecisionEstimate:
    """The precision consistent with the variational memories: S = E_q[∇²U(θ)].

    S = Σ_i Ĥ_i + E_q[∇²R] over all observed sites, with the Ĥ_i of
    :func:`~numpyro_mpe.engine.memories.expected_memories` for the same ``posterior``, ``num_samples``,
    ``rng_key`` and ``diagonal`` (the same draws), to round-off.

    Parameters
    ----------
    adapter : ModelAdapter
        The model with its data.
    posterior : GaussianPosterior
        The variational q (e.g. a guide's Gaussian); its mean and covariance define the draws.
    num_samples : int, default 256
        Draws from q (antithetic pairs) for ``method="mc"``.
    rng_key : jax.random.PRNGKey, optional
        Key of the draws; ``PRNGKey(0)`` by default.
    method : {"mc", "delta"}
        Expectation under q by Monte Carlo, or the value at the mean.
    diagonal : bool, default False
        Keep only the diagonal (for a mean-field q).

    Returns
    -------
    PrecisionEstimate
        ``precision`` (P × P), ``grad`` = E_q[∇U] (≈ 0 at a VI optimum) and the settings.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro_mpe.model import ModelAdapter
    >>> from numpyro_mpe.gaussian import from_precision
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 1))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.arange(3.0)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": x})
    >>> q = from_precision(jnp.zeros(1), jnp.eye(1))
    >>> est = consistent_precision(ad, q, num_samples=8)
    >>> float(est.precision[0, 0])  # 1 (prior) + Σ x_i² = 6, the same at every θ
    6.0
    """
    check_method(method, num_samples)
    thetas = posterior.mean[None] if method == "delta" else draws(posterior, num_samples, rng_key)
    grad, h = _expected_curvature(adapter, thetas, bool(diagonal))
    prec = jnp.diag(h) if diagonal else h
    used = 1 if method == "delta" else int(num_samples)
    return PrecisionEstimate(jnp.asarray(prec, posterior.mean.dtype), grad, method, used, bool(diagonal))


def variational_memories(adapter: ModelAdapter, q: GaussianPosterior, var_name: str, *,
                         num_samples: int = DEFAULT_SAMPLES, rng_key=None, method: str = "mc",
                         diagonal: bool = False):
    """Memories ĝ_i = E_q[∇ℓ_i], Ĥ_i = E_q[∇²ℓ_i] of every observation of ``var_name`` under q: Monte Carlo
    with ``num_samples`` antithetic draws (``method="mc"``), or the values at the mean (``"delta"``), as a
    :class:`~numpyro_mpe.fit.Fit` with this q takes them; they add up, over the observed sites and with
    E_q[∇²R], to :func:`consistent_precision` with the same settings.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit(kind="exact")
    >>> mem = variational_memories(fit.adapter, fit.posterior, "y", num_samples=64)
    >>> bool(jnp.allclose(mem.hess[:, 0, 0], x**2))  # E_q[∇²ℓ_i] = x_i² / σ² for a Gaussian likelihood
    True
    """
    from numpyro_mpe.fit import Fit
    from numpyro_mpe.options import MPEOptions

    check_method(method, num_samples)
    spec = MemorySpec("mc" if method == "mc" else "delta", bool(diagonal), int(num_samples),
                      jax.random.PRNGKey(0) if rng_key is None else rng_key, q)
    return Fit(adapter, q, "vi", memories=spec, options=MPEOptions(progress=False)).memories(var_name)


class VariationalPosterior(NamedTuple):
    """What a variational backend hands to :class:`~numpyro_mpe.fit.Fit`: the posterior N(m, S⁻¹) with the
    guide's mean and the consistent precision S = E_q[∇²U]; the memory spec (expectations under the *guide's*
    q with the same draws); the diagnostics (``precision_rel_diff`` = ‖S − Σ_q⁻¹‖_F / ‖Σ_q⁻¹‖_F,
    ``grad_norm`` = max |E_q[∇U]|, the settings) and the guide's own Gaussian under ``q``."""

    posterior: GaussianPosterior
    memories: MemorySpec
    info: dict


def variational_posterior(adapter: ModelAdapter, q: GaussianPosterior, *, num_samples: int = DEFAULT_SAMPLES,
                          rng_key=None, method: str = "mc", diagonal: bool = False,
                          polish: bool = False) -> VariationalPosterior:
    """The Fit's posterior and memories for a variational Gaussian q (shared by the VI backends).

    The mean is q's; the precision is :func:`consistent_precision` (which equals q's own precision at a VI
    optimum, up to Monte Carlo error), so that the memories, computed lazily per observed site with the same
    draws, add up to it with the prior's curvature.

    ``polish``: first move the mean by one natural-gradient step to the stationary point of the Gaussian
    variational objective, m ← m − S⁻¹ E_q[∇U] (S = E_q[∇²U]; both from the same antithetic draws, exact for a
    quadratic potential): a stochastic optimizer ends in a cloud around the optimum, and the MPE is exact for
    the optimum.  ``info["mean_correction"]`` is that step's length in posterior sd, √(δᵀSδ).

    Raises
    ------
    PosteriorError
        If E_q[∇²U] is not positive definite (then try ``method="delta"`` at a mode or more draws).

    Examples
    --------
    >>> vp = variational_posterior(adapter, q, num_samples=128)  # doctest: +SKIP
    >>> fit = Fit(adapter, vp.posterior, "svi", vp.info, memories=vp.memories)  # doctest: +SKIP
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    est = consistent_precision(adapter, q, num_samples=num_samples, rng_key=rng_key, method=method,
                               diagonal=diagonal)
    correction = 0.0
    if polish:
        prec = np.asarray(est.precision)
        grad = np.asarray(est.grad)
        if np.all(np.isfinite(prec)) and np.all(np.isfinite(grad)):
            step = -(grad / np.diagonal(prec) if diagonal else np.linalg.solve(0.5 * (prec + prec.T), grad))
            correction = float(np.sqrt(max(float(step @ prec @ step), 0.0)))
            if np.all(np.isfinite(step)):
                q = q._replace(mean=q.mean + jnp.asarray(step, q.mean.dtype))
                est = consistent_precision(adapter, q, num_samples=num_samples, rng_key=rng_key,
                                           method=method, diagonal=diagonal)
    prec = np.asarray(est.precision)
    if not np.all(np.isfinite(prec)):
        rows = np.flatnonzero(~np.all(np.isfinite(prec), axis=1))
        raise PosteriorError(f"E_q[∇²U] is not finite in the latent site(s) {adapter.site_names_of(rows)}")
    post = from_precision(q.mean, est.precision)
    if not bool(np.all(np.isfinite(np.asarray(post.chol)))):
        vals = np.linalg.eigvalsh(0.5 * (prec + prec.T))
        raise PosteriorError(
            f"the precision consistent with the memories, E_q[∇²U] ({method}, {est.num_samples} draws), is "
            f"not positive definite (smallest eigenvalue {vals.min():.3g}): the potential is not convex over "
            "q's bulk; try memories='delta' (curvature at the mean), more draws, or a better-converged fit")
    guide_prec = np.asarray(q.precision)
    ref = np.diag(np.diagonal(guide_prec)) if diagonal else guide_prec
    rel = float(np.linalg.norm(prec - ref) / np.linalg.norm(ref))
    info: dict[str, Any] = {
        "precision_rel_diff": rel,
        "grad_norm": float(np.max(np.abs(np.asarray(est.grad)))),
        "memories": method,
        "memory_samples": est.num_samples,
        "diagonal": bool(diagonal),
        "q": q,
    }
    if polish:
        info["mean_correction"] = correction
    spec = MemorySpec("mc" if method == "mc" else "delta", bool(diagonal), int(num_samples), rng_key, q)
    return VariationalPosterior(post, spec, info)
