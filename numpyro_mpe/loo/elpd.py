"""The MPE leave-one-out of one observed site as the installed ArviZ's ELPD object (``fit.loo()``)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import arviz as az
import jax
import numpy as np
import xarray as xr

from numpyro_mpe.errors import user_stacklevel
from numpyro_mpe.gaussian import draws as posterior_draws
from numpyro_mpe.loo.arviz_compat import (
    ARVIZ_1,
    GOOD_K,
    container,
    elpd_se,
    log_lik_on_draws,
    pointwise_elpd,
)
from numpyro_mpe.loo.common import MAX_LEVERAGE

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


def _psis_on_q(fit: Fit, var_name: str, idx: np.ndarray, num_samples: int, rng_key):
    """PSIS-LOO with ``num_samples`` draws from q for the flat observations ``idx`` of ``var_name``.

    Runs the installed ArviZ's own ``loo`` on those observations only; returns pointwise elpd and k̂.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    draws = posterior_draws(fit.posterior, num_samples, rng_key, antithetic=False)
    ll = log_lik_on_draws(fit, draws, var_name, idx)  # (S, n_bad)
    dims = ["chain", "draw", "__obs__"]
    groups = {
        "posterior": xr.Dataset({"__theta__": (("chain", "draw"), np.zeros((1, num_samples)))}),
        "log_likelihood": xr.Dataset({var_name: (dims, ll[None])}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = az.loo(container(groups), pointwise=True, var_name=var_name, reff=1.0)
    return np.asarray(pointwise_elpd(res)).ravel(), np.asarray(res["pareto_k"]).ravel()


#: Methods of :func:`elpd_data`.
METHODS = ("auto", "mpe", "mpe-is")


def elpd_data(fit: Fit, var_name: str | None = None, *, method: str = "auto", groups=None,
              num_samples: int | None = None, rng_key=None, df: float | None = None,
              repair: str | None = None, refit_count: int = 10):
    """The MPE leave-one-out of one observed site as the installed ArviZ's ELPD object.

    Built as ``az.loo(..., pointwise=True)`` builds its result, so that ``az.compare`` and
    ``az.plot_compare`` take it beside ordinary PSIS-LOO results.

    ``method="auto"`` (the default) takes, per observation, the best available estimate of the exact
    Bayesian leave-one-out (:func:`numpyro_mpe.loo.auto.auto_loo`: importance sampling over q's Student-t
    version where q covers the posterior, per-observation MPE importance sampling and moment matching for
    the hard ones, SMC where q is not the posterior, the closed form where draws × rows are too many, NUTS
    refits with ``repair="refit"``): ``elpd_i``/``loo_i`` those estimates, ``pareto_k`` their own k̂
    (the leverage where the closed form is used), ``warning`` True when some observation is flagged
    (k̂ > 0.7 or Monte Carlo error > 0.1 nats), with a warning that names them.  The result also carries
    ``method_i`` (which estimate), ``mcse_i`` (its Monte Carlo standard error), ``flagged_i`` and
    ``global_k`` (the global check of q, :func:`numpyro_mpe.loo.posterior_check.posterior_check`).

    ``method="mpe"``, the closed form alone (the leave-one-out of q):

    * ``elpd_loo`` (arviz 0.x) / ``elpd`` (arviz ≥ 1): Σ_i ``elpd_loo``\\_i of :meth:`Fit.sensitivities`;
      ``se`` the standard error with the installed ArviZ's convention (√(N·var), ddof 0 on 0.x, 1 on ≥ 1);
      ``p_loo`` / ``p``: Σ_i ``p_loo``\\_i;
    * ``loo_i`` / ``elpd_i``: the pointwise values over the observation dims;
    * ``pareto_k``: the MPE **leverage** (the closed-form twin of k̂; same 0.7 threshold, ``good_k = 0.7``);
    * ``warning``: True when some leverage exceeds 0.7 or some cavity is invalid;
    * ``n_samples``: the posterior draws behind the numbers — 0 where ``elpd_loo`` is closed form
      (quadrature in predictor space), ``fit.options.num_samples`` where it was integrated by Monte Carlo,
      raised to
      ``num_samples`` when the PSIS fallback below ran;
    * ``scale``: ``"log"``.

    Observations whose cavity is invalid (leverage ≥ 1: ``valid`` False, ``elpd_loo`` NaN) have no Gaussian
    leave-one-out posterior.  To keep the totals finite, their ``elpd_loo`` is replaced by PSIS-LOO on
    ``num_samples`` draws from q (for those observations only; ``p_loo`` = MPE ``lpd`` − that value), and a
    warning says so.

    ``method="mpe-is"`` replaces the *flagged* observations (leverage > 0.5 or an invalid cavity) by MPE
    importance sampling (:func:`numpyro_mpe.loo.importance.importance_loo`, ``num_samples`` draws from
    each MPE
    leave-one-out Gaussian, consistent for the exact Bayesian LOO); their ``pareto_k`` is then the k̂ of the
    MPE-IS weights (−inf where the weights are constant), the others keep the leverage, and a warning names
    the observations whose MPE-IS k̂ is still above 0.7.

    ``groups`` gives leave-group-out (:func:`numpyro_mpe.loo.groups.group_dataset`): one pointwise value per
    group over the group dim, ``pareto_k`` the group leverage, ``n_data_points`` the number of groups and
    ``n_samples`` the draws per group.  A group whose cavity is invalid gets MPE importance sampling
    (:func:`numpyro_mpe.loo.importance.importance_groups`) instead, with a warning.  Two such results over the
    same groups compare with ``az.compare``.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    var_name : str, optional
        Observed site; required when the model has several (as in ``az.loo``).
    method : {"auto", "mpe", "mpe-is"}, default "auto"
        The best available estimate per observation; the closed-form MPE; or the closed form with MPE
        importance sampling for the observations of leverage > 0.5.
    groups : str or array_like, optional
        Leave-group-out: the name of an observation dim (plate) or labels aligned with the observations.
    num_samples : int, optional
        ``"auto"``: draws of the global importance sampling (default 4000); otherwise draws for the PSIS
        fallback on invalid cavities, for MPE-IS per flagged observation, or per group (default 2000).
    rng_key : jax.random.PRNGKey, optional
        Key for those draws; ``PRNGKey(0)`` when omitted.
    df : float, optional
        MPE-IS proposal: ``None`` the Gaussian MPE leave-one-out posterior, a number a Student-t with ``df``
        degrees of freedom around it (see :func:`numpyro_mpe.loo.importance.importance_loo`); for
        ``"auto"`` the Student-t degrees of freedom of every proposal (default 5).
    repair : {None, "refit"}
        ``"auto"`` only: NUTS refits without each observation still flagged (``arviz.reloo``'s remedy).
    refit_count : int, default 10
        The most NUTS refits.

    Returns
    -------
    arviz.stats.stats_utils.ELPDData or arviz_stats.utils.ELPDDataLOO

    Raises
    ------
    ValueError
        For an unknown ``method``, ``method="mpe-is"`` with ``groups``, an unknown ``repair``, a
        ``refit_count`` below 1, or ``repair="refit"`` on a model NUTS cannot run.

    Examples
    --------
    >>> loo_mpe = fit.loo()  # doctest: +SKIP
    >>> az.compare({"mpe": loo_mpe, "nuts": az.loo(idata_nuts)})  # doctest: +SKIP
    >>> loo_is = fit.loo(method="mpe-is")  # doctest: +SKIP
    >>> az.compare({"a": fit_a.loo(groups="firm"), "b": fit_b.loo(groups="firm")})  # doctest: +SKIP
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('auto': the best available estimate per "
                         f"observation; 'mpe': the closed form; 'mpe-is': MPE importance sampling for the "
                         f"high-leverage observations), got {method!r}")
    if repair is not None and method != "auto":
        raise ValueError(f"repair={repair!r} needs method='auto', got method={method!r}")
    site = fit.adapter.observed_site(var_name)
    extras = {}
    if groups is not None and method == "auto" and repair is None:
        method = "mpe"  # leave-group-out: the closed form, with MPE-IS for invalid group cavities
    num_samples = int(num_samples) if num_samples is not None else (4000 if method == "auto" else 2000)
    if groups is not None:
        if method != "mpe":
            raise ValueError(f"method={method!r} is for leave-one-out; with groups= use method='mpe' (a "
                             "group whose cavity is invalid gets MPE importance sampling anyway)")
        from numpyro_mpe.loo.groups import group_dataset
        from numpyro_mpe.loo.importance import importance_groups

        ds = group_dataset(fit, groups, site.name, num_samples=num_samples, rng_key=rng_key)
        dim = ds["elpd_loo"].dims[0]
        elpd_i = ds["elpd_loo"].copy()
        p_loo_i = ds["p_loo"].copy()
        pareto_k = ds["leverage"].copy()
        valid = np.asarray(ds["valid"])
        n_samples = int(num_samples)
        if not valid.all():
            bad_labels = ds[dim].values[~valid]
            res = importance_groups(fit, groups, site.name, select=bad_labels, num_samples=num_samples,
                                    rng_key=rng_key, progress=False)
            elpd_i.values[~valid] = res["elpd_loo"].values
            p_loo_i.values[~valid] = ds["lpd"].values[~valid] - res["elpd_loo"].values
            warnings.warn(
                f"{bad_labels.size} of {valid.size} groups of '{site.name}' have an invalid MPE cavity "
                f"(leverage >= 1, groups {bad_labels[:10].tolist()}{' ...' if bad_labels.size > 10 else ''})"
                "; "
                f"their elpd_loo is MPE importance sampling on {num_samples} draws instead (Pareto k-hat "
                f"{np.array2string(res['pareto_k'].values[:10], precision=2)}), so the totals mix the closed "
                "form and importance sampling; pareto_k keeps the leverage",
                stacklevel=user_stacklevel(),
            )
        n_data = int(valid.size)
        warn = bool(np.any(np.asarray(pareto_k) > GOOD_K) or not valid.all())
    elif method == "auto":
        from numpyro_mpe.loo.auto import auto_loo, unreliable_message

        ds = auto_loo(fit, site.name, num_samples=num_samples, df=5.0 if df is None else df, rng_key=rng_key,
                      repair=repair, refit_count=refit_count)
        elpd_i, p_loo_i, pareto_k = ds["elpd_loo"].copy(), ds["p_loo"].copy(), ds["pareto_k"].copy()
        n_samples = int(ds.attrs.get("global_samples", ds.attrs.get("smc_particles", 0)))
        n_data = int(site.num_obs)
        warn = bool(np.asarray(ds["flagged"]).any())
        message = unreliable_message(ds)
        if message:
            warnings.warn(message, stacklevel=user_stacklevel())
        extras = {"method_i": ds["method"], "mcse_i": ds["elpd_loo_mcse"], "flagged_i": ds["flagged"],
                  "global_k": float(ds.attrs["global_k"]), "refit": ds.attrs["refit"]}
    else:
        ds = fit.sensitivities(site.name)
        elpd_i = ds["elpd_loo"].copy()
        p_loo_i = ds["p_loo"].copy()
        pareto_k = ds["leverage"].copy()
        valid = np.asarray(ds["valid"]).ravel()
        lpd = np.asarray(ds["lpd"]).ravel()
        flat_elpd = np.asarray(elpd_i).ravel().copy()
        flat_p = np.asarray(p_loo_i).ravel().copy()
        flat_k = np.asarray(pareto_k, dtype=float).ravel().copy()
        bad = np.flatnonzero(~valid | ~np.isfinite(flat_elpd))
        n_samples = fit.site_mpe(site.name).integration.num_samples  # 0 for quadrature
        if method == "mpe-is":
            from numpyro_mpe.loo.importance import importance_loo

            flagged = np.union1d(np.flatnonzero(flat_k > MAX_LEVERAGE), bad)
            if flagged.size:
                res = importance_loo(fit, flagged, num_samples=num_samples, rng_key=rng_key,
                                     var_name=site.name, df=df, progress=False)
                flat_elpd[flagged] = res["elpd_loo"].values
                flat_p[flagged] = lpd[flagged] - res["elpd_loo"].values
                flat_k[flagged] = res["pareto_k"].values
                n_samples = max(n_samples, int(num_samples))
                high = flagged[res["pareto_k"].values > GOOD_K]
                if high.size:
                    warnings.warn(
                        f"MPE importance sampling: {high.size} of the {flagged.size} flagged observations of "
                        f"'{site.name}' still have Pareto k-hat > {GOOD_K} (flat indices "
                        f"{high[:10].tolist()}{' ...' if high.size > 10 else ''}, k-hat "
                        f"{np.array2string(flat_k[high][:10], precision=2)}); their elpd_loo is unreliable: "
                        "raise num_samples, try a heavier-tailed proposal (importance_loo(..., df=5)), or "
                        "refit without them",
                        stacklevel=user_stacklevel(),
                    )
        elif bad.size:
            elpd_bad, k_bad = _psis_on_q(fit, site.name, bad, num_samples, rng_key)
            flat_elpd[bad] = elpd_bad
            flat_p[bad] = lpd[bad] - elpd_bad
            n_samples = max(n_samples, int(num_samples))
            warnings.warn(
                f"{bad.size} of {site.num_obs} observations of '{site.name}' have an invalid MPE cavity "
                f"(leverage >= 1, flat indices {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}); their "
                f"elpd_loo is PSIS-LOO on {num_samples} draws from q instead (Pareto k-hat "
                f"{np.array2string(k_bad[:10], precision=2)}{' ...' if bad.size > 10 else ''}), so the "
                "totals mix MPE and PSIS; pareto_k keeps the leverage",
                stacklevel=user_stacklevel(),
            )
        elpd_i.values = flat_elpd.reshape(elpd_i.shape)
        p_loo_i.values = flat_p.reshape(p_loo_i.shape)
        pareto_k = pareto_k.astype(float)
        pareto_k.values = flat_k.reshape(pareto_k.shape)
        n_data = int(site.num_obs)
        warn = bool(np.any(flat_k > GOOD_K) or (method == "mpe" and bad.size > 0))
    elpd_i.name = "elpd_i" if ARVIZ_1 else "loo_i"
    pareto_k.name = "pareto_k"
    for da in (elpd_i, pareto_k, p_loo_i):
        da.attrs = {}
    elpd = float(np.sum(elpd_i.values))
    se = elpd_se(elpd_i.values)
    p_loo = float(np.sum(p_loo_i.values))
    if ARVIZ_1:
        from arviz_stats.utils import ELPDDataLOO

        out = ELPDDataLOO(elpd=elpd, se=se, p=p_loo, n_samples=int(n_samples), n_data_points=n_data,
                          scale="log", warning=warn, good_k=GOOD_K, elpd_i=elpd_i, pareto_k=pareto_k,
                          approx_posterior=False, p_loo_i=p_loo_i.rename("p_loo_i"))
        for k, v in extras.items():
            setattr(out, k, v)
        return out
    from arviz.stats.stats_utils import ELPDData

    return ELPDData(
        data=[elpd, se, p_loo, int(n_samples), n_data, warn, elpd_i, pareto_k, "log", GOOD_K,
              *extras.values()],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k",
               "scale", "good_k", *extras],
    )
