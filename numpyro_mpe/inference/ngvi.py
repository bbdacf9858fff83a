"""Natural-gradient Gaussian variational inference (variational online Newton) of a NumPyro model as a
:class:`~numpyro_mpe.fit.Fit`; the update itself is :mod:`numpyro_mpe.inference.von`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import init_to_median

from numpyro_mpe.errors import MPEError, PosteriorError
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import from_state
from numpyro_mpe.inference.base import RefitResult
from numpyro_mpe.inference.training import (
    CheckpointMPE,
    checkpoint_callback,
    fit_from_state,
    heldout_adapter,
    history_frame,
    memory_spec,
    train_in_blocks,
)
from numpyro_mpe.inference.von import (
    ConstantLR,
    NGVIState,
    VONConfig,
    von_block,
    von_init,
    von_paired_block,
    von_precision,
)
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.options import MPEOptions, check_choice, check_positive_int, keyword_options

#: Largest natural-gradient step (posterior sd) the final state may still ask for to count as converged.
MAX_STEP = 0.25


class NGVIRefit:
    """Refit of an NGVI fit: NGVI continued from the fit's optimizer state with observation weights
    (:meth:`NGVI.refit`), its noise cancelled by a paired all-ones run (``control``)."""

    coupled = False
    label = "exact_loo_ngvi"

    def __init__(self, ngvi: NGVI, num_steps: int | None = None, lr: float | None = None,
                 control: bool = True):
        self.ngvi, self.num_steps, self.lr, self.control = ngvi, num_steps, lr, bool(control)

    def describe(self) -> str:
        steps = self.ngvi.refit_steps if self.num_steps is None else self.num_steps
        paired = ", paired" if self.control else ""
        return f"NGVI refit ({steps} steps from the fit's optimizer state{paired})"

    def prepare(self, fit: Fit, var_name: str, rng_key):
        if var_name != fit.info.get("var_name"):
            raise MPEError(f"this NGVI fit refits with weights on '{fit.info.get('var_name')}', not "
                           f"'{var_name}'")

        def run(weights):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                r = self.ngvi.refit(fit, weights, num_steps=self.num_steps, lr=self.lr, rng_key=rng_key,
                                    control=self.control)
            q = r.posterior
            return RefitResult(q.mean, q.chol, r.info["diverged_at"] is None, r.info["refit_steps"])

        return run

    def __call__(self, fit: Fit, weights, var_name: str | None = None, *, rng_key=None):
        if var_name is not None and var_name != fit.info.get("var_name"):
            raise MPEError(f"this NGVI fit refits with weights on '{fit.info.get('var_name')}', not "
                           f"'{var_name}'")
        return self.ngvi.refit(fit, weights, rng_key=rng_key).posterior


class NGVI:
    """Natural-gradient Gaussian VI (variational online Newton; IVON for the diagonal) of a NumPyro model.

    Fits q = N(m, S⁻¹) in NumPyro's unconstrained space by the update of :mod:`numpyro_mpe.inference.von` and
    returns a :class:`~numpyro_mpe.fit.Fit` built from the optimizer's mean and precision, so that every MPE
    output (``fit.sensitivities()``, ``fit.loo()``, exports, comparisons) is available.  With ``every=k`` (or
    a ``callback``) the MPE outputs and the MPE leave-one-out estimate are computed from the optimizer's state
    every k steps — in the cavity form and in the first-order "prediction error × prediction variance" form
    (:mod:`numpyro_mpe.inference.training`) — and kept in ``fit.info["history"]``.

    Parameters
    ----------
    model : callable
        A NumPyro model with continuous latent sites and at least one observed site.
    posterior : {"diag", "full"}, default "diag"
        Diagonal precision with the reparameterization Hessian estimate (IVON), or a full precision with exact
        Hessians at the draws (small P).  ``precision=`` is the same option under its older name;
        ``"lowrank"`` is refused: NGVI keeps a full or diagonal precision.
    num_steps : int, default 1000
        Optimizer steps.
    lr : float or callable, default 0.1
        Learning rate α_t of the mean, or a schedule ``step -> lr`` (``step`` the 0-based step count, a traced
        integer: optax schedules fit).  ``lr_schedule=`` is the same option.
    hess_init : float or array, default 1.0
        Initial h (precision per observation): S₀ = λ · hess_init (times the identity for ``"full"``).
    beta1 : float, default 0.9
        Momentum of the gradient (bias-corrected).
    beta2 : float, optional
        Averaging of the Hessian estimate (window 1 / (1 − β₂) steps).  Default for ``"diag"``:
        1 − min(10⁻³, max(10⁻⁵, 3 / num_steps)) — a window of a third of the run, at least 1000 steps (the
        single-draw reparameterization estimate needs that many to average out) and at most IVON's 10⁵;
        default for ``"full"`` (exact Hessians, little noise): 1 − min(0.1, 10 / num_steps).
    mc_samples : int, default 1
        Draws from q per step (2 × ``mc_samples`` with ``antithetic=True``).
    antithetic : bool, default True
        Draw ±ε pairs: exact gradients and Hessians of quadratic potentials (the fit of a Gaussian linear
        model converges to the exact posterior), and no gradient noise in the Hessian estimate.
    subsample_size : int, optional
        Minibatch size over the observations of the site ``var_name``; must not exceed their number.
    callback : callable, optional
        ``callback(checkpoint)`` at every checkpoint with a
        :class:`numpyro_mpe.inference.training.Checkpoint`;
        returning ``True`` stops training.
    every : int, optional
        Checkpoint every ``every`` steps (and at steps 0 and ``num_steps``); default ``num_steps // 20``
        when a ``callback`` is given, else no checkpoints.
    heldout : tuple, optional
        ``(args, kwargs)`` of the model on held-out data: ``heldout_nll`` at checkpoints.
    var_name : str, optional
        The observed site for minibatches, refits and checkpoints; required with several.
    ess : float, optional
        λ, default the total number of observations.
    clip_radius : float, optional
        Elementwise bound on h⁻¹ḡ.
    init_strategy : callable, default ``init_to_median``
        Use ``init_to_uniform`` or ``init_to_sample`` for neural networks.
    memories : {"mc", "delta", "ggn"}, optional
        How the final Fit computes its memories (:func:`numpyro_mpe.inference.training.memory_spec`; default
        ``"mc"``).
    memory_samples : int, default 256
        Draws from q for ``memories="mc"``.
    checkpoint_samples : int, default 100
        Draws from q for the NLLs at checkpoints.
    checkpoint_memories : {"q", "mean"}, default "q"
        See :class:`numpyro_mpe.inference.training.CheckpointMPE`.
    refit_steps : int, default ``max(100, num_steps // 5)``
        Steps of :meth:`refit`.
    on_divergence : {"warn", "raise"}, default "warn"
    precision_from : {"optimizer", "memories"}, default "optimizer"
        S = λh of the final state, or S = E_q[∇²U] from the same draws as the memories, which then add up to S
        to round-off (:func:`numpyro_mpe.inference.variational.variational_posterior`).
    chunk_size, num_samples, progress, curvature, devices
        As for :class:`~numpyro_mpe.Laplace`.

    Notes
    -----
    A step that produces a non-finite mean, precision or momentum (too large ``lr``, too small ``hess_init``)
    is not taken: training stops there with a warning (or a :class:`~numpyro_mpe.errors.PosteriorError`
    carrying the Fit as ``err.fit``) that names the step, and the Fit holds the last finite state;
    ``fit.info["diverged_at"]`` is that step.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.toy import line_data, line_model as model
    >>> x = jnp.linspace(-1, 1, 40); y = 2 * x
    >>> fit = mpe.NGVI(model, "full", num_steps=300, lr=0.3, antithetic=True, memories="delta",
    ...                progress=False).run(jax.random.PRNGKey(0), x, y=y)
    >>> round(float(fit.posterior.mean[0]), 2)  # the exact posterior mean, 2·Σx²/(Σx² + 1/100)
    2.0
    >>> ds = fit.sensitivities()  # per-observation MPE outputs, as for a Laplace fit
    """

    @keyword_options
    def __init__(self, model: Callable, posterior: str | None = None, *, precision: str | None = None,
                 num_steps: int = 1000, lr: float | Callable | None = None,
                 lr_schedule: Callable | None = None,
                 hess_init: float | Any = 1.0, beta1: float = 0.9, beta2: float | None = None,
                 mc_samples: int = 1, antithetic: bool = True, subsample_size: int | None = None,
                 callback: Callable | None = None, every: int | None = None, heldout=None,
                 var_name: str | None = None, ess: float | None = None, clip_radius: float | None = None,
                 init_strategy=init_to_median, memories: str | None = None, memory_samples: int = 256,
                 checkpoint_samples: int = 100, checkpoint_memories: str = "q",
                 refit_steps: int | None = None, on_divergence: str = "warn",
                 precision_from: str = "optimizer", chunk_size: int | None = None, num_samples: int = 2000,
                 progress: bool = True, curvature: str = "exact", devices=None):
        if posterior is not None and precision is not None and posterior != precision:
            raise MPEError(f"posterior={posterior!r} and precision={precision!r} disagree; give one of them")
        structure = posterior or precision or "diag"
        if structure == "lowrank":
            raise MPEError("NGVI cannot provide posterior='lowrank': its precision must be 'diag' or 'full' "
                           "(natural-gradient updates keep a full or diagonal precision); use "
                           "mpe.SVI(model, posterior='lowrank') / mpe.Laplace(model, posterior='lowrank')")
        self.precision = check_choice("posterior", structure, ("diag", "full"))
        self.model = model
        self.num_steps = check_positive_int("num_steps", num_steps)
        if lr is not None and lr_schedule is not None:
            raise TypeError("give either lr (a number or a schedule) or lr_schedule, not both")
        sched = lr_schedule if lr_schedule is not None else (0.1 if lr is None else lr)
        if not callable(sched) and not float(sched) > 0:
            raise MPEError(f"lr must be positive, got {sched}")
        self.lr_fn = sched if callable(sched) else ConstantLR(float(sched))
        self.hess_init = hess_init
        self.beta1 = float(beta1)
        if beta2 is None:
            beta2 = (1.0 - min(0.1, 10.0 / self.num_steps) if self.precision == "full"
                     else 1.0 - min(1e-3, max(1e-5, 3.0 / self.num_steps)))
        self.beta2 = float(beta2)
        for name, b in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= b < 1.0:
                raise MPEError(f"{name} must lie in [0, 1), got {b}")
        self.mc_samples = check_positive_int("mc_samples", mc_samples)
        self.antithetic = bool(antithetic)
        self.subsample_size = None if subsample_size is None else check_positive_int("subsample_size",
                                                                                    subsample_size)
        self.callback = callback
        if every is None and callback is not None:
            every = max(1, self.num_steps // 20)
        self.every = None if every is None else check_positive_int("every", every)
        self.heldout, self.var_name, self.ess, self.clip_radius = heldout, var_name, ess, clip_radius
        self.init_strategy = init_strategy
        memory_spec(memories)  # validates
        self.memories, self.memory_samples = memories, check_positive_int("memory_samples", memory_samples)
        self.checkpoint_samples = check_positive_int("checkpoint_samples", checkpoint_samples)
        self.checkpoint_memories = check_choice("checkpoint_memories", checkpoint_memories, ("q", "mean"))
        self.refit_steps = int(refit_steps if refit_steps is not None else max(100, self.num_steps // 5))
        self.on_divergence = check_choice("on_divergence", on_divergence, ("warn", "raise"))
        self.precision_from = check_choice("precision_from", precision_from, ("optimizer", "memories"))
        if self.precision_from == "memories" and memories == "ggn":
            raise MPEError("precision_from='memories' needs memories='mc' or 'delta' (E_q[∇²U] is not a "
                           "Gauss-Newton matrix)")
        self.options = MPEOptions.make(chunk_size=chunk_size, num_samples=num_samples, progress=progress,
                                       curvature=curvature, devices=devices)

    @property
    def progress(self) -> bool:
        return self.options.progress

    # ------------------------------------------------------------------ helpers
    def config(self, adapter: ModelAdapter) -> VONConfig:
        """The static configuration of the update for this model and data."""
        site = adapter.observed_site(self.var_name)
        n = site.num_obs
        if self.subsample_size is not None and self.subsample_size > n:
            raise MPEError(
                f"subsample_size={self.subsample_size} is larger than the {n} observations of site "
                f"'{site.name}' (dims {site.dims}, shape {site.obs_shape}): a minibatch is drawn without "
                f"replacement, so use subsample_size <= {n} (or None for full batches)")
        ess = self.ess if self.ess is not None else sum(s.num_obs for s in adapter.observed.values())
        if not float(ess) > 0:
            raise MPEError(f"ess must be positive, got {ess}")
        return VONConfig(self.precision == "full", float(ess), self.mc_samples, self.antithetic, self.beta1,
                         self.beta2, self.clip_radius, site.name, self.subsample_size, self.lr_fn)

    def init_state(self, adapter: ModelAdapter, rng_key) -> NGVIState:
        """The initial state: m at the model's initial point, h = ``hess_init``, zero momentum."""
        h0 = np.broadcast_to(np.asarray(self.hess_init, float), (adapter.num_params,))
        if not np.all(h0 > 0):
            raise MPEError(f"hess_init must be positive, got {self.hess_init}")
        return von_init(jnp.asarray(adapter.init_theta), self.hess_init, self.precision == "full", rng_key)

    def _lr_at(self, step: int) -> float:
        return float(self.lr_fn(np.int32(step)))

    def _make_fit(self, adapter: ModelAdapter, config: VONConfig, state: NGVIState, info: dict,
                  posterior_override=None, refit: bool = False) -> Fit:
        diagonal = self.precision == "diag"
        prec = von_precision(config, state)
        if self.precision_from == "memories" and not refit:
            from numpyro_mpe.inference.variational import variational_posterior

            q = posterior_override or from_state(state.mean, prec)
            kind = self.memories or "mc"
            vp = variational_posterior(adapter, q, num_samples=self.memory_samples,
                                       rng_key=jax.random.PRNGKey(0), method=kind, diagonal=diagonal)
            info = {**info, **{k: v for k, v in vp.info.items() if k != "memories"}}
            info["memories"] = (f"{kind}: E_q by Monte Carlo ({self.memory_samples} draws)" if kind == "mc"
                                else "delta: values at the mean") + (
                "; precision E_q[∇²U] from the same draws (precision_from='memories')")
            return Fit(adapter, vp.posterior, "ngvi", info, memories=vp.memories, refit=NGVIRefit(self),
                       options=self.options)
        fit = fit_from_state(adapter, state.mean, prec, method="ngvi", info=info, memories=self.memories,
                             memory_samples=self.memory_samples, rng_key=jax.random.PRNGKey(0),
                             refit=NGVIRefit(self), diagonal=diagonal, options=self.options)
        if posterior_override is not None:
            fit.posterior = posterior_override
        return fit

    # ------------------------------------------------------------------ training
    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged).

        Returns
        -------
        Fit
            q from the optimizer's final (or last finite) mean and precision.  ``fit.info`` holds ``state``
            (the final :class:`~numpyro_mpe.inference.von.NGVIState`), ``steps``, ``diverged_at``,
            ``grad_norm`` (max |E_q ∇U| estimated by the bias-corrected momentum), ``memories``, ``history``
            (a DataFrame of the checkpoints, or ``None``) and the configuration.
        """
        k_build, k_state, k_ck, k_held = jax.random.split(rng_key, 4)
        adapter = ModelAdapter.build(self.model, k_build, args, kwargs, self.init_strategy)
        config = self.config(adapter)
        state = self.init_state(adapter, k_state)
        w = jnp.ones(adapter.observed[config.site_name].num_obs, adapter.structure.dtype)
        nan = jnp.asarray(jnp.nan, adapter.structure.dtype)
        div = [jnp.asarray(-1)]

        def advance(state, k):
            state, d = von_block(adapter, state, k, w, nan, div[0], config=config,
                                 weighted=self.subsample_size is not None)
            div[0] = d
            return state, int(d) >= 0

        checkpoint, records = None, None
        if self.every is not None:
            held = (None if self.heldout is None else
                    heldout_adapter(self.model, self.heldout, k_held, self.init_strategy, adapter,
                                    config.site_name))
            checkpoints = CheckpointMPE(adapter, config.site_name, diagonal=self.precision == "diag",
                                        heldout_adapter=held, num_samples=self.checkpoint_samples,
                                        rng_key=k_ck, options=self.options, memories=self.checkpoint_memories)
            records = []
            checkpoint = checkpoint_callback(checkpoints, lambda s: (s.mean, von_precision(config, s)),
                                             records, lr_at=self._lr_at, callback=self.callback)
        state, _ = train_in_blocks(advance, state, self.num_steps, every=self.every, checkpoint=checkpoint,
                                   desc="NGVI", progress=self.progress)
        d = int(div[0])
        info = self._info(config, state, d)
        info["history"] = None if records is None else history_frame(records,
                                                                     adapter.observed[config.site_name].num_obs)
        fit = self._make_fit(adapter, config, state, info)
        if d >= 0:
            self._diverged(fit, d)
        elif not info["converged"]:
            warnings.warn(
                f"NGVI has not converged: the estimated E_q[∇U] still asks for a natural-gradient step of "
                f"{info['mean_step']:.3g} posterior sd (at most {MAX_STEP}); the leave-one-out outputs "
                "describe a q that may not be the variational optimum: raise num_steps or mc_samples, or "
                "lower lr", stacklevel=2)
        return fit

    def _info(self, config: VONConfig, state: NGVIState, div: int) -> dict:
        t = max(int(state.step), 1)
        g_bar = np.asarray(state.momentum) / (1.0 - self.beta1**t)
        # E_q[∇U] ≈ λ ḡ; the natural-gradient step it asks for, S⁻¹E_q[∇U], in posterior sd: √(λ ḡᵀ h⁻¹ ḡ)
        h = np.asarray(state.hess)
        with np.errstate(over="ignore", invalid="ignore"):  # a diverged state gives inf/NaN: not converged
            quad = g_bar @ (g_bar / h if h.ndim == 1 else np.linalg.solve(h, g_bar))
        mean_step = float(np.sqrt(max(config.ess * float(quad), 0.0)))
        converged = div < 0 and np.isfinite(mean_step) and mean_step <= MAX_STEP
        return {"method": "ngvi", "precision": self.precision, "num_steps": self.num_steps,
                "mean_step": mean_step, "converged": bool(converged),
                "steps": int(state.step), "diverged_at": div if div >= 0 else None,
                "grad_norm": float(config.ess * np.max(np.abs(g_bar))), "ess": config.ess,
                "lr_final": self._lr_at(max(int(state.step) - 1, 0)), "beta1": self.beta1,
                "beta2": self.beta2,
                "mc_samples": self.mc_samples, "antithetic": self.antithetic,
                "subsample_size": self.subsample_size, "var_name": config.site_name, "state": state}

    def _diverged(self, fit: Fit, div: int) -> None:
        msg = (f"NGVI diverged at step {div} of {self.num_steps}: that step gave a non-finite mean, "
               "precision or momentum; training stopped and the Fit holds the last finite state (after step "
               f"{div - 1}). "
               "Lower lr, raise hess_init, or set clip_radius")
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
        plus
        their difference, m + (m_w − m_1) and S + (S_w − S_1): the Monte Carlo noise of the continued
        optimization cancels, leaving the effect of the weights (a control variate; with ``control=False`` the
        weighted run itself is returned).

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
            raise MPEError("refit needs a Fit returned by NGVI.run (fit.info['state'] is its optimizer "
                           "state)")
        adapter = fit.adapter
        config = self.config(adapter)
        dtype = state.mean.dtype
        n = adapter.observed[config.site_name].num_obs
        w = jnp.asarray(weights, dtype)
        if w.shape != (n,):
            raise MPEError(f"weights must have shape ({n},) (one per observation of '{config.site_name}'), "
                           f"got {w.shape}")
        if rng_key is not None:
            state = state._replace(rng_key=rng_key)
        steps = self.refit_steps if num_steps is None else int(num_steps)
        lr_c = jnp.asarray(self._lr_at(max(int(state.step) - 1, 0)) if lr is None else float(lr), dtype)
        div0 = jnp.asarray(-1)
        if control:
            ws = jnp.stack([w, jnp.ones_like(w)])
            states, divs = von_paired_block(adapter, state, steps, ws, lr_c, div0, config=config)
            new = jax.tree_util.tree_map(lambda a: a[0], states)
            ref = jax.tree_util.tree_map(lambda a: a[1], states)
            div = int(jnp.max(divs))
            prec = (von_precision(config, state) + von_precision(config, new) - von_precision(config, ref))
            mean = state.mean + new.mean - ref.mean
        else:
            new, div = von_block(adapter, state, steps, w, lr_c, div0, config=config, weighted=True)
            div = int(div)
            prec, mean = von_precision(config, new), new.mean
        info = self._info(config, new, div)
        info.update(refit_of=fit.method, refit_steps=steps, control=control, history=None)
        post = from_state(mean, prec) if control else None
        out = self._make_fit(adapter, config, new, info, posterior_override=post, refit=True)
        if div >= 0:
            warnings.warn(f"NGVI refit diverged at step {div}; lower lr", stacklevel=2)
        return out


__all__ = ["NGVI", "NGVIRefit", "NGVIState"]
