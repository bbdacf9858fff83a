"""Figures of the per-observation MPE outputs and their comparison with PSIS-LOO.

* :func:`plot_sensitivity` — sensitivity and leverage by observation;
* :func:`plot_elpd_comparison` — pointwise ``elpd_loo``, MPE against PSIS-LOO, coloured by Pareto k̂;
* :func:`plot_leverage_vs_k` — leverage against Pareto k̂.

Inputs are :meth:`numpyro_mpe.Fit.sensitivities` (an ``xarray.Dataset``) or
:func:`numpyro_mpe.loo.compare.compare_psis` (a ``pandas.DataFrame``); every function draws on ``ax``
(created when ``None``) and returns the axes, as ArviZ's ``plot_*`` functions do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from numpyro_mpe.io.point_labels import PointLabels, largest, observation_labels
from numpyro_mpe.io.style import (
    BLUE,
    CYAN,
    FLAG,
    GREY,
    K_THRESHOLD,
    leverage_limits,
    new_axes,
    style_axes,
    styled_axes,
    threshold_line,
    unit_range,
)


def _columns(data: Any, columns: Sequence[str]) -> tuple[list[np.ndarray], list[str]]:
    """``columns`` of a DataFrame or an ``xarray.Dataset`` as float arrays (one entry per observation),
    and one label per observation."""
    if isinstance(data, pd.DataFrame):
        frame = data
    elif hasattr(data, "data_vars"):  # xarray.Dataset
        missing = [c for c in columns if c not in data.data_vars]
        if missing:
            raise ValueError(f"the dataset has no variable(s) {missing}; expected fit.sensitivities()")
        frame = data[list(columns)].to_dataframe().reset_index()
    else:
        raise TypeError(f"expected a pandas.DataFrame or an xarray.Dataset, got {type(data).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; got {list(frame.columns)}")
    return [frame[c].to_numpy(float) for c in columns], observation_labels(frame)


def _identity_line(ax, lo: float, hi: float) -> None:
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color=GREY, linestyle="-", linewidth=1.0, alpha=0.7, zorder=1,
            label="y = x", gid="identity")


# ---------------------------------------------------------------- sensitivity and leverage by observation
def plot_sensitivity(ds: Any, ax: Any = None, *, top: int = 3, threshold: float = K_THRESHOLD):
    """Index plot of the MPE ``sensitivity`` and ``leverage`` of every observation.

    The upper panel shows the sensitivity √(Δmᵀ S Δm) — how far the posterior mean moves, in
    posterior standard deviations, if the observation is removed — as stems; the lower panel the
    leverage with a dashed line at ``threshold`` (0.7, the Pareto k̂ threshold of PSIS-LOO: leverage is
    its closed-form twin).  The ``top`` most sensitive observations and every observation above the
    threshold are labelled.  Observations whose cavity does not exist (leverage ≥ 1, sensitivity NaN)
    are marked with a cross at zero on the upper panel.

    Parameters
    ----------
    ds : xarray.Dataset or pandas.DataFrame
        :meth:`numpyro_mpe.Fit.sensitivities` output (or a table with ``sensitivity`` and
        ``leverage`` columns, e.g. :func:`numpyro_mpe.loo.compare.compare_psis`).  Multi-dimensional sites
        are flattened in C order; labels show the coordinates.
    ax : matplotlib.axes.Axes or sequence of two Axes, optional
        Two axes draw the two panels.  A single axes draws both on it, the leverage against a twin
        right-hand axis.  ``None`` creates a figure with two stacked panels sharing the x axis.
    top : int, default 3
        Number of largest sensitivities to label.
    threshold : float, default 0.7
        Leverage flag line.

    Returns
    -------
    numpy.ndarray of matplotlib.axes.Axes
        ``[ax_sensitivity, ax_leverage]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from numpyro_mpe.io.plots import plot_sensitivity
    >>> ds = xr.Dataset({"sensitivity": ("obs", [0.3, 2.4, np.nan]), "leverage": ("obs", [0.1, 0.6, 1.2])})
    >>> axes = plot_sensitivity(ds)
    >>> [a.get_ylabel() for a in axes]
    ['sensitivity (posterior sd)', 'leverage']

    On a fit:

    >>> plot_sensitivity(fit.sensitivities())  # doctest: +SKIP
    """
    (sens, lev), labels = _columns(ds, ["sensitivity", "leverage"])
    x = np.arange(len(sens))
    ax_s, ax_l, twin = _sensitivity_axes(ax)
    labels_s = _draw_sensitivity(ax_s, x, sens, labels, top)
    labels_l = _draw_leverage(ax_l, x, lev, labels, top, threshold, twin)
    ax_l.set_xlabel("observation")
    bottom = ax_s if twin else ax_l
    if len(x) <= 40:
        bottom.set_xticks(x)
        bottom.set_xticklabels(labels, fontsize=8, rotation=90 if max(map(len, labels)) > 3 else 0)
    bottom.set_xlim(-0.7, len(x) - 0.3)
    if twin:
        ax_s.set_xlabel("observation")
        handles = ax_s.get_legend_handles_labels()
        handles2 = ax_l.get_legend_handles_labels()
        ax_s.legend(handles[0] + handles2[0], handles[1] + handles2[1][:-1] + [f"leverage {threshold:g}"],
                    fontsize=8, frameon=False, loc="upper left")
    ax_s.set_title("MPE sensitivity and leverage by observation", fontsize=11, loc="left")
    labels_s.place(ax_s)
    labels_l.place(ax_l, avoid=(x, lev))
    return np.array([ax_s, ax_l], dtype=object)


def _sensitivity_axes(ax: Any) -> tuple[Any, Any, bool]:
    """The two styled panels of :func:`plot_sensitivity`, and whether the leverage is on a twin axis."""
    twin = False
    if ax is None:
        ax_s, ax_l = new_axes(2, figsize=(7.0, 5.5), sharex=True)
    elif isinstance(ax, (Sequence, np.ndarray)):
        if len(ax) != 2:
            raise ValueError(f"ax must be one Axes or two, got {len(ax)}")
        ax_s, ax_l = ax
    else:
        ax_s, ax_l, twin = ax, ax.twinx(), True
    for a in (ax_s, ax_l):
        style_axes(a)
    if twin:
        ax_l.spines["right"].set_visible(True)
        ax_l.grid(False)
    return ax_s, ax_l, twin


def _draw_sensitivity(ax, x: np.ndarray, sens: np.ndarray, labels: list[str], top: int) -> PointLabels:
    """Stems of the finite sensitivities, crosses at zero for the observations without a cavity."""
    ok = np.isfinite(sens)
    markerline, stemlines, _ = ax.stem(x[ok], sens[ok], linefmt=BLUE, markerfmt="o", basefmt=" ",
                                       label="sensitivity")
    markerline.set_color(BLUE)
    markerline.set_markersize(5)
    stemlines.set_linewidth(1.2)
    if (~ok).any():
        ax.plot(x[~ok], np.zeros((~ok).sum()), "x", color=FLAG, markersize=7, mew=1.5,
                label="no cavity (leverage ≥ 1)", gid="invalid")
    ax.set_ylabel("sensitivity (posterior sd)")
    ax.set_ylim(bottom=0)
    point_labels = PointLabels()
    for i in largest(sens, top):
        point_labels.add(x[i], sens[i], labels[i])
    return point_labels


def _draw_leverage(ax, x: np.ndarray, lev: np.ndarray, labels: list[str], top: int, threshold: float,
                   twin: bool) -> PointLabels:
    """Leverage points (flagged ones magenta) and the threshold line."""
    flag = lev > threshold
    marker = "D" if twin else "o"
    ax.scatter(x[~flag], lev[~flag], s=22, color=CYAN if twin else BLUE, zorder=3, label="leverage",
               marker=marker)
    if flag.any():
        ax.scatter(x[flag], lev[flag], s=32, color=FLAG, zorder=3, marker=marker,
                   label=f"leverage > {threshold:g}")
    threshold_line(ax, threshold, label=f"{threshold:g}", gid="threshold")
    ax.set_ylabel("leverage")
    ax.set_ylim(*leverage_limits(lev))
    if not twin:
        ax.text(1.0, threshold, f" {threshold:g}", transform=ax.get_yaxis_transform(), va="center",
                ha="left", fontsize=9, color=GREY, clip_on=False)
    point_labels = PointLabels()
    point_labels.add_flagged_and_top(x, lev, labels, flagged=flag, scores=np.where(flag, -np.inf, lev),
                                     top=max(0, top - int(flag.sum())))
    return point_labels


# ---------------------------------------------------------------- MPE vs PSIS
def plot_elpd_comparison(df: pd.DataFrame, ax: Any = None, *, threshold: float = K_THRESHOLD,
                         top: int = 3, cmap: str = "viridis"):
    """Pointwise ``elpd_loo_mpe`` against ``elpd_loo_psis``, coloured by PSIS's Pareto k̂.

    Points on the grey line y = x agree.  Observations with k̂ > ``threshold`` (where PSIS-LOO is
    unreliable) are drawn larger with a magenta edge and labelled, as are the ``top`` other observations
    farthest from the line; the colour bar marks the threshold.

    Parameters
    ----------
    df : pandas.DataFrame
        :func:`numpyro_mpe.loo.compare.compare_psis` output: columns ``elpd_loo_mpe``, ``elpd_loo_psis``,
        ``pareto_k`` and the observation coordinates.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on, with the k̂ colour bar beside them; ``None`` creates a figure.
    threshold : float, default 0.7
        Pareto k̂ flag.
    top : int, default 3
        Number of unflagged observations with the largest ``|elpd_loo_mpe − elpd_loo_psis|`` to label.
    cmap : str, default "viridis"
        Colormap of k̂ (from ``min(0, k̂)`` to ``max(1, k̂)``).

    Returns
    -------
    matplotlib.axes.Axes
        The axes of the points (not the colour bar's).

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.plots import plot_elpd_comparison
    >>> df = pd.DataFrame({"obs": [0, 1, 2], "elpd_loo_mpe": [-2.1, -2.5, -8.9],
    ...                    "elpd_loo_psis": [-2.0, -2.6, -7.5], "pareto_k": [0.1, 0.3, 0.8]})
    >>> ax = plot_elpd_comparison(df)
    >>> ax.get_xlabel()
    'elpd_loo (PSIS-LOO)'
    """
    (mpe_, psis, k), labels = _columns(df, ["elpd_loo_mpe", "elpd_loo_psis", "pareto_k"])
    ax = styled_axes(ax, figsize=(6.0, 5.0))
    ok = np.isfinite(mpe_) & np.isfinite(psis)
    both = np.concatenate([mpe_[ok], psis[ok]])
    if both.size:
        _identity_line(ax, float(both.min()), float(both.max()))
    vmin, vmax = unit_range(k)
    flag = ok & (k > threshold)
    calm = ok & ~flag
    sc = ax.scatter(psis[calm], mpe_[calm], c=k[calm], cmap=cmap, vmin=vmin, vmax=vmax, s=30,
                    edgecolors="white", linewidths=0.5, zorder=3, label=f"k̂ ≤ {threshold:g}")
    if flag.any():
        sc = ax.scatter(psis[flag], mpe_[flag], c=k[flag], cmap=cmap, vmin=vmin, vmax=vmax, s=70,
                        edgecolors=FLAG, linewidths=1.8, zorder=4, label=f"k̂ > {threshold:g}",
                        gid="flagged")
    point_labels = PointLabels()
    point_labels.add_flagged_and_top(psis, mpe_, labels, flagged=flag, flag_pad=7.0, top=top,
                                     scores=np.where(calm, np.abs(mpe_ - psis), -np.inf))
    cbar = ax.figure.colorbar(sc, ax=ax, pad=0.02, fraction=0.05)
    cbar.set_label("PSIS Pareto k̂")
    cbar.ax.axhline(threshold, color=FLAG, linewidth=1.5)
    cbar.outline.set_visible(False)
    if (~ok).any():
        ax.text(0.98, 0.02, f"{int((~ok).sum())} observation(s) without an MPE cavity not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color=GREY)
    ax.set_xlabel("elpd_loo (PSIS-LOO)")
    ax.set_ylabel("elpd_loo (MPE)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend(handles=_k_legend(sc.cmap(sc.norm(0.5 * (vmin + threshold))), threshold), loc="upper left",
              fontsize=9, frameon=False)
    ax.set_title("Pointwise elpd_loo: MPE vs PSIS", fontsize=11, loc="left")
    point_labels.place(ax, avoid=(psis, mpe_))
    return ax


def _k_legend(color, threshold: float) -> list:
    """Legend entries of :func:`plot_elpd_comparison`: y = x, and a calm and a flagged point of ``color``."""
    from matplotlib.lines import Line2D

    return [
        Line2D([], [], color=GREY, linewidth=1.0, alpha=0.7, label="y = x"),
        Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=color,
               markeredgecolor="white", label=f"k̂ ≤ {threshold:g}"),
        Line2D([], [], linestyle="", marker="o", markersize=8.5, markerfacecolor=color,
               markeredgecolor=FLAG, markeredgewidth=1.8, label=f"k̂ > {threshold:g} (PSIS unreliable)"),
    ]


def plot_leverage_vs_k(df: pd.DataFrame, ax: Any = None, *, threshold: float = K_THRESHOLD,
                       top: int = 3):
    """MPE leverage against PSIS's Pareto k̂, with the threshold on both axes and y = x.

    For a Gaussian posterior and likelihood term, the importance ratios of PSIS-LOO have a Pareto tail
    of shape exactly the leverage; PSIS estimates k̂ from a finite tail (large residuals push it up),
    so expect agreement in rank more than in value.  The quadrants split by the dashed threshold lines
    show where the two diagnostics disagree.  Observations above either threshold, and otherwise the
    ``top`` largest by k̂, are labelled.

    Parameters
    ----------
    df : pandas.DataFrame
        :func:`numpyro_mpe.loo.compare.compare_psis` output: columns ``leverage``, ``pareto_k`` and the
        observation coordinates.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on (made square: both axes share one scale); ``None`` creates a figure.
    threshold : float, default 0.7
        Flag on both diagnostics.
    top : int, default 3
        Number of largest k̂ labelled when below the thresholds.

    Returns
    -------
    matplotlib.axes.Axes
        Leverage on x, k̂ on y, on one scale.

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.plots import plot_leverage_vs_k
    >>> df = pd.DataFrame({"obs": [0, 1, 2], "leverage": [0.1, 0.3, 0.69], "pareto_k": [0.05, 0.4, 0.8]})
    >>> ax = plot_leverage_vs_k(df)
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('MPE leverage', 'PSIS Pareto k̂')
    """
    (lev, k), labels = _columns(df, ["leverage", "pareto_k"])
    ax = styled_axes(ax, figsize=(5.5, 5.0))
    ok = np.isfinite(lev) & np.isfinite(k)
    vals = np.concatenate([lev[ok], k[ok], [0.0, threshold]])
    lo, hi = float(vals.min()), max(1.0, float(vals.max()))
    _identity_line(ax, lo, hi)
    threshold_line(ax, threshold, vertical=True, gid="threshold_x", label=f"threshold {threshold:g}")
    threshold_line(ax, threshold, gid="threshold_y")
    flag = ok & ((lev > threshold) | (k > threshold))
    calm = ok & ~flag
    ax.scatter(lev[calm], k[calm], s=30, color=BLUE, edgecolors="white", linewidths=0.5, zorder=3,
               label="observation")
    if flag.any():
        ax.scatter(lev[flag], k[flag], s=45, color=FLAG, edgecolors="white", linewidths=0.5, zorder=4,
                   label=f"leverage or k̂ > {threshold:g}", gid="flagged")
    point_labels = PointLabels()
    point_labels.add_flagged_and_top(lev, k, labels, flagged=flag, scores=np.where(flag | ~ok, -np.inf, k),
                                     top=top)
    pad = 0.05 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("MPE leverage")
    ax.set_ylabel("PSIS Pareto k̂")
    ax.legend(loc="upper left", fontsize=9, frameon=False)
    ax.set_title("Leverage vs Pareto k̂", fontsize=11, loc="left")
    point_labels.place(ax, avoid=(lev, k))
    return ax


__all__ = ["plot_elpd_comparison", "plot_leverage_vs_k", "plot_sensitivity"]
