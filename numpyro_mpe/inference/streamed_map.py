"""The MAP and the precision of a Laplace fit from sums over chunks of observations.

U(θ) = R(θ) + Σ_i w_i ℓ_i(θ) with R the prior part (:func:`numpyro_mpe.engine.streaming.prior_potential`); its
gradient and curvature are sums of per-chunk terms of
:class:`numpyro_mpe.engine.streaming.StreamingSite`, so no
pass holds more than one chunk's Jacobian (``chunk·K·P``) besides P×P (or P) sums.

* :func:`chunked_newton`: damped Newton (Levenberg) on those sums: exact curvature where the predictor is
  linear, Gauss–Newton (GGN) otherwise; for P up to a few thousand.
* :func:`chunked_lbfgs`: L-BFGS (optax, zoom line search) on the same objective, for wide models.
* :func:`structured_precision`: S = ∇²R + Σ_i J_iᵀΛ_iJ_i as full, diagonal, or diagonal plus rank r
  (top-r eigenpairs of the likelihood curvature, the diagonal kept exact).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from numpyro_mpe.engine.streaming import StreamingSite, prior_potential
from numpyro_mpe.errors import PosteriorError
from numpyro_mpe.gaussian import DiagGaussianPosterior, LowRankGaussianPosterior, from_precision


class MapResult(NamedTuple):
    theta: jax.Array
    value: float
    grad: jax.Array
    steps: int


class PriorPart:
    """R(θ), its gradient, Hessian (P ≤ ``dense_limit``) or Hessian diagonal."""

    def __init__(self, eng: StreamingSite):
        ad, plan, name = eng.adapter, eng.plan, eng.name
        self.fn = jax.jit(lambda t: prior_potential(ad, plan, name, t))
        self.vg = jax.jit(jax.value_and_grad(lambda t: prior_potential(ad, plan, name, t)))
        self.hess = jax.jit(jax.hessian(lambda t: prior_potential(ad, plan, name, t)))
        self._hvp = jax.jit(lambda t, v: jax.jvp(jax.grad(lambda s: prior_potential(ad, plan, name, s)),
                                                 (t,), (v,))[1])

    def hess_diag(self, theta, dense_limit: int = 4096):
        """diag ∇²R(θ): exact for P ≤ ``dense_limit``; above, ∇²R·1, checked to be diagonal."""
        p = theta.shape[0]
        if p <= dense_limit:
            return jnp.diagonal(self.hess(theta))
        d = self._hvp(theta, jnp.ones_like(theta))
        r = jnp.where(jax.random.bernoulli(jax.random.PRNGKey(11), 0.5, theta.shape), 1.0, -1.0)
        atol = 1e-8 * (1 + jnp.max(jnp.abs(d)))
        if not bool(jnp.allclose(self._hvp(theta, r), d * r, rtol=1e-6, atol=atol)):
            raise PosteriorError(
                f"the prior's Hessian couples the {p} parameters, so its diagonal cannot be read from one "
                "Hessian-vector product; use independent priors (e.g. Normal(...).expand(...)) for a wide "
                "model with posterior='diag' or 'lowrank'")
        return d


def chunked_newton(eng: StreamingSite, prior: PriorPart, theta0, *, max_steps: int = 200,
                   gtol: float = 1e-8, progress: bool = True) -> MapResult:
    """Damped Newton on U = R + Σ_chunks: (H + μI)δ = −g with H = ∇²R + Σ JᵀΛJ, μ adapted on acceptance;
    stops at ‖g‖_∞ ≤ gtol·max(1, |U|), then up to three undamped steps kept while ‖g‖_∞ shrinks."""
    eye = jnp.eye(theta0.shape[0], dtype=theta0.dtype)

    def vgh(t):
        v, g, h = eng.reduce(t, "all", "full")
        rv, rg = prior.vg(t)
        return v + rv, g + rg, h + prior.hess(t)

    def value(t):
        return eng.reduce(t, "value") + prior.fn(t)

    theta = theta0
    u, g, h = vgh(theta)
    mu, step = 1e-3, 0
    bar = tqdm(total=max_steps, desc="Newton over chunks", disable=not progress, leave=False)
    while step < max_steps and float(jnp.max(jnp.abs(g))) > gtol * max(1.0, abs(float(u))):
        step += 1
        bar.update(1)
        cand = theta + jnp.linalg.solve(0.5 * (h + h.T) + mu * eye, -g)
        uc = value(cand)
        if bool(jnp.isfinite(uc)) and float(uc) <= float(u):
            theta = cand
            u, g, h = vgh(theta)
            mu = max(mu / 10.0, 1e-12)
        else:
            mu = min(mu * 10.0, 1e12)
    bar.close()
    converged = float(jnp.max(jnp.abs(g))) <= gtol * max(1.0, abs(float(u)))
    for _ in range(3 if converged else 0):
        cand = theta - jnp.linalg.solve(0.5 * (h + h.T), g)
        uc, gc, hc = vgh(cand)
        if not (bool(jnp.isfinite(uc)) and float(jnp.max(jnp.abs(gc))) < float(jnp.max(jnp.abs(g)))
                and float(uc) <= float(u) + 1e-9 * max(1.0, abs(float(u)))):
            break
        theta, u, g, h = cand, uc, gc, hc
    return MapResult(theta, float(u), g, step)


def chunked_lbfgs(eng: StreamingSite, prior: PriorPart, theta0, *, max_steps: int = 500,
                  gtol: float = 1e-8, memory: int = 20) -> MapResult:
    """L-BFGS (``optax.lbfgs``, zoom line search) on U = R + Σ_chunks, the sum over chunks inside one
    program (``lax.map``); stops at ‖g‖_∞ ≤ gtol·max(1, |U|) or after ``max_steps``."""
    import optax

    total = eng.total_loss_fn()

    def fun(t):
        return total(t) + prior.fn(t)

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

    @jax.jit
    def run(t0):
        state = opt.init(t0)
        v0, g0 = jax.value_and_grad(fun)(t0)
        t, state, k, _, _ = jax.lax.while_loop(cond, body, (t0, state, 0, v0, g0))
        v, g = jax.value_and_grad(fun)(t)
        return t, v, g, k

    t, v, g, k = run(theta0)
    return MapResult(t, float(v), g, int(k))


def structured_precision(eng: StreamingSite, prior: PriorPart, theta, structure: str, rank: int = 10,
                         rng_key=None):
    """The posterior at ``theta`` with precision S = ∇²R + Σ_i J_iᵀΛ_iJ_i in the given structure."""
    p = theta.shape[0]
    if structure == "full":
        _, _, g = eng.reduce(theta, "all", "full")
        return from_precision(theta, g + prior.hess(theta))
    d_prior = prior.hess_diag(theta)
    _, _, g_diag = eng.reduce(theta, "all", "diag")
    if structure == "diag":
        return DiagGaussianPosterior(theta, d_prior + g_diag)
    rank = int(min(rank, p))
    if p <= 2048:
        _, _, g = eng.reduce(theta, "all", "full")
        lam, vec = jnp.linalg.eigh(0.5 * (g + g.T))
        lam, vec = lam[::-1][:rank], vec[:, ::-1][:, :rank]
    else:  # randomized range finder with one power step, on Σ JᵀΛJ products streamed over chunks
        key = jax.random.PRNGKey(5) if rng_key is None else rng_key
        omega = jax.random.normal(key, (p, min(p, rank + 10)), theta.dtype)
        y = eng.reduce(theta, "all", "matvec", omega)[2]
        q, _ = jnp.linalg.qr(eng.reduce(theta, "all", "matvec", jnp.linalg.qr(y)[0])[2])
        b = q.T @ eng.reduce(theta, "all", "matvec", q)[2]
        lam, z = jnp.linalg.eigh(0.5 * (b + b.T))
        lam, vec = lam[::-1][:rank], (q @ z)[:, ::-1][:, :rank]
    lam = jnp.clip(lam, 0.0, None)
    factor = vec * jnp.sqrt(lam)
    d = d_prior + jnp.clip(g_diag - jnp.sum(factor**2, axis=1), 0.0, None)
    if not bool(jnp.all(d > 0)):
        warnings.warn("lowrank posterior: non-positive diagonal entries were raised to 1e-12", stacklevel=3)
        d = jnp.maximum(d, 1e-12)
    return LowRankGaussianPosterior.build(theta, d, factor)


def check_structured(adapter, post) -> None:
    """Refuse a non-finite or non-positive diagonal, naming the latent sites."""
    d = np.asarray(post.precision_diag if hasattr(post, "precision_diag") else post.diag)
    bad = np.flatnonzero(~np.isfinite(d) | (d <= 0))
    if bad.size:
        labels = adapter.param_labels()
        raise PosteriorError(
            f"the {post.structure} precision is not finite and positive in {bad.size} entries, in the latent "
            f"site(s) {adapter.site_names_of(bad)} ({[labels[i] for i in bad[:8]]})")
