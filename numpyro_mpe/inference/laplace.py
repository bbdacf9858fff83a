"""Laplace approximation: MAP in unconstrained space, exact Hessian as the precision."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_median

from numpyro_mpe.engine.streaming import CURVATURES, StreamingSite, auto_chunk_size
from numpyro_mpe.errors import MPEError, PosteriorError, check_chunk_size, check_options
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import DENSE_LIMIT, DiagGaussianPosterior, LowRankGaussianPosterior, from_precision
from numpyro_mpe.model.adapter import ModelAdapter


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
    max_steps : int, optional
        Maximum optimizer steps: 200 for (damped) Newton, 500 for L-BFGS where the fit streams with it.
    gtol : float, optional
        Convergence tolerance on ‖∇U‖_∞ relative to max(1, |U|): 1e-8 in float64, 1e-4 in float32
        by default; not converging warns with the gradient norm.
    chunk_size : int, optional
        Observations per chunk in the per-observation MPE pass: 4096 on the dense path; where the fit
        streams, by default as many rows as keep a chunk's Jacobian within 16 MiB
        (:func:`numpyro_mpe.engine.streaming.auto_chunk_size`, 65536 for P = 20).
    num_samples : int, default 2000
        Monte Carlo draws where ``elpd_loo`` cannot be integrated by Gauss–Hermite.
    progress : bool, default True
        Show progress bars on long per-observation passes.
    curvature : {"exact", "ggn"}, default "exact"
        Curvature of the precision and of the memories: the exact Hessian, or the generalized Gauss–Newton
        Σ_i J_iᵀΛ_iJ_i (+ the prior's Hessian) through each observation's predictor, Λ_i projected onto
        the PSD cone.  The two agree for canonical-link GLMs.
    posterior : {"full", "diag", "lowrank"}, default "full"
        Structure of the precision S: full, its diagonal, or diagonal plus rank ``rank`` (the top
        eigenpairs of the likelihood curvature, the diagonal kept exact).
    rank : int, default 10
        Rank of the ``"lowrank"`` posterior.
    devices : sequence of jax.Device, optional
        Devices to shard the observations over (default: all of ``jax.devices()``).
    optimizer : {"auto", "newton", "lbfgs"}, default "auto"
        MAP optimizer when the fit streams over chunks: Newton (on the GGN with ``curvature="ggn"``) for
        P ≤ 2048 where the predictor is linear in θ, else L-BFGS (optax).

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

    OPTIONS = {"init_strategy", "max_steps", "gtol", "chunk_size", "num_samples", "progress", "curvature",
               "posterior", "rank", "devices", "optimizer"}
    STRUCTURES = ("full", "diag", "lowrank")

    def __init__(self, model: Callable, **options):
        check_options("Laplace", options, self.OPTIONS)
        self.model = model
        self.init_strategy = options.get("init_strategy", init_to_median)
        self.max_steps_given = options.get("max_steps")
        self.max_steps = int(options.get("max_steps", 200))
        self.gtol = options.get("gtol")
        self.mpe_options = {k: options[k] for k in ("chunk_size", "num_samples", "progress", "curvature",
                                                     "devices") if options.get(k) is not None}
        check_chunk_size(self.mpe_options.get("chunk_size"))
        self.curvature = options.get("curvature", "exact")
        if self.curvature not in CURVATURES:
            raise MPEError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        self.structure = options.get("posterior", "full")
        if self.structure not in self.STRUCTURES:
            raise MPEError(f"posterior must be one of {self.STRUCTURES}, got {self.structure!r}")
        self.rank = int(options.get("rank", 10))
        if self.rank < 1:
            raise MPEError(f"rank must be a positive integer, got {self.rank}")
        self.optimizer = options.get("optimizer", "auto")
        if self.optimizer not in ("auto", "newton", "lbfgs"):
            raise MPEError(f"optimizer must be 'auto', 'newton' or 'lbfgs', got {self.optimizer!r}")

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged)."""
        adapter = ModelAdapter.build(self.model, rng_key, args, kwargs, self.init_strategy)
        gtol = self.gtol
        if gtol is None:
            gtol = 1e-8 if adapter.init_theta.dtype == jnp.float64 else 1e-4
        gtol = float(gtol)
        p = adapter.num_params
        if self.structure == "full" and p > DENSE_LIMIT:
            raise MPEError(
                f"posterior='full' needs a dense {p}x{p} precision (P = {p} > {DENSE_LIMIT}); use "
                "posterior='diag' or posterior='lowrank' (with curvature='ggn') for a wide model")
        eng = self._streaming_engine(adapter)
        if eng is not None:
            return self._run_streamed(adapter, eng, gtol)
        if self.structure != "full" and p > 2048:
            reason = eng_reason(adapter, self.curvature)
            raise MPEError(f"posterior={self.structure!r} for P = {p} needs the streamed fit, which is not "
                           f"available for this model: {reason}")
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
        if self.curvature == "ggn":
            precision = ggn_precision(adapter, theta, precision)
        check_precision(adapter, precision)
        post = dense_structured(adapter, theta, precision, self.structure, self.rank)
        return Fit(adapter, post, method="laplace", info={"steps": int(state.step), "grad_norm": gnorm,
                                                           "potential": value, "streamed": False},
                   **self.mpe_options)

    # ------------------------------------------------------------ streamed fit
    def _streaming_engine(self, adapter: ModelAdapter):
        """The streaming engine when the MAP can stream: one observed site with a predictor whose rows the
        model can run on, the prior separable from it, and either more than one chunk, curvature='ggn' or
        a structured posterior; with curvature='exact' the predictor must be linear in θ."""
        if len(adapter.observed) != 1:
            return None
        name = next(iter(adapter.observed))
        site = adapter.observed[name]
        if site.predictor is None:
            return None
        chunk = self.mpe_options.get("chunk_size")
        if chunk is None:
            itemsize = adapter.init_theta.dtype.itemsize
            chunk = auto_chunk_size(adapter.num_params, site.predictor.num_eta, itemsize)
        if not (site.num_obs > chunk or self.curvature == "ggn" or self.structure != "full"):
            return None
        eng = StreamingSite(adapter, name, chunk_size=chunk, curvature=self.curvature,
                            devices=self.mpe_options.get("devices"),
                            progress=self.mpe_options.get("progress", True))
        if eng.plan is None or not eng.plan.prior_ok:
            return None
        if self.curvature == "exact" and not eng.is_linear(adapter.init_theta):
            return None
        return eng

    def _run_streamed(self, adapter: ModelAdapter, eng, gtol: float) -> Fit:
        from numpyro_mpe.inference.streamed_map import (
            PriorPart,
            check_structured,
            chunked_lbfgs,
            chunked_newton,
            structured_precision,
        )

        prior = PriorPart(eng)
        p = adapter.num_params
        opt = self.optimizer
        if opt == "auto":  # Gauss–Newton converges fast only where η is linear in θ (GLMs)
            opt = "newton" if p <= 2048 and eng.is_linear(adapter.init_theta) else "lbfgs"
        progress = self.mpe_options.get("progress", True)
        if opt == "newton":
            res = chunked_newton(eng, prior, adapter.init_theta, max_steps=self.max_steps, gtol=gtol,
                                 progress=progress)
        else:
            steps = 500 if self.max_steps_given is None else self.max_steps
            res = chunked_lbfgs(eng, prior, adapter.init_theta, max_steps=steps, gtol=gtol)
        if not np.isfinite(res.value) or not np.all(np.isfinite(np.asarray(res.theta))):
            raise PosteriorError(
                f"the potential energy is not finite at the optimum (U = {res.value}); check the model's "
                "priors and data, or pass init_strategy=numpyro.infer.init_to_value(values=...)")
        gnorm = float(jnp.max(jnp.abs(res.grad)))
        if gnorm > gtol * max(1.0, abs(res.value)):
            warnings.warn(
                f"Laplace: the {opt} optimizer did not converge in {res.steps} steps "
                f"(max |grad U| = {gnorm:.3g}); raise max_steps or check the model", stacklevel=3)
        post = structured_precision(eng, prior, res.theta, self.structure, self.rank)
        if self.structure == "full":
            check_precision(adapter, post.precision)
        else:
            check_structured(adapter, post)
        fit = Fit(adapter, post, method="laplace", info={"steps": res.steps, "grad_norm": gnorm,
                                                          "potential": res.value, "streamed": True,
                                                          "optimizer": opt}, **self.mpe_options)
        fit._cache[("stream", eng.name)] = eng  # the data are placed once
        return fit


def eng_reason(adapter: ModelAdapter, curvature: str) -> str:
    names = list(adapter.observed)
    if len(names) != 1:
        return f"the model has {len(names)} observed sites (streaming handles one)"
    site = adapter.observed[names[0]]
    if site.predictor is None:
        return f"site '{names[0]}' has no predictor ({site.no_predictor_reason})"
    from numpyro_mpe.engine.streaming import row_plan

    plan, why = row_plan(adapter, names[0])
    if plan is None:
        return why
    if not plan.prior_ok:
        return "the prior part of the potential could not be separated from the likelihood"
    return f"curvature={curvature!r} needs a predictor linear in θ; use curvature='ggn'"


def ggn_precision(adapter: ModelAdapter, theta, exact):
    """∇²R(θ) + Σ_sites Σ_i J_iᵀΛ_i⁺J_i: the exact Hessian with each predictor site's likelihood part
    replaced by its generalized Gauss–Newton (sites without a predictor keep their exact Hessian)."""
    out = exact
    for name, site in adapter.observed.items():
        if site.predictor is None:
            warnings.warn(f"curvature='ggn': site '{name}' has no predictor ({site.no_predictor_reason}); "
                          "its exact Hessian is used", stacklevel=3)
            continue
        exact_lik = jax.jit(jax.hessian(lambda t, n=name: -jnp.sum(adapter.log_lik(t, n))))(theta)
        eng = StreamingSite(adapter, name, chunk_size=max(site.num_obs, 1), curvature="ggn", progress=False)
        _, _, ggn = eng.reduce(theta, "all", "full")
        out = out - exact_lik + ggn
    return out


def dense_structured(adapter: ModelAdapter, theta, precision, structure: str, rank: int):
    """The posterior of a dense precision in the requested structure: itself, its diagonal, or its
    diagonal plus the top-``rank`` eigenpairs of its off-prior part (diagonal kept exact)."""
    if structure == "full":
        return from_precision(theta, precision)
    if structure == "diag":
        return DiagGaussianPosterior(theta, jnp.diagonal(precision))
    prior_h = jax.jit(jax.hessian(lambda t: prior_only_potential(adapter, t)))(theta)
    lik = precision - prior_h
    lam, vec = jnp.linalg.eigh(0.5 * (lik + lik.T))
    r = min(rank, theta.shape[0])
    lam, vec = jnp.clip(lam[::-1][:r], 0.0, None), vec[:, ::-1][:, :r]
    factor = vec * jnp.sqrt(lam)
    d = jnp.diagonal(precision) - jnp.sum(factor**2, axis=1)
    return LowRankGaussianPosterior.build(theta, jnp.maximum(d, 1e-12 * jnp.max(jnp.abs(d))), factor)


def prior_only_potential(adapter: ModelAdapter, theta):
    """R(θ): the potential of the model with every observed site blocked."""
    from numpyro import handlers
    from numpyro.infer.util import potential_energy

    blocked = handlers.block(adapter.model, hide=list(adapter.observed))
    return potential_energy(blocked, adapter.args, adapter.kwargs, adapter.unravel(theta))


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
