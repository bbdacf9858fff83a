"""The best available leave-one-out estimate of every observation, chosen automatically (``fit.loo()``).

The closed-form MPE is the leave-one-out of the Gaussian q; it is the Bayesian leave-one-out only where q is
the posterior.  A non-Gaussian posterior biases every observation a little the same way (a softmax with
150 rows: each within 0.2 nats, the total 6 nats off), so repairing flagged observations alone is not
enough.  ``method="auto"`` therefore estimates every observation by importance sampling toward the exact
posterior without it, with q's machinery as proposals, and says per observation what it used:

1. **Global check** (:func:`numpyro_mpe.loo.posterior_check.posterior_check`): S draws from q with Student-t
   tails, g = t_df(m, S⁻¹), and the Pareto k̂ of p(θ, y)/g(θ).
2. **k̂ ≤ 0.7** (q's t version covers the posterior): PSIS-LOO over those draws for every observation, with
   the log-ratios −U(θ_s) − log g(θ_s) − ℓ_i(θ_s) (``global-is``; PSIS-LOO of an approximate posterior, as
   R loo's ``loo_approximate_posterior``).  More draws when the Monte Carlo error of the total is above
   0.15 nats.  Observations whose k̂_i > 0.7, MCSE > 0.1, leverage > 0.5 or invalid cavity are redone by
   MPE importance sampling from their own cavity: ½ t_df(q₋i) + ½ t_df(q), a defensive mixture
   (``mixture-is``), and those still at k̂ > 0.7 by adaptive moment matching of that proposal
   (``moment-matched-is``, Paananen et al. 2021), kept only where its k̂ is lower.
3. **k̂ > 0.7** (q is not the posterior), or more than a tenth of the observations still flagged: tempered
   SMC from a widened t version of q to the posterior (:func:`numpyro_mpe.inference.smc.tempered_smc`) and
   PSIS-LOO over its particles (``smc-psis``).
4. Whatever stays at k̂ > 0.7 or MCSE > 0.1 is **flagged**, never silently trusted; ``repair="refit"``
   refits up to ``refit_count`` of them by NUTS without the observation (``nuts-refit``,
   :func:`numpyro_mpe.loo.nuts_refit.nuts_loo`).

Where draws × observations exceed :data:`numpyro_mpe.loo.posterior_check.MAX_ELEMENTS` (large N, where q is
close to the posterior anyway) the closed-form MPE is kept (``mpe``) and only the observations the trust
rule flags (leverage > 0.5, invalid cavity, or p_loo_i > 0.5: an outlier the closed form underweights) get
MPE importance sampling.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import jax
import numpy as np
import xarray as xr

from numpyro_mpe.loo.common import (
    GOOD_K,
    MAX_LEVERAGE,
    site_parameters,
)
from numpyro_mpe.loo.importance import UnitImportance, memory_rows, one_hot_row
from numpyro_mpe.loo.posterior_check import (
    DF,
    NUM_SAMPLES,
    affordable,
    cached_terms,
    draw_terms,
    posterior_check,
)
from numpyro_mpe.options import check_choice, check_positive_int

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: An estimate with a larger Monte Carlo standard error (nats) is flagged.
MAX_MCSE = 0.1
#: Target Monte Carlo error of the total from the global draws (nats), and the most draws spent on it.
TOTAL_MCSE, MAX_GLOBAL_SAMPLES = 0.15, 32000
#: p_loo_i above which the closed form is redone by importance sampling where the global draws are not
#: affordable (an outlier the closed form underweights; for leverage see ``loo.common.MAX_LEVERAGE``).
MAX_P_LOO = 0.5
#: Fraction of flagged observations above which the global draws give way to SMC.
ESCALATE = 0.1
#: Repairs of ``fit.loo()``.
REPAIRS = (None, "refit")


#: Observations per block of :func:`_psis_loo`: its temporaries are blocks × draws, a few MiB that the
#: allocator reuses, instead of fresh draws × N matrices (64 MiB each at 4000 × 2000) whose first touch
#: costs more than the arithmetic.
PSIS_BLOCK = 256


def _psis_loo(base, ll):
    """PSIS-LOO over shared draws: log-ratios base_s − ℓ_i(θ_s) per observation.  Returns elpd, MCSE, k̂ per
    observation (:meth:`numpyro_mpe.loo.importance.UnitImportance.estimate`) and the delta-method MCSE of
    their sum (the draws are shared, so the observations' errors correlate: φ_s = Σ_i w̃_is (p_is/p̂_i − 1),
    MCSE = √Σ_s φ_s²).  Observations are taken :data:`PSIS_BLOCK` at a time."""
    n = ll.shape[1]
    e, mcse, k = np.empty(n), np.empty(n), np.empty(n)
    phi = np.zeros(ll.shape[0])  # Σ_i of each draw's terms of the delta method
    for lo in range(0, n, PSIS_BLOCK):
        block = slice(lo, min(lo + PSIS_BLOCK, n))
        ll_b = np.ascontiguousarray(ll[:, block].T)
        est = UnitImportance.estimate(base[None, :] - ll_b, ll_b)
        e[block], mcse[block], k[block] = est["elpd"], est["mcse"], est["khat"]
        with np.errstate(over="ignore", invalid="ignore"):
            phi += np.nansum(np.exp(est["smoothed"]) * (np.exp(ll_b - est["elpd"][:, None]) - 1.0), 0)
    return e, mcse, k, float(np.sqrt(np.sum(phi**2)))


@site_parameters
def auto_loo(fit: Fit, var_name: str | None = None, *, num_samples: int = NUM_SAMPLES,
             obs_samples: int = 2000, df: float = DF, rng_key=None, repair: str | None = None,
             refit_count: int = 10, progress: bool | None = None) -> xr.Dataset:
    """Per observation, the best available leave-one-out estimate and what it was (see the module docstring).

    Parameters
    ----------
    {site_parameters}
    num_samples : int, default 4000
        Draws of the global check and of the global importance sampling (raised, up to 32000, when the
        Monte Carlo error of the total is above 0.15 nats).
    obs_samples : int, default 2000
        Draws per observation of the per-observation importance sampling.
    df : float, default 5
        Degrees of freedom of the Student-t proposals.
    rng_key : jax.random.PRNGKey, optional
        Default ``PRNGKey(0)``.
    repair : {None, "refit"}
        ``"refit"``: NUTS refits without each observation still flagged, at most ``refit_count``.
    refit_count : int, default 10
        The most NUTS refits (the worst flagged first).
    progress : bool, optional
        Progress bars (default: the fit's setting).

    Returns
    -------
    xarray.Dataset
        Over the site's observation dims: ``elpd_loo``, ``p_loo`` (lpd − elpd_loo), ``elpd_loo_mcse``,
        ``pareto_k`` (k̂ of the estimate used; the leverage for ``mpe``; −inf for ``nuts-refit``),
        ``method`` (``mpe``, ``global-is``, ``mixture-is``, ``moment-matched-is``, ``smc-psis``,
        ``nuts-refit``), ``flagged`` (True where the estimate is unreliable) and ``leverage``; ``attrs``:
        ``global_k``, ``global_k_gaussian``, ``branch`` ("global-is", "smc" or "closed-form"),
        ``refit`` (flat indices refit by NUTS), ``seconds``; after SMC ``smc_stages``, ``smc_particles`` and
        ``smc_moves`` (MALA steps over all stages).

    Raises
    ------
    MPEError
        For an unknown ``repair``, ``refit_count`` below 1, or ``repair="refit"`` on a model NUTS cannot run.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, _ = line_fit()
    >>> ds = auto_loo(fit)
    >>> sorted(set(ds.method.values.ravel().tolist())), bool(ds.flagged.any())
    (['global-is'], False)
    >>> bool(abs(float(ds.elpd_loo.sum()) - float(fit.site_mpe().elpd_loo.sum())) < 0.1)
    True
    """
    check_choice("repair", repair, REPAIRS)
    refit_count = check_positive_int("refit_count", refit_count)
    site = fit.adapter.observed_site(var_name)
    name = site.name
    if repair == "refit":
        from numpyro_mpe.loo.nuts_refit import check_nuts_runs

        check_nuts_runs(fit, name)
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    progress = fit.progress if progress is None else progress
    t0 = time.perf_counter()
    sens = fit.sensitivities(name)
    lpd = np.asarray(sens["lpd"]).ravel()
    lev = np.asarray(sens["leverage"], dtype=float).ravel()
    valid = np.asarray(sens["valid"]).ravel().astype(bool)
    n = lpd.size
    elpd = np.asarray(sens["elpd_loo"]).ravel().copy()
    mcse = np.zeros(n)
    khat = lev.copy()
    method = np.full(n, "mpe", dtype=object)
    attrs = {"global_k": np.nan, "global_k_gaussian": np.nan, "branch": "closed-form"}

    def unit_is(idx, key_idx):
        """Mixture IS from each observation's cavity, then moment matching where k̂ stays above 0.7."""
        if not idx.size:
            return
        engine = UnitImportance(fit, name, obs_samples, jax.random.fold_in(key, key_idx), df=df,
                                defensive=0.5)

        memory = dict(zip(idx.tolist(), memory_rows(fit, name, idx)))
        est = engine.run(((*memory[i], one_hot_row(i, n)) for i in idx.tolist()), idx.size, progress)
        elpd[idx], mcse[idx], khat[idx] = est["elpd"], est["mcse"], est["khat"]
        method[idx] = "mixture-is"
        for i in idx[est["khat"] > GOOD_K]:
            mm = engine.moment_match(*memory[int(i)], one_hot_row(int(i), n))
            if mm["khat"] < khat[i]:
                elpd[i], mcse[i], khat[i] = mm["elpd"], mm["mcse"], mm["khat"]
                method[i] = "moment-matched-is"

    if affordable(fit, num_samples):
        check = posterior_check(fit, name, num_samples=num_samples, df=df, rng_key=key)
        attrs.update(global_k=check.khat, global_k_gaussian=check.khat_gaussian)
        branch = "global-is" if check.reliable else "smc"
        if branch == "global-is":
            terms = cached_terms(fit, name, num_samples, df, key)
            base = -terms.potential - terms.log_g
            e, mc, k, _ = _psis_loo(base, terms.log_lik)
            redo = (k > GOOD_K) | (lev > MAX_LEVERAGE) | ~valid | ~(mc <= MAX_MCSE)
            total_mcse = _psis_loo(base, terms.log_lik[:, ~redo])[3] if (~redo).any() else 0.0
            more = int(min(MAX_GLOBAL_SAMPLES, np.ceil(num_samples * (total_mcse / TOTAL_MCSE) ** 2)))
            if total_mcse > TOTAL_MCSE and more > num_samples and affordable(fit, more):
                terms = draw_terms(fit, name, more, jax.random.fold_in(key, 3), df)
                e, mc, k, _ = _psis_loo(-terms.potential - terms.log_g, terms.log_lik)
                redo = (k > GOOD_K) | (lev > MAX_LEVERAGE) | ~valid | ~(mc <= MAX_MCSE)
            attrs["global_samples"] = int(terms.theta.shape[0])
            elpd[:], mcse[:], khat[:] = e, mc, k
            method[:] = "global-is"
            unit_is(np.flatnonzero(redo), 1)
            still = (khat > GOOD_K) | ~(mcse <= MAX_MCSE)
            if still.sum() > max(1, ESCALATE * n):
                branch = "smc"
        if branch == "smc":
            from numpyro_mpe.inference.smc import tempered_smc
            from numpyro_mpe.loo.arviz_compat import log_lik_on_draws

            smc = tempered_smc(fit.adapter, fit.posterior, jax.random.fold_in(key, 2), progress=progress)
            ll = log_lik_on_draws(fit, jax.numpy.asarray(smc.theta), name)
            elpd[:], mcse[:], khat[:], _ = _psis_loo(np.zeros(smc.theta.shape[0]), np.asarray(ll))
            method[:] = "smc-psis"
            attrs.update(smc_stages=smc.stages, smc_particles=int(smc.theta.shape[0]),
                         smc_moves=int(sum(smc.steps)))
        attrs["branch"] = branch
    else:
        p_loo = lpd - elpd
        unit_is(np.flatnonzero((lev > MAX_LEVERAGE) | ~valid | ~(p_loo <= MAX_P_LOO)), 1)
    flagged = (khat > GOOD_K) | ~(mcse <= MAX_MCSE)
    refit = np.zeros(0, int)
    if repair == "refit" and flagged.any():
        from numpyro_mpe.loo.nuts_refit import nuts_loo

        order = np.flatnonzero(flagged)[np.argsort(-np.nan_to_num(khat[flagged], nan=np.inf))]
        refit = np.sort(order[:refit_count])
        res = nuts_loo(fit, refit, name, rng_key=jax.random.fold_in(key, 4), progress=progress)
        elpd[refit], mcse[refit] = res["elpd_loo"].values, res["elpd_loo_mcse"].values
        khat[refit] = -np.inf
        method[refit] = "nuts-refit"
        flagged[refit] = (res["r_hat"].values > 1.05) | (res["divergences"].values > 0) | ~(
            res["elpd_loo_mcse"].values <= MAX_MCSE)
    attrs.update(refit=refit.tolist(), seconds=time.perf_counter() - t0, var_name=name,
                 method="fit.loo(method='auto'): the best available leave-one-out estimate per observation")
    shape, dims = np.shape(sens["elpd_loo"]), sens["elpd_loo"].dims
    ds = xr.Dataset({
        "elpd_loo": (dims, elpd.reshape(shape)), "p_loo": (dims, (lpd - elpd).reshape(shape)),
        "elpd_loo_mcse": (dims, mcse.reshape(shape)), "pareto_k": (dims, khat.reshape(shape)),
        "method": (dims, method.astype(str).reshape(shape)), "flagged": (dims, flagged.reshape(shape)),
        "leverage": (dims, lev.reshape(shape))}, coords=sens["elpd_loo"].coords, attrs=attrs)
    return ds


def unreliable_message(ds: xr.Dataset) -> str | None:
    """A warning naming the flagged observations of an :func:`auto_loo` result, or None."""
    flagged = np.asarray(ds["flagged"]).ravel()
    if not flagged.any():
        return None
    idx = np.flatnonzero(flagged)
    k = np.asarray(ds["pareto_k"]).ravel()[idx]
    methods = sorted(set(np.asarray(ds["method"]).ravel()[idx].tolist()))
    return (f"{idx.size} of {flagged.size} observations of '{ds.attrs['var_name']}' have no reliable "
            f"leave-one-out estimate (Pareto k-hat > {GOOD_K} or Monte Carlo error > {MAX_MCSE} nats after "
            f"{', '.join(methods)}; flat indices {idx[:10].tolist()}{' ...' if idx.size > 10 else ''}, k-hat "
            f"{np.array2string(k[:10], precision=2)}): fit.loo(repair='refit') refits them by NUTS")


__all__ = ["auto_loo", "unreliable_message"]
