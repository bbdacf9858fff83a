"""Gaussian stochastic variational inference (NumPyro SVI) as a :class:`~numpyro_mpe.fit.Fit`.

:class:`SVI` fits NumPyro's ``AutoNormal`` (``posterior="diag"``), ``AutoMultivariateNormal`` (``"full"``) or
``AutoLowRankMultivariateNormal`` (``"lowrank"``) by maximizing the ELBO (``Trace_ELBO``); :func:`from_svi`
takes a user's finished NumPyro SVI run with one of those guides, ``AutoDiagonalNormal`` or
``AutoLaplaceApproximation``.  Either way the guide's Gaussian q = N(m, Σ) in unconstrained space is mapped
onto the flat θ of the model (:mod:`numpyro_mpe.inference.guides`), and the Fit holds

* the mean m and the precision S = E_q[∇²U] consistent with the variational memories Ĥ_i = E_q[∇²ℓ_i]
  (:mod:`numpyro_mpe.inference.variational`; at a VI optimum S = Σ⁻¹ up to Monte Carlo error, and their
  relative difference is ``fit.info["precision_rel_diff"]``);
* ``refit``: :class:`SVIRefit`, SVI again with observation weights (0 removes), warm-started from the fit's
  guide parameters: the brute-force leave-one-out of :func:`numpyro_mpe.exact_loo`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import Trace_ELBO, init_to_median
from numpyro.infer.autoguide import AutoLaplaceApproximation

from numpyro_mpe.errors import MPEError, PosteriorError
from numpyro_mpe.fit import Fit
from numpyro_mpe.inference.guides import (
    GUIDES,
    check_guide,
    default_optim,
    elbo_diagnostics,
    ensure_prototype,
    guide_extractor,
    guide_name,
)
from numpyro_mpe.inference.svi_refit import SVIRefit, svi_refit  # noqa: F401  (svi_refit re-exported)
from numpyro_mpe.inference.training import (
    CheckpointMPE,
    checkpoint_callback,
    heldout_adapter,
    history_frame,
    train_in_blocks,
)
from numpyro_mpe.inference.variational import DEFAULT_SAMPLES, check_method, variational_posterior
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.options import MPEOptions, check_choice, check_options, check_positive_int, keyword_options
from numpyro_mpe.programs import jit

#: Largest movement of the averaged mean, in posterior sd, between the halves of the averaging window, and
#: largest final natural-gradient step, for a run to count as converged.
MAX_DRIFT = 0.1
MAX_CORRECTION = 0.25


# ---------------------------------------------------------------- building the Fit
def _fit_from_guide(adapter: ModelAdapter, guide, params: dict, *, memories: str, memory_samples: int,
                    rng_key, info: dict, options: MPEOptions, refit: SVIRefit | None,
                    diagonal_memories: bool = True, polish: bool = False) -> Fit:
    gauss = jit(guide_extractor(guide, adapter))(params)
    if not (np.all(np.isfinite(np.asarray(gauss.mean))) and np.all(np.isfinite(np.asarray(gauss.cov)))):
        raise PosteriorError(f"the guide {guide_name(guide)} has non-finite parameters (did the SVI run "
                             "diverge?); lower lr or check the model")
    q = gauss.posterior()
    info = dict(info, guide=guide_name(guide))
    if isinstance(guide, AutoLaplaceApproximation):
        # A Laplace approximation: the Hessian of U at the guide's mode, delta memories, Newton refits.
        from numpyro_mpe.inference.laplace import laplace_map
        from numpyro_mpe.inference.optimum import check_precision

        state, post, spec = laplace_map(adapter, q.mean, 0, 1e-8)  # no step: U, ∇U, ∇²U at the guide's mode
        check_precision(adapter, post.precision, q.mean, spec)
        rel = float(np.linalg.norm(np.asarray(post.precision - q.precision)) / np.linalg.norm(q.precision))
        info.update(grad_norm=float(np.max(np.abs(np.asarray(state.grad)))), q=q, precision_rel_diff=rel)
        return Fit(adapter, post, method="laplace", info=info, options=options)
    vp = variational_posterior(adapter, q, num_samples=memory_samples, rng_key=rng_key, method=memories,
                               diagonal=gauss.diagonal and diagonal_memories, polish=polish)
    info.update(vp.info)
    spec = vp.memories
    if options.curvature == "ggn":  # memories through each observation's predictor at the mean of q
        spec = spec._replace(kind="ggn", diagonal=False)
    return Fit(adapter, vp.posterior, method="svi", info=info, memories=spec, refit=refit, options=options)


class SVI:
    """Gaussian variational inference with NumPyro's SVI, returning a :class:`~numpyro_mpe.fit.Fit`.

    Maximizes the ELBO (``Trace_ELBO``) of a Gaussian guide in unconstrained space; the Fit's mean is the
    guide's, its precision S = E_q[∇²U] is consistent with the variational memories Ĥ_i = E_q[∇²ℓ_i]
    (see :mod:`numpyro_mpe.inference.variational`), and exact leave-one-out refits
    (:func:`numpyro_mpe.exact_loo`) rerun SVI with the observation removed.

    Parameters
    ----------
    model : callable
        A NumPyro model with continuous latent sites and at least one observed site.
    posterior : {"diag", "full", "lowrank"}, default "diag"
        The guide: ``AutoNormal`` (mean-field: diagonal memories and precision), ``AutoMultivariateNormal`` or
        ``AutoLowRankMultivariateNormal``.  ``guide=`` is the same option under NumPyro's name.
    optim : numpyro.optim optimizer, optional
        Default: ``ClippedAdam`` with the learning rate decaying geometrically from ``lr`` to ``lr_end``.
    num_steps : int, default 2000
        SVI steps.
    num_particles : int, default 1
        ELBO draws per step.
    rank : int, optional
        Rank of the ``"lowrank"`` guide (NumPyro's default √P).
    init_strategy : callable, default ``init_to_median``
        The guide's ``init_loc_fn``.
    init_scale : float, default 0.1
        Initial scale of the guide.
    lr, lr_end : float, default 0.02 and lr/100
        Learning rate at the first and last step of the default optimizer (the refits decay from ``lr/2`` to
        ``lr_end``).
    clip_norm : float, default 10.0
        Gradient clipping of the default optimizer.
    stable_update : bool, default True
        Skip steps with a non-finite loss (NumPyro's ``SVI.stable_update``).
    average : float, default 0.25
        The guide's parameters are averaged over this fraction of the last steps (Polyak–Ruppert): a
        stochastic optimizer ends in a cloud around the optimum, the average near it.  0 keeps the last
        iterate.  ``fit.info["mean_drift"]`` is the movement of the averaged mean between the two halves of
        the window (posterior sd).  ``fit.info["converged"]`` is True when the ELBO is flat and the final
        natural-gradient step (``polish``) is at most 0.25 sd — without the polish, when the drift is at most
        0.1 sd; a warning says when not.
    polish : bool, default True
        Move the final mean by one natural-gradient step m − S⁻¹E_q[∇U] to the stationary point of the
        variational objective (exact for a quadratic potential; see
        :func:`numpyro_mpe.inference.variational.variational_posterior`);
        ``fit.info["mean_correction"]`` is its length in posterior sd.
    memories : {"mc", "delta"}, default "mc"
        Memories and precision as expectations under q (Monte Carlo) or at the mean.
    memory_samples : int, default 256
        Draws from q (antithetic, common to all observations) for ``memories="mc"``.
    diagonal_memories : bool, default True
        For ``posterior="diag"``: diagonal memories Ĥ_i and precision S, the natural parameters of the
        mean-field q.  ``False`` keeps the full E_q[∇²ℓ_i] and S = E_q[∇²U] with the mean-field mean and
        draws, which follows the mean of a mean-field refit more closely.
    refit_steps : int, default ``max(500, num_steps // 2)``
        SVI steps of each warm-started refit.
    callback : callable, optional
        ``callback(checkpoint)`` at every checkpoint with a :class:`numpyro_mpe.inference.training.Checkpoint`
        built from the guide's Gaussian; returning ``True`` stops training.
    every : int, optional
        Checkpoint every ``every`` steps (and at steps 0 and ``num_steps``): the MPE of the guide's current
        Gaussian (:class:`numpyro_mpe.inference.training.CheckpointMPE`), kept in ``fit.info["history"]``;
        default ``num_steps // 20`` when a ``callback`` is given, else no checkpoints (and no extra cost).
    heldout : tuple, optional
        ``(args, kwargs)`` of the model on held-out data: ``heldout_nll`` at checkpoints.
    var_name : str, optional
        The observed site of the checkpoints; required when the model has several.
    checkpoint_samples : int, default 100
        Draws from q for the NLLs at checkpoints.
    checkpoint_memories : {"q", "mean"}, default "q"
        Memories of the checkpoints (see :class:`numpyro_mpe.inference.training.CheckpointMPE`).
    chunk_size, num_samples, progress, curvature, devices
        As for :class:`~numpyro_mpe.Laplace` (``progress`` also shows NumPyro's SVI progress bar;
        ``curvature="ggn"`` takes the memories through each observation's predictor at the mean of q).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.toy import line_data, line_model as model
    >>> x, y = line_data(kind="exact")
    >>> fit = mpe.SVI(model, posterior="full", num_steps=1000, progress=False).run(jax.random.PRNGKey(0), x,
    ...                                                                             y=y)
    >>> fit.method, abs(float(fit.posterior.mean[0]) - 2.0) < 0.1
    ('svi', True)
    """

    @keyword_options
    def __init__(self, model: Callable, posterior: str | None = None, *, guide: str | None = None, optim=None,
                 num_steps: int = 2000, num_particles: int = 1, rank: int | None = None,
                 callback: Callable | None = None, every: int | None = None, init_strategy=init_to_median,
                 init_scale: float = 0.1, lr: float = 0.02, lr_end: float | None = None,
                 clip_norm: float = 10.0,
                 stable_update: bool = True, memories: str = "mc", memory_samples: int = DEFAULT_SAMPLES,
                 diagonal_memories: bool = True, refit_steps: int | None = None, heldout=None,
                 var_name: str | None = None, checkpoint_samples: int = 100, checkpoint_memories: str = "q",
                 average: float = 0.25, polish: bool = True, chunk_size: int | None = None,
                 num_samples: int = 2000, progress: bool = True, curvature: str = "exact", devices=None):
        if posterior is not None and guide is not None and posterior != guide:
            raise MPEError(f"posterior={posterior!r} and guide={guide!r} disagree; give one of them")
        structure = posterior or guide or "diag"
        if structure not in GUIDES:
            if isinstance(structure, str):
                given = "posterior" if posterior is not None else "guide"
                raise MPEError(f"{given} must be one of {sorted(GUIDES)}, got {structure!r}")
            check_guide(structure)
            raise MPEError(f"SVI takes posterior='diag'|'full'|'lowrank'; for a {guide_name(structure)} "
                           "instance run NumPyro's SVI and pass the result to mpe.from_svi")
        if rank is not None and structure != "lowrank":
            raise MPEError(f"rank= applies to posterior='lowrank' only, got posterior={structure!r}")
        self.model = model
        self.guide = structure
        self.optim = optim
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.num_particles = check_positive_int("num_particles", num_particles)
        self.rank = rank
        self.init_strategy, self.init_scale = init_strategy, float(init_scale)
        self.lr = float(lr)
        self.lr_end = float(self.lr / 100 if lr_end is None else lr_end)
        if not (self.lr > 0 and self.lr_end > 0):
            raise MPEError(f"lr and lr_end must be positive, got {self.lr}, {self.lr_end}")
        self.clip_norm, self.stable_update = float(clip_norm), bool(stable_update)
        if not 0.0 <= float(average) < 1.0:
            raise MPEError(f"average must lie in [0, 1) (the fraction of the last steps averaged), got "
                           f"{average}")
        self.average = float(average)
        self.polish = bool(polish)
        check_method(memories, memory_samples, ("memories", "memory_samples"))
        self.memories, self.memory_samples = memories, int(memory_samples)
        self.diagonal_memories = bool(diagonal_memories)
        self.refit_steps = int(refit_steps if refit_steps is not None else max(500, self.num_steps // 2))
        self.options = MPEOptions.make(chunk_size=chunk_size, num_samples=num_samples, progress=progress,
                                       curvature=curvature, devices=devices)
        if callback is not None and not callable(callback):
            raise MPEError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback
        if every is None and callback is not None:
            every = max(1, self.num_steps // 20)
        self.every = None if every is None else check_positive_int("every", every)
        self.heldout, self.var_name = heldout, var_name
        self.checkpoint_samples = check_positive_int("checkpoint_samples", checkpoint_samples)
        self.checkpoint_memories = check_choice("checkpoint_memories", checkpoint_memories, ("q", "mean"))

    @property
    def progress(self) -> bool:
        return self.options.progress

    def _make_guide(self, model):
        kw: dict[str, Any] = {"init_loc_fn": self.init_strategy, "init_scale": self.init_scale}
        if self.guide == "lowrank":
            kw["rank"] = self.rank
        return GUIDES[self.guide](model, **kw)

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged).

        ``fit.info`` holds the ELBO trace (``losses``), ``elbo``, ``elbo_drift``/``elbo_mcse``/``converged``
        (last two tenths of the run), ``grad_norm`` = max |E_q[∇U]| (≈ 0 at the optimum),
        ``precision_rel_diff`` between E_q[∇²U] and the guide's precision, the guide's own Gaussian ``q``, and
        ``history`` (a DataFrame of the checkpoints with ``every``/``callback``, else ``None``).
        """
        key_model, key_svi, key_mem = jax.random.split(rng_key, 3)
        adapter = ModelAdapter.build(self.model, key_model, args, kwargs, self.init_strategy)
        args, kwargs = adapter.args, adapter.kwargs  # the data as the model sees them (pandas converted)
        guide = self._make_guide(self.model)
        optim = self.optim if self.optim is not None else default_optim(self.lr, self.lr_end, self.num_steps,
                                                                         self.clip_norm)
        svi = numpyro.infer.SVI(self.model, guide, optim, Trace_ELBO(num_particles=self.num_particles))
        params, losses, records, halves = self._train(svi, guide, adapter, key_svi, key_model, args, kwargs)
        steps = int(losses.size)
        history = None if records is None else history_frame(records,
                                                             adapter.observed_site(self.var_name).num_obs)
        diag = elbo_diagnostics(losses) if losses.size else {
            "elbo": float("nan"), "elbo_drift": float("nan"), "elbo_mcse": float("nan"), "converged": False}
        info = {"steps": steps, "losses": losses, "num_particles": self.num_particles, **diag,
                "history": history, "average": self.average}
        refit = SVIRefit(self.model, guide, params, args, kwargs, num_steps=self.refit_steps,
                         num_particles=self.num_particles, lr=self.lr / 2, lr_end=self.lr_end,
                         clip_norm=self.clip_norm, stable_update=self.stable_update)
        fit = _fit_from_guide(adapter, guide, params, memories=self.memories,
                              memory_samples=self.memory_samples, rng_key=key_mem, info=info,
                              options=self.options, refit=refit, diagonal_memories=self.diagonal_memories,
                              polish=self.polish)
        drift = float("nan")
        if halves is not None:  # the guide's mean over the two halves of the averaging window, in sd units
            extract = jit(guide_extractor(guide, adapter))
            d = extract(halves[1]).mean - extract(halves[0]).mean
            drift = float(np.sqrt(max(float(d @ fit.posterior.precision_matvec(d)), 0.0)))
        correction = fit.info.get("mean_correction", 0.0)
        # with the polish the final mean is the stationary point, as long as the step to it was short
        settled = correction <= MAX_CORRECTION if self.polish else not drift > MAX_DRIFT
        converged = bool(diag["converged"] and settled)
        fit.info.update(mean_drift=drift, converged=converged)
        if steps == self.num_steps and not converged:
            warnings.warn(
                f"SVI has not converged: the guide's mean moved {drift:.3g} posterior sd between the halves "
                f"of the last {self.average:.0%} of the steps (at most {MAX_DRIFT}), the final "
                f"natural-gradient step was {correction:.3g} sd (at most {MAX_CORRECTION}), the ELBO drifted "
                f"{diag['elbo_drift']:.3g} over the last tenth (standard error {diag['elbo_mcse']:.2g}); the "
                "leave-one-out outputs describe a q that may not be the variational optimum: raise "
                "num_steps, num_particles or lr", stacklevel=2)
        return fit

    def _lr_at(self, step: int) -> float:
        """Learning rate of the default optimizer at 0-based ``step`` (NaN for a user's optimizer)."""
        if self.optim is not None:
            return float("nan")
        decay = (self.lr_end / self.lr) ** (1.0 / max(self.num_steps, 1))
        return self.lr * decay ** min(step, self.num_steps)

    def _train(self, svi, guide, adapter: ModelAdapter, key_svi, key_model, args: tuple, kwargs: dict):
        """SVI in blocks (:func:`~numpyro_mpe.inference.training.train_in_blocks`), with a
        :class:`CheckpointMPE` of the guide's Gaussian between blocks when checkpointing, and the guide's
        parameters averaged over the last ``average`` of the steps (two halves kept apart, for the drift).
        Returns the parameters (averaged), the losses of the steps taken, the checkpoint records (``None``
        without) and the averages of the two halves (``None`` when training stopped before the window)."""
        state = svi.init(key_svi, *args, **kwargs)
        update = svi.stable_update if self.stable_update else svi.update
        window = int(round(self.average * self.num_steps))
        start, middle = self.num_steps - window, self.num_steps - window // 2
        zeros = jax.tree_util.tree_map(jnp.zeros_like, svi.get_params(state))

        @partial(jit, static_argnums=1)
        def block(carry, length, step0):
            def body(c, i):
                s, sums, counts = c
                s, loss = update(s, *args, **kwargs)
                step = step0 + i + 1  # steps taken
                half = jnp.where(step > middle, 1, 0)
                take = step > start
                params = svi.get_params(s)
                sums = [jax.tree_util.tree_map(lambda a, x, k=k: a + jnp.where(take & (half == k), x, 0.0),
                                               sums[k], params) for k in range(2)]
                counts = counts + jnp.where(take, jax.nn.one_hot(half, 2, dtype=counts.dtype), 0)
                return (s, sums, counts), loss

            return jax.lax.scan(body, carry, jnp.arange(length))

        losses: list[np.ndarray] = []
        done = [0]

        def advance(carry, k):
            carry, block_losses = block(carry, k, done[0])
            done[0] += k
            losses.append(np.asarray(block_losses))
            return carry, False

        checkpoint, records = None, None
        if self.every is not None:
            k_ck, k_held = jax.random.split(jax.random.fold_in(key_model, 1))
            site = adapter.observed_site(self.var_name)
            held = (None if self.heldout is None else
                    heldout_adapter(self.model, self.heldout, k_held, self.init_strategy, adapter, site.name))
            checkpoints = CheckpointMPE(adapter, site.name, diagonal=self.guide == "diag",
                                        heldout_adapter=held, num_samples=self.checkpoint_samples,
                                        rng_key=k_ck, options=self.options, memories=self.checkpoint_memories)
            extract = guide_extractor(guide, adapter)

            @jit
            def gaussian(carry):
                g = extract(svi.get_params(carry[0]))
                if g.diagonal:
                    return g.mean, 1.0 / g.cov
                q = g.posterior()
                return q.mean, q.precision

            records = []
            checkpoint = checkpoint_callback(checkpoints, gaussian, records, lr_at=self._lr_at,
                                             callback=self.callback)
        carry = (state, [zeros, zeros], jnp.zeros(2, jnp.int32))
        (state, sums, counts), _ = train_in_blocks(advance, carry, self.num_steps, every=self.every,
                                                   checkpoint=checkpoint, desc="SVI", progress=self.progress)
        all_losses = np.concatenate(losses) if losses else np.zeros(0)
        counts = np.asarray(counts)
        if counts.min() == 0:  # training stopped before the averaging window
            return svi.get_params(state), all_losses, records, None
        halves = [jax.tree_util.tree_map(lambda a, n=n: a / n, s, ) for s, n in zip(sums, counts)]
        total = jax.tree_util.tree_map(lambda a, b: (a + b) / counts.sum(), *sums)
        return total, all_losses, records, halves


FROM_SVI_OPTIONS = {"rng_key", "memories", "memory_samples", "diagonal_memories", "refit_steps",
                    "num_particles", "lr", "lr_end", "clip_norm", "init_strategy", "chunk_size",
                    "num_samples", "progress", "curvature", "devices"}


def from_svi(model: Callable, guide, params: dict, *args, mpe_options: dict | None = None, **kwargs) -> Fit:
    """A :class:`~numpyro_mpe.fit.Fit` from a finished NumPyro SVI run with a Gaussian guide.

    Parameters
    ----------
    model : callable
        The NumPyro model the guide was fitted to.
    guide : AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal or
        AutoLaplaceApproximation
        The fitted guide; any other guide (``AutoDelta``, ``AutoIAFNormal``, a custom function) is refused
        with a :class:`~numpyro_mpe.errors.ModelError` naming it.
    params : dict
        ``svi_result.params`` (constrained values, as ``SVI.get_params`` returns them).
    *args, **kwargs
        The model's data, exactly as passed to ``svi.run``.
    mpe_options : dict, optional
        ``rng_key`` (of the memory draws), ``memories`` ("mc" or "delta"), ``memory_samples`` (256),
        ``diagonal_memories`` (True; see :class:`SVI`), refit settings ``refit_steps`` (1000),
        ``num_particles`` (1), ``lr`` (0.01, the refits' first learning rate), ``lr_end`` (lr/100),
        ``clip_norm``, the model's ``init_strategy``, and the Fit's ``chunk_size``, ``num_samples``,
        ``progress``, ``curvature``, ``devices``.

    Returns
    -------
    Fit
        ``method="svi"``; for ``AutoLaplaceApproximation``, ``method="laplace"`` with the Hessian of U at the
        guide's mode and delta-method memories (a Laplace fit: :func:`numpyro_mpe.exact_loo` refits by
        Newton).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> from numpyro.infer import SVI, Trace_ELBO
    >>> from numpyro.infer.autoguide import AutoMultivariateNormal
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.toy import line_data, line_model as model
    >>> x, y = line_data(kind="exact")
    >>> guide = AutoMultivariateNormal(model)
    >>> svi = SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    >>> res = svi.run(jax.random.PRNGKey(0), 2000, x, y=y, progress_bar=False)
    >>> fit = mpe.from_svi(model, guide, res.params, x, y=y, mpe_options={"progress": False})
    >>> fit.method, fit.info["guide"]
    ('svi', 'AutoMultivariateNormal')
    """
    opts = dict(mpe_options or {})
    check_options("from_svi", opts, FROM_SVI_OPTIONS)
    check_guide(guide)
    memories = opts.get("memories", "mc")
    memory_samples = int(opts.get("memory_samples", DEFAULT_SAMPLES))
    check_method(memories, memory_samples, ("memories", "memory_samples"))
    rng_key = opts.get("rng_key", jax.random.PRNGKey(0))
    key_model, key_mem = jax.random.split(rng_key)
    adapter = ModelAdapter.build(model, key_model, args, kwargs, opts.get("init_strategy", init_to_median))
    ensure_prototype(guide, params, args, kwargs)
    refit = None
    if not isinstance(guide, AutoLaplaceApproximation):
        lr = float(opts.get("lr", 0.01))
        refit = SVIRefit(model, guide, params, args, kwargs, num_steps=int(opts.get("refit_steps", 1000)),
                         num_particles=int(opts.get("num_particles", 1)), lr=lr,
                         lr_end=float(opts.get("lr_end", lr / 100)),
                         clip_norm=float(opts.get("clip_norm", 10.0)))
    options = MPEOptions.make(**{k: opts[k] for k in ("chunk_size", "num_samples", "progress", "curvature",
                                                      "devices") if k in opts})
    return _fit_from_guide(adapter, guide, params, memories=memories, memory_samples=memory_samples,
                           rng_key=key_mem, info={"source": "from_svi"}, options=options, refit=refit,
                           diagonal_memories=bool(opts.get("diagonal_memories", True)))


__all__ = ["SVI", "SVIRefit", "from_svi", "svi_refit"]
