"""THE Newton iteration: damped Newton (Levenberg) over a (value, gradient, Hessian) oracle.

One pure update rule, :func:`newton_update`, serves every minimization of the package: the Laplace MAP (the
oracle is the potential, the whole iteration one compiled ``while_loop``: :func:`minimize`), the streamed MAP
(the oracle is a pass over chunks of observations, driven from the host: :func:`minimize_host`) and the
brute-force leave-one-out refits (the potential without some observations, warm-started at the fit's mean).

Each step solves (H + μI) δ = −g for the candidate θ + δ; the oracle is evaluated there; a candidate that
does not increase f is accepted and μ shrinks (to 0 below 1e-8 of the Hessian's scale), otherwise it is
rejected and μ grows (from 1e-6 of the scale, ×10, at most 1e12 of it).  The iteration stops when
‖g‖_∞ ≤ gtol · max(1, |f|) or after ``max_steps`` steps; once converged it *polishes*: up to ``polish``
undamped steps, each kept only while it shrinks ‖g‖_∞ (the MPE assumes ∇U(m) = 0, and the stopping rule is
relative to |U|, which carries an arbitrary constant).

``max_steps=1`` is exactly one undamped step θ₁ = θ₀ − H(θ₀)⁻¹g(θ₀), accepted whatever its value: the step
that the MPE's leave-one-out shift equals to round-off.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from numpyro_mpe.programs import jit


class NewtonState(NamedTuple):
    """State of the iteration: the accepted point with f, ∇f, ∇²f there; the next candidate; the damping μ;
    the damped steps taken; the polishing steps taken (−1 before convergence); whether it is done."""

    theta: jax.Array
    value: jax.Array
    grad: jax.Array
    hess: jax.Array
    cand: jax.Array
    damping: jax.Array
    steps: jax.Array
    polish: jax.Array
    done: jax.Array


def _scale(hess):
    return jnp.maximum(1.0, jnp.max(jnp.abs(jnp.diagonal(hess))))


def converged(value, grad, gtol):
    """‖∇f‖_∞ ≤ gtol · max(1, |f|)."""
    return jnp.max(jnp.abs(grad)) <= gtol * jnp.maximum(1.0, jnp.abs(value))


def _propose(theta, grad, hess, damping):
    h = 0.5 * (hess + hess.T)
    return theta + jnp.linalg.solve(h + damping * jnp.eye(theta.shape[0], dtype=theta.dtype), -grad)


def newton_init(theta, value, grad, hess, *, damping: float = 1e-3, gtol: float, max_steps: int,
                polish: int = 3) -> NewtonState:
    """The state at the starting point (f, ∇f, ∇²f evaluated there) with its first candidate.  ``damping``:
    the first μ, relative to the Hessian's scale (0: an undamped first step)."""
    mu = jnp.asarray(damping, theta.dtype) * _scale(hess)
    conv = converged(value, grad, gtol)
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))
    start_polish = conv & (polish > 0) & (max_steps != 1)
    mu = jnp.where(start_polish, 0.0, mu)
    done = ~finite | (conv & ~start_polish) | (max_steps == 0)
    return NewtonState(theta, value, grad, hess, _propose(theta, grad, hess, mu), mu, jnp.asarray(0),
                       jnp.where(start_polish, 0, -1), done)


def newton_update(state: NewtonState, value, grad, hess, *, gtol: float, max_steps, polish: int = 3
                  ) -> NewtonState:
    """Take (or reject) the candidate ``state.cand`` given f, ∇f, ∇²f there, and propose the next one."""
    s = state
    finite = jnp.isfinite(value) & jnp.all(jnp.isfinite(grad)) & jnp.all(jnp.isfinite(hess))
    polishing = s.polish >= 0
    one_step = max_steps == 1
    gmax, gmax_old = jnp.max(jnp.abs(grad)), jnp.max(jnp.abs(s.grad))
    tol = jnp.where(polishing, 1e-9 * jnp.maximum(1.0, jnp.abs(s.value)), 1e-12 * (1.0 + jnp.abs(s.value)))
    ok = finite & (value <= s.value + tol) & (~polishing | (gmax < gmax_old))
    ok = ok | one_step
    theta = jnp.where(ok, s.cand, s.theta)
    val, g = jnp.where(ok, value, s.value), jnp.where(ok, grad, s.grad)
    h = jnp.where(ok, hess, s.hess)
    steps = s.steps + jnp.where(polishing, 0, 1)
    scale = _scale(h)
    grown = jnp.where(s.damping == 0, 1e-6 * scale, jnp.minimum(10.0 * s.damping, 1e12 * scale))
    shrunk = jnp.where(s.damping < 1e-8 * scale, 0.0, s.damping / 10.0)
    mu = jnp.where(ok, shrunk, grown)
    conv = converged(val, g, gtol)
    # polishing: undamped steps while they shrink the gradient, at most `polish` of them
    pol = jnp.where(polishing, jnp.where(ok, s.polish + 1, polish), jnp.where(conv & (polish > 0), 0, -1))
    pol_done = polishing & (~ok | (pol >= polish))
    done = (one_step | ~jnp.isfinite(val) | pol_done | (~polishing & conv & (polish <= 0))
            | (~polishing & ~conv & (steps >= max_steps)))
    mu = jnp.where(pol >= 0, 0.0, mu)
    return NewtonState(theta, val, g, h, _propose(theta, g, h, mu), mu, steps, pol, done)


def minimize(vgh: Callable, theta0, *, gtol: float, max_steps: int = 200, damping: float = 1e-3,
             polish: int = 3) -> NewtonState:
    """Newton on a traceable oracle ``vgh(θ) -> (f, ∇f, ∇²f)``: one ``while_loop`` (call it inside a
    jitted function; ``max_steps`` may be traced).  The oracle is traced once, for the start and the loop's
    body alike (a nested ``jax.jit``: half the program to trace and lower)."""
    vgh = jax.jit(vgh)
    v, g, h = vgh(theta0)
    state = newton_init(theta0, v, g, h, damping=damping, gtol=gtol, max_steps=max_steps, polish=polish)

    def body(s):
        return newton_update(s, *vgh(s.cand), gtol=gtol, max_steps=max_steps, polish=polish)

    return jax.lax.while_loop(lambda s: ~s.done, body, state)


@partial(jit, static_argnames=("gtol", "polish"))
def _update(state, value, grad, hess, max_steps, *, gtol, polish):
    return newton_update(state, value, grad, hess, gtol=gtol, max_steps=max_steps, polish=polish)


@partial(jit, static_argnames=("gtol", "polish"))
def _init(theta, value, grad, hess, damping, max_steps, *, gtol, polish):
    return newton_init(theta, value, grad, hess, damping=damping, gtol=gtol, max_steps=max_steps,
                       polish=polish)


def minimize_host(vgh: Callable, theta0, *, gtol: float, max_steps: int = 200, damping: float = 1e-3,
                  polish: int = 3, progress=None) -> NewtonState:
    """Newton on a host-side oracle (e.g. sums over chunks of observations), the same update rule compiled
    once; ``progress``: a tqdm bar advanced per step."""
    state = _init(theta0, *vgh(theta0), damping, max_steps, gtol=float(gtol), polish=polish)
    while not bool(state.done):
        state = _update(state, *vgh(state.cand), max_steps, gtol=float(gtol), polish=polish)
        if progress is not None:
            progress.update(1)
    return state
