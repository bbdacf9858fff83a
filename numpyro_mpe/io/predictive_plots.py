"""Figures of the LOO predictive checks: the LOO-PIT ECDF against the uniform, LOO predictive intervals.

* :func:`plot_loo_pit` — the ECDF of the LOO-PIT values minus the uniform CDF, with the simultaneous
  confidence band of :func:`numpyro_mpe.loo.calibration.ecdf_band` (as ArviZ's ``plot_loo_pit(ecdf=True)``)
  and the calibration test in the legend;
* :func:`plot_loo_intervals` — the central LOO predictive interval of every observation, the observations
  on top (those outside their interval in magenta).

Inputs are the outputs of :func:`numpyro_mpe.loo.predictive.loo_pit` and
:func:`numpyro_mpe.loo.predictive.loo_predictive_interval` (or plain arrays); every function draws on ``ax``
(created when ``None``) and returns the axes, as ArviZ's ``plot_*`` functions do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from numpyro_mpe.io.style import BLUE, CYAN, FLAG, GREY, styled_axes
from numpyro_mpe.loo.calibration import ecdf_at, ecdf_band, pit_calibration

#: Points of the ECDF curve.
CURVE_POINTS = 400


def p_value(p: float) -> str:
    """``"= 0.123"``, or ``"< 0.001"`` below that.

    Examples
    --------
    >>> from numpyro_mpe.io.predictive_plots import p_value
    >>> p_value(0.4321), p_value(0.0004)
    ('= 0.432', '< 0.001')
    """
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def _pit_array(pit: Any) -> tuple[np.ndarray, str]:
    """The PIT values of a :func:`loo_pit` Dataset (its one variable), a DataArray or an array."""
    if hasattr(pit, "data_vars"):
        name = str(pit.attrs.get("var_name", next(iter(pit.data_vars))))
        return np.asarray(pit[name]).ravel(), name
    return np.asarray(pit, float).ravel(), str(getattr(pit, "name", None) or "y")


def plot_loo_pit(pit: Any, ax: Any = None, *, prob: float = 0.95, seed: int = 0):
    """The LOO-PIT ECDF difference, ECDF(u) − u, with its simultaneous ``prob`` confidence band.

    Under a well-calibrated model the curve stays inside the band (grey); a ∪-shaped PIT (predictives too
    narrow, e.g. overdispersed counts under a Poisson model) shows as a curve that rises above the band
    near 0 and falls below it near 1, a ∩-shape (too wide) the other way, a bias as one long excursion.

    Parameters
    ----------
    pit : xarray.Dataset, xarray.DataArray or array_like
        :func:`numpyro_mpe.loo.predictive.loo_pit` output (its calibration attrs are reused when its band
        level is ``prob``), or PIT values.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; ``None`` creates a figure.
    prob : float, default 0.95
        Simultaneous coverage of the band.
    seed : int, default 0
        Seed of the band's simulations.

    Returns
    -------
    matplotlib.axes.Axes
        PIT value on x, ECDF difference on y; the legend gives the test's p-value and outcome.

    Examples
    --------
    >>> import numpy as np
    >>> from numpyro_mpe.io.plots import plot_loo_pit
    >>> ax = plot_loo_pit(np.random.default_rng(0).uniform(size=100))
    >>> ax.get_xlabel()
    'LOO-PIT'
    """
    values, name = _pit_array(pit)
    values = values[np.isfinite(values)]
    attrs = getattr(pit, "attrs", {})
    test = dict(attrs) if attrs.get("band_prob") == prob else pit_calibration(values, prob, seed)
    band = ecdf_band(values.size, prob, seed=seed)
    ax = styled_axes(ax, figsize=(6.0, 4.2))
    ax.fill_between(band.z, band.lower - band.z, band.upper - band.z, step="mid", color=GREY, alpha=0.18,
                    linewidth=0, label=f"{prob:.0%} simultaneous band", gid="band")
    u = np.linspace(0.0, 1.0, CURVE_POINTS)
    verdict = "outside: miscalibrated" if test["ecdf_reject"] else "inside"
    ax.plot(u, ecdf_at(values, u) - u, color=FLAG if test["ecdf_reject"] else BLUE, linewidth=1.6,
            drawstyle="steps-post", gid="ecdf",
            label=f"LOO-PIT ECDF − uniform ({verdict}; p {p_value(test['ecdf_pvalue'])}, "
                  f"KS p {p_value(test['ks_pvalue'])})")
    ax.axhline(0.0, color=GREY, linewidth=0.8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("LOO-PIT")
    ax.set_ylabel("ECDF difference")
    ax.set_title(f"LOO-PIT of '{name}' ({values.size} observations)", fontsize=10)
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return ax


def plot_loo_intervals(interval: Any, y: Any, ax: Any = None, *, mean: Any = None, sort: bool = True):
    """The LOO predictive interval of every observation, with the observation on top.

    Parameters
    ----------
    interval : xarray.DataArray or array_like
        :func:`numpyro_mpe.loo.predictive.loo_predictive_interval` output (``ci_bound`` first), or an
        array (2, N) of lower and upper bounds.
    y : array_like
        The observations (N values, flattened as the interval's observation dims).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; ``None`` creates a figure.
    mean : array_like, optional
        The LOO means (drawn as ticks; observations ordered by them when ``sort``).
    sort : bool, default True
        Order the observations by their interval's midpoint (or mean); else by index.

    Returns
    -------
    matplotlib.axes.Axes
        Observation on x (ordered), value on y; observations outside their interval in magenta.

    Examples
    --------
    >>> import numpy as np
    >>> from numpyro_mpe.io.plots import plot_loo_intervals
    >>> ax = plot_loo_intervals(np.array([[-1.0, 0.0], [1.0, 2.0]]), [0.5, 2.5])
    >>> ax.get_ylabel()
    'y'
    """
    bounds = np.asarray(interval, float).reshape(2, -1)
    lo, hi = bounds
    yv = np.asarray(y, float).ravel()
    centre = (lo + hi) / 2 if mean is None else np.asarray(mean, float).ravel()
    order = np.argsort(centre, kind="stable") if sort else np.arange(yv.size)
    x = np.arange(yv.size)
    outside = (yv[order] < lo[order]) | (yv[order] > hi[order])
    prob = float(getattr(interval, "attrs", {}).get("prob", np.nan))
    ax = styled_axes(ax, figsize=(7.0, 4.2))
    ax.vlines(x, lo[order], hi[order], color=CYAN, linewidth=max(0.6, min(2.5, 250 / max(yv.size, 1))),
              alpha=0.7, gid="intervals",
              label="LOO predictive interval" + ("" if np.isnan(prob) else f" ({prob:.0%})"))
    if mean is not None:
        ax.plot(x, centre[order], "_", color=BLUE, markersize=6, gid="means", label="LOO mean")
    ax.plot(x[~outside], yv[order][~outside], "o", color=BLUE, markersize=3.5, gid="inside", label="y inside")
    ax.plot(x[outside], yv[order][outside], "o", color=FLAG, markersize=4.5, gid="outside",
            label=f"y outside ({int(outside.sum())} of {yv.size})")
    ax.set_xlabel("observation" + (" (by LOO mean)" if sort and mean is not None else
                                   " (by interval midpoint)" if sort else ""))
    ax.set_ylabel(str(getattr(interval, "name", None) or "y"))
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return ax


__all__ = ["p_value", "plot_loo_intervals", "plot_loo_pit"]
