"""LOO predictive checks without sampling: LOO-PIT, expectations, intervals, scores, R² and metrics.

The leave-one-out predictive of observation i is the MPE cavity pushed through the likelihood,
p(ỹ | y₋i) ≈ ∫ p(ỹ | η) N(η; η̂_i + Δη_i, V₋i) dη in the site's active predictor components.  Every
functional is one integral over the nodes of the full quadrature rule of ``elpd_loo``, computed for each
row inside the per-observation pass (:mod:`numpyro_mpe.engine.predictive`; streamed over chunks and sharded
as ``elpd_loo``): no posterior or predictive draws.  The functions mirror arviz-stats 1.x (names, return
types, the sign of the scores): ``loo_pit``, ``loo_expectations``, ``loo_score``, ``loo_r2`` and
``loo_metrics``, plus ``loo_predictive_interval``.

Leave-group-out (``groups=``): each observation's predictive given the other groups (its group's cavity
S₋G = S − Σ_{j∈G} Ĥ_j), in ``loo_expectations``, ``loo_predictive_interval``, ``loo_score``, ``loo_r2`` and
``loo_metrics``; ``loo_pit`` refuses it (the PIT values of one group are not independent, so the uniformity
test does not apply).  Observations whose cavity is invalid (leverage ≥ 1) get NaN, unless the caller's
``repaired`` samples (importance sampling) replace them (:func:`predictive_values`).
"""

from __future__ import annotations

import warnings
from collections import namedtuple
from typing import TYPE_CHECKING

import jax
import numpy as np
import xarray as xr

from numpyro_mpe.engine.predictive import check_probs
from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import host_generator
from numpyro_mpe.loo.calibration import pit_calibration
from numpyro_mpe.loo.common import site_parameters
from numpyro_mpe.loo.predictive_values import PredictiveValues, moment_values, predictive_values

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Key of the uniforms of the randomized PIT of discrete outcomes when none is given (arviz-stats' default
#: seed, 214, as a JAX key).
DEFAULT_PIT_KEY = 214
#: Kinds of :func:`loo_expectations` and :func:`loo_metrics`.
EXPECTATION_KINDS = ("mean", "median", "var", "sd", "quantile")
METRIC_KINDS = ("mae", "mse", "rmse", "acc", "acc_balanced")


# ------------------------------------------------------------------ xarray over the observation dims
def _array(site, flat, name: str, lead: tuple = (), coords: dict | None = None) -> xr.DataArray:
    """``flat`` (N, *lead sizes) as a DataArray over ``lead`` then the site's observation dims."""
    flat = np.asarray(flat)
    arr = flat.reshape(tuple(site.obs_shape) + flat.shape[1:])
    k = len(site.obs_shape)
    arr = np.moveaxis(arr, list(range(k, arr.ndim)), list(range(arr.ndim - k)))
    return xr.DataArray(arr, dims=list(lead) + list(site.dims), coords={**site.coords(), **(coords or {})},
                        name=name)


def _warn_invalid(pv: PredictiveValues, what: str) -> None:
    bad = np.flatnonzero(~pv.valid)
    if bad.size:
        warnings.warn(f"{bad.size} of {pv.valid.size} observations of '{pv.site.name}' have no Gaussian "
                      f"cavity (leverage >= 1, flat indices {bad[:10].tolist()}"
                      f"{' ...' if bad.size > 10 else ''}); "
                      f"their {what} is NaN and left out of the summaries", stacklevel=3)


def _round(x: float, round_to):
    if round_to is None or (isinstance(round_to, str) and round_to.lower() == "none"):
        return float(x)
    if isinstance(round_to, str):
        return float(f"{x:.{round_to}}")
    return float(np.round(x, round_to))


def _pit_values(pv: PredictiveValues, rng_key):
    lower, mass = pv.values["pit_lower"], pv.values["pit_mass"]
    if not pv.spec.discrete:
        return lower, "none (continuous outcome)"
    key = jax.random.PRNGKey(DEFAULT_PIT_KEY) if rng_key is None else rng_key
    u = host_generator(key).random(lower.shape)
    what = f"PRNGKey({DEFAULT_PIT_KEY}) (default)" if rng_key is None else "the given rng_key"
    return np.clip(lower + u * mass, 0.0, 1.0), what


#: The numpydoc entry of ``repair``, shared by the functionals below (``{repair}`` in their docstrings).
REPAIR_PARAMETER = """repair : {"flagged", "invalid", None}, default "flagged"
        Observations whose closed form is not trusted — leverage > 0.5 or no Gaussian cavity (``"flagged"``),
        or only the latter (``"invalid"``) — take their values from importance sampling toward p(θ | y₋i),
        the proposal with which ``fit.loo()`` repairs them; ``None`` keeps the closed form everywhere (NaN
        without a cavity).  Leave-one-out only (``groups`` keeps the closed form)."""


def repair_parameter(fn):
    """Decorator: ``{repair}`` in ``fn``'s docstring becomes :data:`REPAIR_PARAMETER`."""
    fn.__doc__ = fn.__doc__.replace("{repair}", REPAIR_PARAMETER)
    return fn


@site_parameters
@repair_parameter
def loo_pit(fit: Fit, var_name: str | None = None, *, rng_key=None, prob: float = 0.95,
            groups=None, repair: str | None = "flagged") -> xr.Dataset:
    """LOO probability integral transform: p(ỹ_i ≤ y_i | y₋i) of every observation, from the MPE cavities.

    For a continuous outcome the PIT is E[F(y_i | η)] over the cavity; for a discrete one it is randomized,
    F(y_i − 1) + u_i p(y_i), u_i ~ U(0, 1) (Czado, Gneiting and Held 2009), so that it is uniform under
    the model (as arviz-stats randomizes ties).

    Parameters
    ----------
    {site_parameters}
    rng_key : jax.random.PRNGKey, optional
        Key of the uniforms u_i of a discrete outcome; ``PRNGKey(214)`` when omitted (arviz-stats' default
        seed).  Unused for continuous outcomes.
    prob : float, default 0.95
        Coverage of the simultaneous ECDF band of the calibration test.
    groups : None
        Refused: the PIT values of a group left out together are not independent uniforms.
    {repair}

    Returns
    -------
    xarray.Dataset
        One variable named after the site over its observation dims (as ``arviz_stats.loo_pit``); ``attrs``:
        the calibration tests of :func:`numpyro_mpe.loo.calibration.pit_calibration` (``ecdf_pvalue``,
        ``ecdf_reject``, ``ks_statistic``, ``ks_pvalue``, ...), ``randomized`` and ``rng_key``.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> ds = fit.loo_pit()
    >>> ds["y"].shape, bool(((ds["y"] > 0) & (ds["y"] < 1)).all())
    ((20,), True)
    >>> sorted(k for k in ds.attrs if k.startswith("ks_"))
    ['ks_pvalue', 'ks_statistic']
    """
    if groups is not None:
        raise MPEError("loo_pit does not take groups=: the PIT values of the observations of a group left "
                       "out together are not independent, so their uniformity test does not apply; "
                       "loo_expectations, loo_predictive_interval, loo_score, loo_r2 and loo_metrics take "
                       "groups=")
    pv = moment_values(fit, var_name, None, pit=True, repair=repair)
    _warn_invalid(pv, "LOO-PIT")
    pit, how = _pit_values(pv, rng_key)
    ds = xr.Dataset({pv.site.name: _array(pv.site, pit, pv.site.name)})
    ds.attrs.update(pit_calibration(pit, prob), randomized=bool(pv.spec.discrete), rng_key=how,
                    var_name=pv.site.name, method="MPE cavity, full quadrature rule in predictor space")
    return ds


@site_parameters
@repair_parameter
def loo_expectations(fit: Fit, var_name: str | None = None, kind: str = "mean", probs=None, *, groups=None,
                     repair: str | None = "flagged"):
    """LOO predictive expectations E[ỹ_i | y₋i] (or var, sd, median, quantiles) from the MPE cavities.

    mean and variance by the law of total variance over the cavity (E μ(η), E σ²(η) + Var μ(η)); quantiles
    solve E F(q | η) = p (the smallest integer q for a discrete outcome).

    Parameters
    ----------
    {site_parameters}
    kind : {"mean", "median", "var", "sd", "quantile"}, default "mean"
        What to compute (as ``arviz_stats.loo_expectations``; circular kinds are not supported).
    probs : float or list of float, optional
        The quantiles' probabilities for ``kind="quantile"``, each in (0, 1).
    groups : str or array_like, optional
        Leave-group-out: each observation's predictive with its whole group left out.
    {repair}

    Returns
    -------
    loo_expec : xarray.DataArray
        Over the site's observation dims (after a ``quantile`` dim for ``kind="quantile"``).
    khat : xarray.DataArray
        The MPE leverage, the closed-form twin of arviz-stats' k̂ (flag above 0.7; for groups the group's).

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> mean, khat = fit.loo_expectations()
    >>> q, _ = fit.loo_expectations(kind="quantile", probs=[0.25, 0.75])
    >>> mean.dims, q.dims, bool((q.sel(quantile=0.25) < mean).all())
    (('data',), ('quantile', 'data'), True)
    """
    if kind not in EXPECTATION_KINDS:
        raise MPEError(f"kind must be one of {list(EXPECTATION_KINDS)}, got '{kind}'")
    if kind == "quantile" and probs is None:
        raise MPEError("probs must be given when kind is 'quantile'")
    if kind in ("quantile", "median"):
        probs = (0.5,) if kind == "median" else check_probs(probs)
        pv = predictive_values(fit, var_name, ("quantiles",), probs, groups=groups, repair=repair)
        q = pv.values["quantiles"]
        if kind == "median":
            out = _array(pv.site, q[:, 0], pv.site.name)
        else:
            out = _array(pv.site, q, pv.site.name, ("quantile",), {"quantile": list(probs)})
    else:
        pv = moment_values(fit, var_name, groups, repair=repair)
        v = pv.values["mean" if kind == "mean" else "var"]
        out = _array(pv.site, np.sqrt(v) if kind == "sd" else v, pv.site.name)
    _warn_invalid(pv, f"LOO {kind}")
    return out, _array(pv.site, pv.leverage, pv.site.name)


def interval_probs(prob: float) -> tuple:
    """The quantile probabilities (½ − prob/2, ½ + prob/2) of the central interval of probability ``prob``.

    Examples
    --------
    >>> [round(p, 3) for p in interval_probs(0.9)]
    [0.05, 0.95]
    """
    (prob,) = check_probs(prob, "prob")
    return (0.5 - prob / 2.0, 0.5 + prob / 2.0)


@site_parameters
@repair_parameter
def loo_predictive_interval(fit: Fit, var_name: str | None = None, prob: float = 0.9, *,
                            groups=None, repair: str | None = "flagged") -> xr.DataArray:
    """Central LOO predictive intervals: the (1 − prob)/2 and (1 + prob)/2 quantiles of p(ỹ_i | y₋i).

    Parameters
    ----------
    {site_parameters}
    prob : float, default 0.9
        Probability inside the interval, in (0, 1).
    groups : str or array_like, optional
        Leave-group-out: each observation's predictive with its whole group left out.
    {repair}

    Returns
    -------
    xarray.DataArray
        Over a ``ci_bound`` dim (``"lower"``, ``"upper"``, as arviz-stats' intervals) then the observation
        dims; ``attrs["coverage"]``: the share of observations inside their interval.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> ci = fit.loo_predictive_interval(prob=0.9)
    >>> ci.dims, bool((ci.sel(ci_bound="lower") < ci.sel(ci_bound="upper")).all())
    (('ci_bound', 'data'), True)
    """
    (prob,) = check_probs(prob, "prob")
    pv = predictive_values(fit, var_name, ("quantiles",), interval_probs(prob), groups=groups, repair=repair)
    _warn_invalid(pv, "LOO predictive interval")
    out = _array(pv.site, pv.values["quantiles"], pv.site.name, ("ci_bound",),
                 {"ci_bound": ["lower", "upper"]})
    y = np.asarray(pv.site.flat_value)
    q = pv.values["quantiles"]
    ok = np.isfinite(q).all(axis=1)
    out.attrs.update(prob=prob, coverage=float(np.mean((q[ok, 0] <= y[ok]) & (y[ok] <= q[ok, 1]))))
    return out


@site_parameters
@repair_parameter
def loo_score(fit: Fit, var_name: str | None = None, kind: str = "crps", pointwise: bool = False,
              round_to=None, *, groups=None, repair: str | None = "flagged"):
    """LOO CRPS or SCRPS from the MPE cavities, as maximization scores (arviz-stats' sign convention).

    CRPS_i = E|Ỹ − y_i| − ½ E|Ỹ − Ỹ′| under p(ỹ | y₋i) (closed form for a Normal likelihood, else by
    integrating (F(t) − 1{t ≥ y_i})²); the score is −CRPS_i.  SCRPS_i = −E|Ỹ − y_i| / E|Ỹ − Ỹ′| −
    ½ log E|Ỹ − Ỹ′| (Bolin and Wallin 2023).

    Parameters
    ----------
    {site_parameters}
    kind : {"crps", "scrps"}, default "crps"
    pointwise : bool, default False
        Also return the per-observation scores and the leverages.
    round_to : int or str, optional
        Decimals (int) or significant digits (``"2g"``) of ``mean`` and ``se``; raw numbers by default.
    groups : str or array_like, optional
        Leave-group-out: each observation's predictive with its whole group left out.
    {repair}

    Returns
    -------
    namedtuple
        ``CRPS`` or ``SCRPS`` with ``mean`` and ``se`` (sd / √N, ddof 0, as arviz-stats), and with
        ``pointwise`` also ``pointwise`` (over the observation dims) and ``pareto_k`` (the MPE leverage).

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> res = fit.loo_score(kind="crps")
    >>> type(res).__name__, res.mean < 0
    ('CRPS', True)
    """
    if kind not in ("crps", "scrps"):
        raise MPEError(f"kind must be 'crps' or 'scrps', got '{kind}'")
    pv = predictive_values(fit, var_name, ("crps",), groups=groups, repair=repair)
    _warn_invalid(pv, kind.upper())
    if kind == "crps":
        score = -pv.values["crps"]
    else:
        mad = pv.values["mean_abs_diff"]
        score = -pv.values["abs_error"] / mad - 0.5 * np.log(mad)
    ok = np.isfinite(score)
    mean, se = float(np.mean(score[ok])), float(np.std(score[ok]) / np.sqrt(ok.sum()))
    name = kind.upper()
    if pointwise:
        return namedtuple(name, ["mean", "se", "pointwise", "pareto_k"])(
            _round(mean, round_to), _round(se, round_to), _array(pv.site, score, pv.site.name),
            _array(pv.site, pv.leverage, pv.site.name))
    return namedtuple(name, ["mean", "se"])(_round(mean, round_to), _round(se, round_to))


def _observed_and_mean(fit: Fit, var_name, groups, repair):
    pv = moment_values(fit, var_name, groups, repair=repair)
    _warn_invalid(pv, "LOO mean")
    y = np.asarray(pv.site.flat_value, float)
    ok = np.isfinite(pv.values["mean"])
    return y[ok], pv.values["mean"][ok]


@site_parameters
@repair_parameter
def loo_r2(fit: Fit, var_name: str | None = None, n_simulations: int = 4000, summary: bool = True,
           point_estimate: str = "mean", ci_kind: str = "eti", ci_prob: float = 0.89, round_to=None, *,
           groups=None, repair: str | None = "flagged"):
    """LOO-adjusted R² = 1 − Var(y − E[ỹ | y₋i]) / Var(y), with the Dirichlet-weighted bootstrap of
    arviz-stats' ``loo_r2`` (same seed, 42) over the MPE LOO means.

    Parameters
    ----------
    {site_parameters}
    n_simulations : int, default 4000
        Bootstrap draws.
    summary : bool, default True
        A summary (point estimate and interval) or the ``n_simulations`` draws.
    point_estimate : {"mean", "median"}, default "mean"
    ci_kind : {"eti"}, default "eti"
        Equal-tailed interval.
    ci_prob : float, default 0.89
    round_to : int or str, optional
        Decimals or significant digits; raw numbers by default.
    groups : str or array_like, optional
        Leave-group-out: each observation's mean with its whole group left out.
    {repair}

    Returns
    -------
    namedtuple or numpy.ndarray
        ``loo_R2`` with fields ``mean`` (``point_estimate``), ``eti_lb``, ``eti_ub``; or the draws.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> r2 = fit.loo_r2()
    >>> type(r2).__name__, r2._fields, 0.5 < r2.mean < 1
    ('loo_R2', ('mean', 'eti_lb', 'eti_ub'), True)
    """
    from scipy import stats

    if ci_kind != "eti":
        raise MPEError(f"ci_kind must be 'eti', got '{ci_kind}'")
    if point_estimate not in ("mean", "median"):
        raise MPEError(f"point_estimate must be 'mean' or 'median', got '{point_estimate}'")
    (ci_prob,) = check_probs(ci_prob, "ci_prob")
    y, pred = _observed_and_mean(fit, var_name, groups, repair)
    n = y.size
    eloo = pred - y
    rd = stats.dirichlet.rvs(np.ones(n), size=int(n_simulations), random_state=42)
    scale = n / (n - 1)
    vary = (np.sum(rd * y**2, axis=1) - np.sum(rd * y, axis=1) ** 2) * scale
    vareloo = (np.sum(rd * eloo**2, axis=1) - np.sum(rd * eloo, axis=1) ** 2) * scale
    draws = np.clip(1 - vareloo / vary, -1, 1)
    if not summary:
        return draws
    lb, ub = np.quantile(draws, [(1 - ci_prob) / 2, (1 + ci_prob) / 2])
    fields = [point_estimate, "eti_lb", "eti_ub"]
    est = getattr(np, point_estimate)(draws)
    return namedtuple("loo_R2", fields)(*(_round(v, round_to) for v in (est, lb, ub)))


@repair_parameter
def loo_metrics(fit: Fit, kind: str = "rmse", var_name: str | None = None, round_to=None, *, groups=None,
                repair: str | None = "flagged"):
    """Predictive metrics of the MPE LOO means against the observations, as arviz-stats' ``loo_metrics``.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    kind : {"mae", "mse", "rmse", "acc", "acc_balanced"}, default "rmse"
        Mean absolute error, mean squared error, its root, accuracy of E[ỹ_i | y₋i] > 0.5 (binary outcomes)
        and balanced accuracy.
    var_name : str, optional
        Observed site; required when the model has several.
    round_to : int or str, optional
        Decimals or significant digits of the metric and its standard error; raw numbers by default.
    groups : str or array_like, optional
        Leave-group-out: the metric over each observation's mean with its whole group left out.
    {repair}

    Returns
    -------
    namedtuple
        Named ``kind``, with ``mean`` and ``se``.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> fit.loo_metrics(kind="mae", round_to=1)._fields
    ('mean', 'se')
    """
    if kind not in METRIC_KINDS:
        raise MPEError(f"kind must be one of {list(METRIC_KINDS)}, got '{kind}'")
    y, pred = _observed_and_mean(fit, var_name, groups, repair)
    n = y.size
    if kind in ("mae", "mse", "rmse"):
        e = np.abs(y - pred) if kind == "mae" else (y - pred) ** 2
        mean, se = np.mean(e), np.std(e, ddof=1) / n**0.5
        if kind == "rmse":  # first-order Taylor expansion of the square root, as arviz-stats
            mean, se = mean**0.5, (se**2 / mean / 4) ** 0.5
    else:
        hit = (pred > 0.5) == y
        if kind == "acc":
            mean = np.mean(hit)
            se = (mean * (1 - mean) / n) ** 0.5
        else:
            neg = y == 0
            tn, tp = np.mean(hit[neg]), np.mean(hit[~neg])
            mean = (tp + tn) / 2
            se = ((tp * (1 - tp) + tn * (1 - tn)) / 4 / n) ** 0.5
    return namedtuple(kind, ["mean", "se"])(_round(mean, round_to), _round(se, round_to))


__all__ = ["DEFAULT_PIT_KEY", "interval_probs", "loo_expectations", "loo_metrics", "loo_pit",
           "loo_predictive_interval", "loo_r2", "loo_score", "predictive_values"]
