"""Laplace approximation: MAP in unconstrained space, exact Hessian (or GGN) as the precision."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_median

from numpyro_mpe.derivatives import value_grad_hessian
from numpyro_mpe.engine.layout import Layout, auto_chunk_size
from numpyro_mpe.engine.sums import site_sums
from numpyro_mpe.engine.terms import SiteData
from numpyro_mpe.errors import MPEError, PosteriorError
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import (
    DENSE_LIMIT,
    DiagGaussianPosterior,
    GaussianPosterior,
    LowRankGaussianPosterior,
    from_precision,
)
from numpyro_mpe.inference.base import RefitResult
from numpyro_mpe.inference.newton import converged, minimize
from numpyro_mpe.inference.optimum import check_precision, spectrum
from numpyro_mpe.inference.streamed import (
    check_structured,
    prior_derivatives,
    streamed_lbfgs,
    streamed_newton,
    structured_precision,
)
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.rows import row_plan
from numpyro_mpe.options import STRUCTURES, MPEOptions, check_choice, check_positive_int, keyword_options
from numpyro_mpe.programs import jit, track

OPTIMIZERS = ("auto", "newton", "lbfgs")


@jit
def laplace_map(adapter: ModelAdapter, theta0, max_steps, gtol):
    """The MAP of U by damped Newton from ``theta0``, with U, ∇U and the exact ∇²U there, and the
    :class:`~numpyro_mpe.inference.optimum.Spectrum` of ∇²U for its checks: one program."""
    state = minimize(value_grad_hessian(adapter.potential), theta0, gtol=gtol, max_steps=max_steps)
    h = 0.5 * (state.hess + state.hess.T)
    return state, GaussianPosterior(state.theta, h, jnp.linalg.cholesky(h)), spectrum(adapter, state.theta, h)


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
    posterior : {"full", "diag", "lowrank"}, default "full"
        Structure of the precision S: full, its diagonal, or diagonal plus rank ``rank`` (the top
        eigenpairs of the likelihood curvature, the diagonal kept exact).
    rank : int, default 10
        Rank of the ``"lowrank"`` posterior.
    optimizer : {"auto", "newton", "lbfgs"}, default "auto"
        MAP optimizer when the fit streams over chunks: Newton (on the GGN with ``curvature="ggn"``) for
        P ≤ 2048 where the predictor is linear in θ, else L-BFGS (optax).
    curvature : {"exact", "ggn"}, default "exact"
        Curvature of the precision and of the memories: the exact Hessian, or the generalized Gauss–Newton
        Σ_i J_iᵀΛ_iJ_i (+ the prior's Hessian) through each observation's predictor, Λ_i projected onto
        the PSD cone.  The two agree for canonical-link GLMs.
    chunk_size : int, optional
        Observations per chunk of the per-observation passes; by default as many rows as keep a chunk's
        Jacobian within 16 MiB (:func:`numpyro_mpe.engine.layout.auto_chunk_size`, 65536 for P = 20).
    num_samples : int, default 2000
        Monte Carlo draws where ``elpd_loo`` cannot be integrated by Gauss–Hermite.
    progress : bool, default True
        Show progress bars on long per-observation passes.
    devices : sequence of jax.Device, optional
        Devices to shard the observations over (default: all of ``jax.devices()``).

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

    @keyword_options
    def __init__(self, model: Callable, *, init_strategy=init_to_median, max_steps: int | None = None,
                 gtol: float | None = None, posterior: str = "full", rank: int = 10, optimizer: str = "auto",
                 curvature: str = "exact", chunk_size: int | None = None, num_samples: int = 2000,
                 progress: bool = True, devices=None):
        if model is None or not callable(model):
            raise MPEError(f"Laplace needs a NumPyro model (a callable), got {model!r}")
        self.model = model
        self.init_strategy = init_strategy
        self.max_steps = None if max_steps is None else check_positive_int("max_steps", max_steps)
        self.gtol = None if gtol is None else float(gtol)
        self.structure = check_choice("posterior", posterior, STRUCTURES)
        self.rank = check_positive_int("rank", rank)
        self.optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.options = MPEOptions.make(chunk_size=chunk_size, num_samples=num_samples, progress=progress,
                                       curvature=curvature, devices=devices)

    @property
    def curvature(self) -> str:
        return self.options.curvature

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged)."""
        compile_info: dict = {}
        with track("Laplace.run", compile_info):
            fit = self._run(rng_key, args, kwargs)
        fit.info["compile"].update(compile_info)
        return fit

    def _run(self, rng_key, args, kwargs) -> Fit:
        adapter = ModelAdapter.build(self.model, rng_key, args, kwargs, self.init_strategy)
        gtol = self.gtol if self.gtol is not None else (1e-8 if adapter.structure.dtype == jnp.float64
                                                        else 1e-4)
        p = adapter.num_params
        if self.structure == "full" and p > DENSE_LIMIT:
            raise MPEError(
                f"posterior='full' needs a dense {p}x{p} precision (P = {p} > {DENSE_LIMIT}); use "
                "posterior='diag' or posterior='lowrank' (with curvature='ggn') for a wide model")
        site, why = self._streaming_site(adapter)
        if site is not None:
            return self._run_streamed(adapter, site, gtol)
        if self.structure != "full" and p > 2048:
            raise MPEError(f"posterior={self.structure!r} for P = {p} needs the streamed fit, which is not "
                           f"available for this model: {why}")
        max_steps = 200 if self.max_steps is None else self.max_steps
        state, post, spec = laplace_map(adapter, adapter.init_theta, max_steps, gtol)
        theta, value = state.theta, float(state.value)
        _check_finite(theta, value)
        gnorm = float(np.max(np.abs(np.asarray(state.grad))))
        if gnorm > gtol * max(1.0, abs(value)):
            warnings.warn(
                f"Laplace: the optimizer did not converge in {int(state.steps)} steps "
                f"(max |grad U| = {gnorm:.3g}); raise max_steps or check the model", stacklevel=3)
        info = {"steps": int(state.steps), "grad_norm": gnorm, "potential": value, "streamed": False}
        precision = post.precision
        if self.curvature == "ggn":
            precision = ggn_precision(Fit(adapter, post, "laplace", options=self.options), precision)
            post = from_precision(theta, precision)
            spec = None
        check_precision(adapter, precision, theta, spec)
        if self.structure != "full":
            post = dense_structured(adapter, theta, precision, self.structure, self.rank)
        return Fit(adapter, post, method="laplace", info=info, options=self.options)

    # ------------------------------------------------------------ streamed fit
    def _streaming_site(self, adapter: ModelAdapter) -> tuple[SiteData | None, str | None]:
        """The site's rows in chunks when the MAP can stream: one observed site with a predictor whose rows
        the model can run on, the prior separable from it, and either more than one chunk, curvature='ggn' or
        a structured posterior; with curvature='exact' the predictor must be linear in θ.  Else ``None`` and
        why."""
        names = list(adapter.observed)
        if len(names) != 1:
            return None, f"the model has {len(names)} observed sites (streaming handles one)"
        site = adapter.observed[names[0]]
        if site.predictor is None:
            return None, f"site '{names[0]}' has no predictor ({site.no_predictor_reason})"
        chunk = self.options.chunk_size or auto_chunk_size(adapter.num_params, site.predictor.num_eta,
                                                           adapter.structure.dtype.itemsize)
        if not (site.num_obs > chunk or self.curvature == "ggn" or self.structure != "full"):
            return None, "one chunk holds every observation"
        plan, why = row_plan(adapter, site.name)
        if plan is None:
            return None, why
        if not plan.prior_ok:
            return None, "the prior part of the potential could not be separated from the likelihood"
        layout = Layout.build(site.num_obs, chunk, self.options.devices)
        data = SiteData(adapter, site.name, layout, curvature=self.curvature, stream=True, plan=plan)
        if self.curvature == "exact" and not data.is_linear(adapter.init_theta):
            return None, f"curvature={self.curvature!r} needs a predictor linear in θ; use curvature='ggn'"
        return data, None

    def _run_streamed(self, adapter: ModelAdapter, site: SiteData, gtol: float) -> Fit:
        p = adapter.num_params
        opt = self.optimizer
        if opt == "auto":  # Gauss–Newton converges fast only where η is linear in θ (GLMs)
            opt = "newton" if p <= 2048 and site.is_linear(adapter.init_theta) else "lbfgs"
        if opt == "newton":
            res = streamed_newton(site, adapter.init_theta, max_steps=self.max_steps or 200, gtol=gtol,
                                  progress=self.options.progress)
        else:
            res = streamed_lbfgs(site, adapter.init_theta, max_steps=self.max_steps or 500, gtol=gtol)
        _check_finite(res.theta, res.value)
        gnorm = float(jnp.max(jnp.abs(res.grad)))
        if gnorm > gtol * max(1.0, abs(res.value)):
            warnings.warn(
                f"Laplace: the {opt} optimizer did not converge in {res.steps} steps "
                f"(max |grad U| = {gnorm:.3g}); raise max_steps or check the model", stacklevel=4)
        post = structured_precision(site, res.theta, self.structure, self.rank)
        if self.structure == "full":
            check_precision(adapter, post.precision)  # no walk along U: a full-data potential per point
        else:
            check_structured(adapter, post)
        return Fit(adapter, post, method="laplace", info={"steps": res.steps, "grad_norm": gnorm,
                                                           "potential": res.value, "streamed": True,
                                                           "optimizer": opt},
                   options=self.options, site_data={site.name: site})


def _check_finite(theta, value) -> None:
    if not np.isfinite(value) or not np.all(np.isfinite(np.asarray(theta))):
        raise PosteriorError(
            f"the potential energy is not finite at the optimum (U = {value}); check the model's priors and "
            "data, or pass init_strategy=numpyro.infer.init_to_value(values=...)")


@partial(jit, static_argnames=("name",))
def _likelihood_hessian(adapter: ModelAdapter, theta, name: str):
    return jax.hessian(lambda t: -jnp.sum(adapter.log_lik(t, name)))(theta)


def ggn_precision(fit: Fit, exact):
    """∇²R(θ) + Σ_sites Σ_i J_iᵀΛ_i⁺J_i: the exact Hessian with each predictor site's likelihood part replaced
    by its generalized Gauss–Newton (sites without a predictor keep their exact Hessian)."""
    adapter, theta = fit.adapter, fit.posterior.mean
    out = exact
    for name, site in adapter.observed.items():
        if site.predictor is None:
            warnings.warn(f"curvature='ggn': site '{name}' has no predictor ({site.no_predictor_reason}); "
                          "its exact Hessian is used", stacklevel=4)
            continue
        _, _, ggn = site_sums(fit.site_data(name), theta, "all", "full")
        out = out - _likelihood_hessian(adapter, theta, name) + ggn
    return out


def dense_structured(adapter: ModelAdapter, theta, precision, structure: str, rank: int):
    """The posterior of a dense precision in the requested structure: itself, its diagonal, or its diagonal
    plus the top-``rank`` eigenpairs of its off-prior part (diagonal kept exact)."""
    if structure == "full":
        return from_precision(theta, precision)
    if structure == "diag":
        return DiagGaussianPosterior(theta, jnp.diagonal(precision))
    lik = precision - prior_derivatives(adapter, theta, None)[2]
    lam, vec = jnp.linalg.eigh(0.5 * (lik + lik.T))
    r = min(rank, theta.shape[0])
    lam, vec = jnp.clip(lam[::-1][:r], 0.0, None), vec[:, ::-1][:, :r]
    factor = vec * jnp.sqrt(lam)
    d = jnp.diagonal(precision) - jnp.sum(factor**2, axis=1)
    return LowRankGaussianPosterior.build(theta, jnp.maximum(d, 1e-12 * jnp.max(jnp.abs(d))), factor)


# ---------------------------------------------------------------- refits
@partial(jit, static_argnames=("name", "polish"))
def newton_refit(adapter: ModelAdapter, theta0, weights, max_steps, gtol, name: str, polish: int = 0):
    """Minimize U_w(θ) = U(θ) + Σ_i (1 − w_i) log p(y_i | θ) (the potential with observation weights w on
    ``name``) by Newton from ``theta0``, undamped at first; returns the state (the Laplace approximation of
    the refit is N(θ, ∇²U_w(θ)⁻¹))."""
    def u_w(t):
        return adapter.potential(t) + jnp.sum((1.0 - weights) * adapter.log_lik(t, name))

    return minimize(value_grad_hessian(u_w), theta0, gtol=gtol, max_steps=max_steps, damping=0.0,
                    polish=polish)


class LaplaceRefit:
    """Refit of a Laplace fit: Newton on the weighted potential from the fit's mean, the Laplace
    approximation at the result.  ``max_steps=1`` is one undamped Newton step, which the MPE shift equals to
    round-off; the default converges (the exact Laplace leave-one-out posterior)."""

    coupled = False
    label = "exact_loo"

    def __init__(self, max_steps: int = 100, gtol: float = 1e-10):
        self.max_steps = check_positive_int("max_steps", max_steps)
        self.gtol = float(gtol)

    def describe(self) -> str:
        return f"Newton refit ({self.max_steps} steps at most), Laplace approximation at the result"

    def prepare(self, fit: Fit, var_name: str, rng_key=None):
        adapter, m = fit.adapter, fit.posterior.mean

        def run(weights):
            s = newton_refit(adapter, m, weights, self.max_steps, self.gtol, var_name)
            conv = bool(jnp.isfinite(s.value)) and (self.max_steps == 1
                                                    or bool(converged(s.value, s.grad, self.gtol)))
            return RefitResult(s.theta, jnp.linalg.cholesky(0.5 * (s.hess + s.hess.T)), conv, s.steps)

        return run
