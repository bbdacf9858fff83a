"""The MAP and the precision of a Laplace fit from sums over chunks of observations.

U(θ) = R(θ) + Σ_i w_i ℓ_i(θ) with R the prior part (:func:`numpyro_mpe.model.rows.prior_potential`, on one
row); its gradient and curvature are sums of per-chunk terms (:mod:`numpyro_mpe.engine.sums`), so no pass
holds more than one chunk's Jacobian (``chunk·K·P``) besides P×P (or P) sums.

* :func:`streamed_newton`: damped Newton (:mod:`numpyro_mpe.inference.newton`) on those sums: exact curvature
  where the predictor is linear, Gauss–Newton (GGN) otherwise; for P up to a few thousand.
* :func:`streamed_lbfgs`: L-BFGS (optax, zoom line search) on the same objective, for wide models.
* :func:`structured_precision`: S = ∇²R + Σ_i J_iᵀΛ_iJ_i as full, diagonal, or diagonal plus rank r
  (top-r eigenpairs of the likelihood curvature, the diagonal kept exact).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from numpyro_mpe.derivatives import value_grad_hessian
from numpyro_mpe.engine.sums import site_sums, total_loss_fn
from numpyro_mpe.engine.terms import SiteData
from numpyro_mpe.errors import PosteriorError
from numpyro_mpe.gaussian import (
    DiagGaussianPosterior,
    LowRankGaussianPosterior,
    from_precision,
    standard_normal,
)
from numpyro_mpe.inference.newton import minimize_host
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.rows import RowPlan, prior_potential
from numpyro_mpe.programs import jit


class MapResult(NamedTuple):
    theta: jax.Array
    value: float
    grad: jax.Array
    steps: int


@partial(jit, static_argnames=("plan", "hessian"))
def prior_derivatives(adapter: ModelAdapter, theta, plan: RowPlan | None, hessian: bool = True):
    """R(θ), ∇R(θ) and (``hessian``) ∇²R(θ) of the prior part of the potential."""
    def fn(t):
        return prior_potential(adapter, t, plan)

    if hessian:
        return value_grad_hessian(fn)(theta)
    value, grad = jax.value_and_grad(fn)(theta)
    return value, grad, None


@partial(jit, static_argnames=("plan",))
def _prior_hvp(adapter: ModelAdapter, theta, v, plan: RowPlan | None):
    return jax.jvp(jax.grad(lambda s: prior_potential(adapter, s, plan)), (theta,), (v,))[1]


def prior_hess_diag(adapter: ModelAdapter, theta, plan: RowPlan | None, dense_limit: int = 4096):
    """diag ∇²R(θ): exact for P ≤ ``dense_limit``; above, ∇²R·1, checked to be diagonal."""
    p = theta.shape[0]
    if p <= dense_limit:
        return jnp.diagonal(prior_derivatives(adapter, theta, plan)[2])
    d = _prior_hvp(adapter, theta, jnp.ones_like(theta), plan)
    r = jnp.asarray(np.where(np.random.default_rng(11).random(p) < 0.5, 1.0, -1.0), theta.dtype)
    atol = 1e-8 * (1 + jnp.max(jnp.abs(d)))
    if not bool(jnp.allclose(_prior_hvp(adapter, theta, r, plan), d * r, rtol=1e-6, atol=atol)):
        raise PosteriorError(
            f"the prior's Hessian couples the {p} parameters, so its diagonal cannot be read from one "
            "Hessian-vector product; use independent priors (e.g. Normal(...).expand(...)) for a wide model "
            "with posterior='diag' or 'lowrank'")
    return d


def streamed_newton(site: SiteData, theta0, *, max_steps: int = 200, gtol: float = 1e-8,
                    progress: bool = True) -> MapResult:
    """Damped Newton on U = R + Σ_chunks with H = ∇²R + Σ JᵀΛJ (the oracle is a pass over the chunks)."""
    adapter, plan = site.adapter, site.plan

    def vgh(t):
        v, g, h = site_sums(site, t, "all", "full")
        rv, rg, rh = prior_derivatives(adapter, t, plan)
        return v + rv, g + rg, h + rh

    bar = tqdm(total=max_steps, desc="Newton over chunks", disable=not progress, leave=False)
    state = minimize_host(vgh, theta0, gtol=gtol, max_steps=max_steps, progress=bar)
    bar.close()
    return MapResult(state.theta, float(state.value), state.grad, int(state.steps))


def streamed_lbfgs(site: SiteData, theta0, *, max_steps: int = 500, gtol: float = 1e-8,
                   memory: int = 20) -> MapResult:
    """L-BFGS (``optax.lbfgs``, zoom line search) on U = R + Σ_chunks, the sum over chunks inside one
    program (``lax.map``); stops at ‖g‖_∞ ≤ gtol·max(1, |U|) or after ``max_steps``."""
    import optax

    total = total_loss_fn(site)
    adapter, plan = site.adapter, site.plan

    def fun(t):
        return total(t) + prior_potential(adapter, t, plan)

    opt = optax.lbfgs(memory_size=memory)
    vg = optax.value_and_grad_from_state(fun)

    def cond(carry):
        t, state, k, v, g = carry
        return (k < max_steps) & (jnp.max(jnp.abs(g)) > gtol * jnp.maximum(1.0, jnp.abs(v))) & jnp.isfinite(v)

    def body(carry):
        t, state, k, _, _ = carry
        v, g = vg(t, state=state)
        updates, state = opt.update(g, state, t, value=v, grad=g, value_fn=fun)
        return optax.apply_updates(t, updates), state, k + 1, v, g

    @jit
    def run(t0):
        state = opt.init(t0)
        v0, g0 = jax.value_and_grad(fun)(t0)
        t, state, k, _, _ = jax.lax.while_loop(cond, body, (t0, state, 0, v0, g0))
        v, g = jax.value_and_grad(fun)(t)
        return t, v, g, k

    t, v, g, k = run(theta0)
    return MapResult(t, float(v), g, int(k))


def structured_precision(site: SiteData, theta, structure: str, rank: int = 10, rng_key=None):
    """The posterior at ``theta`` with precision S = ∇²R + Σ_i J_iᵀΛ_iJ_i in the given structure."""
    adapter, plan = site.adapter, site.plan
    p = theta.shape[0]
    if structure == "full":
        _, _, g = site_sums(site, theta, "all", "full")
        return from_precision(theta, g + prior_derivatives(adapter, theta, plan)[2])
    d_prior = prior_hess_diag(adapter, theta, plan)
    _, _, g_diag = site_sums(site, theta, "all", "diag")
    if structure == "diag":
        return DiagGaussianPosterior(theta, d_prior + g_diag)
    rank = int(min(rank, p))
    if p <= 2048:
        _, _, g = site_sums(site, theta, "all", "full")
        lam, vec = jnp.linalg.eigh(0.5 * (g + g.T))
        lam, vec = lam[::-1][:rank], vec[:, ::-1][:, :rank]
    else:  # randomized range finder with one power step, on Σ JᵀΛJ products streamed over chunks
        key = jax.random.PRNGKey(5) if rng_key is None else rng_key
        omega = standard_normal(key, (p, min(p, rank + 10)), theta.dtype)
        y = site_sums(site, theta, "all", "matvec", omega)[2]
        q, _ = jnp.linalg.qr(site_sums(site, theta, "all", "matvec", jnp.linalg.qr(y)[0])[2])
        b = q.T @ site_sums(site, theta, "all", "matvec", q)[2]
        lam, z = jnp.linalg.eigh(0.5 * (b + b.T))
        lam, vec = lam[::-1][:rank], (q @ z)[:, ::-1][:, :rank]
    lam = jnp.clip(lam, 0.0, None)
    factor = vec * jnp.sqrt(lam)
    d = d_prior + jnp.clip(g_diag - jnp.sum(factor**2, axis=1), 0.0, None)
    if not bool(jnp.all(d > 0)):
        warnings.warn("lowrank posterior: non-positive diagonal entries were raised to 1e-12", stacklevel=3)
        d = jnp.maximum(d, 1e-12)
    return LowRankGaussianPosterior.build(theta, d, factor)


def check_structured(adapter: ModelAdapter, post) -> None:
    """Refuse a non-finite or non-positive diagonal, naming the latent sites."""
    d = np.asarray(post.precision_diag if hasattr(post, "precision_diag") else post.diag)
    bad = np.flatnonzero(~np.isfinite(d) | (d <= 0))
    if bad.size:
        labels = adapter.param_labels()
        raise PosteriorError(
            f"the {post.structure} precision is not finite and positive in {bad.size} entries, in the latent "
            f"site(s) {adapter.site_names_of(bad)} ({[labels[i] for i in bad[:8]]})")
