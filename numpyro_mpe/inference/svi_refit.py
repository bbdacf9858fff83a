"""SVI refits with observation weights: the brute-force leave-one-out of an :class:`~numpyro_mpe.SVI` fit.

:class:`SVIRefit` runs NumPyro SVI again on the model with weights w_i on one observed site (0 removes i),
warm-started from the fit's guide parameters, and returns the refit guide's Gaussian; refits share their
random numbers (``coupled``), so that leave-one-out shifts taken against a reference refit with every
observation kept cancel the noise they share.  :func:`numpyro_mpe.exact_loo` runs it for SVI fits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import Trace_ELBO

from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import GaussianPosterior
from numpyro_mpe.inference.base import RefitResult
from numpyro_mpe.inference.guides import (
    WEIGHTS_KW,
    clone_guide,
    default_optim,
    elbo_diagnostics,
    guide_extractor,
    weighted_model,
)
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


class SVIRefit:
    """Refit by SVI with per-observation weights, warm-started from a fit's guide parameters.

    One compiled program per observed site runs ``num_steps`` SVI steps of the weighted model from the full
    fit's parameters, with a fresh ``ClippedAdam`` whose learning rate decays from ``lr`` to ``lr_end``.  The
    refits share their random numbers (``coupled``): leave-one-out shifts are taken relative to a reference
    refit with every observation kept, so that the noise they share cancels.
    """

    coupled = True
    label = "exact_loo_svi"

    def __init__(self, model: Callable, guide, params: dict, args: tuple, kwargs: dict, *, num_steps: int,
                 num_particles: int, lr: float, lr_end: float, clip_norm: float, stable_update: bool = True):
        self.model, self.guide, self.params = model, guide, params
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.num_steps = int(num_steps)
        self.num_particles = int(num_particles)
        self.lr, self.lr_end, self.clip_norm = float(lr), float(lr_end), float(clip_norm)
        self.stable_update = bool(stable_update)
        self._runners: dict[str, Callable] = {}

    def describe(self) -> str:
        return f"SVI refit ({self.num_steps} steps, warm-started from the fit's guide)"

    def runner(self, adapter: ModelAdapter, var_name: str) -> Callable:
        """The jitted ``(weights (N,), rng_key) -> (GuideGaussian, losses)`` for site ``var_name``."""
        if var_name in self._runners:
            return self._runners[var_name]
        n = adapter.observed[var_name].num_obs
        wmodel = weighted_model(self.model, var_name)
        guide = clone_guide(self.guide, wmodel)
        optim = default_optim(self.lr, self.lr_end, self.num_steps, self.clip_norm)
        svi = numpyro.infer.SVI(wmodel, guide, optim, Trace_ELBO(num_particles=self.num_particles))
        args, kwargs = self.args, self.kwargs
        ones = jnp.ones(n, adapter.structure.dtype)
        state0 = svi.init(jax.random.PRNGKey(0), *args, init_params=self.params, **{WEIGHTS_KW: ones},
                          **kwargs)
        extract = guide_extractor(guide, adapter)
        update = svi.stable_update if self.stable_update else svi.update
        num_steps = self.num_steps

        @jit
        def run(weights, rng_key):
            state = state0._replace(rng_key=rng_key)
            state, losses = jax.lax.scan(lambda s, _: update(s, *args, **{WEIGHTS_KW: weights}, **kwargs),
                                         state, None, length=num_steps)
            return extract(svi.get_params(state)), losses

        self._runners[var_name] = run
        return run

    def prepare(self, fit: Fit, var_name: str, rng_key):
        run = self.runner(fit.adapter, var_name)

        def refit(weights):
            gauss, losses = run(weights, rng_key)
            q = gauss.posterior()
            conv = elbo_diagnostics(np.asarray(losses))["converged"]
            return RefitResult(q.mean, q.chol, conv, self.num_steps)

        return refit

    def __call__(self, fit: Fit, weights, var_name: str | None = None, *, rng_key=None) -> GaussianPosterior:
        """The refit guide's Gaussian with ``weights`` on ``var_name`` (0 removes an observation)."""
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
        A fit from :class:`SVI` or :func:`from_svi` (its ``refit`` carries the model, guide, parameters and
        optimizer settings).
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
    >>> fit = mpe.SVI(model, posterior="full").run(jax.random.PRNGKey(0), x, y=y)  # doctest: +SKIP
    >>> q_minus_3 = svi_refit(fit, jnp.ones(len(y)).at[3].set(0.0))  # doctest: +SKIP
    """
    if not isinstance(fit.refit, SVIRefit):
        raise MPEError(f"svi_refit needs a fit made by mpe.SVI or mpe.from_svi, got method={fit.method!r}")
    return fit.refit(fit, weights, var_name, rng_key=rng_key)



__all__ = ["SVIRefit", "svi_refit"]
