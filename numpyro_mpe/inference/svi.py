"""Gaussian stochastic variational inference (NumPyro SVI) as a :class:`~numpyro_mpe.fit.Fit`.

:class:`SVI` fits NumPyro's ``AutoNormal`` (``guide="diag"``), ``AutoMultivariateNormal`` (``"full"``) or
``AutoLowRankMultivariateNormal`` (``"lowrank"``) by maximizing the ELBO (``Trace_ELBO``); :func:`from_svi`
takes a user's finished NumPyro SVI run with one of those guides, ``AutoDiagonalNormal`` or
``AutoLaplaceApproximation``.  Either way the guide's Gaussian q = N(m, Σ) in unconstrained space is mapped
onto the flat θ of :class:`~numpyro_mpe.model.adapter.ModelAdapter` (latent sites sorted by name; the
guides keep
the model's order, so the entries are permuted), and the Fit holds

* the mean m and the precision S = E_q[∇²U] consistent with the variational memories
  Ĥ_i = E_q[∇²ℓ_i] (:mod:`numpyro_mpe.inference.variational`; at a VI optimum S = Σ⁻¹ up to Monte Carlo
  error, and
  their relative difference is ``fit.info["precision_rel_diff"]``);
* ``refit_fn``: :func:`svi_refit`, SVI again with observation weights (0 removes), warm-started from the
  fit's guide parameters: the brute-force leave-one-out of :func:`exact_loo_svi`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import xarray as xr
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp
from numpyro import distributions as dist
from numpyro import handlers
from numpyro.infer import Trace_ELBO, init_to_median
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.primitives import Messenger
from tqdm.auto import tqdm

from numpyro_mpe.errors import ModelError, MPEError, PosteriorError, check_chunk_size, check_options
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import GaussianPosterior, from_precision
from numpyro_mpe.inference.training import CheckpointMPE, _heldout_adapter, history_frame
from numpyro_mpe.inference.variational import DEFAULT_SAMPLES, METHODS, variational_posterior
from numpyro_mpe.model.adapter import ModelAdapter

#: ``guide=`` names of :class:`SVI` and the NumPyro autoguides they build.
GUIDES = {"diag": AutoNormal, "full": AutoMultivariateNormal, "lowrank": AutoLowRankMultivariateNormal}

#: Guides whose q is Gaussian in unconstrained space (accepted by :func:`from_svi`).
GAUSSIAN_GUIDES = (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal,
                   AutoLaplaceApproximation)

_WEIGHTS_KW = "_mpe_weights"


# ---------------------------------------------------------------- guides
def _guide_name(guide) -> str:
    if isinstance(guide, type):
        return guide.__name__
    return getattr(guide, "__name__", None) or type(guide).__name__


def check_guide(guide) -> None:
    """Refuse a guide whose q is not a Gaussian in unconstrained space, naming it.

    Accepted: ``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``,
    ``AutoLowRankMultivariateNormal`` and ``AutoLaplaceApproximation`` (instances, and subclasses that keep
    their parameters).

    Examples
    --------
    >>> from numpyro.infer.autoguide import AutoDelta
    >>> check_guide(AutoDelta(lambda: None))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    numpyro_mpe.errors.ModelError: guide AutoDelta is not a Gaussian guide: ...
    """
    if not isinstance(guide, GAUSSIAN_GUIDES):
        names = ", ".join(g.__name__ for g in GAUSSIAN_GUIDES)
        raise ModelError(
            f"guide {_guide_name(guide)} is not a Gaussian guide: the MPE needs q = N(m, Σ) over the "
            f"model's unconstrained latent space; use one of {names} (or mpe.SVI(model, guide='diag'|'full'|"
            "'lowrank'))")


def _ensure_prototype(guide, params: dict, args: tuple, kwargs: dict) -> None:
    """Run the guide once (seeded, parameters substituted) if it has not been set up yet."""
    if guide.prototype_trace is None:
        with handlers.block():
            handlers.substitute(handlers.seed(guide, jax.random.PRNGKey(0)), data=params)(*args, **kwargs)


class GuideGaussian(NamedTuple):
    """A guide's q = N(mean, cov) in the adapter's flat order (``cov`` is the variance vector if diagonal)."""

    mean: jax.Array
    cov: jax.Array

    @property
    def diagonal(self) -> bool:
        return self.cov.ndim == 1

    def posterior(self) -> GaussianPosterior:
        """q as a :class:`GaussianPosterior` (precision Σ⁻¹)."""
        p = self.mean.shape[0]
        if self.diagonal:
            return from_precision(self.mean, jnp.diag(1.0 / self.cov))
        c = jnp.linalg.cholesky(0.5 * (self.cov + self.cov.T))
        cinv = solve_triangular(c, jnp.eye(p, dtype=self.mean.dtype), lower=True)
        return from_precision(self.mean, cinv.T @ cinv)


def guide_extractor(guide, adapter: ModelAdapter) -> Callable[[dict], GuideGaussian]:
    """``params -> GuideGaussian``: the guide's Gaussian, permuted to the adapter's flat θ (traceable).

    The guide must be set up (its prototype traced).  ``AutoNormal`` keeps one loc/scale per site, looked up
    by name; the ``AutoContinuous`` guides keep one flat vector in the model's site order, mapped by passing
    the indices 0..P−1 through the guide's own unpacking.  Raises :class:`ModelError` if the latent sites or
    their unconstrained sizes differ from the model's.
    """
    check_guide(guide)
    names = [s.name for s in adapter.latent]
    sizes = {s.name: s.stop - s.start for s in adapter.latent}
    guide_sites = sorted(guide._init_locs)
    if guide_sites != sorted(names):
        raise ModelError(f"the guide's latent sites {guide_sites} differ from the model's {sorted(names)}; "
                         "was the guide built for this model and data?")
    for name, value in guide._init_locs.items():
        if int(np.size(value)) != sizes[name]:
            raise ModelError(f"latent site '{name}' has {int(np.size(value))} unconstrained entries in the "
                             f"guide and {sizes[name]} in the model")
    prefix = guide.prefix
    if isinstance(guide, AutoNormal):
        def extract(params):
            loc = jnp.concatenate([jnp.reshape(params[f"{n}_{prefix}_loc"], -1) for n in names])
            scale = jnp.concatenate([jnp.reshape(params[f"{n}_{prefix}_scale"], -1) for n in names])
            return GuideGaussian(loc, scale**2)
        return extract

    assert isinstance(guide, AutoContinuous)
    p = adapter.num_params
    unpacked = guide._unpack_latent(jnp.arange(p, dtype=jnp.float32))
    perm = np.concatenate([np.reshape(np.asarray(unpacked[n]), -1) for n in names]).astype(int)
    if sorted(perm.tolist()) != list(range(p)):
        raise ModelError(f"could not map the flat latent vector of {_guide_name(guide)} onto the model's")

    def extract(params):
        q = guide.get_posterior(params)
        if isinstance(q, dist.Normal):
            return GuideGaussian(q.loc[perm], (q.scale**2)[perm])
        cov = q.covariance_matrix
        return GuideGaussian(q.loc[perm], cov[perm][:, perm])

    return extract


# ---------------------------------------------------------------- observation weights
class SiteWeights(Messenger):
    """Weight the log-likelihood of observed site ``name`` per observation (0 masks it out).

    ``weights`` is flat over the site's batch shape (C order, as
    :class:`~numpyro_mpe.model.adapter.ModelAdapter`
    flattens observations); nonzero weights scale the log-density, zero weights mask it (no NaN gradient
    from a masked term's scale).
    """

    def __init__(self, fn=None, name: str | None = None, weights=None):
        self.name = name
        self.weights = weights
        super().__init__(fn)

    def process_message(self, msg):
        if msg["type"] != "sample" or msg["name"] != self.name or self.weights is None:
            return
        w = jnp.reshape(self.weights, msg["fn"].batch_shape)
        keep = w != 0
        msg["fn"] = msg["fn"].mask(keep)
        s = jnp.where(keep, w, 1.0)
        msg["scale"] = s if msg.get("scale") is None else s * msg["scale"]


def weighted_model(model: Callable, name: str) -> Callable:
    """``model`` with a keyword ``_mpe_weights`` (flat weights of site ``name``; ``None``: unweighted)."""

    def wmodel(*args, _mpe_weights=None, **kwargs):
        with SiteWeights(name=name, weights=_mpe_weights):
            return model(*args, **kwargs)

    return wmodel


def _clone_guide(guide, model: Callable):
    """A fresh guide of the same class and settings as ``guide``, for ``model``."""
    kw: dict[str, Any] = {"prefix": guide.prefix, "init_loc_fn": guide.init_loc_fn}
    if isinstance(guide, AutoLowRankMultivariateNormal):
        kw["rank"] = guide.rank
    if isinstance(guide, AutoNormal) and guide.create_plates is not None:
        kw["create_plates"] = guide.create_plates
    return type(guide)(model, **kw)


def default_optim(lr: float, lr_end: float, num_steps: int, clip_norm: float):
    """``ClippedAdam`` with the learning rate decaying geometrically from ``lr`` to ``lr_end``."""
    lr, lr_end = float(lr), float(lr_end)
    decay = (lr_end / lr) ** (1.0 / max(int(num_steps), 1))

    def schedule(i):
        return lr * decay ** jnp.minimum(i, num_steps)

    return numpyro.optim.ClippedAdam(step_size=schedule, clip_norm=float(clip_norm))


def elbo_diagnostics(losses) -> dict:
    """ELBO trace summary: final ELBO, drift between the last two tenths of the run, and ``converged``.

    ``elbo`` is −(mean loss over the last tenth); ``elbo_drift`` the mean loss of the second-to-last tenth
    minus that of the last; ``elbo_mcse`` the standard error of their difference.  ``converged`` when the
    drift is within 3 standard errors (a flat, noisy trace) and the losses are finite.
    """
    losses = np.asarray(losses, float)
    n = losses.size
    w = max(1, n // 10)
    last, prev = losses[-w:], losses[-2 * w : -w] if n >= 2 * w else losses[:w]
    drift = float(np.mean(prev) - np.mean(last))
    se = float(np.sqrt(np.var(prev) / prev.size + np.var(last) / last.size))
    finite = bool(np.all(np.isfinite(last)))
    return {"elbo": -float(np.mean(last)), "elbo_drift": drift, "elbo_mcse": se,
            "converged": finite and abs(drift) <= 3.0 * se + 1e-12 * (1.0 + abs(float(np.mean(last))))}


# ---------------------------------------------------------------- refits
class SVIRefit:
    """Refit by SVI with per-observation weights, warm-started from a fit's guide parameters.

    Set as ``fit.refit_fn`` by :class:`SVI` and :func:`from_svi`; call :func:`svi_refit` (or this object)
    as ``refit(fit, weights, var_name)``.  One compiled program per observed site runs ``num_steps`` SVI
    steps of the weighted model from the full fit's parameters, with a fresh ``ClippedAdam`` whose learning
    rate decays from ``lr`` to ``lr_end``.
    """

    def __init__(self, model: Callable, guide, params: dict, args: tuple, kwargs: dict, *, num_steps: int,
                 num_particles: int, lr: float, lr_end: float, clip_norm: float, stable_update: bool = True):
        self.model = model
        self.guide = guide
        self.params = params
        self.args = tuple(args)
        self.kwargs = dict(kwargs)
        self.num_steps = int(num_steps)
        self.num_particles = int(num_particles)
        self.lr, self.lr_end, self.clip_norm = float(lr), float(lr_end), float(clip_norm)
        self.stable_update = bool(stable_update)
        self._runners: dict[str, Callable] = {}

    def runner(self, adapter: ModelAdapter, var_name: str) -> Callable:
        """The jitted ``(weights (N,), rng_key) -> (GuideGaussian, losses)`` for site ``var_name``."""
        if var_name in self._runners:
            return self._runners[var_name]
        n = adapter.observed[var_name].num_obs
        wmodel = weighted_model(self.model, var_name)
        guide = _clone_guide(self.guide, wmodel)
        optim = default_optim(self.lr, self.lr_end, self.num_steps, self.clip_norm)
        svi = numpyro.infer.SVI(wmodel, guide, optim, Trace_ELBO(num_particles=self.num_particles))
        args, kwargs = self.args, self.kwargs
        ones = jnp.ones(n, adapter.init_theta.dtype)
        state0 = svi.init(jax.random.PRNGKey(0), *args, init_params=self.params,
                          **{_WEIGHTS_KW: ones}, **kwargs)
        extract = guide_extractor(guide, adapter)
        update = svi.stable_update if self.stable_update else svi.update
        num_steps = self.num_steps

        @jax.jit
        def run(weights, rng_key):
            state = state0._replace(rng_key=rng_key)

            def body(s, _):
                return update(s, *args, **{_WEIGHTS_KW: weights}, **kwargs)

            state, losses = jax.lax.scan(body, state, None, length=num_steps)
            return extract(svi.get_params(state)), losses

        self._runners[var_name] = run
        return run

    def exact_loo(self, fit: Fit, indices, var_name: str | None = None, **kwargs) -> xr.Dataset:
        """Brute-force leave-one-out by these refits: :func:`exact_loo_svi` (``kwargs`` passed on)."""
        return exact_loo_svi(fit, indices, var_name, **kwargs)

    def __call__(self, fit: Fit, weights, var_name: str | None = None, *, rng_key=None) -> GaussianPosterior:
        site = fit.adapter.observed_site(var_name)
        weights = jnp.asarray(weights, fit.posterior.mean.dtype)
        if weights.shape != (site.num_obs,):
            weights = jnp.reshape(jnp.broadcast_to(weights, site.obs_shape), (-1,))
        rng_key = jax.random.PRNGKey(1) if rng_key is None else rng_key
        gauss, _ = self.runner(fit.adapter, site.name)(weights, rng_key)
        return gauss.posterior()


def svi_refit(fit: Fit, weights, var_name: str | None = None, *, rng_key=None) -> GaussianPosterior:
    """Refit an SVI fit with observation weights on ``var_name`` (0 removes), by SVI, warm-started.

    Parameters
    ----------
    fit : Fit
        A fit from :class:`SVI` or :func:`from_svi` (its ``refit_fn`` carries the model, guide, parameters
        and optimizer settings).
    weights : array_like
        One weight per observation of the site (flat C order, or the site's observation shape).
    var_name : str, optional
        Observed site; required when the model has several.
    rng_key : jax.random.PRNGKey, optional
        Key of the refit's ELBO draws (``PRNGKey(1)`` by default); refits sharing a key share their noise.

    Returns
    -------
    GaussianPosterior
        The refit guide's Gaussian (its own precision Σ⁻¹) in the adapter's flat order.

    Examples
    --------
    >>> fit = mpe.SVI(model, guide="full").run(jax.random.PRNGKey(0), x, y=y)  # doctest: +SKIP
    >>> q_minus_3 = svi_refit(fit, jnp.ones(len(y)).at[3].set(0.0))  # doctest: +SKIP
    """
    refit = fit.refit_fn
    if not isinstance(refit, SVIRefit):
        raise MPEError(f"svi_refit needs a fit made by mpe.SVI or mpe.from_svi, got method={fit.method!r}")
    return refit(fit, weights, var_name, rng_key=rng_key)


# ---------------------------------------------------------------- building the Fit
def _fit_from_guide(adapter: ModelAdapter, guide, params: dict, *, memories: str, memory_samples: int,
                    rng_key, info: dict, mpe_options: dict, refit: SVIRefit | None,
                    diagonal_memories: bool = True) -> Fit:
    extract = guide_extractor(guide, adapter)
    gauss = jax.jit(extract)(params)
    if not (bool(jnp.all(jnp.isfinite(gauss.mean))) and bool(jnp.all(jnp.isfinite(gauss.cov)))):
        raise PosteriorError(f"the guide {_guide_name(guide)} has non-finite parameters (did the SVI run "
                             "diverge?); lower lr or check the model")
    q = gauss.posterior()
    info = dict(info, guide=_guide_name(guide))
    if isinstance(guide, AutoLaplaceApproximation):
        # A Laplace approximation: the Hessian of U at the guide's mode, delta memories, Newton refits.
        from numpyro_mpe.inference.laplace import check_precision

        prec = jax.jit(jax.hessian(adapter.potential))(q.mean)
        check_precision(adapter, prec)
        post = from_precision(q.mean, prec)
        grad = jax.jit(jax.grad(adapter.potential))(q.mean)
        rel = float(jnp.linalg.norm(prec - q.precision) / jnp.linalg.norm(q.precision))
        info.update(grad_norm=float(jnp.max(jnp.abs(grad))), q=q, precision_rel_diff=rel)
        return Fit(adapter, post, method="laplace", info=info, **mpe_options)
    vp = variational_posterior(adapter, q, num_samples=memory_samples, rng_key=rng_key, method=memories,
                               diagonal=gauss.diagonal and diagonal_memories)
    info.update(vp.info)
    return Fit(adapter, vp.posterior, method="svi", info=info, memories_fn=vp.memories_fn, refit_fn=refit,
               **mpe_options)


_MPE_OPTIONS = ("chunk_size", "num_samples", "progress", "curvature", "devices")


def _check_memories(memories, memory_samples):
    if memories not in METHODS:
        raise ValueError(f"memories must be one of {METHODS}, got {memories!r}")
    if int(memory_samples) < 1:
        raise ValueError(f"memory_samples must be a positive integer, got {memory_samples}")


class SVI:
    """Gaussian variational inference with NumPyro's SVI, returning a :class:`~numpyro_mpe.fit.Fit`.

    Maximizes the ELBO (``Trace_ELBO``) of a Gaussian guide in unconstrained space; the Fit's mean is the
    guide's, its precision S = E_q[∇²U] is consistent with the variational memories Ĥ_i = E_q[∇²ℓ_i]
    (see :mod:`numpyro_mpe.inference.variational`), and exact leave-one-out refits
    (:func:`exact_loo_svi`) rerun SVI
    with the observation removed.

    Parameters
    ----------
    model : callable
        A NumPyro model with continuous latent sites and at least one observed site.
    guide : {"diag", "full", "lowrank"}, default "diag"
        ``AutoNormal`` (mean-field: diagonal memories and precision), ``AutoMultivariateNormal`` or
        ``AutoLowRankMultivariateNormal``; ``posterior=`` is accepted as the same option (the name Laplace
        and NGVI use).
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
        Learning rate at the first and last step of the default optimizer (the refits decay from ``lr/2``
        to ``lr_end``).
    clip_norm : float, default 10.0
        Gradient clipping of the default optimizer.
    stable_update : bool, default True
        Skip steps with a non-finite loss (NumPyro's ``SVI.stable_update``).
    memories : {"mc", "delta"}, default "mc"
        Memories and precision as expectations under q (Monte Carlo) or at the mean.
    memory_samples : int, default 256
        Draws from q (antithetic, common to all observations) for ``memories="mc"``.
    diagonal_memories : bool, default True
        For ``guide="diag"``: diagonal memories Ĥ_i and precision S, the natural parameters of the
        mean-field q (DESIGN §2).  ``False`` keeps the full E_q[∇²ℓ_i] and S = E_q[∇²U] with the mean-field
        mean and draws, which follows the mean of a mean-field refit more closely (its stationarity condition
        E_q[∇U₋i] = 0 couples the coordinates through the full expected Hessian).
    refit_steps : int, default ``max(500, num_steps // 2)``
        SVI steps of each warm-started refit.
    callback : callable, optional
        ``callback(checkpoint)`` at every checkpoint with a
        :class:`numpyro_mpe.inference.training.Checkpoint` built
        from the guide's Gaussian (mean and precision Σ⁻¹ in the adapter's flat order; the precision's
        diagonal for ``guide="diag"``); returning ``True`` stops training.
    every : int, optional
        Checkpoint every ``every`` steps (and at steps 0 and ``num_steps``): the MPE of the guide's current
        Gaussian by :class:`numpyro_mpe.inference.training.CheckpointMPE`, kept in
        ``fit.info["history"]``; default
        ``num_steps // 20`` when a ``callback`` is given, else no checkpoints (and no extra cost).
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
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import numpyro_mpe as mpe
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 20); y = 2 * x
    >>> fit = mpe.SVI(model, guide="full", num_steps=1000, progress=False).run(jax.random.PRNGKey(0), x, y=y)
    >>> fit.method, abs(float(fit.posterior.mean[0]) - 2.0) < 0.1
    ('svi', True)
    >>> ds = fit.sensitivities()  # doctest: +SKIP
    """

    OPTIONS = {"init_strategy", "init_scale", "lr", "lr_end", "clip_norm", "stable_update", "memories",
               "memory_samples", "diagonal_memories", "refit_steps", "heldout", "var_name",
               "checkpoint_samples", "checkpoint_memories", "posterior", *_MPE_OPTIONS}

    def __init__(self, model: Callable, guide: str | None = None, optim=None, num_steps: int = 2000,
                 num_particles: int = 1, rank: int | None = None, callback: Callable | None = None,
                 every: int | None = None, **options):
        check_options("SVI", options, self.OPTIONS)
        structure = options.pop("posterior", None)  # the name shared with Laplace and NGVI
        if structure is not None and guide is not None and structure != guide:
            raise ValueError(f"posterior={structure!r} and guide={guide!r} disagree; give one of them")
        guide = guide or structure or "diag"
        if guide not in GUIDES:
            if isinstance(guide, str):
                raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide!r}")
            check_guide(guide)
            raise ValueError(f"SVI takes guide='diag'|'full'|'lowrank'; for a {_guide_name(guide)} instance "
                             "run NumPyro's SVI and pass the result to mpe.from_svi")
        if rank is not None and guide != "lowrank":
            raise ValueError(f"rank= applies to guide='lowrank' only, got guide={guide!r}")
        if int(num_steps) < 1 or int(num_particles) < 1:
            raise ValueError(f"num_steps and num_particles must be positive, got {num_steps} and "
                             f"{num_particles}")
        self.model = model
        self.guide = guide
        self.optim = optim
        self.num_steps = int(num_steps)
        self.num_particles = int(num_particles)
        self.rank = rank
        self.init_strategy = options.get("init_strategy", init_to_median)
        self.init_scale = float(options.get("init_scale", 0.1))
        self.lr = float(options.get("lr", 0.02))
        self.lr_end = float(options.get("lr_end", self.lr / 100))
        if not (self.lr > 0 and self.lr_end > 0):
            raise ValueError(f"lr and lr_end must be positive, got {self.lr}, {self.lr_end}")
        self.clip_norm = float(options.get("clip_norm", 10.0))
        self.stable_update = bool(options.get("stable_update", True))
        self.memories = options.get("memories", "mc")
        self.memory_samples = int(options.get("memory_samples", DEFAULT_SAMPLES))
        _check_memories(self.memories, self.memory_samples)
        self.diagonal_memories = bool(options.get("diagonal_memories", True))
        self.refit_steps = int(options.get("refit_steps", max(500, self.num_steps // 2)))
        self.progress = bool(options.get("progress", True))
        self.mpe_options = {k: options[k] for k in _MPE_OPTIONS if k in options}
        check_chunk_size(self.mpe_options.get("chunk_size"))
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        self.callback = callback
        if every is None and callback is not None:
            every = max(1, self.num_steps // 20)
        if every is not None and (isinstance(every, bool) or int(every) != every or int(every) < 1):
            raise ValueError(f"every must be a positive integer (checkpoint every that many steps), got "
                             f"{every!r}")
        self.every = None if every is None else int(every)
        self.heldout = options.get("heldout")
        self.var_name = options.get("var_name")
        self.checkpoint_samples = int(options.get("checkpoint_samples", 100))
        self.checkpoint_memories = options.get("checkpoint_memories", "q")
        if self.checkpoint_memories not in ("q", "mean"):
            raise ValueError(f"checkpoint_memories must be 'q' or 'mean', got {self.checkpoint_memories!r}")

    def _make_guide(self, model):
        cls = GUIDES[self.guide]
        kw: dict[str, Any] = {"init_loc_fn": self.init_strategy, "init_scale": self.init_scale}
        if self.guide == "lowrank":
            kw["rank"] = self.rank
        return cls(model, **kw)

    def run(self, rng_key, *args, **kwargs) -> Fit:
        """Fit the model to the data ``*args, **kwargs`` (passed to the model unchanged).

        ``fit.info`` holds the ELBO trace (``losses``), ``elbo``, ``elbo_drift``/``elbo_mcse``/``converged``
        (last two tenths of the run), ``grad_norm`` = max |E_q[∇U]| (≈ 0 at the optimum),
        ``precision_rel_diff`` between E_q[∇²U] and the guide's precision, the guide's own Gaussian ``q``, and
        ``history`` (a DataFrame of the checkpoints with ``every``/``callback``, else ``None``).
        """
        key_model, key_svi, key_mem = jax.random.split(rng_key, 3)
        adapter = ModelAdapter.build(self.model, key_model, args, kwargs, self.init_strategy)
        guide = self._make_guide(self.model)
        optim = self.optim if self.optim is not None else default_optim(self.lr, self.lr_end, self.num_steps,
                                                                         self.clip_norm)
        svi = numpyro.infer.SVI(self.model, guide, optim, Trace_ELBO(num_particles=self.num_particles))
        history = None
        if self.every is None:
            result = svi.run(key_svi, self.num_steps, *args, progress_bar=self.progress,
                             stable_update=self.stable_update, **kwargs)
            params, losses, steps = result.params, np.asarray(result.losses), self.num_steps
        else:
            params, losses, records = self._train_with_checkpoints(svi, guide, adapter, key_svi, key_model,
                                                                   args, kwargs)
            steps = int(losses.size)
            history = history_frame(records, adapter.observed_site(self.var_name).num_obs)
        if losses.size:
            diag = elbo_diagnostics(losses)
        else:  # the callback stopped training at step 0
            diag = {"elbo": float("nan"), "elbo_drift": float("nan"), "elbo_mcse": float("nan"),
                    "converged": False}
        if not diag["converged"] and steps == self.num_steps:
            warnings.warn(
                f"SVI: the ELBO is still moving at the end of the run (drift {diag['elbo_drift']:.3g} over "
                f"the last tenth, standard error {diag['elbo_mcse']:.2g}); raise num_steps or lr",
                stacklevel=2)
        info = {"steps": steps, "losses": losses, "num_particles": self.num_particles, **diag,
                "history": history}
        refit = SVIRefit(self.model, guide, params, args, kwargs, num_steps=self.refit_steps,
                         num_particles=self.num_particles, lr=self.lr / 2, lr_end=self.lr_end,
                         clip_norm=self.clip_norm, stable_update=self.stable_update)
        return _fit_from_guide(adapter, guide, params, memories=self.memories,
                               memory_samples=self.memory_samples, rng_key=key_mem, info=info,
                               mpe_options=self.mpe_options, refit=refit,
                               diagonal_memories=self.diagonal_memories)


    def _lr_at(self, step: int) -> float:
        """Learning rate of the default optimizer at 0-based ``step`` (NaN for a user's optimizer)."""
        if self.optim is not None:
            return float("nan")
        decay = (self.lr_end / self.lr) ** (1.0 / max(self.num_steps, 1))
        return self.lr * decay ** min(step, self.num_steps)

    def _train_with_checkpoints(self, svi, guide, adapter: ModelAdapter, key_svi, key_model, args: tuple,
                                kwargs: dict) -> tuple[dict, np.ndarray, list[dict]]:
        """SVI in blocks of ``every`` steps, a :class:`CheckpointMPE` of the guide's Gaussian between them.

        Returns the final parameters, the losses of the steps taken and the checkpoint records.
        """
        k_ck, k_held = jax.random.split(jax.random.fold_in(key_model, 1))
        site = adapter.observed_site(self.var_name)
        held = (None if self.heldout is None else
                _heldout_adapter(self.model, self.heldout, k_held, self.init_strategy, adapter, site.name))
        diagonal = self.guide == "diag"
        checkpoints = CheckpointMPE(adapter, site.name, diagonal=diagonal, heldout_adapter=held,
                                    num_samples=self.checkpoint_samples, rng_key=k_ck,
                                    chunk_size=self.mpe_options.get("chunk_size", 4096),
                                    memories=self.checkpoint_memories)
        state = svi.init(key_svi, *args, **kwargs)
        extract = guide_extractor(guide, adapter)
        update = svi.stable_update if self.stable_update else svi.update

        @jax.jit
        def gaussian(state):
            g = extract(svi.get_params(state))
            if g.diagonal:
                return g.mean, 1.0 / g.cov
            q = g.posterior()
            return q.mean, q.precision

        @partial(jax.jit, static_argnums=1)
        def block(state, length):
            return jax.lax.scan(lambda s, _: update(s, *args, **kwargs), state, None, length=length)

        every, num_steps = self.every, self.num_steps
        records: list[dict] = []
        bar = tqdm(total=num_steps, desc="SVI", disable=not self.progress, leave=False)

        def checkpoint(state, step: int) -> bool:
            mean, prec = gaussian(state)
            ck = checkpoints.checkpoint(mean, prec, step, self._lr_at(max(step - 1, 0)))
            records.append(ck.record)
            bar.set_postfix(loo_nll=f"{ck.record['loo_nll']:.4g}", heldout=f"{ck.record['heldout_nll']:.4g}",
                            refresh=False)
            return bool(self.callback is not None and self.callback(ck) is True)

        losses: list[np.ndarray] = []
        stop = checkpoint(state, 0)
        done = 0
        while done < num_steps and not stop:
            k = min(every, num_steps - done)
            state, block_losses = block(state, k)
            losses.append(np.asarray(block_losses))
            done += k
            bar.update(k)
            stop = checkpoint(state, done)
        bar.close()
        all_losses = np.concatenate(losses) if losses else np.zeros(0)
        return svi.get_params(state), all_losses, records


FROM_SVI_OPTIONS = {"rng_key", "memories", "memory_samples", "diagonal_memories", "refit_steps",
                    "num_particles", "lr", "lr_end", "clip_norm", "init_strategy", *_MPE_OPTIONS}


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
        ``diagonal_memories`` (True; see :class:`SVI`),
        refit settings ``refit_steps`` (1000), ``num_particles`` (1), ``lr`` (0.01, the refits' first
        learning rate), ``lr_end`` (1e-4), ``clip_norm``, the ModelAdapter's ``init_strategy``, and the Fit's
        ``chunk_size``, ``num_samples``, ``progress``.

    Returns
    -------
    Fit
        ``method="svi"``; for ``AutoLaplaceApproximation``, ``method="laplace"`` with the Hessian of U at
        the guide's mode and delta-method memories (a Laplace fit: :func:`numpyro_mpe.exact_loo` refits by
        Newton).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro.infer import SVI, Trace_ELBO
    >>> from numpyro.infer.autoguide import AutoMultivariateNormal
    >>> import numpyro_mpe as mpe
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 20); y = 2 * x
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
    _check_memories(memories, memory_samples)
    rng_key = opts.get("rng_key", jax.random.PRNGKey(0))
    key_model, key_mem = jax.random.split(rng_key)
    adapter = ModelAdapter.build(model, key_model, args, kwargs, opts.get("init_strategy", init_to_median))
    _ensure_prototype(guide, params, args, kwargs)
    refit = None
    if not isinstance(guide, AutoLaplaceApproximation):
        lr = float(opts.get("lr", 0.01))
        refit = SVIRefit(model, guide, params, args, kwargs, num_steps=int(opts.get("refit_steps", 1000)),
                         num_particles=int(opts.get("num_particles", 1)), lr=lr,
                         lr_end=float(opts.get("lr_end", lr / 100)),
                         clip_norm=float(opts.get("clip_norm", 10.0)))
    mpe_opts = {k: opts[k] for k in _MPE_OPTIONS if k in opts}
    return _fit_from_guide(adapter, guide, params, memories=memories, memory_samples=memory_samples,
                           rng_key=key_mem, info={"source": "from_svi"}, mpe_options=mpe_opts, refit=refit,
                           diagonal_memories=bool(opts.get("diagonal_memories", True)))


# ---------------------------------------------------------------- brute-force LOO by SVI refits
def exact_loo_svi(fit: Fit, indices: int | Sequence[int] | np.ndarray | None, var_name: str | None = None, *,
                  num_samples: int = 4000, rng_key=None, coupled: bool = True,
                  progress: bool = True) -> xr.Dataset:
    """Leave-one-out by brute force for an SVI fit: rerun SVI without each listed observation.

    Each refit runs the fit's :class:`SVIRefit` (SVI on the model with observation i masked out, warm-started
    from the full fit's guide parameters) and takes the refit guide's Gaussian q₋i as the leave-one-out
    posterior.  Nothing here uses the memories or cavities, so it is an independent check of
    :meth:`numpyro_mpe.Fit.sensitivities` for the same method.

    SVI's own noise would blur shifts of a fraction of a posterior sd; with ``coupled=True`` (default) every
    refit, and a reference refit with all observations kept, runs from the same start with the same random
    stream (common random numbers), and the shift is m₋i − m_ref: the noise the runs share cancels.

    Parameters
    ----------
    fit : Fit
        A fit from :class:`SVI` or :func:`from_svi` (not ``AutoLaplaceApproximation``: use
        :func:`numpyro_mpe.exact_loo`).
    indices : int, sequence of int, or None
        Flat indices into the observations of ``var_name``; ``None`` means all.
    var_name : str, optional
        Observed site; required when the model has several.
    num_samples : int, default 4000
        Antithetic draws from q₋i for ``elpd_loo``; 0 skips it (NaN).
    rng_key : jax.random.PRNGKey, optional
        Key of the refits' ELBO draws and of the ``elpd_loo`` draws.
    coupled : bool, default True
        Shift relative to the coupled reference refit (see above); ``False``: relative to the fit's mean.
    progress : bool, default True
        Progress bar over the observations.

    Returns
    -------
    xarray.Dataset
        Over ``obs`` (flat index, with the site's dims as non-index coordinates) and ``param``, as
        :func:`numpyro_mpe.exact_loo`: ``shift`` (m₋i − m), ``sensitivity`` (√(shiftᵀ S shift), S the fit's
        precision), ``elpd_loo`` = log E_{q₋i}[p(y_i|θ)] by Monte Carlo and ``elpd_loo_mcse``, ``leverage``
        (largest eigenvalue of S^{-1/2} ∇²ℓ_i(m) S^{-1/2}), ``converged`` (the refit's ELBO trace is flat,
        :func:`elbo_diagnostics`) and ``steps``.  ``attrs["reference_shift"]`` is √(δᵀSδ) of the reference
        refit's offset δ = m_ref − m.

    Examples
    --------
    >>> fit = mpe.SVI(model, guide="full").run(jax.random.PRNGKey(0), X, y=y)  # doctest: +SKIP
    >>> ex = exact_loo_svi(fit, range(30))  # doctest: +SKIP
    >>> scipy.stats.spearmanr(ex.sensitivity, fit.sensitivities().sensitivity[:30])  # doctest: +SKIP
    """
    from numpyro_mpe.loo.exact import _flat_indices, refit_dataset

    refit = fit.refit_fn
    if not isinstance(refit, SVIRefit):
        raise MPEError(f"exact_loo_svi needs a fit made by mpe.SVI or mpe.from_svi, got "
                       f"method={fit.method!r}; use mpe.exact_loo for Laplace fits")
    adapter = fit.adapter
    site = adapter.observed_site(var_name)
    name = site.name
    idx = _flat_indices(indices, site.num_obs, name)
    num_samples = int(num_samples)
    if num_samples == 1 or num_samples < 0:
        raise ValueError(f"num_samples must be 0 (no elpd_loo) or at least 2, got {num_samples}")
    post = fit.posterior
    m = jnp.asarray(post.mean)
    p, dtype = m.shape[0], m.dtype
    chol = jnp.asarray(post.chol)
    rng_key = jax.random.PRNGKey(1) if rng_key is None else rng_key
    key_fit, key_z = jax.random.split(rng_key)
    half = (num_samples + 1) // 2
    z = jax.random.normal(key_z, (max(half, 1), p), dtype)
    z = jnp.concatenate([z, -z])[:num_samples]
    run = refit.runner(adapter, name)
    ones = jnp.ones(site.num_obs, dtype)
    if coupled:
        ref, _ = run(ones, key_fit)
        m_ref = ref.mean
    else:
        m_ref = m

    @jax.jit
    def one(i, gauss):
        q = gauss.posterior()
        shift = q.mean - m_ref
        out = {"shift": shift, "sensitivity": jnp.linalg.norm(chol.T @ shift)}
        h = -jax.hessian(lambda t: adapter.log_lik(t, name)[i])(m)
        a_w = post.whiten(post.whiten(0.5 * (h + h.T)).T)
        out["leverage"] = jnp.linalg.eigvalsh(0.5 * (a_w + a_w.T))[-1]
        if num_samples:
            draws = q.mean + q.unwhiten(z.T).T
            ll = jax.vmap(lambda t: adapter.log_lik(t, name)[i])(draws)
            value = logsumexp(ll) - jnp.log(num_samples)
            w = jnp.exp(ll - jnp.max(ll))
            out["elpd_loo"] = value
            out["elpd_loo_mcse"] = jnp.std(w) / jnp.mean(w) / jnp.sqrt(num_samples)
        else:
            out["elpd_loo"] = out["elpd_loo_mcse"] = jnp.asarray(jnp.nan, dtype)
        return out

    keys = ("shift", "sensitivity", "leverage", "elpd_loo", "elpd_loo_mcse")
    out: dict[str, list] = {k: [] for k in (*keys, "converged")}
    for i in tqdm(idx, desc=f"exact LOO (SVI refits) {name}", disable=not progress, leave=False):
        gauss, losses = run(ones.at[int(i)].set(0.0), key_fit)
        r = jax.device_get(one(jnp.asarray(i), gauss))
        for k in keys:
            out[k].append(r[k])
        out["converged"].append(elbo_diagnostics(losses)["converged"])
    arrays = {k: np.asarray(v) for k, v in out.items()}
    if not len(idx):
        arrays["shift"] = np.zeros((0, p), dtype)
    arrays["steps"] = np.full(len(idx), refit.num_steps, int)
    ds = refit_dataset(adapter, site, idx, arrays)
    ref_off = m_ref - m
    integration = (f"Monte Carlo in θ-space ({num_samples} antithetic draws from the refit guide's Gaussian)"
                   if num_samples else "not computed (num_samples=0)")
    ds.attrs.update(var_name=name, method="exact_loo_svi", refit_steps=refit.num_steps, coupled=bool(coupled),
                    num_samples=num_samples, elpd_integration=integration,
                    reference_shift=float(jnp.linalg.norm(chol.T @ ref_off)))
    ds["shift"].attrs["description"] = "m_-i - m (unconstrained space), SVI refit without i"
    ds["sensitivity"].attrs["description"] = "sqrt(shift' S shift), S the full-data precision"
    ds["leverage"].attrs["description"] = "max eig of S^-1/2 Hess(-log p(y_i|theta))(m) S^-1/2"
    return ds
