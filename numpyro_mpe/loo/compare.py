"""MPE leave-one-out against ArviZ's PSIS-LOO, observation by observation."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import arviz as az
import numpy as np
import pandas as pd

from numpyro_mpe.loo.arviz_compat import (
    GOOD_K,
    container,
    elpd_se,
    log_likelihood_array,
    logmeanexp_draws,
    pointwise_elpd,
    sample_groups,
)

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Per-observation columns of :func:`compare_psis` (after the observation coordinates).
COLUMNS = ("elpd_loo_mpe", "elpd_loo_psis", "p_loo_mpe", "p_loo_psis", "pareto_k", "leverage", "sensitivity",
           "valid")


class ComparisonSummary(dict):
    """The summary of :func:`compare_psis`: a plain ``dict`` whose ``str`` is a readable table."""

    def __str__(self) -> str:
        return format_summary(self)


def _obs_values(da, site) -> np.ndarray:
    """Values of a pointwise DataArray as a flat ``(N,)`` array in the site's observation order."""
    other = [d for d in da.dims if d not in ("chain", "draw")]
    if set(other) == set(site.dims):
        arr = da.transpose(*site.dims).values
    elif int(np.prod([da.sizes[d] for d in other], dtype=int)) == site.num_obs:
        arr = da.values
    else:
        raise ValueError(
            f"the posterior's log-likelihood of '{site.name}' has observation dims "
            f"{dict((d, da.sizes[d]) for d in other)}, the model's site has "
            f"{dict(zip(site.dims, site.obs_shape))}"
        )
    return np.asarray(arr, dtype=float).reshape(site.num_obs)


def _corr(a, b, method: str) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    return float(pd.Series(a[ok]).corr(pd.Series(b[ok]), method=method))


def compare_psis(fit: Fit, idata=None, var_name: str | None = None, num_samples: int = 2000,
                 rng_key=None) -> pd.DataFrame:
    """Compare the MPE leave-one-out with ArviZ's PSIS-LOO, observation by observation.

    PSIS-LOO is ``az.loo(idata, pointwise=True, var_name=...)`` of the installed ArviZ (0.x or ≥ 1) on the
    user's posterior ``idata`` — typically NUTS via ``az.from_numpyro(mcmc, log_likelihood=True)`` — or,
    when ``idata`` is omitted, on ``num_samples`` independent draws from q, the fit's own Gaussian
    approximation.  The latter checks the MPE's closed forms against importance sampling *from the same q*,
    not against the exact posterior; the output says which it is.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    idata : arviz.InferenceData or xarray.DataTree, optional
        A posterior sample with a ``log_likelihood`` group holding ``var_name`` over the same observations.
    var_name : str, optional
        Observed site; required when the model has several.
    num_samples : int, default 2000
        Draws from q when ``idata`` is omitted.
    rng_key : jax.random.PRNGKey, optional
        Key for those draws; ``PRNGKey(0)`` when omitted.

    Returns
    -------
    pandas.DataFrame
        One row per observation (flattened in C order, index ``observation``), the observation coordinates
        as columns named by the site's dims, then ``elpd_loo_mpe``, ``elpd_loo_psis``, ``p_loo_mpe``,
        ``p_loo_psis`` (``lpd_i − loo_i`` with ``lpd_i`` the log-mean-exp of the draws' likelihoods),
        ``pareto_k`` (PSIS k̂), ``leverage``, ``sensitivity`` and ``valid`` (the MPE cavity exists;
        ``elpd_loo_mpe`` is NaN where it does not).  ``df.attrs["summary"]`` is a
        :class:`ComparisonSummary` (a dict; ``print`` it for a table) with the totals ``elpd_loo_mpe``,
        ``elpd_loo_psis``, their SEs (``se_elpd_loo_mpe``, ``se_elpd_loo_psis``), ``elpd_diff`` (MPE − PSIS)
        and ``se_elpd_diff``, ``p_loo_mpe``, ``p_loo_psis`` — all over the ``n_compared`` observations with
        a valid cavity —, correlations ``corr_elpd_pearson``, ``corr_elpd_spearman`` (pointwise elpd),
        ``corr_k_pearson``, ``corr_k_spearman`` (leverage vs k̂), ``n_high_leverage`` and ``n_high_khat``
        (above ``k_threshold`` = 0.7), ``n_invalid``, ``n_obs``, ``n_draws``, ``posterior_from_q`` and
        ``posterior_source``.  ``df.attrs["posterior_source"]`` repeats the latter.

    Examples
    --------
    >>> import arviz as az, numpyro_mpe as mpe
    >>> from numpyro.infer import MCMC, NUTS
    >>> fit = mpe.Laplace(model).run(key, X, y=y)  # doctest: +SKIP
    >>> mcmc = MCMC(NUTS(model), num_warmup=500, num_samples=1000); mcmc.run(key, X, y=y)  # doctest: +SKIP
    >>> df = mpe.compare_psis(fit, az.from_numpyro(mcmc, log_likelihood=True))  # doctest: +SKIP
    >>> print(df.attrs["summary"])  # doctest: +SKIP
    >>> df.sort_values("pareto_k").tail()  # doctest: +SKIP
    """
    site = fit.adapter.observed_site(var_name)
    ds = fit.sensitivities(site.name)
    from_q = idata is None
    if from_q:
        idata = container(sample_groups(fit, num_samples, rng_key, [site.name]))
    ll = log_likelihood_array(idata, site.name)
    n_chains, n_draws = int(ll.sizes.get("chain", 1)), int(ll.sizes.get("draw", 1))
    if from_q:
        source = (f"{n_draws} independent draws from q, the {fit.method} Gaussian approximation "
                  "(PSIS checks the MPE against the same q, not the exact posterior)")
    else:
        source = f"user-supplied posterior sample ({n_chains} chain(s) x {n_draws} draws)"
    lpd_psis = _obs_values(logmeanexp_draws(ll), site)  # also checks the observations match
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto")
        psis = az.loo(idata, pointwise=True, var_name=site.name)
    elpd_psis = _obs_values(pointwise_elpd(psis), site)
    khat = _obs_values(psis["pareto_k"], site)
    del ll

    def flat(name):
        return np.asarray(ds[name].values, dtype=float).reshape(site.num_obs)

    cols = {}
    if site.dims:
        unr = np.unravel_index(np.arange(site.num_obs), site.obs_shape)
        for dim, i in zip(site.dims, unr):
            cols[dim] = np.asarray(ds[dim].values)[i]
    cols.update(
        elpd_loo_mpe=flat("elpd_loo"), elpd_loo_psis=elpd_psis, p_loo_mpe=flat("p_loo"),
        p_loo_psis=lpd_psis - elpd_psis, pareto_k=khat, leverage=flat("leverage"),
        sensitivity=flat("sensitivity"), valid=np.asarray(ds["valid"].values, dtype=bool).reshape(-1),
    )
    df = pd.DataFrame(cols, index=pd.RangeIndex(site.num_obs, name="observation"))

    both = np.isfinite(df.elpd_loo_mpe.values) & np.isfinite(df.elpd_loo_psis.values)
    e_m, e_p = df.elpd_loo_mpe.values[both], df.elpd_loo_psis.values[both]
    summary = ComparisonSummary(
        var_name=site.name,
        n_obs=int(site.num_obs),
        n_compared=int(both.sum()),
        elpd_loo_mpe=float(e_m.sum()),
        se_elpd_loo_mpe=elpd_se(e_m),
        elpd_loo_psis=float(e_p.sum()),
        se_elpd_loo_psis=elpd_se(e_p),
        elpd_diff=float((e_m - e_p).sum()),
        se_elpd_diff=elpd_se(e_m - e_p),
        p_loo_mpe=float(df.p_loo_mpe.values[both].sum()),
        p_loo_psis=float(df.p_loo_psis.values[both].sum()),
        corr_elpd_pearson=_corr(df.elpd_loo_mpe.values, df.elpd_loo_psis.values, "pearson"),
        corr_elpd_spearman=_corr(df.elpd_loo_mpe.values, df.elpd_loo_psis.values, "spearman"),
        corr_k_pearson=_corr(df.leverage.values, df.pareto_k.values, "pearson"),
        corr_k_spearman=_corr(df.leverage.values, df.pareto_k.values, "spearman"),
        k_threshold=GOOD_K,
        n_high_leverage=int(np.sum(df.leverage.values > GOOD_K)),
        n_high_khat=int(np.sum(df.pareto_k.values > GOOD_K)),
        n_invalid=int(np.sum(~df.valid.values)),
        n_draws=n_chains * n_draws,
        posterior_from_q=bool(from_q),
        posterior_source=source,
        method=fit.method,
    )
    df.attrs["summary"] = summary
    df.attrs["posterior_source"] = source
    df.attrs["var_name"] = site.name
    return df


def format_summary(summary: dict | pd.DataFrame) -> str:
    """A readable table of the summary of :func:`compare_psis`.

    Parameters
    ----------
    summary : dict or pandas.DataFrame
        ``df.attrs["summary"]``, or the DataFrame returned by :func:`compare_psis`.

    Returns
    -------
    str

    Examples
    --------
    >>> df = mpe.compare_psis(fit)  # doctest: +SKIP
    >>> print(mpe.format_summary(df))  # doctest: +SKIP
    >>> print(df.attrs["summary"])  # the same  # doctest: +SKIP
    """
    s = summary.attrs["summary"] if isinstance(summary, pd.DataFrame) else summary
    thr = s["k_threshold"]
    n_note = "" if s["n_compared"] == s["n_obs"] else \
        f"  (totals over the {s['n_compared']} observations with a valid cavity)"
    lines = [
        f"MPE ({s['method']}) vs PSIS-LOO for '{s['var_name']}': {s['n_obs']} observations{n_note}",
        f"PSIS posterior: {s['posterior_source']}",
        "",
        f"{'':12}{'MPE':>12}{'PSIS':>12}{'MPE - PSIS':>14}",
        f"{'elpd_loo':12}{s['elpd_loo_mpe']:12.2f}{s['elpd_loo_psis']:12.2f}{s['elpd_diff']:14.2f}",
        f"{'  SE':12}{s['se_elpd_loo_mpe']:12.2f}{s['se_elpd_loo_psis']:12.2f}{s['se_elpd_diff']:14.2f}",
        f"{'p_loo':12}{s['p_loo_mpe']:12.2f}{s['p_loo_psis']:12.2f}{s['p_loo_mpe'] - s['p_loo_psis']:14.2f}",
        "",
        f"{'correlation':34}{'Pearson':>10}{'Spearman':>10}",
        f"{'pointwise elpd_loo, MPE vs PSIS':34}{s['corr_elpd_pearson']:10.3f}"
        f"{s['corr_elpd_spearman']:10.3f}",
        f"{'leverage vs Pareto k-hat':34}{s['corr_k_pearson']:10.3f}{s['corr_k_spearman']:10.3f}",
        "",
        f"above {thr}: leverage {s['n_high_leverage']}, Pareto k-hat {s['n_high_khat']};"
        f" invalid cavities (leverage >= 1): {s['n_invalid']}",
    ]
    return "\n".join(lines)
