"""The memories of every observation: ĝ_i = E_q[∇ℓ_i] and Ĥ_i = E_q[∇²ℓ_i], ℓ_i = −log p(y_i | θ).

* The delta method (Laplace): values at the mean m.  Through the predictor, ĝ_i = J_iᵀe_i and
  Ĥ_i = J_iᵀΛ_iJ_i, with no P×P work per observation — exact where η_i(θ) is linear in θ (GLMs, location–scale
  models in NumPyro's unconstrained space), the Gauss–Newton memories otherwise; or dense exact Hessians
  (forward-over-forward, one parameter direction at a time).
* Expectations under a Gaussian q by Monte Carlo (variational fits): antithetic draws θ_s = m ± L⁻ᵀz_s common
  to all observations and sites (common random numbers), streamed draw by draw (never S × N × P × P);
  factored through a linear predictor, Ĥ_i = J_iᵀ E_q[Λ_i] J_i, else dense exact Hessians per draw.
* ``diagonal``: only the diagonals of the Ĥ_i (a mean-field q), so that they add up to a diagonal precision.

:class:`MemorySpec` says which a Fit uses; :func:`site_memories` computes them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.engine.terms import predictor_derivs
from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import draws
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit, small_work

#: Kinds of memories: at the mean (exact curvature), through the predictor at the mean, Monte Carlo under q.
MEMORY_KINDS = ("delta", "ggn", "mc")
#: Default number of draws from q for Monte Carlo memories.
DEFAULT_MEMORY_SAMPLES = 256


class MemorySpec(NamedTuple):
    """How a Fit takes its memories.

    ``kind``: ``"delta"`` (values at the mean; through the predictor where η is linear in θ, else exact
    Hessians), ``"ggn"`` (through the predictor at the mean, H_i = J_iᵀΛ_iJ_i, where the site has one) or
    ``"mc"`` (expectations under ``q`` by Monte Carlo with ``num_samples`` antithetic draws from
    ``rng_key``); ``diagonal``: keep the diagonals only (mean-field q); ``q``: the Gaussian whose expectations
    are taken (default: the fit's posterior).
    """

    kind: str = "delta"
    diagonal: bool = False
    num_samples: int = DEFAULT_MEMORY_SAMPLES
    rng_key: Any = None
    q: Any = None

    def describe(self) -> str:
        diag = ", diagonal" if self.diagonal else ""
        if self.kind == "mc":
            return f"mc: expectations under q by Monte Carlo ({self.num_samples} draws{diag})"
        if self.kind == "ggn":
            return "ggn: through the predictor at the mean of q, H_i = J_i' Lambda_i J_i (Gauss-Newton)"
        return f"delta: gradients and exact Hessians of each term at the mean of q{diag}"


class Memories:
    """Per-observation memories ĝ_i ``(N, P)`` and Ĥ_i of ℓ_i = −log p(y_i | θ).

    Ĥ_i is held either dense (``dense``, ``(N, P, P)``) or factored in predictor space,
    Ĥ_i = J_iᵀ Λ_i J_i with ``jac`` J_i ``(N, K, P)`` and ``lam`` Λ_i = ∇²_η ℓ_i ``(N, K, K)``.
    ``hess`` gives the dense form either way (materialized once, on first use); :meth:`hess_at` a few rows.
    """

    def __init__(self, grad, dense=None, jac=None, lam=None, resid=None):
        self.grad = grad
        self.dense = dense
        self.jac = jac
        self.lam = lam
        self.resid = resid  # e_i = ∇_η ℓ_i (factored form only)
        self._hess = dense

    @property
    def factored(self) -> bool:
        return self.dense is None

    @property
    def hess(self):
        """Ĥ_i for every observation, ``(N, P, P)``."""
        if self._hess is None:
            self._hess = jnp.einsum("nkp,nkl,nlq->npq", self.jac, self.lam, self.jac)
        return self._hess

    def hess_at(self, index):
        """Ĥ_i for the observations ``index`` (an int or integer array)."""
        if self.dense is not None:
            return self.dense[index]
        j = self.jac[index]
        return jnp.einsum("...kp,...kl,...lq->...pq", j, self.lam[index], j)

    def diagonalized(self) -> Memories:
        """The same memories with only the diagonals of the Ĥ_i (as dense diagonal matrices)."""
        if self.factored:
            d = jnp.einsum("nkp,nkl,nlp->np", self.jac, self.lam, self.jac)
        else:
            d = jnp.diagonal(self.dense, axis1=-2, axis2=-1)
        return Memories(self.grad, dense=diag_matrix(d))


class PredictorState(NamedTuple):
    """Predictor of a site at the mean: η_i(m) ``(N, K_all)``, J_i ``(N, K, P)`` on the active components
    ``active`` (those that depend on θ), the fixed ``aux`` parameters, the observed values and weights."""

    eta: jax.Array
    jac: jax.Array
    active: tuple
    aux: dict
    y: jax.Array
    weights: jax.Array


def diag_matrix(d):
    """Batch of diagonal matrices from ``d`` of shape ``(..., P)``."""
    return d[..., :, None] * jnp.eye(d.shape[-1], dtype=d.dtype)


def stream_mean(fn, thetas):
    """(1/S) Σ_s fn(θ_s), one draw at a time inside one compiled scan (no S-sized intermediate)."""
    first = jax.eval_shape(fn, thetas[0])
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), first)

    def body(acc, theta):
        return jax.tree_util.tree_map(jnp.add, acc, fn(theta)), None

    total, _ = jax.lax.scan(body, zeros, thetas)
    return jax.tree_util.tree_map(lambda a: a / thetas.shape[0], total)


# ---------------------------------------------------------------- one θ
def _dense_at(adapter: ModelAdapter, name: str, theta, diagonal: bool):
    """∇ℓ_i(θ) ``(N, P)`` and ∇²ℓ_i(θ) ``(N, P, P)`` (or its diagonal): gradients by forward mode, Hessians
    forward-over-forward one parameter direction at a time, so that no intermediate holds P² tangents."""
    grad_fn = jax.jacfwd(lambda t: -adapter.log_lik(t, name))
    eye = jnp.eye(theta.shape[0], dtype=theta.dtype)
    g = grad_fn(theta)
    cols = jax.lax.map(lambda e: jax.jvp(grad_fn, (theta,), (e,))[1], eye)  # (P, N, P)
    h = jnp.transpose(cols, (1, 0, 2))
    h = 0.5 * (h + jnp.swapaxes(h, -1, -2))
    return g, (jnp.diagonal(h, axis1=-2, axis2=-1) if diagonal else h)


@partial(jit, static_argnames=("name", "active"))
def _predictor_state(adapter: ModelAdapter, theta, name: str, active: tuple):
    site = adapter.observed[name]
    act = np.asarray(active)

    def eta_fn(t):
        return adapter.eta(t, name)

    jac = jax.jacfwd(lambda t: eta_fn(t)[:, act])(theta)
    w = adapter.predictor_mask(name)
    return (eta_fn(theta), jac, adapter.predictor_aux(theta, name), site.flat_value,
            jnp.ones(site.num_obs, theta.dtype) if w is None else w)


def predictor_state(adapter: ModelAdapter, theta, name: str, active: tuple) -> PredictorState:
    """η_i(θ), its Jacobian on the ``active`` components, the fixed parameters, values and weights."""
    eta, jac, aux, y, w = _predictor_state(adapter, theta, name, tuple(active))
    return PredictorState(eta, jac, tuple(active), aux, y, w)


@partial(jit, static_argnames=("name", "active", "curvature"))
def _predictor_derivs_at(adapter: ModelAdapter, eta, y, aux, w, name: str, active: tuple, curvature: str):
    from numpyro_mpe.engine.terms import psd_project

    derivs = predictor_derivs(adapter.observed[name].predictor.log_lik, active)

    def one(ea, yi, ai, wi):
        _, g, h = derivs(ea, yi, ai, wi)
        return g, (psd_project(h) if curvature == "ggn" else h)

    return jax.vmap(one)(eta, y, aux, w)


def factored_memories(adapter: ModelAdapter, name: str, pred: PredictorState,
                      curvature: str = "exact") -> Memories:
    """Memories through the predictor at its state ``pred``: ĝ_i = J_iᵀ e_i, Ĥ_i = J_iᵀ Λ_i J_i (exact when
    η is linear in θ; Λ_i PSD-projected for ``curvature="ggn"``)."""
    e, lam = _predictor_derivs_at(adapter, pred.eta, pred.y, pred.aux, pred.weights, name, pred.active,
                                  curvature)
    return Memories(jnp.einsum("nkp,nk->np", pred.jac, e), jac=pred.jac, lam=lam, resid=e)


def _quick_dense(adapter: ModelAdapter, theta, name: str, diagonal: bool) -> bool:
    """A Hessian per row (N × P² outputs from small arguments): quick only when that is small."""
    return small_work(adapter.observed[name].num_obs, int(theta.shape[-1]))


@partial(jit, static_argnames=("name", "diagonal"), quick=_quick_dense)
def _dense_memories(adapter: ModelAdapter, theta, name: str, diagonal: bool):
    return _dense_at(adapter, name, theta, diagonal)


def exact_memories(adapter: ModelAdapter, theta, name: str) -> Memories:
    """ĝ_i = ∇ℓ_i(θ) and the exact Ĥ_i = ∇²ℓ_i(θ) (delta method at ``theta``)."""
    grad, hess = _dense_memories(adapter, theta, name, False)
    return Memories(grad, dense=hess)


# ---------------------------------------------------------------- expectations under q
@partial(jit, static_argnames=("name", "active"))
def _factored_mc(adapter: ModelAdapter, thetas, y, aux, w, name: str, active: tuple):
    derivs3 = predictor_derivs(adapter.observed[name].predictor.log_lik, active)

    def at(theta):
        eta = adapter.eta(theta, name)
        return jax.vmap(lambda ea, yi, ai, wi: derivs3(ea, yi, ai, wi)[1:])(eta, y, aux, w)

    return stream_mean(at, thetas)


@partial(jit, static_argnames=("name", "diagonal"), quick=_quick_dense)
def _dense_mc(adapter: ModelAdapter, thetas, name: str, diagonal: bool):
    return stream_mean(lambda t: _dense_at(adapter, name, t, diagonal), thetas)


def expected_memories(adapter: ModelAdapter, q, name: str, *, num_samples: int = DEFAULT_MEMORY_SAMPLES,
                      rng_key=None, diagonal: bool = False, pred: PredictorState | None = None,
                      linear: bool = False) -> Memories:
    """Memories ĝ_i = E_q[∇ℓ_i], Ĥ_i = E_q[∇²ℓ_i] of every observation of ``name`` by Monte Carlo.

    ``num_samples`` antithetic draws from q (:func:`numpyro_mpe.gaussian.draws`, the same for every
    observation and site), streamed draw by draw; through the predictor state ``pred`` (factored, no P × P
    work per observation) where η_i(θ) is ``linear`` in θ, else with dense exact Hessians.  With
    ``diagonal=True`` only the diagonals of the Ĥ_i are kept (dense diagonal matrices).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> from numpyro_mpe.model import ModelAdapter
    >>> from numpyro_mpe.gaussian import from_precision
    >>> from numpyro_mpe.io.toy import logistic_line_model as model
    >>> x = jnp.linspace(-1, 1, 5)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": (x > 0) * 1.0})
    >>> q = from_precision(jnp.zeros(1), 4.0 * jnp.eye(1))
    >>> mem = expected_memories(ad, q, "y", num_samples=64)
    >>> mem.grad.shape, mem.hess.shape
    ((5, 1), (5, 1, 1))
    """
    if int(num_samples) < 1:
        raise MPEError(f"num_samples must be a positive integer for Monte Carlo memories, got {num_samples}")
    thetas = draws(q, num_samples, rng_key)
    if pred is not None and linear:
        e, lam = _factored_mc(adapter, thetas, pred.y, pred.aux, pred.weights, name, pred.active)
        mem = Memories(jnp.einsum("nkp,nk->np", pred.jac, e), jac=pred.jac, lam=lam, resid=e)
        return mem.diagonalized() if diagonal else mem
    grad, h = _dense_mc(adapter, thetas, name, bool(diagonal))
    return Memories(grad, dense=diag_matrix(h) if diagonal else h)
