"""The variational online Newton (VON) update of natural-gradient Gaussian VI, as pure functions of a state.

q(θ) = N(m, S⁻¹) over the flat unconstrained θ of :class:`~numpyro_mpe.model.ModelAdapter`, in the
parametrization of IVON (Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML
2024).  With λ the effective sample size (by default N, the number of observations) the state is ``mean`` m,
``hess`` h with S = λ h (the precision per observation: the prior is folded into the potential U = Σ_i ℓ_i
+ R,
so IVON's weight decay is zero), and ``momentum`` ḡ.

One step, with θ_k = m + ε_k, ε_k ~ N(0, S⁻¹) (``mc_samples`` draws, optionally antithetic pairs ±ε_k):

    ĝ = mean_k ∇U_w(θ_k) / λ
    ĥ = mean_k ∇U_w(θ_k) ⊙ ε_k ⊙ h          (diagonal: reparameterization estimate of diag ∇²U / λ)
    ĥ = mean_k ∇²U_w(θ_k) / λ               (full: exact Hessians at the draws, for small P)
    ḡ ← β₁ ḡ + (1 − β₁) ĝ
    h ← h + (1 − β₂)(ĥ − h) + ½(1 − β₂)² (ĥ − h) h⁻¹ (ĥ − h)
    m ← m − α_t · h⁻¹ ḡ / (1 − β₁ᵗ)

The last term of the h update is IVON's correction: h_new = ½[h + (h + rd) h⁻¹ (h + rd)] with r = 1 − β₂,
d = ĥ − h, so h stays positive (definite) for any ĥ, including the indefinite Hessians of a non-convex U.
At a
fixed point E_q[∇U] = 0 and S = E_q[∇²U] (full) — the stationarity conditions of the Gaussian variational
objective, the posterior whose memories the MPE perturbs.

**Weights.**  U_w(θ) = U(θ) + Σ_i (1 − w_i) log p(y_i | θ) on the site ``site_name``: w = 0 removes an
observation (refits); minibatches of ``subsample_size`` B draw B observations per step without replacement
and weight them N/B.

:func:`von_block` runs n steps in one compiled program (one per configuration, model structure and data
shapes); a step whose result is not finite is not taken and the step number is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular

from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit


class NGVIState(NamedTuple):
    """State of natural-gradient VI: q = N(mean, (ess · hess)⁻¹).

    ``hess`` is h, ``(P,)`` (diagonal) or ``(P, P)`` (full): the precision per unit of effective sample size
    λ = ``ess``; ``momentum`` the exponential average of ĝ = ∇U/λ; ``step`` the steps taken; ``rng_key`` the
    key of the next step's draws.
    """

    mean: jax.Array
    hess: jax.Array
    momentum: jax.Array
    step: jax.Array
    rng_key: jax.Array


@dataclass(frozen=True)
class ConstantLR:
    """A constant learning rate as a schedule ``step -> lr`` (hashable: equal rates share programs)."""

    value: float

    def __call__(self, step):
        return self.value


class VONConfig(NamedTuple):
    """The static settings of the update (hashable: the key of its compiled programs)."""

    full: bool
    ess: float
    mc_samples: int
    antithetic: bool
    beta1: float
    beta2: float
    clip_radius: float | None
    site_name: str
    subsample_size: int | None
    lr_fn: Callable


def von_init(mean, hess_init, full: bool, rng_key) -> NGVIState:
    """The initial state: m, h = ``hess_init`` (times the identity for a full precision), zero momentum."""
    p = mean.shape[0]
    h0 = jnp.broadcast_to(jnp.asarray(hess_init, mean.dtype), (p,))
    return NGVIState(mean, jnp.diag(h0) if full else h0, jnp.zeros_like(mean), jnp.asarray(0), rng_key)


def von_precision(config: VONConfig, state: NGVIState):
    """S = λ h."""
    return config.ess * state.hess


def von_step(adapter: ModelAdapter, config: VONConfig, state: NGVIState, w, lr_const, weighted: bool):
    """One step; returns the new state and whether it is finite (and h positive definite)."""
    def u_w(theta, w):
        u = adapter.potential(theta)
        if not weighted:
            return u
        return u + jnp.sum((1.0 - w) * adapter.log_lik(theta, config.site_name))

    m, h, mom = state.mean, state.hess, state.momentum
    p, dtype, lam = m.shape[0], m.dtype, config.ess
    t = state.step + 1
    key, k_z, k_b = jax.random.split(state.rng_key, 3)
    lr = jnp.where(jnp.isnan(lr_const), jnp.asarray(config.lr_fn(state.step), dtype), lr_const)
    if config.subsample_size is not None:
        n, b = adapter.observed[config.site_name].num_obs, int(config.subsample_size)
        idx = jax.random.choice(k_b, n, (b,), replace=False)
        w = w * jnp.zeros(n, dtype).at[idx].set(n / b)
    z = jax.random.normal(k_z, (config.mc_samples, p), dtype)
    if config.antithetic:
        z = jnp.concatenate([z, -z])
    if config.full:
        chol = jnp.linalg.cholesky(lam * h)
        eps = solve_triangular(chol.T, z.T, lower=False).T
    else:
        eps = z / jnp.sqrt(lam * h)
    thetas = m + eps
    grads = jax.vmap(jax.grad(u_w), in_axes=(0, None))(thetas, w)
    g_hat = jnp.mean(grads, 0) / lam
    r = 1.0 - config.beta2
    if config.full:
        hess = jax.vmap(jax.hessian(u_w), in_axes=(0, None))(thetas, w)
        h_hat = jnp.mean(hess, 0) / lam
        h_hat = 0.5 * (h_hat + h_hat.T)
        d = h_hat - h
        h_new = h + r * d + 0.5 * r**2 * d @ cho_solve((jnp.linalg.cholesky(h), True), d)
        h_new = 0.5 * (h_new + h_new.T)
    else:
        d = jnp.mean(grads * eps, 0) * h - h
        h_new = h + r * d + 0.5 * r**2 * d * d / h
    mom_new = config.beta1 * mom + (1.0 - config.beta1) * g_hat
    g_bar = mom_new / (1.0 - config.beta1 ** t.astype(dtype))
    if config.full:
        chol_new = jnp.linalg.cholesky(h_new)
        delta = cho_solve((chol_new, True), g_bar)
        pd_ok = jnp.all(jnp.isfinite(chol_new))
    else:
        delta = g_bar / h_new
        pd_ok = jnp.all(h_new > 0)
    if config.clip_radius is not None:
        delta = jnp.clip(delta, -config.clip_radius, config.clip_radius)
    m_new = m - lr * delta
    new = NGVIState(m_new, h_new, mom_new, t, key)
    ok = pd_ok & jnp.all(jnp.isfinite(m_new)) & jnp.all(jnp.isfinite(h_new)) & jnp.all(jnp.isfinite(mom_new))
    return new, ok


@partial(jit, static_argnames=("config", "weighted"))
def von_block(adapter: ModelAdapter, state: NGVIState, n, w, lr_const, diverged_at, *, config: VONConfig,
              weighted: bool):
    """``n`` steps (traced) from ``state``; a step whose result is not finite is not taken: the state stays
    the last finite one and ``diverged_at`` records the step number (1-based); later steps are skipped.
    ``lr_const``: a constant learning rate (NaN: the schedule's)."""
    def body(_, carry):
        s, div = carry

        def do(s):
            new, ok = von_step(adapter, config, s, w, lr_const, weighted)
            kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, s)
            return kept, jnp.where(ok, div, new.step)

        return jax.lax.cond(div >= 0, lambda s: (s, div), do, s)

    return jax.lax.fori_loop(0, n, body, (state, diverged_at))


@partial(jit, static_argnames=("config",))
def von_paired_block(adapter: ModelAdapter, state: NGVIState, n, ws, lr_const, diverged_at, *,
                     config: VONConfig):
    """:func:`von_block` (weighted) for each row of ``ws`` from the same state, with common random numbers."""
    return jax.vmap(lambda w: von_block(adapter, state, n, w, lr_const, diverged_at, config=config,
                                        weighted=True))(ws)
