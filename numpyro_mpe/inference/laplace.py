"""Laplace approximation: MAP in unconstrained space, exact Hessian as the precision."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_median

from ..errors import PosteriorError, check_options
from ..fit import Fit
from ..model import ModelAdapter
from ..posterior import from_precision


class NewtonState(NamedTuple):
    """State of the damped Newton iteration."""

    theta: jax.Array
    value: jax.Array
    grad: jax.Array
    damping: jax.Array
    step: jax.Array


def damped_newton(fun: Callable, theta0, *, max_steps: int = 200, gtol: float = 1e-8):
    """Minimize ``fun`` by Newton steps with Levenberg damping and step acceptance.

    Each step solves (∇²U + μI) δ = −∇U; a step that lowers U is taken and μ shrinks, otherwise μ grows.
    Stops when ‖∇U‖_∞ ≤ gtol · max(1, |U|) or after ``max_steps``; then, if converged, polishes with up
    to three undamped Newton steps kept only while they shrink ‖∇U‖_∞.  Returns the
    final :class:`NewtonState`.
    """
    vg = jax.value_and_grad(fun)
    hess = jax.hessian(fun)
    eye = jnp.eye(theta0.shape[0], dtype=theta0.dtype)

    def converged(s):
        return jnp.max(jnp.abs(s.grad)) <= gtol * jnp.maximum(1.0, jnp.abs(s.value))

    def cond(s):
        return (s.step < max_steps) & ~converged(s) & jnp.isfinite(s.value)

    def body(s):
        h = hess(s.theta)
        h = 0.5 * (h + h.T)
        delta = jnp.linalg.solve(h + s.damping * eye, -s.grad)
        cand = s.theta + delta
        v, g = vg(cand)
        ok = jnp.isfinite(v) & (v <= s.value) & jnp.all(jnp.isfinite(g))
        return NewtonState(
            jnp.where(ok, cand, s.theta), jnp.where(ok, v, s.value), jnp.where(ok, g, s.grad),
            jnp.where(ok, jnp.maximum(s.damping / 10.0, 1e-12), jnp.minimum(s.damping * 10.0, 1e12)),
            s.step + 1,
        )

    def polish(_, s):
        # Undamped Newton steps, kept while they shrink the gradient: the MPE assumes ∇U(m) = 0, and the
        # stopping rule above is relative to |U|, which carries an arbitrary constant.
        h = hess(s.theta)
        cand = s.theta - jnp.linalg.solve(0.5 * (h + h.T), s.grad)
        v, g = vg(cand)
        ok = (jnp.isfinite(v) & jnp.all(jnp.isfinite(g)) & (jnp.max(jnp.abs(g)) < jnp.max(jnp.abs(s.grad)))
              & (v <= s.value + 1e-9 * jnp.maximum(1.0, jnp.abs(s.value))))
        return NewtonState(jnp.where(ok, cand, s.theta), jnp.where(ok, v, s.value),
                           jnp.where(ok, g, s.grad), s.damping, s.step)

    def run(s):
        s = jax.lax.while_loop(cond, body, s)
        return jax.lax.cond(converged(s), lambda s: jax.lax.fori_loop(0, 3, polish, s), lambda s: s, s)

    v0, g0 = vg(theta0)
    init = NewtonState(theta0, v0, g0, jnp.asarray(1e-3, theta0.dtype), jnp.asarray(0))
    return jax.jit(run)(init)


class Laplace:
    """Laplace approximation of a NumPyro model's posterior, q = N(θ̂, ∇²U(θ̂)⁻¹) in unconstrained space.

    Parameters
    ----------
    model : callable
        A NumPyro model with continuous latent sites and at least one observed site.
    init_strategy : callable, default ``init_to_median``
        NumPyro initialization strategy for the optimizer.
    max_steps : int, default 200
        Maximum damped-Newton steps.
    gtol : float, optional
        Convergence tolerance on ‖∇U‖_∞ relative to max(1, |U|): 1e-8 in float64, 1e-4 in float32
        by default; not converging warns with the gradient norm.
    chunk_size : int, default 4096
        Observations per chunk in the per-observation MPE pass.
    num_samples : int, default 2000
        Monte Carlo draws where ``elpd_loo`` cannot be integrated by Gauss–Hermite.
    progress : bool, default True
        Show progress bars on long per-observation passes.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import numpyro_mpe as mpe
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 20); y = 2 * x
    >>> fit = mpe.Laplace(model, progress=False).run(jax.random.PRNGKey(0), x, y=y)
    >>> float(fit.posterior.mean[0]) > 1.5
    True
    """

    OPTIONS = {"init_strategy", "max_steps", "gtol", "chunk_size", "num_samples", "progress"}

    def __init__(self, model: Callable, **options):
        check_options("Laplace", options, self.OPTIONS)
        self.model = model
        self.init_strategy = options.get("init_strategy", init_to_median)
        self.max_steps = int(options.get("max_steps", 200))
        self.gtol = options.get("gtol")
        self.mpe_options = {k: options[k] for k in ("chunk_size", "num_samples", "progress") if k in options}
        if self.mpe_options.get("chunk_size", 1) < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {self.mpe_options['chunk_size']}")

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged)."""
        adapter = ModelAdapter.build(self.model, rng_key, args, kwargs, self.init_strategy)
        gtol = self.gtol
        if gtol is None:
            gtol = 1e-8 if adapter.init_theta.dtype == jnp.float64 else 1e-4
        gtol = float(gtol)
        state = damped_newton(adapter.potential, adapter.init_theta, max_steps=self.max_steps, gtol=gtol)
        theta = state.theta
        value = float(state.value)
        if not np.isfinite(value) or not np.all(np.isfinite(np.asarray(theta))):
            raise PosteriorError(
                f"the potential energy is not finite at the optimum (U = {value}); check the model's "
                "priors and data, or pass init_strategy=numpyro.infer.init_to_value(values=...)"
            )
        gnorm = float(jnp.max(jnp.abs(state.grad)))
        if gnorm > gtol * max(1.0, abs(value)):
            warnings.warn(
                f"Laplace: the optimizer did not converge in {int(state.step)} steps "
                f"(max |grad U| = {gnorm:.3g}); raise max_steps or check the model",
                stacklevel=2,
            )
        precision = jax.jit(jax.hessian(adapter.potential))(theta)
        check_precision(adapter, precision)
        post = from_precision(theta, precision)
        return Fit(adapter, post, method="laplace", info={"steps": int(state.step), "grad_norm": gnorm,
                                                           "potential": value}, **self.mpe_options)


def check_precision(adapter: ModelAdapter, precision) -> None:
    """Raise :class:`PosteriorError` naming the latent sites if ``precision`` is not finite and PD."""
    prec = np.asarray(precision)
    if not np.all(np.isfinite(prec)):
        rows = np.flatnonzero(~np.all(np.isfinite(prec), axis=1))
        raise PosteriorError(
            "the Hessian of the potential at the optimum is not finite in the latent site(s) "
            f"{adapter.site_names_of(rows)}"
        )
    vals, vecs = np.linalg.eigh(0.5 * (prec + prec.T))
    tol = 1e-12 * max(1.0, float(np.max(np.abs(vals))))
    bad = vals <= tol
    if bad.any():
        weight = np.sum(vecs[:, bad] ** 2, axis=1)
        rows = np.flatnonzero(weight > 0.1)
        labels = adapter.param_labels()
        raise PosteriorError(
            f"the Hessian of the potential at the optimum is not positive definite (smallest eigenvalue "
            f"{vals.min():.3g}); the flat directions involve the latent site(s) "
            f"{adapter.site_names_of(rows)} ({[labels[r] for r in rows][:8]}): the mode is a saddle or "
            "the parameters are not identified; add prior information or reparameterize"
        )
