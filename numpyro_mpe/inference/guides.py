"""Gaussian guides of NumPyro's SVI as the Fit's q, and observation weights for refits.

* :func:`check_guide`, :func:`guide_extractor`: a guide's q = N(m, Σ) in unconstrained space mapped onto the
  flat θ of :class:`~numpyro_mpe.model.ModelAdapter` (latent sites sorted by name; the ``AutoContinuous``
  guides keep the model's order, so the entries are permuted);
* :class:`SiteWeights`, :func:`weighted_model`: a model whose observed site is weighted per observation
  (0 removes it), for refits;
* :func:`default_optim` (``ClippedAdam`` with a decaying learning rate) and :func:`elbo_diagnostics`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.scipy.linalg import solve_triangular
from numpyro import distributions as dist
from numpyro import handlers
from numpyro.infer.autoguide import (
    AutoContinuous,
    AutoDiagonalNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from numpyro.primitives import Messenger

from numpyro_mpe.errors import ModelError
from numpyro_mpe.gaussian import GaussianPosterior, from_precision
from numpyro_mpe.model.adapter import ModelAdapter

#: ``guide=`` names of :class:`~numpyro_mpe.SVI` and the NumPyro autoguides they build.
GUIDES = {"diag": AutoNormal, "full": AutoMultivariateNormal, "lowrank": AutoLowRankMultivariateNormal}

#: Guides whose q is Gaussian in unconstrained space (accepted by :func:`~numpyro_mpe.from_svi`).
GAUSSIAN_GUIDES = (AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal,
                   AutoLaplaceApproximation)

#: The keyword of :func:`weighted_model` that carries the weights.
WEIGHTS_KW = "_mpe_weights"


def guide_name(guide) -> str:
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
            f"guide {guide_name(guide)} is not a Gaussian guide: the MPE needs q = N(m, Σ) over the "
            f"model's unconstrained latent space; use one of {names} (or mpe.SVI(model, guide='diag'|'full'|"
            "'lowrank'))")


def ensure_prototype(guide, params: dict, args: tuple, kwargs: dict) -> None:
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
        raise ModelError(f"could not map the flat latent vector of {guide_name(guide)} onto the model's")

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


def clone_guide(guide, model: Callable):
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
