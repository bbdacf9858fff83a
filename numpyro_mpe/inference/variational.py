"""Memories and precision of a variational Gaussian posterior (DESIGN §2, "Memories").

For a Gaussian q = N(m, Σ) fitted by variational inference the memories of observation i are
expectations under q,

    ĝ_i = E_q[∇ℓ_i(θ)],    Ĥ_i = E_q[∇²ℓ_i(θ)],    ℓ_i = −log p(y_i | θ),

and the precision that goes with them is S = E_q[∇²U(θ)] = Σ_i Ĥ_i + E_q[∇²R(θ)] (all observed sites, R the
prior in unconstrained space).  At a stationary point of the ELBO with a full-covariance q, S = Σ⁻¹ exactly
(Opper & Archambeau 2009); with a diagonal q, diag S = diag Σ⁻¹.  Estimating S and the Ĥ_i from the *same*
draws keeps the identity Σ_i Ĥ_i + E_q[∇²R] = S to round-off, so that removing every memory returns the
prior's curvature and the MPE is consistent whatever the Monte Carlo error.

* ``method="mc"``: Monte Carlo with ``num_samples`` antithetic draws θ_s = m ± L⁻ᵀz_s from q, common to all
  observations and sites (common random numbers); streamed over draws (never S × N × P × P).  Where the
  site's predictor η_i(θ) is linear in θ, the memories stay factored, Ĥ_i = J_iᵀ E_q[Λ_i(η_i(θ))] J_i, with
  no P × P work per observation; otherwise dense exact Hessians per draw.
* ``method="delta"``: values at the mean (ĝ_i = ∇ℓ_i(m), Ĥ_i = ∇²ℓ_i(m), S = ∇²U(m)): the Laplace memories.
* ``diagonal=True`` (mean-field q): Ĥ_i, S and E_q[∇²R] keep only their diagonals, so they still add up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.engine.mpe import (
    Memories,
    PredictorState,
    predictor_derivs,
    predictor_is_linear,
    predictor_state,
)
from numpyro_mpe.engine.mpe import memories as delta_memories
from numpyro_mpe.errors import MPEError, PosteriorError
from numpyro_mpe.gaussian import GaussianPosterior, from_precision
from numpyro_mpe.model.adapter import ModelAdapter

METHODS = ("mc", "delta")

#: Default number of draws from q for the Monte Carlo memories and precision.
DEFAULT_SAMPLES = 256


class PrecisionEstimate(NamedTuple):
    """S = E_q[∇²U] and E_q[∇U] (their values at the mean for ``method="delta"``)."""

    precision: jax.Array  # (P, P); diagonal matrix when ``diagonal``
    grad: jax.Array  # (P,): E_q[∇U], zero at a stationary point of the ELBO (up to MC error)
    method: str
    num_samples: int
    diagonal: bool


def _check_method(method: str, num_samples: int) -> None:
    if method not in METHODS:
        raise MPEError(f"method must be one of {METHODS}, got {method!r}")
    if method == "mc" and int(num_samples) < 1:
        raise MPEError(f"num_samples must be a positive integer for method='mc', got {num_samples}")


def draws(posterior: GaussianPosterior, num_samples: int, rng_key=None) -> jax.Array:
    """Antithetic draws θ_s = m ± L⁻ᵀ z_s from q, shape ``(num_samples, P)``.

    The same ``rng_key`` gives the same draws: the memories of every site and the precision are all computed
    from them (common random numbers), which is what makes them add up.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro_mpe.gaussian import from_precision
    >>> q = from_precision(jnp.zeros(2), jnp.eye(2))
    >>> th = draws(q, 4)
    >>> th.shape, bool(jnp.allclose(th.mean(0), 0.0))
    ((4, 2), True)
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    num_samples = int(num_samples)
    half = (num_samples + 1) // 2
    z = jax.random.normal(rng_key, (half, posterior.dim), posterior.mean.dtype)
    z = jnp.concatenate([z, -z])[:num_samples]
    return posterior.mean + posterior.unwhiten(z.T).T


def _stream_mean(fn: Callable, thetas):
    """(1/S) Σ_s fn(θ_s), one draw at a time inside one compiled scan (no S-sized intermediate)."""
    first = jax.eval_shape(fn, thetas[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(acc, theta):
        return jax.tree_util.tree_map(jnp.add, acc, fn(theta)), None

    total, _ = jax.lax.scan(body, zeros, thetas)
    return jax.tree_util.tree_map(lambda a: a / thetas.shape[0], total)


def _diag_matrix(d):
    """Batch of diagonal matrices from ``d`` of shape ``(..., P)``."""
    return d[..., :, None] * jnp.eye(d.shape[-1], dtype=d.dtype)


# ---------------------------------------------------------------- precision
def consistent_precision(adapter: ModelAdapter, posterior: GaussianPosterior, *,
                         num_samples: int = DEFAULT_SAMPLES, rng_key=None, method: str = "mc",
                         diagonal: bool = False) -> PrecisionEstimate:
    """The precision consistent with the variational memories: S = E_q[∇²U(θ)].

    S = Σ_i Ĥ_i + E_q[∇²R] over all observed sites, with the Ĥ_i of :func:`variational_memories` for the same
    ``posterior``, ``num_samples``, ``rng_key``, ``method`` and ``diagonal`` (the same draws), to round-off.

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
    >>> from numpyro_mpe.model.adapter import ModelAdapter
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
    _check_method(method, num_samples)
    dtype = posterior.mean.dtype

    def at(theta):
        g = jax.grad(adapter.potential)(theta)
        h = jax.hessian(adapter.potential)(theta)
        h = 0.5 * (h + h.T)
        return g, (jnp.diagonal(h) if diagonal else h)

    if method == "delta":
        grad, h = jax.jit(at)(posterior.mean)
        used = 1
    else:
        thetas = draws(posterior, num_samples, rng_key)
        grad, h = jax.jit(lambda t: _stream_mean(at, t))(thetas)
        used = int(num_samples)
    prec = jnp.diag(h) if diagonal else h
    return PrecisionEstimate(jnp.asarray(prec, dtype), grad, method, used, bool(diagonal))


# ---------------------------------------------------------------- memories
def _factored_mc(adapter: ModelAdapter, thetas, var_name: str, pred: PredictorState):
    """E_q[e_i] and E_q[Λ_i] through a linear predictor: ĝ_i = J_iᵀ ē_i, Ĥ_i = J_iᵀ Λ̄_i J_i."""
    site = adapter.observed[var_name]
    f = site.predictor.log_lik
    active = jnp.asarray(pred.active)
    w = jnp.ones(site.num_obs, thetas.dtype) if pred.weights is None else pred.weights
    y = site.flat_value

    derivs3 = predictor_derivs(f, active)

    def derivs(eta_all, yi, aux, wi):
        return derivs3(eta_all, yi, aux, wi)[1:]

    def at(theta):
        eta = adapter.eta(theta, var_name)
        return jax.vmap(derivs)(eta, y, pred.aux, w)

    return jax.jit(lambda t: _stream_mean(at, t))(thetas)


def _dense_mc(adapter: ModelAdapter, thetas, var_name: str, diagonal: bool):
    """E_q[∇ℓ_i] and E_q[∇²ℓ_i] (or its diagonal) with exact Hessians at every draw."""
    p = thetas.shape[1]
    eye = jnp.eye(p, dtype=thetas.dtype)

    def neg_ll(t):
        return -adapter.log_lik(t, var_name)

    grad_fn = jax.jacfwd(neg_ll)  # (N, P)

    def at(theta):
        g = grad_fn(theta)
        cols = jax.lax.map(lambda e: jax.jvp(grad_fn, (theta,), (e,))[1], eye)  # (P, N, P)
        h = jnp.transpose(cols, (1, 0, 2))
        h = 0.5 * (h + jnp.swapaxes(h, -1, -2))
        return g, (jnp.diagonal(h, axis1=-2, axis2=-1) if diagonal else h)

    return jax.jit(lambda t: _stream_mean(at, t))(thetas)


def _diagonalize(mem: Memories) -> Memories:
    if mem.factored:
        d = jnp.einsum("nkp,nkl,nlp->np", mem.jac, mem.lam, mem.jac)
    else:
        d = jnp.diagonal(mem.dense, axis1=-2, axis2=-1)
    return Memories(mem.grad, dense=_diag_matrix(d))


def variational_memories(adapter: ModelAdapter, posterior: GaussianPosterior, var_name: str, *,
                         num_samples: int = DEFAULT_SAMPLES, rng_key=None, method: str = "mc",
                         diagonal: bool = False, pred: PredictorState | None = None) -> Memories:
    """Memories ĝ_i = E_q[∇ℓ_i], Ĥ_i = E_q[∇²ℓ_i] of every observation of ``var_name`` under q.

    ``method="mc"`` averages exact memories over ``num_samples`` antithetic draws from q (:func:`draws`, the
    same for every observation and site), streamed draw by draw; through the predictor (factored, no P × P
    work per observation) where η_i(θ) is linear in θ, else with dense exact Hessians.  ``method="delta"``
    takes the values at the mean.  With ``diagonal=True`` only the diagonals of the Ĥ_i are kept (dense
    diagonal matrices), matching the diagonal precision of a mean-field q.  The memories, summed over all
    observed sites, plus E_q[∇²R] equal :func:`consistent_precision` with the same settings.

    Parameters
    ----------
    adapter : ModelAdapter
        The model with its data.
    posterior : GaussianPosterior
        The variational q whose expectations are taken.
    var_name : str
        Observed site.
    num_samples : int, default 256
        Draws from q for ``method="mc"``.
    rng_key : jax.random.PRNGKey, optional
        Key of the draws; ``PRNGKey(0)`` by default (use the key of :func:`consistent_precision`).
    method : {"mc", "delta"}
        Monte Carlo expectation or value at the mean.
    diagonal : bool, default False
        Diagonal memories (mean-field q).
    pred : PredictorState, optional
        The site's predictor at the mean (computed if the site has one and it is not given).

    Returns
    -------
    Memories
        Factored (``jac``, ``lam``, ``resid``) or dense (``dense``); ``grad`` is ĝ.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro_mpe.model.adapter import ModelAdapter
    >>> from numpyro_mpe.gaussian import from_precision
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 1))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Bernoulli(logits=b * x), obs=y)
    >>> x = jnp.linspace(-1, 1, 5)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": (x > 0) * 1.0})
    >>> q = from_precision(jnp.zeros(1), 4.0 * jnp.eye(1))
    >>> mem = variational_memories(ad, q, "y", num_samples=64)
    >>> mem.factored, mem.hess.shape
    (True, (5, 1, 1))
    """
    _check_method(method, num_samples)
    site = adapter.observed[var_name]
    m = posterior.mean
    if pred is None and site.predictor is not None:
        pred = predictor_state(adapter, m, var_name)
    if method == "delta":
        mem = delta_memories(adapter, m, var_name, pred)
        return _diagonalize(mem) if diagonal else mem
    thetas = draws(posterior, num_samples, rng_key)
    if pred is not None and len(pred.active) and predictor_is_linear(adapter, m, var_name, pred.active):
        e, lam = _factored_mc(adapter, thetas, var_name, pred)
        mem = Memories(jnp.einsum("nkp,nk->np", pred.jac, e), jac=pred.jac, lam=lam, resid=e)
        return _diagonalize(mem) if diagonal else mem
    grad, h = _dense_mc(adapter, thetas, var_name, diagonal)
    return Memories(grad, dense=_diag_matrix(h) if diagonal else h)


# ---------------------------------------------------------------- assembling a variational fit
class VariationalPosterior(NamedTuple):
    """What a variational backend hands to :class:`~numpyro_mpe.fit.Fit`.

    ``posterior`` is N(m, S⁻¹) with the guide's mean and the consistent precision S = E_q[∇²U];
    ``memories_fn`` computes the memories of a site under the *guide's* q with the same draws; ``info`` holds
    the diagnostics (``precision_rel_diff`` = ‖S − Σ_q⁻¹‖_F / ‖Σ_q⁻¹‖_F, ``grad_norm`` = max |E_q[∇U]|,
    the settings) and the guide's own Gaussian under ``q``.
    """

    posterior: GaussianPosterior
    memories_fn: Callable
    info: dict


def variational_posterior(adapter: ModelAdapter, q: GaussianPosterior, *, num_samples: int = DEFAULT_SAMPLES,
                          rng_key=None, method: str = "mc", diagonal: bool = False) -> VariationalPosterior:
    """The Fit's posterior and memories for a variational Gaussian q (shared by the VI backends).

    The mean is q's; the precision is :func:`consistent_precision` (which equals q's own precision at a VI
    optimum, up to Monte Carlo error: their relative difference is ``info["precision_rel_diff"]``), so that
    the memories of :func:`variational_memories`, computed lazily per observed site with the same draws, add
    up to it with the prior's curvature.

    Parameters
    ----------
    adapter : ModelAdapter
        The model with its data.
    q : GaussianPosterior
        The variational Gaussian (mean, precision, Cholesky of the precision).
    num_samples, rng_key, method, diagonal
        As in :func:`variational_memories`.

    Returns
    -------
    VariationalPosterior

    Raises
    ------
    PosteriorError
        If E_q[∇²U] is not positive definite (then try ``method="delta"`` at a mode or more draws).

    Examples
    --------
    >>> vp = variational_posterior(adapter, q, num_samples=128)  # doctest: +SKIP
    >>> fit = Fit(adapter, vp.posterior, "svi", vp.info, memories_fn=vp.memories_fn)  # doctest: +SKIP
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    est = consistent_precision(adapter, q, num_samples=num_samples, rng_key=rng_key, method=method,
                               diagonal=diagonal)
    prec = np.asarray(est.precision)
    if not np.all(np.isfinite(prec)):
        rows = np.flatnonzero(~np.all(np.isfinite(prec), axis=1))
        raise PosteriorError(f"E_q[∇²U] is not finite in the latent site(s) {adapter.site_names_of(rows)}")
    post = from_precision(q.mean, est.precision)
    if not bool(jnp.all(jnp.isfinite(post.chol))):
        vals = np.linalg.eigvalsh(0.5 * (prec + prec.T))
        raise PosteriorError(
            f"the precision consistent with the memories, E_q[∇²U] ({method}, {est.num_samples} draws), is "
            f"not positive definite (smallest eigenvalue {vals.min():.3g}): the potential is not convex over "
            "q's bulk; try memories='delta' (curvature at the mean), more draws, or a better-converged fit")
    guide_prec = q.precision
    ref = jnp.diag(jnp.diagonal(guide_prec)) if diagonal else guide_prec
    rel = float(jnp.linalg.norm(est.precision - ref) / jnp.linalg.norm(ref))
    info: dict[str, Any] = {
        "precision_rel_diff": rel,
        "grad_norm": float(jnp.max(jnp.abs(est.grad))),
        "memories": method,
        "memory_samples": est.num_samples,
        "diagonal": bool(diagonal),
        "q": q,
    }

    def memories_fn(fit, var_name: str) -> Memories:
        pred = fit.predictor_state(var_name) if fit.adapter.observed[var_name].predictor is not None else None
        return variational_memories(fit.adapter, q, var_name, num_samples=num_samples, rng_key=rng_key,
                                    method=method, diagonal=diagonal, pred=pred)

    return VariationalPosterior(post, memories_fn, info)
