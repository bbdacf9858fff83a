"""Natural-gradient Gaussian variational inference (variational online Newton) for NumPyro potentials.

q(θ) = N(m, S⁻¹) over the flat unconstrained θ of :class:`~numpyro_mpe.model.adapter.ModelAdapter`,
fitted by the
variational online Newton (VON) update of the Bayesian learning rule, in the parametrization of IVON
(Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024).  With λ the effective
sample size (by default N, the number of observations) the state is

* ``mean`` m, ``hess`` h with S = λ h (the precision per observation: the prior is folded into the potential
  U = Σ_i ℓ_i + R, so IVON's weight decay is zero), and ``momentum`` ḡ.

One step, with θ_k = m + ε_k, ε_k ~ N(0, S⁻¹) (``mc_samples`` draws, optionally antithetic pairs ±ε_k):

    ĝ = mean_k ∇U_w(θ_k) / λ
    ĥ = mean_k ∇U_w(θ_k) ⊙ ε_k ⊙ h          (diagonal: reparameterization estimate of diag ∇²U / λ)
    ĥ = mean_k ∇²U_w(θ_k) / λ               (full: exact Hessians at the draws, for small P)
    ḡ ← β₁ ḡ + (1 − β₁) ĝ
    h ← h + (1 − β₂)(ĥ − h) + ½(1 − β₂)² (ĥ − h) h⁻¹ (ĥ − h)
    m ← m − α_t · h⁻¹ ḡ / (1 − β₁ᵗ)

The last term of the h update is IVON's correction: h_new = ½[h + (h + rd) h⁻¹ (h + rd)] with r = 1 − β₂,
d = ĥ − h, so h stays positive (definite) for any ĥ, including the indefinite Hessians of a non-convex U.
The ĥ of the diagonal variant is Stein's identity E_q[∇U(θ)(θ − m)ᵀ] S = E_q[∇²U(θ)] read on the diagonal.
At a fixed point E_q[∇U] = 0 and S = E_q[∇²U] (full) — the stationarity conditions of the Gaussian
variational objective, the posterior whose memories the MPE perturbs.

**Minibatches.**  With ``subsample_size`` B, every step draws B observations of the site without replacement
and uses U_w(θ) = R(θ) + (N/B) Σ_{i∈batch} ℓ_i(θ), implemented through per-observation weights on the site's
log-likelihood, U_w = U + Σ_i (1 − w_i) log p(y_i | θ): one call of the potential and one of the site's
log-likelihood (two full model passes per draw; subsampling saves the optimizer's noise budget, not model
time — for a model written with ``numpyro.plate(..., subsample_size=...)`` use that instead).  The same
weights (0 for removed observations) give the refits of :meth:`NGVI.refit`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.scipy.linalg import cho_solve, solve_triangular
from numpyro.infer import init_to_median
from tqdm.auto import tqdm

from numpyro_mpe.errors import PosteriorError, check_chunk_size, check_options
from numpyro_mpe.fit import Fit
from numpyro_mpe.inference.training import (
    CheckpointMPE,
    _heldout_adapter,
    fit_from_state,
    history_frame,
    memories_hook,
    posterior_from_state,
)
from numpyro_mpe.model.adapter import ModelAdapter


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


def _constant(value: float) -> Callable:
    return lambda step: value


class _Engine:
    """The compiled NGVI steps for one model and configuration (cached per adapter)."""

    def __init__(self, adapter: ModelAdapter, *, full: bool, ess: float, mc_samples: int, antithetic: bool,
                 beta1: float, beta2: float, clip_radius: float | None, site_name: str, subsample_size,
                 lr_fn: Callable):
        self.adapter = adapter
        self.full = full
        self.ess = float(ess)
        self.mc_samples = int(mc_samples)
        self.antithetic = bool(antithetic)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.clip_radius = clip_radius
        self.site_name = site_name
        self.num_obs = adapter.observed[site_name].num_obs
        self.subsample_size = subsample_size
        self.lr_fn = lr_fn
        self._blocks: dict[bool, Callable] = {}
        self._vblock = None

    # ---------------------------------------------------------------- potential with weights
    def _potential(self, weighted: bool) -> Callable:
        adapter, name = self.adapter, self.site_name

        def u_w(theta, w):
            u = adapter.potential(theta)
            if not weighted:
                return u
            return u + jnp.sum((1.0 - w) * adapter.log_lik(theta, name))

        return u_w

    # ---------------------------------------------------------------- one step
    def step(self, state: NGVIState, w, lr_const, weighted: bool):
        """One NGVI step; returns the new state and whether it is finite (and h positive definite)."""
        u_w = self._potential(weighted)
        m, h, mom = state.mean, state.hess, state.momentum
        p = m.shape[0]
        dtype = m.dtype
        lam = self.ess
        t = state.step + 1
        key, k_z, k_b = jax.random.split(state.rng_key, 3)
        lr = jnp.where(jnp.isnan(lr_const), jnp.asarray(self.lr_fn(state.step), dtype), lr_const)
        if self.subsample_size is not None:
            n, b = self.num_obs, int(self.subsample_size)
            idx = jax.random.choice(k_b, n, (b,), replace=False)
            w = w * jnp.zeros(n, dtype).at[idx].set(n / b)
        z = jax.random.normal(k_z, (self.mc_samples, p), dtype)
        if self.antithetic:
            z = jnp.concatenate([z, -z])
        if self.full:
            chol = jnp.linalg.cholesky(lam * h)
            eps = solve_triangular(chol.T, z.T, lower=False).T
        else:
            eps = z / jnp.sqrt(lam * h)
        thetas = m + eps
        grads = jax.vmap(jax.grad(u_w), in_axes=(0, None))(thetas, w)
        g_hat = jnp.mean(grads, 0) / lam
        r = 1.0 - self.beta2
        if self.full:
            hess = jax.vmap(jax.hessian(u_w), in_axes=(0, None))(thetas, w)
            h_hat = jnp.mean(hess, 0) / lam
            h_hat = 0.5 * (h_hat + h_hat.T)
            d = h_hat - h
            chol_h = jnp.linalg.cholesky(h)
            h_new = h + r * d + 0.5 * r**2 * d @ cho_solve((chol_h, True), d)
            h_new = 0.5 * (h_new + h_new.T)
        else:
            h_hat = jnp.mean(grads * eps, 0) * h
            d = h_hat - h
            h_new = h + r * d + 0.5 * r**2 * d * d / h
        mom_new = self.beta1 * mom + (1.0 - self.beta1) * g_hat
        g_bar = mom_new / (1.0 - self.beta1 ** t.astype(dtype))
        if self.full:
            chol_new = jnp.linalg.cholesky(h_new)
            delta = cho_solve((chol_new, True), g_bar)
            pd_ok = jnp.all(jnp.isfinite(chol_new))
        else:
            delta = g_bar / h_new
            pd_ok = jnp.all(h_new > 0)
        if self.clip_radius is not None:
            delta = jnp.clip(delta, -self.clip_radius, self.clip_radius)
        m_new = m - lr * delta
        new = NGVIState(m_new, h_new, mom_new, t, key)
        ok = (pd_ok & jnp.all(jnp.isfinite(m_new)) & jnp.all(jnp.isfinite(h_new))
              & jnp.all(jnp.isfinite(mom_new)))
        return new, ok

    # ---------------------------------------------------------------- blocks of steps
    def block(self, weighted: bool) -> Callable:
        """Jitted ``(state, n, w, lr_const, diverged_at) -> (state, diverged_at)``: ``n`` steps (traced).

        A step whose result is not finite is not taken: the state stays the last finite one and
        ``diverged_at`` records the step number (1-based); later steps are skipped.
        """
        if weighted not in self._blocks:

            def run(state, n, w, lr_const, diverged_at):
                def body(_, carry):
                    s, div = carry

                    def do(s):
                        new, ok = self.step(s, w, lr_const, weighted)
                        kept = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, s)
                        return kept, jnp.where(ok, div, new.step)

                    return jax.lax.cond(div >= 0, lambda s: (s, div), do, s)

                return jax.lax.fori_loop(0, n, body, (state, diverged_at))

            self._blocks[weighted] = jax.jit(run)
        return self._blocks[weighted]

    def paired_block(self) -> Callable:
        """:meth:`block` (weighted) vmapped over a leading axis of weights, with common random numbers."""
        if self._vblock is None:
            run = self.block(True)
            self._vblock = jax.jit(jax.vmap(run, in_axes=(None, None, 0, None, None)))
        return self._vblock


class NGVIRefit:
    """The ``refit_fn`` of NGVI fits: ``(fit, weights) -> GaussianPosterior`` by :meth:`NGVI.refit`."""

    def __init__(self, ngvi: NGVI):
        self.ngvi = ngvi

    def __call__(self, fit: Fit, weights, var_name: str | None = None, *, rng_key=None):
        if var_name is not None and var_name != fit.info.get("var_name"):
            raise ValueError(f"this NGVI fit refits with weights on '{fit.info.get('var_name')}', "
                             f"not '{var_name}'")
        return self.ngvi.refit(fit, weights, rng_key=rng_key).posterior

    def exact_loo(self, fit: Fit, indices, var_name: str | None = None, **kwargs) -> xr.Dataset:
        """Brute-force leave-one-out by these refits: :func:`exact_loo_ngvi` (``kwargs`` passed on)."""
        return exact_loo_ngvi(fit, indices, var_name, **kwargs)


class NGVI:
    """Natural-gradient Gaussian VI (variational online Newton; IVON for the diagonal) of a NumPyro model.

    Fits q = N(m, S⁻¹) in NumPyro's unconstrained space by the update in this module's docstring and returns a
    :class:`~numpyro_mpe.fit.Fit` built from the optimizer's mean and precision, so that every MPE output
    (``fit.sensitivities()``, ``fit.loo()``, exports, comparisons) is available.  With ``every=k`` (or a
    ``callback``) the MPE outputs and the MPE leave-one-out estimate are computed from the optimizer's state
    every k steps — in the cavity form and in the first-order "prediction error × prediction variance" form
    (:mod:`numpyro_mpe.inference.training`) — and kept in ``fit.info["history"]``.

    Parameters
    ----------
    model : callable
        A NumPyro model with continuous latent sites and at least one observed site.
    num_steps : int, default 1000
        Optimizer steps.
    lr : float or callable, default 0.1
        Learning rate α_t of the mean, or a schedule ``step -> lr`` (``step`` the 0-based step count, a
        traced integer: optax schedules and ``jax.example_libraries.optimizers`` schedules, e.g.
        ``exponential_decay``, fit).
    hess_init : float or array, default 1.0
        Initial h (precision per observation): S₀ = λ · hess_init (times the identity for ``"full"``).
    beta1 : float, default 0.9
        Momentum of the gradient (bias-corrected).
    beta2 : float, optional
        Averaging of the Hessian estimate (window 1 / (1 − β₂) steps).  Default for ``"diag"``:
        1 − min(10⁻³, max(10⁻⁵, 3 / num_steps)) — a window of a third of the run, at least 1000 steps (the
        single-draw reparameterization estimate needs that many to average out: shorter windows leave some
        h_j far too small, hence cavities with leverage > 1) and at most IVON's 10⁵ (β₂ = 0.99999); in runs
        shorter than ~3000 steps h then stays close to ``hess_init``, as in IVON.  Default for ``"full"``
        (exact Hessians, little noise): 1 − min(0.1, 10 / num_steps), so ``hess_init`` weighs e⁻¹⁰ at the
        end.
    mc_samples : int, default 1
        Draws from q per step (2 × ``mc_samples`` with ``antithetic=True``).
    subsample_size : int, optional
        Minibatch size over the observations of the site ``var_name`` (see the module docstring); must not
        exceed the number of observations.
    precision : {"diag", "full"}, default "diag"
        Diagonal precision with the reparameterization Hessian estimate (IVON), or a full precision with exact
        Hessians at the draws (small P).  ``posterior=`` is accepted as the same option (the name Laplace
        and SVI use); ``posterior="lowrank"`` is refused: NGVI keeps a full or diagonal precision.
    lr_schedule : callable, optional
        A schedule ``step -> lr``; an alternative to passing a callable ``lr`` (give one of them).
    callback : callable, optional
        ``callback(checkpoint)`` at every checkpoint with a
        :class:`numpyro_mpe.inference.training.Checkpoint` (step,
        per-observation outputs, history record, and a Fit from the state); returning ``True`` stops
        training.
    every : int, optional
        Checkpoint every ``every`` steps (and at steps 0 and ``num_steps``); default ``num_steps // 20``
        when a ``callback`` is given, else no checkpoints.
    **options
        ``antithetic`` (bool, default False: draw ±ε pairs — exact gradients and Hessians of quadratic
        potentials, and no gradient noise in the Hessian estimate); ``heldout`` (``(args, kwargs)`` of the
        model on held-out data: ``heldout_nll`` at checkpoints); ``var_name`` (the observed site for
        minibatches, refits and checkpoints; required with several); ``ess`` (λ, default the total number
        of observations); ``clip_radius`` (elementwise bound on h⁻¹ḡ, default none); ``init_strategy``
        (default ``init_to_median``; use ``init_to_uniform`` or ``init_to_sample`` for neural networks);
        ``memories`` (``"mc"``, ``"delta"``, ``"ggn"``: how the final Fit computes its memories, see
        :func:`numpyro_mpe.inference.training.memories_hook`; default ``"mc"`` where
        :mod:`numpyro_mpe.inference.variational`
        exists, else ``"delta"``); ``memory_samples`` (256); ``checkpoint_samples`` (draws from q for the
        NLLs at checkpoints, 100); ``checkpoint_memories`` (``"q"``, the default, or ``"mean"``: see
        :class:`numpyro_mpe.inference.training.CheckpointMPE`); ``refit_steps`` (steps of :meth:`refit`,
        default
        max(100, num_steps // 5)); ``on_divergence`` (``"warn"``, the default, or ``"raise"``);
        ``precision_from`` (``"optimizer"``, the default: S = λh of the final state; or ``"memories"``:
        S = E_q[∇²U] from the same draws as the memories, which then add up to S to round-off, see
        :func:`numpyro_mpe.inference.variational.variational_posterior`); ``progress`` (bool); ``chunk_size``,
        ``num_samples`` (of the Fit's MPE pass).

    Notes
    -----
    A step that produces a non-finite mean, precision or momentum (too large ``lr``, too small
    ``hess_init``) is not taken: training stops there with a warning (or a
    :class:`~numpyro_mpe.errors.PosteriorError` carrying the Fit as ``err.fit``) that names the step, and the
    Fit holds the last finite state; ``fit.info["diverged_at"]`` is that step.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import numpyro_mpe as mpe
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 40); y = 2 * x
    >>> fit = mpe.NGVI(model, num_steps=300, lr=0.3, precision="full", antithetic=True, memories="delta",
    ...                progress=False).run(jax.random.PRNGKey(0), x, y=y)
    >>> round(float(fit.posterior.mean[0]), 2)  # the exact posterior mean, 2·Σx²/(Σx² + 1/100)
    2.0
    >>> ds = fit.sensitivities()  # per-observation MPE outputs, as for a Laplace fit
    """

    OPTIONS = {"antithetic", "heldout", "var_name", "ess", "clip_radius", "init_strategy", "memories",
               "memory_samples", "checkpoint_samples", "refit_steps", "on_divergence", "progress",
               "chunk_size", "num_samples", "precision_from", "checkpoint_memories", "posterior",
               "curvature", "devices"}

    def __init__(self, model: Callable, num_steps: int = 1000, lr: float | Callable | None = None,
                 hess_init: float | Any = 1.0, beta1: float = 0.9, beta2: float | None = None,
                 mc_samples: int = 1, subsample_size: int | None = None, precision: str = "diag",
                 lr_schedule: Callable | None = None, callback: Callable | None = None,
                 every: int | None = None, **options):
        check_options("NGVI", options, self.OPTIONS)
        structure = options.pop("posterior", None)  # the name shared with Laplace and SVI
        if structure == "lowrank":
            raise ValueError("NGVI cannot provide posterior='lowrank' (its natural-gradient updates keep a "
                             "full or diagonal precision); use posterior='diag' or 'full', or "
                             "mpe.SVI(model, posterior='lowrank') / mpe.Laplace(model, posterior='lowrank')")
        if structure is not None:
            if structure not in ("diag", "full"):
                raise ValueError(f"posterior must be 'diag' or 'full' for NGVI, got {structure!r}")
            precision = structure
        self.model = model
        self.num_steps = int(num_steps)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
        if lr is not None and lr_schedule is not None:
            raise TypeError("give either lr (a number or a schedule) or lr_schedule, not both")
        sched = lr_schedule if lr_schedule is not None else (0.1 if lr is None else lr)
        if callable(sched):
            self.lr_fn = sched
        else:
            if not float(sched) > 0:
                raise ValueError(f"lr must be positive, got {sched}")
            self.lr_fn = _constant(float(sched))
        self.hess_init = hess_init
        self.beta1 = float(beta1)
        if beta2 is None:
            if precision == "full":
                beta2 = 1.0 - min(0.1, 10.0 / self.num_steps)
            else:
                beta2 = 1.0 - min(1e-3, max(1e-5, 3.0 / self.num_steps))
        self.beta2 = float(beta2)
        for name, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must lie in [0, 1), got {b}")
        self.mc_samples = int(mc_samples)
        if self.mc_samples < 1:
            raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
        if subsample_size is not None and int(subsample_size) < 1:
            raise ValueError(f"subsample_size must be a positive integer, got {subsample_size}")
        self.subsample_size = None if subsample_size is None else int(subsample_size)
        if precision not in ("diag", "full"):
            raise ValueError(f"precision must be 'diag' or 'full', got {precision!r}")
        self.precision = precision
        self.callback = callback
        if every is None and callback is not None:
            every = max(1, self.num_steps // 20)
        if every is not None and int(every) < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.every = None if every is None else int(every)
        self.antithetic = bool(options.get("antithetic", False))
        self.heldout = options.get("heldout")
        self.var_name = options.get("var_name")
        self.ess = options.get("ess")
        self.clip_radius = options.get("clip_radius")
        self.init_strategy = options.get("init_strategy", init_to_median)
        self.memories = options.get("memories")
        self.memory_samples = int(options.get("memory_samples", 256))
        self.checkpoint_samples = int(options.get("checkpoint_samples", 100))
        self.checkpoint_memories = options.get("checkpoint_memories", "q")
        self.refit_steps = int(options.get("refit_steps", max(100, self.num_steps // 5)))
        self.on_divergence = options.get("on_divergence", "warn")
        if self.on_divergence not in ("warn", "raise"):
            raise ValueError(f"on_divergence must be 'warn' or 'raise', got {self.on_divergence!r}")
        self.progress = bool(options.get("progress", True))
        self.mpe_options = {k: options[k] for k in ("chunk_size", "num_samples", "progress", "curvature",
                                                     "devices") if k in options}
        check_chunk_size(self.mpe_options.get("chunk_size"))
        self.precision_from = options.get("precision_from", "optimizer")
        if self.precision_from not in ("optimizer", "memories"):
            raise ValueError(f"precision_from must be 'optimizer' or 'memories', got {self.precision_from!r}")
        if self.precision_from == "memories" and self.memories == "ggn":
            raise ValueError("precision_from='memories' needs memories='mc' or 'delta' (E_q[∇²U] is not a "
                             "Gauss-Newton matrix)")
        memories_hook(self.memories)  # validate early

    # ------------------------------------------------------------------ helpers
    def _engine(self, adapter: ModelAdapter) -> _Engine:
        site = adapter.observed_site(self.var_name)
        n = site.num_obs
        if self.subsample_size is not None and self.subsample_size > n:
            raise ValueError(
                f"subsample_size={self.subsample_size} is larger than the {n} observations of site "
                f"'{site.name}' (dims {site.dims}, shape {site.obs_shape}): a minibatch is drawn without "
                f"replacement, so use subsample_size <= {n} (or None for full batches)")
        ess = self.ess if self.ess is not None else sum(s.num_obs for s in adapter.observed.values())
        if not float(ess) > 0:
            raise ValueError(f"ess must be positive, got {ess}")
        return _Engine(adapter, full=self.precision == "full", ess=float(ess), mc_samples=self.mc_samples,
                       antithetic=self.antithetic, beta1=self.beta1, beta2=self.beta2,
                       clip_radius=self.clip_radius, site_name=site.name,
                       subsample_size=self.subsample_size, lr_fn=self.lr_fn)

    def init_state(self, adapter: ModelAdapter, rng_key) -> NGVIState:
        """The initial state: m at the model's initial point, h = ``hess_init``, zero momentum."""
        m = jnp.asarray(adapter.init_theta)
        p = m.shape[0]
        h0 = jnp.broadcast_to(jnp.asarray(self.hess_init, m.dtype), (p,))
        if not bool(jnp.all(h0 > 0)):
            raise ValueError(f"hess_init must be positive, got {self.hess_init}")
        h = jnp.diag(h0) if self.precision == "full" else h0
        return NGVIState(m, h, jnp.zeros_like(m), jnp.asarray(0), rng_key)

    def _precision(self, engine: _Engine, state: NGVIState):
        return engine.ess * state.hess

    def _lr_at(self, step: int) -> float:
        return float(self.lr_fn(jnp.asarray(step)))

    def _make_fit(self, engine: _Engine, state: NGVIState, info: dict, posterior_override=None,
                  refit: bool = False) -> Fit:
        diagonal = self.precision == "diag"
        prec = self._precision(engine, state)
        if self.precision_from == "memories" and not refit:
            from numpyro_mpe.inference.variational import variational_posterior

            q = posterior_override or posterior_from_state(state.mean, prec)
            kind = self.memories or "mc"
            vp = variational_posterior(engine.adapter, q, num_samples=self.memory_samples,
                                       rng_key=jax.random.PRNGKey(0), method=kind, diagonal=diagonal)
            info = {**info, **{k: v for k, v in vp.info.items() if k != "memories"}}
            info["memories"] = (f"{kind}: E_q by Monte Carlo ({self.memory_samples} draws)" if kind == "mc"
                                else "delta: values at the mean") + (
                "; precision E_q[∇²U] from the same draws (precision_from='memories')")
            fit = Fit(engine.adapter, vp.posterior, "ngvi", info, memories_fn=vp.memories_fn,
                      refit_fn=NGVIRefit(self), **self.mpe_options)
        else:
            fit = fit_from_state(engine.adapter, state.mean, prec, method="ngvi", info=info,
                                 memories=self.memories, memory_samples=self.memory_samples,
                                 rng_key=jax.random.PRNGKey(0), refit_fn=NGVIRefit(self), diagonal=diagonal,
                                 **self.mpe_options)
            if posterior_override is not None:
                fit.posterior = posterior_override
        fit._cache["ngvi_engine"] = engine
        return fit

    # ------------------------------------------------------------------ training loop
    def _train(self, engine: _Engine, state: NGVIState, num_steps: int, checkpoints: CheckpointMPE | None,
               desc: str) -> tuple[NGVIState, int, list[dict]]:
        block = engine.block(self.subsample_size is not None)
        n = engine.num_obs
        w = jnp.ones(n, state.mean.dtype)
        nan = jnp.asarray(jnp.nan, state.mean.dtype)
        every = self.every if checkpoints is not None else None
        size = every if every is not None else max(1, math.ceil(num_steps / 100))
        records: list[dict] = []
        div = jnp.asarray(-1)

        def checkpoint(s: NGVIState) -> bool:
            step = int(s.step)
            ck = checkpoints.checkpoint(s.mean, self._precision(engine, s), step,
                                        self._lr_at(max(step - 1, 0)))
            records.append(ck.record)
            bar.set_postfix(loo_nll=f"{ck.record['loo_nll']:.4g}", heldout=f"{ck.record['heldout_nll']:.4g}",
                            refresh=False)
            return bool(self.callback is not None and self.callback(ck) is True)

        bar = tqdm(total=num_steps, desc=desc, disable=not self.progress, leave=False)
        stop = checkpoint(state) if checkpoints is not None else False
        done = 0
        while done < num_steps and not stop:
            k = min(size, num_steps - done)
            state, div = block(state, k, w, nan, div)
            done += k
            bar.update(k)
            if int(div) >= 0:
                break
            if checkpoints is not None and (done % every == 0 or done == num_steps):
                stop = checkpoint(state)
        bar.close()
        return state, int(div), records

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged).

        Returns
        -------
        Fit
            q from the optimizer's final (or last finite) mean and precision.  ``fit.info`` holds
            ``state`` (the final :class:`NGVIState`), ``steps``, ``diverged_at``, ``grad_norm`` (max |E_q ∇U|
            estimated by the bias-corrected momentum), ``memories`` (how memories are computed), ``history``
            (a DataFrame of the checkpoints, or ``None``) and the configuration.
        """
        k_build, k_state, k_ck, k_held = jax.random.split(rng_key, 4)
        adapter = ModelAdapter.build(self.model, k_build, args, kwargs, self.init_strategy)
        engine = self._engine(adapter)
        state = self.init_state(adapter, k_state)
        checkpoints = None
        if self.every is not None:
            held = (None if self.heldout is None else
                    _heldout_adapter(self.model, self.heldout, k_held, self.init_strategy, adapter,
                                     engine.site_name))
            checkpoints = CheckpointMPE(adapter, engine.site_name, diagonal=self.precision == "diag",
                                        heldout_adapter=held, num_samples=self.checkpoint_samples,
                                        rng_key=k_ck, chunk_size=self.mpe_options.get("chunk_size", 4096),
                                        memories=self.checkpoint_memories)
        state, div, records = self._train(engine, state, self.num_steps, checkpoints, "NGVI")
        info = self._info(engine, state, div)
        info["history"] = history_frame(records, engine.num_obs) if checkpoints is not None else None
        fit = self._make_fit(engine, state, info)
        if div >= 0:
            self._diverged(fit, div)
        return fit

    def _info(self, engine: _Engine, state: NGVIState, div: int) -> dict:
        t = max(int(state.step), 1)
        g_bar = np.asarray(state.momentum) / (1.0 - self.beta1**t)
        return {"method": "ngvi", "precision": self.precision, "num_steps": self.num_steps,
                "steps": int(state.step), "diverged_at": div if div >= 0 else None,
                "grad_norm": float(engine.ess * np.max(np.abs(g_bar))), "ess": engine.ess,
                "lr_final": self._lr_at(max(int(state.step) - 1, 0)), "beta1": self.beta1,
                "beta2": self.beta2,
                "mc_samples": self.mc_samples, "antithetic": self.antithetic,
                "subsample_size": self.subsample_size, "var_name": engine.site_name, "state": state}

    def _diverged(self, fit: Fit, div: int) -> None:
        msg = (f"NGVI diverged at step {div} of {self.num_steps}: that step gave a non-finite mean, "
               f"precision or momentum; training stopped and the Fit holds the last finite state (after step "
               f"{div - 1}). Lower lr, raise hess_init, or set clip_radius")
        if self.on_divergence == "raise":
            err = PosteriorError(msg)
            err.fit = fit
            raise err
        warnings.warn(msg, stacklevel=3)

    # ------------------------------------------------------------------ refits
    def refit(self, fit: Fit, weights, *, num_steps: int | None = None, lr: float | None = None,
              rng_key=None, control: bool = True) -> Fit:
        """Continue training from ``fit``'s optimizer state with per-observation ``weights`` (warm start).

        ``weights`` ``(N,)`` multiply the terms ℓ_i of the site ``var_name`` (0 removes i; the exact
        leave-one-out refit by the same method).  With ``control=True`` two runs share every random number —
        one with ``weights``, one with the weights of the fit (all ones) — and the returned q is the fit's
        plus their difference, m + (m_w − m_1) and S + (S_w − S_1): the Monte Carlo noise of the continued
        optimization cancels, leaving the effect of the weights (a control variate; with ``control=False``
        the weighted run itself is returned).

        Parameters
        ----------
        fit : Fit
            A Fit returned by :meth:`run` of an NGVI with the same configuration.
        weights : array (N,)
            Per-observation weights of the site.
        num_steps : int, optional
            Steps of the refit (default the ``refit_steps`` option).
        lr : float, optional
            Constant learning rate of the refit (default the schedule's last value).
        rng_key : jax.random.PRNGKey, optional
            Key of the refit's draws (default the fit's state key).
        control : bool, default True
            Cancel the optimizer's noise with the paired all-ones run.

        Returns
        -------
        Fit

        Examples
        --------
        >>> w = jnp.ones(40).at[3].set(0.0)  # doctest: +SKIP
        >>> shift = ngvi.refit(fit, w).posterior.mean - fit.posterior.mean  # doctest: +SKIP
        """
        state = fit.info.get("state")
        if not isinstance(state, NGVIState):
            raise TypeError("refit needs a Fit returned by NGVI.run (fit.info['state'] is its optimizer "
                            "state)")
        engine = fit._cache.get("ngvi_engine")
        if engine is None:
            engine = self._engine(fit.adapter)
            fit._cache["ngvi_engine"] = engine
        dtype = state.mean.dtype
        w = jnp.asarray(weights, dtype)
        if w.shape != (engine.num_obs,):
            raise ValueError(f"weights must have shape ({engine.num_obs},) (one per observation of "
                             f"'{engine.site_name}'), got {w.shape}")
        if rng_key is not None:
            state = state._replace(rng_key=rng_key)
        steps = self.refit_steps if num_steps is None else int(num_steps)
        lr_c = jnp.asarray(self._lr_at(max(int(state.step) - 1, 0)) if lr is None else float(lr), dtype)
        div0 = jnp.asarray(-1)
        if control:
            ws = jnp.stack([w, jnp.ones_like(w)])
            states, divs = engine.paired_block()(state, steps, ws, lr_c, div0)
            new = jax.tree_util.tree_map(lambda a: a[0], states)
            ref = jax.tree_util.tree_map(lambda a: a[1], states)
            div = int(jnp.max(divs))
            prec = (self._precision(engine, state) + self._precision(engine, new)
                    - self._precision(engine, ref))
            mean = state.mean + new.mean - ref.mean
        else:
            new, div = engine.block(True)(state, steps, w, lr_c, div0)
            div = int(div)
            prec, mean = self._precision(engine, new), new.mean
        info = self._info(engine, new, div)
        info.update(refit_of=fit.method, refit_steps=steps, control=control, history=None)
        post = posterior_from_state(mean, prec) if control else None
        out = self._make_fit(engine, new, info, posterior_override=post, refit=True)
        if div >= 0:
            warnings.warn(f"NGVI refit diverged at step {div}; lower lr", stacklevel=2)
        return out


def exact_loo_ngvi(fit: Fit, indices: int | Sequence[int] | np.ndarray | None, var_name: str | None = None, *,
                   num_steps: int | None = None, lr: float | None = None, num_samples: int = 4000,
                   rng_key=None, control: bool = True, progress: bool = True) -> xr.Dataset:
    """Leave-one-out by brute force for an NGVI fit: continue NGVI without each listed observation.

    Each refit is :meth:`NGVI.refit` with weight 0 on observation i, warm-started from the fit's optimizer
    state (mean, precision, momentum); with ``control=True`` its Monte Carlo noise is cancelled by a paired
    all-ones run with the same random numbers.  q₋i is the refit's Gaussian.  Nothing here uses memories or
    cavities: it is the same-method check of :meth:`numpyro_mpe.Fit.sensitivities` for NGVI.

    Parameters
    ----------
    fit : Fit
        A fit from :meth:`NGVI.run`.
    indices : int, sequence of int, or None
        Flat indices into the observations of the site; ``None`` means all.
    var_name : str, optional
        Observed site (must be the one NGVI weights, ``fit.info["var_name"]``).
    num_steps, lr
        Steps and constant learning rate of each refit (defaults of :meth:`NGVI.refit`).
    num_samples : int, default 4000
        Antithetic draws from q₋i for ``elpd_loo``; 0 skips it (NaN).
    rng_key : jax.random.PRNGKey, optional
        Key of the refits' draws (shared by all refits) and of the ``elpd_loo`` draws.
    control : bool, default True
        Paired all-ones run as a control variate (see :meth:`NGVI.refit`).
    progress : bool, default True
        Progress bar over the observations.

    Returns
    -------
    xarray.Dataset
        As :func:`numpyro_mpe.exact_loo`: over ``obs`` and ``param``, ``shift`` (m₋i − m), ``sensitivity``
        (√(shiftᵀ S shift), S the fit's precision), ``elpd_loo`` (log E_{q₋i} p(y_i | θ) by Monte Carlo) and
        ``elpd_loo_mcse``, ``leverage`` (largest eigenvalue of S^{-1/2} ∇²ℓ_i(m) S^{-1/2}), ``converged``
        (the refit stayed finite) and ``steps``.

    Examples
    --------
    >>> ngvi = mpe.NGVI(model, precision="full", num_steps=500)  # doctest: +SKIP
    >>> fit = ngvi.run(jax.random.PRNGKey(0), X, y=y)  # doctest: +SKIP
    >>> ex = mpe.exact_loo_ngvi(fit, range(30))  # doctest: +SKIP
    >>> scipy.stats.spearmanr(ex.sensitivity, fit.sensitivities().sensitivity[:30])  # doctest: +SKIP
    """
    from numpyro_mpe.loo.exact import _flat_indices, refit_dataset

    refit = fit.refit_fn
    if not isinstance(refit, NGVIRefit):
        raise TypeError(f"exact_loo_ngvi needs a fit made by mpe.NGVI, got method={fit.method!r}; use "
                        "mpe.exact_loo for Laplace fits")
    ngvi = refit.ngvi
    adapter = fit.adapter
    site = adapter.observed_site(var_name)
    name = site.name
    if name != fit.info.get("var_name"):
        raise ValueError(f"this NGVI fit refits with weights on '{fit.info.get('var_name')}', not '{name}'")
    idx = _flat_indices(indices, site.num_obs, name)
    num_samples = int(num_samples)
    if num_samples == 1 or num_samples < 0:
        raise ValueError(f"num_samples must be 0 (no elpd_loo) or at least 2, got {num_samples}")
    post = fit.posterior
    m = jnp.asarray(post.mean)
    p, dtype = m.shape[0], m.dtype
    chol = jnp.asarray(post.chol)
    key_fit, key_z = jax.random.split(jax.random.PRNGKey(1) if rng_key is None else rng_key)
    half = (max(num_samples, 2) + 1) // 2
    z = jax.random.normal(key_z, (half, p), dtype)
    z = jnp.concatenate([z, -z])[:num_samples]

    @jax.jit
    def one(i, mean_i, chol_i):
        shift = mean_i - m
        out = {"shift": shift, "sensitivity": jnp.linalg.norm(chol.T @ shift)}
        h = -jax.hessian(lambda t: adapter.log_lik(t, name)[i])(m)
        a_w = post.whiten(post.whiten(0.5 * (h + h.T)).T)
        out["leverage"] = jnp.linalg.eigvalsh(0.5 * (a_w + a_w.T))[-1]
        if num_samples:
            ok = jnp.all(jnp.isfinite(chol_i))
            chol_i = jnp.where(ok, chol_i, jnp.eye(p, dtype=dtype))
            draws = mean_i + solve_triangular(chol_i.T, z.T, lower=False).T
            ll = jax.vmap(lambda t: adapter.log_lik(t, name)[i])(draws)
            w = jnp.exp(ll - jnp.max(ll))
            out["elpd_loo"] = jnp.where(ok, jax.scipy.special.logsumexp(ll) - jnp.log(num_samples), jnp.nan)
            out["elpd_loo_mcse"] = jnp.where(ok, jnp.std(w) / jnp.mean(w) / jnp.sqrt(num_samples), jnp.nan)
        else:
            out["elpd_loo"] = out["elpd_loo_mcse"] = jnp.asarray(jnp.nan, dtype)
        return out

    keys = ("shift", "sensitivity", "leverage", "elpd_loo", "elpd_loo_mcse")
    out: dict[str, list] = {k: [] for k in (*keys, "converged", "steps")}
    ones = jnp.ones(site.num_obs, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i in tqdm(idx, desc=f"exact LOO (NGVI refits) {name}", disable=not progress, leave=False):
            r_fit = ngvi.refit(fit, ones.at[int(i)].set(0.0), num_steps=num_steps, lr=lr, rng_key=key_fit,
                               control=control)
            q = r_fit.posterior
            r = jax.device_get(one(jnp.asarray(i), q.mean, q.chol))
            for k in keys:
                out[k].append(r[k])
            out["converged"].append(r_fit.info["diverged_at"] is None)
            out["steps"].append(r_fit.info["refit_steps"])
    arrays = {k: np.asarray(v) for k, v in out.items()}
    if not len(idx):
        arrays["shift"] = np.zeros((0, p), dtype)
    ds = refit_dataset(adapter, site, idx, arrays)
    integration = (f"Monte Carlo in θ-space ({num_samples} antithetic draws from the refit's Gaussian)"
                   if num_samples else "not computed (num_samples=0)")
    ds.attrs.update(var_name=name, method="exact_loo_ngvi", control=bool(control), num_samples=num_samples,
                    elpd_integration=integration)
    ds["shift"].attrs["description"] = "m_-i - m (unconstrained space), NGVI refit without i"
    ds["sensitivity"].attrs["description"] = "sqrt(shift' S shift), S the full-data precision"
    ds["leverage"].attrs["description"] = "max eig of S^-1/2 Hess(-log p(y_i|theta))(m) S^-1/2"
    return ds
