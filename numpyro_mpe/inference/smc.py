"""Tempered sequential Monte Carlo from a fit's Gaussian to the posterior, for when q is not the posterior.

Where the global check says importance sampling cannot correct q (Pareto k̂ > 0.7, e.g. a hierarchical
model whose Laplace scale is several times the posterior's), ``fit.loo(method="auto")`` needs draws from the
posterior itself.  This sampler starts from a heavy-tailed, widened version of q and moves its particles
through the tempered targets

    π_b(w) ∝ g₀(w)^(1−b) · p(θ(w), y)^b,   0 = b₀ < b₁ < … < 1,

in q's whitened coordinates w (θ = m + L⁻ᵀw; g₀ = t_df(0, c² I)): each next temperature is chosen by
bisection so that the effective sample size of the incremental weights is ``ess_frac`` of the particles,
the particles are resampled (systematic) and moved by preconditioned MALA steps whose preconditioner is the
particles' covariance and whose step size adapts to the acceptance rate (Chopin & Papaspiliopoulos 2020,
ch. 17; Del Moral, Doucet & Jasra 2006).  The moves of a stage come in blocks of :data:`MOVE_BLOCK` steps and
stop once the particles' mean squared jump from the stage's start, d = mean_s ‖C⁻¹(w_s − w_s⁰)‖² (C the
preconditioner's Cholesky factor), shows that they have forgotten their resampled copies: d ≥ 2P(1 − ρ_max),
a mean correlation with the start of at most ρ_max (:data:`MAX_CORRELATION`), or d grows by less than
:data:`JUMP_GROWTH` over a block (the adaptive rule of Chopin & Papaspiliopoulos 2020, ch. 17).  The product
of the mean incremental weights estimates the normalizing constant.  Its cost is at most num_particles ×
num_mcmc × stages gradient evaluations of the potential: meant for the small and medium models where q can
fail (hundreds of parameters, thousands of rows).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp  # host-side: the weights are NumPy arrays
from tqdm.auto import tqdm

from numpyro_mpe.gaussian import base_draws, base_logpdf, host_generator
from numpyro_mpe.programs import jit

#: MALA steps per block of a stage's moves (one compiled program for every stage).
MOVE_BLOCK = 5
#: A stage's moves stop when a block grows the mean squared jump from the stage's start by less than this.
JUMP_GROWTH = 0.1
#: ... or when the particles' mean correlation with their start is at most this (intermediate stages, last
#: stage): E‖C⁻¹(w − w⁰)‖² = 2P(1 − ρ) for draws w⁰, w of the stage's target with correlation ρ.
MAX_CORRELATION = (0.2, 0.1)


class SMCResult(NamedTuple):
    """Equally weighted particles θ (M, P) from the posterior, log Z(posterior)/Z(g₀) (up to g₀'s constant),
    the number of tempering stages, and the mean MALA acceptance and the MALA steps of each stage."""

    theta: np.ndarray
    log_z: float
    stages: int
    acceptance: list
    steps: list


@partial(jit, static_argnames=("inflate",))
def _to_theta(post, w, *, inflate):
    return post.mean + post.unwhiten(inflate * w.T).T


def _potential_w(adapter, post, w, inflate):
    u = adapter.potential(post.mean + post.unwhiten(inflate * w))
    return jnp.where(jnp.isfinite(u), u, jnp.inf)


@partial(jit, static_argnames=("df", "inflate"))
def _increments(adapter, post, w, *, df, inflate):
    """−U(θ(w)) − log g₀(w) per particle: the log incremental weight of a unit rise in temperature."""
    return jax.vmap(lambda x: -_potential_w(adapter, post, x, inflate) - base_logpdf(x, df))(w)


@partial(jit, static_argnames=("steps", "df", "inflate"))
def _mala(adapter, post, key, w, b, chol, eps, *, steps, df, inflate):
    """``steps`` preconditioned MALA moves of every particle under π_b; returns particles and acceptance."""
    def log_pi(x):
        return (1.0 - b) * base_logpdf(x, df) - b * _potential_w(adapter, post, x, inflate)

    value_grad = jax.value_and_grad(log_pi)
    mass = chol @ chol.T

    def finite(lp, g):
        ok = jnp.isfinite(lp) & jnp.all(jnp.isfinite(g))
        return jnp.where(ok, lp, -jnp.inf), jnp.where(ok, g, 0.0)

    def log_kernel(to, frm, g_frm):
        d = jax.scipy.linalg.solve_triangular(chol, to - frm - 0.5 * eps**2 * mass @ g_frm, lower=True)
        return -0.5 * jnp.sum(d * d) / eps**2

    def chain(k, x):
        def step(carry, kk):
            x, lp, g, acc = carry
            y = x + 0.5 * eps**2 * mass @ g + eps * chol @ jax.random.normal(kk, x.shape, x.dtype)
            lpy, gy = finite(*value_grad(y))
            log_a = lpy - lp + log_kernel(x, y, gy) - log_kernel(y, x, g)
            ok = jnp.log(jax.random.uniform(jax.random.fold_in(kk, 1), dtype=x.dtype)) < log_a
            return (jnp.where(ok, y, x), jnp.where(ok, lpy, lp), jnp.where(ok, gy, g), acc + ok), None

        lp0, g0 = finite(*value_grad(x))
        (x, _, _, acc), _ = jax.lax.scan(step, (x, lp0, g0, 0.0), jax.random.split(k, steps))
        return x, acc / steps

    return jax.vmap(chain)(jax.random.split(key, w.shape[0]), w)


def _moves(adapter, post, key, w, b, chol, eps, *, most, df, inflate):
    """Blocks of :data:`MOVE_BLOCK` MALA steps under π_b until the mean squared jump from the start, in the
    preconditioner's metric, reaches 2P(1 − ρ_max) (:data:`MAX_CORRELATION`) or grows by less than
    :data:`JUMP_GROWTH` over a block, or ``most`` steps.  Returns the particles, the mean acceptance and the
    steps taken."""
    dtype = post.mean.dtype
    enough = 2.0 * w.shape[-1] * (1.0 - MAX_CORRELATION[1 if b >= 1.0 else 0])
    most = max(most, 1)
    start = np.asarray(w)
    x = jnp.asarray(w, dtype)
    b, eps, chol_j = jnp.asarray(b, dtype), jnp.asarray(eps, dtype), jnp.asarray(chol, dtype)
    jump, taken, accepted = 0.0, 0, 0.0
    while taken < most:
        block = min(MOVE_BLOCK, most - taken)
        key, k = jax.random.split(key)
        x, acc = _mala(adapter, post, k, x, b, chol_j, eps, steps=block, df=df, inflate=inflate)
        taken += block
        accepted += block * float(np.mean(np.asarray(acc)))
        z = np.linalg.solve(chol, (np.asarray(x) - start).T)  # C⁻¹(w − w⁰) per particle, (P, M)
        before, jump = jump, float(np.mean(np.sum(z * z, axis=0)))
        if jump >= enough or 0.0 < jump <= (1.0 + JUMP_GROWTH) * before:  # not moved at all: keep trying
            break
    return np.asarray(x), accepted / taken, taken


def tempered_smc(adapter, posterior, rng_key, *, num_particles: int = 4000, num_mcmc: int = 20,
                 final_mcmc: int = 40, ess_frac: float = 0.5, df: float = 5.0, inflate: float = 2.0,
                 max_stages: int = 200, progress: bool = False) -> SMCResult:
    """Particles from the posterior of ``adapter``'s model, by tempering from the Gaussian ``posterior``.

    Parameters
    ----------
    adapter : ModelAdapter
        The model as functions of the flat unconstrained θ (its ``potential``).
    posterior : GaussianPosterior
        q = N(m, S⁻¹): the reference is t_df(m, inflate² S⁻¹).
    rng_key : jax.random.PRNGKey
    num_particles, num_mcmc, final_mcmc : int
        Particles; the most MALA moves per stage, and at the last stage (b = 1): fewer once the particles
        have forgotten their start (module docstring), at least one block of :data:`MOVE_BLOCK`.
    ess_frac : float
        Effective sample size kept at each stage, as a fraction of the particles.
    df, inflate : float
        Tails and width of the reference: heavier and wider than q, so that it covers a posterior that q
        misses.
    max_stages : int
        The run stops there, at whatever temperature it reached (``stages`` tells).
    progress : bool
        A progress bar over the temperature.

    Returns
    -------
    SMCResult
        The particles at b = 1, log Z, the stages, their acceptance rates and MALA steps.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, _ = line_fit()
    >>> res = tempered_smc(fit.adapter, fit.posterior, jax.random.PRNGKey(0), num_particles=500)
    >>> bool(np.allclose(res.theta.mean(0), fit.posterior.mean, atol=0.05))  # q is exact here
    True
    """
    p = posterior.mean.shape[0]
    dtype = posterior.mean.dtype
    k0, key = jax.random.split(rng_key)
    w = base_draws(k0, num_particles, p, float(df), dtype)
    b, log_z, stages, acceptance, steps = 0.0, 0.0, 0, [], []
    eps = float(p ** (-1.0 / 6.0))
    kw = {"df": float(df), "inflate": float(inflate)}
    bar = tqdm(total=1.0, desc="SMC to the posterior", disable=not progress, leave=False,
               bar_format="{l_bar}{bar}| b={n:.3f} [{elapsed}]")
    while b < 1.0 and stages < max_stages:
        inc = np.asarray(_increments(adapter, posterior, w, **kw))
        inc = np.where(np.isfinite(inc), inc, -np.inf)

        def ess(nb, b=b, inc=inc):
            lw = (nb - b) * inc
            lw = lw - logsumexp(lw)
            return float(np.exp(-logsumexp(2 * lw)))

        if ess(1.0) >= ess_frac * num_particles:
            nb = 1.0
        else:
            lo, hi = b, 1.0
            for _ in range(50):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if ess(mid) >= ess_frac * num_particles else (lo, mid)
            nb = lo if lo > b else 0.5 * (b + hi)
        lw = (nb - b) * inc
        log_z += float(logsumexp(lw) - np.log(num_particles))
        weights = np.exp(lw - logsumexp(lw))
        key, k_res, k_move = jax.random.split(key, 3)
        cum = np.cumsum(weights)
        cum[-1] = 1.0
        u0 = float(host_generator(k_res).random())
        idx = np.searchsorted(cum, (u0 + np.arange(num_particles)) / num_particles)
        w = np.asarray(w)[idx]
        bar.update(nb - b)
        b = nb
        cov = np.cov(w.T).reshape(p, p) + 1e-9 * np.eye(p)
        chol = np.linalg.cholesky(cov)
        most = final_mcmc if b >= 1.0 and final_mcmc else num_mcmc
        w, a, taken = _moves(adapter, posterior, k_move, w, b, chol, eps, most=int(most), **kw)
        acceptance.append(a)
        steps.append(taken)
        eps = eps * 0.6 if a < 0.4 else (eps * 1.4 if a > 0.75 else eps)
        stages += 1
    bar.close()
    theta = _to_theta(posterior, jnp.asarray(w, dtype), inflate=float(inflate))
    return SMCResult(np.asarray(theta), log_z, stages, acceptance, steps)


__all__ = ["SMCResult", "tempered_smc"]
