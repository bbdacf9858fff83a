"""Exact Bayesian leave-one-out by NUTS refits without each observation (as ``arviz.reloo`` does).

For observation i, NUTS samples p(θ | y₋i) ∝ exp(−U(θ) − ℓ_i(θ)) in the fit's flat unconstrained
coordinates (the potential of the fitted model with i's log-likelihood removed), and

    elpd_i = log (1/S) Σ_s p(y_i | θ_s),   θ_s ~ p(θ | y₋i),

with its Monte Carlo standard error from the effective sample size of p(y_i | θ_s) over the chains.  All
refits of a site share one compiled program: the observation index is an argument of the potential.  Used by
``fit.loo(repair="refit")`` for the observations the other estimates leave flagged, and public for any
observations.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer.hmc import hmc
from tqdm.auto import tqdm

from numpyro_mpe.errors import MPEError
from numpyro_mpe.loo.common import flat_indices, log_mean_exp, obs_coords
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


@partial(jit, static_argnames=("name", "num_warmup", "num_samples", "num_chains"))
def _refit(adapter, init, key, i, *, name, num_warmup, num_samples, num_chains):
    """NUTS chains on p(θ | y₋i); returns ℓ_i at the draws (chains, draws) and the divergences."""
    def potential_gen(i):
        return lambda t: adapter.potential(t) + adapter.log_lik(t, name)[i]

    init_kernel, sample_kernel = hmc(potential_fn_gen=potential_gen, algo="NUTS")

    def chain(k):
        k_init, k_run = jax.random.split(k)
        start = init + 0.1 * jax.random.normal(k_init, init.shape, init.dtype)
        state = init_kernel(start, num_warmup, model_args=(i,), rng_key=k_run)
        state = jax.lax.fori_loop(0, num_warmup, lambda _, s: sample_kernel(s, model_args=(i,)), state)

        def body(s, _):
            s = sample_kernel(s, model_args=(i,))
            return s, (adapter.log_lik(s.z, name)[i], s.diverging)

        _, (ll, div) = jax.lax.scan(body, state, None, length=num_samples)
        return ll, div

    return jax.vmap(chain)(jax.random.split(key, num_chains))


def check_nuts_runs(fit: Fit, var_name: str) -> None:
    """Refuse, naming the problem, a fit whose potential NUTS cannot follow: not finite, or without a finite
    gradient, at the fit's mean."""
    theta = fit.posterior.mean
    def potential(t):
        return fit.adapter.potential(t) + fit.adapter.log_lik(t, var_name)[0]

    try:
        u, g = jax.value_and_grad(potential)(theta)
    except Exception as err:  # a model JAX cannot differentiate
        raise MPEError("repair='refit' runs NUTS on the model, and JAX cannot differentiate its log "
                       f"density: {type(err).__name__}: {err}") from err
    bad = ~np.isfinite(np.asarray(g))
    if not np.isfinite(float(u)) or bad.any():
        sites = sorted(set(fit.adapter.site_names_of(np.flatnonzero(bad)))) if bad.any() else []
        raise MPEError(
            "repair='refit' runs NUTS on the model, and NUTS cannot start: at the fit's mean the potential "
            f"is {float(u)!r}" + (f" and its gradient is not finite in {sites}" if sites else "")
            + "; NUTS needs a log density with a finite gradient (a continuous, differentiable model)")


def nuts_loo(fit: Fit, indices, var_name: str | None = None, *, num_warmup: int = 500,
             num_samples: int = 1000, num_chains: int = 2, rng_key=None,
             progress: bool | None = None) -> xr.Dataset:
    """Exact Bayesian leave-one-out of the observations ``indices`` by NUTS refits without each.

    Parameters
    ----------
    fit : Fit
        A fitted model (the refits start from its mean).
    indices : int or sequence of int
        Flat observation indices of ``var_name``.
    var_name : str, optional
        Observed site; required when the model has several.
    num_warmup, num_samples, num_chains : int
        NUTS warmup and draws per chain, and chains (vectorized).
    rng_key : jax.random.PRNGKey, optional
        Default ``PRNGKey(0)``; refit i uses ``fold_in(rng_key, i)``.
    progress : bool, optional
        A progress bar over the refits (default: the fit's setting).

    Returns
    -------
    xarray.Dataset
        Over dim ``obs`` with ``elpd_loo`` (log mean p(y_i | θ_s)), ``elpd_loo_mcse`` (delta method with the
        ESS of p(y_i | θ_s) over the chains), ``r_hat`` (split R̂ of ℓ_i) and ``divergences``.

    Raises
    ------
    MPEError
        If NUTS cannot run on the model (a potential or gradient that is not finite at the fit's mean), or
        for fewer than one draw.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, _ = line_fit()
    >>> ds = nuts_loo(fit, [0], num_warmup=200, num_samples=500)  # doctest: +SKIP
    >>> bool(abs(ds.elpd_loo[0] - fit.site_mpe().elpd_loo[0]) < 0.1)  # doctest: +SKIP
    True
    """
    site = fit.adapter.observed_site(var_name)
    for name, value in (("num_warmup", num_warmup), ("num_samples", num_samples), ("num_chains", num_chains)):
        if int(value) < (0 if name == "num_warmup" else 1):
            raise MPEError(f"{name} must be a positive integer, got {value!r}")
    idx = flat_indices(indices, site.num_obs, site.name)
    check_nuts_runs(fit, site.name)
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    progress = fit.progress if progress is None else progress
    elpd, mcse, rhat, div = (np.zeros(idx.size) for _ in range(4))
    for k, i in enumerate(tqdm(idx, desc=f"NUTS refits of {site.name}", disable=not progress, leave=False)):
        ll, d = _refit(fit.adapter, fit.posterior.mean, jax.random.fold_in(key, int(i)), jnp.asarray(int(i)),
                       name=site.name, num_warmup=int(num_warmup), num_samples=int(num_samples),
                       num_chains=int(num_chains))
        ll = np.asarray(ll)
        est, iid_mcse = log_mean_exp(ll.ravel())
        # the draws are autocorrelated: the iid error scaled by √(S / ESS) of p(y_i | θ_s) over the chains
        ess = (float(effective_sample_size(np.exp(ll - ll.max()))) if num_chains > 1 or num_samples > 3
               else float(ll.size))
        elpd[k], mcse[k] = est, iid_mcse * np.sqrt(ll.size / max(ess, 1.0))
        rhat[k] = float(split_gelman_rubin(ll)) if num_samples > 3 else np.nan
        div[k] = float(np.asarray(d).sum())
    ds = xr.Dataset({"elpd_loo": ("obs", elpd), "elpd_loo_mcse": ("obs", mcse), "r_hat": ("obs", rhat),
                     "divergences": ("obs", div.astype(int))}, coords=obs_coords(site, idx))
    ds.attrs.update(var_name=site.name, method="NUTS refit without the observation",
                    num_warmup=int(num_warmup), num_samples=int(num_samples), num_chains=int(num_chains))
    return ds


__all__ = ["check_nuts_runs", "nuts_loo"]
