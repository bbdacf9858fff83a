"""Matplotlib figures of the per-observation MPE outputs and their comparison with PSIS-LOO.

Every function draws on ``ax`` (created when ``None``) and returns the axes, as ArviZ's ``plot_*``
functions do.  Inputs are the outputs of the package: :meth:`numpyro_mpe.Fit.sensitivities` (an
``xarray.Dataset``, per observation or, with ``groups=``, per group),
:func:`numpyro_mpe.loo.compare.compare_psis`
(a ``pandas.DataFrame``) and training histories of the VI backends (a table by step).

The look follows ArviZ's ``arviz-doc`` style: no top/right spines, a light grid, the colour-blind
friendly ``arviz-doc`` palette; thresholds are grey dashed lines and flagged observations magenta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Pareto k̂ / leverage threshold above which an observation is flagged (as in ``arviz.loo``).
K_THRESHOLD = 0.7

# arviz-doc palette
_BLUE = "#107591"
_CYAN = "#00c0bf"
_ORANGE = "#f69a48"
_FLAG = "#cf166e"
_GREY = "#525252"
_LIGHT = "0.85"

#: Columns of :func:`numpyro_mpe.loo.compare.compare_psis` that are values, not observation coordinates.
_VALUE_COLUMNS = {
    "elpd_loo_mpe", "elpd_loo_psis", "p_loo_mpe", "p_loo_psis", "pareto_k", "leverage", "sensitivity",
    "lpd", "elpd_loo", "p_loo", "valid", "elpd_diff", "observed", "y",
}


# ---------------------------------------------------------------- helpers
def _new_axes(nrows: int = 1, figsize: tuple[float, float] = (6.0, 4.5), sharex: bool = False):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, 1, figsize=figsize, sharex=sharex, layout="constrained")
    return axes


def _style(ax) -> None:
    """The ``arviz-doc`` look on one axes: no top/right spines, light grid behind the data."""
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("0.33")
        ax.spines[side].set_linewidth(0.8)
    ax.set_axisbelow(True)
    ax.grid(True, color=_LIGHT, linewidth=0.6)
    ax.tick_params(colors="0.15", direction="out")


def _to_frame(data: Any, columns: Sequence[str]) -> pd.DataFrame:
    """``columns`` of a DataFrame or an ``xarray.Dataset`` as a DataFrame, one row per observation."""
    if isinstance(data, pd.DataFrame):
        frame = data
    elif hasattr(data, "data_vars"):  # xarray.Dataset
        missing = [c for c in columns if c not in data.data_vars]
        if missing:
            raise ValueError(f"the dataset has no variable(s) {missing}; expected fit.sensitivities()")
        frame = data[list(columns)].to_dataframe()
        frame = frame.reset_index()
    else:
        raise TypeError(f"expected a pandas.DataFrame or an xarray.Dataset, got {type(data).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column(s) {missing}; got {list(frame.columns)}")
    return frame


def _obs_labels(frame: pd.DataFrame) -> list[str]:
    """One label per row: the observation coordinate columns (``"3"``, ``"2,5"``), else the index."""
    coords = [c for c in frame.columns if c not in _VALUE_COLUMNS and not str(c).startswith("_")]
    coords = [c for c in coords if not pd.api.types.is_float_dtype(frame[c])]
    if coords:
        return [",".join(str(v) for v in row) for row in frame[coords].itertuples(index=False)]
    return [str(i) for i in frame.index]


def _top(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the ``n`` largest finite values, largest first."""
    finite = np.flatnonzero(np.isfinite(values))
    if n <= 0 or finite.size == 0:
        return np.array([], dtype=int)
    order = finite[np.argsort(values[finite])[::-1]]
    return order[:n]


class _Labels:
    """Observation labels placed next to their points, avoiding each other and the points.

    Labels are collected with :meth:`add` and drawn by :meth:`place` once the axes limits are final: each
    takes the first of eight positions around its point (upper right first) whose estimated text box
    overlaps no label placed before it and no data point; ``pad`` (points) clears the point's marker.
    """

    _DIRECTIONS = ((1, 0.75, "left", "bottom"), (-1, 0.75, "right", "bottom"), (1, -0.75, "left", "top"),
                   (-1, -0.75, "right", "top"), (1.4, 0, "left", "center"), (-1.4, 0, "right", "center"),
                   (0, 1.4, "center", "bottom"), (0, -1.4, "center", "top"))

    def __init__(self) -> None:
        self.items: list[tuple[float, float, str, str, float]] = []

    def add(self, x: float, y: float, text: str, color: str = "0.15", pad: float = 4.0) -> None:
        if np.isfinite(x) and np.isfinite(y) and all(it[2] != text for it in self.items):
            self.items.append((float(x), float(y), text, color, float(pad)))

    def place(self, ax, avoid: tuple[np.ndarray, np.ndarray] | None = None, fontsize: float = 9.0) -> None:
        """Draw the labels on ``ax``, keeping clear of the data points ``avoid = (x, y)`` too."""
        if not self.items:
            return
        ax.apply_aspect()
        px = ax.figure.dpi / 72.0  # pixels per point
        pts = ax.transData.transform([(x, y) for x, y, *_ in self.items])
        obstacles = pts
        if avoid is not None:
            ax_, ay_ = (np.asarray(a, float).ravel() for a in avoid)
            ok = np.isfinite(ax_) & np.isfinite(ay_)
            obstacles = np.concatenate([pts, ax.transData.transform(np.c_[ax_[ok], ay_[ok]])])
        boxes: list[tuple[float, float, float, float]] = []
        for (x, y, text, color, pad), (X, Y) in zip(self.items, pts):
            w, h = 0.62 * fontsize * len(text) * px, 1.1 * fontsize * px
            offsets = [(dx * pad, dy * pad, ha, va) for dx, dy, ha, va in self._DIRECTIONS]
            choice = offsets[0]
            for off in offsets:
                box = self._box(X, Y, off, w, h, px)
                hits_label = any(self._overlap(box, b) for b in boxes)
                m = 2 * px  # a point's marker radius, roughly
                ox, oy = obstacles[:, 0], obstacles[:, 1]
                hits_point = bool(np.any((box[0] - m < ox) & (ox < box[2] + m)
                                         & (box[1] - m < oy) & (oy < box[3] + m)))
                if not hits_label and not hits_point:
                    choice = off
                    break
            boxes.append(self._box(X, Y, choice, w, h, px))
            dx, dy, ha, va = choice
            ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                        fontsize=fontsize, color=color, gid="obs_label")

    @staticmethod
    def _box(X, Y, off, w, h, px):
        dx, dy, ha, va = off
        x0 = X + dx * px - {"left": 0.0, "center": w / 2, "right": w}[ha]
        y0 = Y + dy * px - {"bottom": 0.0, "center": h / 2, "top": h}[va]
        return (x0, y0, x0 + w, y0 + h)

    @staticmethod
    def _overlap(a, b) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _identity_line(ax, lo: float, hi: float) -> None:
    pad = 0.05 * (hi - lo if hi > lo else 1.0)
    lo, hi = lo - pad, hi + pad
    ax.plot([lo, hi], [lo, hi], color=_GREY, linestyle="-", linewidth=1.0, alpha=0.7, zorder=1,
            label="y = x", gid="identity")


# ---------------------------------------------------------------- figures
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
    >>> import jax, numpyro
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_model, STACKLOSS_PREDICTORS
    >>> from numpyro_mpe.io.plots import plot_sensitivity
    >>> numpyro.enable_x64()
    >>> df = load_stackloss()
    >>> X, y = df[list(STACKLOSS_PREDICTORS)].to_numpy(float), df["stack.loss"].to_numpy(float)
    >>> fit = mpe.Laplace(stackloss_model, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    >>> axes = plot_sensitivity(fit.sensitivities())
    >>> [a.get_ylabel() for a in axes]
    ['sensitivity (posterior sd)', 'leverage']
    """
    frame = _to_frame(ds, ["sensitivity", "leverage"])
    sens = frame["sensitivity"].to_numpy(float)
    lev = frame["leverage"].to_numpy(float)
    labels = _obs_labels(frame)
    x = np.arange(len(frame))

    twin = False
    if ax is None:
        ax_s, ax_l = _new_axes(2, figsize=(7.0, 5.5), sharex=True)
    elif isinstance(ax, (Sequence, np.ndarray)):
        if len(ax) != 2:
            raise ValueError(f"ax must be one Axes or two, got {len(ax)}")
        ax_s, ax_l = ax
    else:
        ax_s, ax_l, twin = ax, ax.twinx(), True
    for a in (ax_s, ax_l):
        _style(a)
    if twin:
        ax_l.spines["right"].set_visible(True)
        ax_l.grid(False)

    ok = np.isfinite(sens)
    markerline, stemlines, baseline = ax_s.stem(x[ok], sens[ok], linefmt=_BLUE, markerfmt="o",
                                                basefmt=" ", label="sensitivity")
    markerline.set_color(_BLUE)
    markerline.set_markersize(5)
    stemlines.set_linewidth(1.2)
    if (~ok).any():
        ax_s.plot(x[~ok], np.zeros((~ok).sum()), "x", color=_FLAG, markersize=7, mew=1.5,
                  label="no cavity (leverage ≥ 1)", gid="invalid")
    ax_s.set_ylabel("sensitivity (posterior sd)")
    ax_s.set_ylim(bottom=0)
    labels_s, labels_l = _Labels(), _Labels()
    for i in _top(sens, top):
        labels_s.add(x[i], sens[i], labels[i])

    flag = lev > threshold
    ax_l.scatter(x[~flag], lev[~flag], s=22, color=_CYAN if twin else _BLUE, zorder=3, label="leverage",
                 marker="D" if twin else "o")
    if flag.any():
        ax_l.scatter(x[flag], lev[flag], s=32, color=_FLAG, zorder=3, marker="D" if twin else "o",
                     label=f"leverage > {threshold:g}")
    ax_l.axhline(threshold, color=_GREY, linestyle="--", linewidth=1.0, label=f"{threshold:g}",
                 gid="threshold")
    ax_l.set_ylabel("leverage")
    lev_finite = lev[np.isfinite(lev)]
    ax_l.set_ylim(min(0.0, float(lev_finite.min(initial=0.0))) - 0.02,
                  max(1.0, float(lev_finite.max(initial=1.0))) * 1.05)
    if not twin:
        ax_l.text(1.0, threshold, f" {threshold:g}", transform=ax_l.get_yaxis_transform(), va="center",
                  ha="left", fontsize=9, color=_GREY, clip_on=False)
    for i in np.flatnonzero(flag):
        labels_l.add(x[i], lev[i], labels[i], color=_FLAG)
    for i in _top(np.where(flag, -np.inf, lev), max(0, top - int(flag.sum()))):
        labels_l.add(x[i], lev[i], labels[i])

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
        Axes to draw on; ``None`` creates a figure.
    threshold : float, default 0.7
        Pareto k̂ flag.
    top : int, default 3
        Number of unflagged observations with the largest ``|elpd_loo_mpe − elpd_loo_psis|`` to label.
    cmap : str, default "viridis"
        Colormap of k̂ (from ``min(0, k̂)`` to ``max(1, k̂)``).

    Returns
    -------
    matplotlib.axes.Axes

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
    frame = _to_frame(df, ["elpd_loo_mpe", "elpd_loo_psis", "pareto_k"])
    mpe_ = frame["elpd_loo_mpe"].to_numpy(float)
    psis = frame["elpd_loo_psis"].to_numpy(float)
    k = frame["pareto_k"].to_numpy(float)
    labels = _obs_labels(frame)
    if ax is None:
        ax = _new_axes(1, figsize=(6.0, 5.0))
    _style(ax)
    ok = np.isfinite(mpe_) & np.isfinite(psis)
    both = np.concatenate([mpe_[ok], psis[ok]])
    if both.size:
        _identity_line(ax, float(both.min()), float(both.max()))
    kf = k[np.isfinite(k)]
    vmin, vmax = min(0.0, float(kf.min(initial=0.0))), max(1.0, float(kf.max(initial=1.0)))
    flag = ok & (k > threshold)
    calm = ok & ~flag
    sc = ax.scatter(psis[calm], mpe_[calm], c=k[calm], cmap=cmap, vmin=vmin, vmax=vmax, s=30,
                    edgecolors="white", linewidths=0.5, zorder=3, label=f"k̂ ≤ {threshold:g}")
    if flag.any():
        sc = ax.scatter(psis[flag], mpe_[flag], c=k[flag], cmap=cmap, vmin=vmin, vmax=vmax, s=70,
                        edgecolors=_FLAG, linewidths=1.8, zorder=4, label=f"k̂ > {threshold:g}",
                        gid="flagged")
    obs_labels = _Labels()
    for i in np.flatnonzero(flag):
        obs_labels.add(psis[i], mpe_[i], labels[i], color=_FLAG, pad=7.0)
    for i in _top(np.where(calm, np.abs(mpe_ - psis), -np.inf), top):
        obs_labels.add(psis[i], mpe_[i], labels[i])
    cbar = ax.figure.colorbar(sc, ax=ax, pad=0.02, fraction=0.05)
    cbar.set_label("PSIS Pareto k̂")
    cbar.ax.axhline(threshold, color=_FLAG, linewidth=1.5)
    cbar.outline.set_visible(False)
    if (~ok).any():
        ax.text(0.98, 0.02, f"{int((~ok).sum())} observation(s) without an MPE cavity not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=8, color=_GREY)
    ax.set_xlabel("elpd_loo (PSIS-LOO)")
    ax.set_ylabel("elpd_loo (MPE)")
    ax.set_aspect("equal", adjustable="datalim")
    from matplotlib.lines import Line2D

    mid = sc.cmap(sc.norm(0.5 * (vmin + threshold)))
    handles = [
        Line2D([], [], color=_GREY, linewidth=1.0, alpha=0.7, label="y = x"),
        Line2D([], [], linestyle="", marker="o", markersize=6, markerfacecolor=mid,
               markeredgecolor="white", label=f"k̂ ≤ {threshold:g}"),
        Line2D([], [], linestyle="", marker="o", markersize=8.5, markerfacecolor=mid,
               markeredgecolor=_FLAG, markeredgewidth=1.8, label=f"k̂ > {threshold:g} (PSIS unreliable)"),
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=9, frameon=False)
    ax.set_title("Pointwise elpd_loo: MPE vs PSIS", fontsize=11, loc="left")
    obs_labels.place(ax, avoid=(psis, mpe_))
    return ax


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
        Axes to draw on; ``None`` creates a figure.
    threshold : float, default 0.7
        Flag on both diagnostics.
    top : int, default 3
        Number of largest k̂ labelled when below the thresholds.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.plots import plot_leverage_vs_k
    >>> df = pd.DataFrame({"obs": [0, 1, 2], "leverage": [0.1, 0.3, 0.69], "pareto_k": [0.05, 0.4, 0.8]})
    >>> ax = plot_leverage_vs_k(df)
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('MPE leverage', 'PSIS Pareto k̂')
    """
    frame = _to_frame(df, ["leverage", "pareto_k"])
    lev = frame["leverage"].to_numpy(float)
    k = frame["pareto_k"].to_numpy(float)
    labels = _obs_labels(frame)
    if ax is None:
        ax = _new_axes(1, figsize=(5.5, 5.0))
    _style(ax)
    ok = np.isfinite(lev) & np.isfinite(k)
    vals = np.concatenate([lev[ok], k[ok], [0.0, threshold]])
    lo, hi = float(vals.min()), max(1.0, float(vals.max()))
    _identity_line(ax, lo, hi)
    ax.axvline(threshold, color=_GREY, linestyle="--", linewidth=1.0, gid="threshold_x",
               label=f"threshold {threshold:g}")
    ax.axhline(threshold, color=_GREY, linestyle="--", linewidth=1.0, gid="threshold_y")
    flag = ok & ((lev > threshold) | (k > threshold))
    calm = ok & ~flag
    ax.scatter(lev[calm], k[calm], s=30, color=_BLUE, edgecolors="white", linewidths=0.5, zorder=3,
               label="observation")
    if flag.any():
        ax.scatter(lev[flag], k[flag], s=45, color=_FLAG, edgecolors="white", linewidths=0.5, zorder=4,
                   label=f"leverage or k̂ > {threshold:g}", gid="flagged")
    obs_labels = _Labels()
    for i in np.flatnonzero(flag):
        obs_labels.add(lev[i], k[i], labels[i], color=_FLAG)
    for i in _top(np.where(flag | ~ok, -np.inf, k), top):
        obs_labels.add(lev[i], k[i], labels[i])
    pad = 0.05 * (hi - lo)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("MPE leverage")
    ax.set_ylabel("PSIS Pareto k̂")
    ax.legend(loc="upper left", fontsize=9, frameon=False)
    ax.set_title("Leverage vs Pareto k̂", fontsize=11, loc="left")
    obs_labels.place(ax, avoid=(lev, k))
    return ax


#: Variables of the group Dataset that :func:`plot_groups` draws (``Fit.sensitivities(groups=...)``).
GROUP_VARIABLES = ("lpd", "elpd_loo", "sensitivity", "leverage")


def plot_groups(group_ds: Any, ax: Any = None, *, threshold: float = K_THRESHOLD, sort: bool = False):
    """Leave-group-out by group: group ``elpd_loo``, ``sensitivity`` and ``leverage`` side by side.

    One row per group, the groups on a shared vertical axis labelled with their coordinate and size.
    Left: the group's joint predictive density ``lpd`` (hollow) and its MPE leave-group-out estimate
    ``elpd_loo`` (filled), joined by a segment of length ``p_loo`` — the further apart, the more the fit
    relies on the group to predict it.  Middle: the ``sensitivity``, how far the posterior mean moves (in
    posterior sd) if the whole group is removed.  Right: the group ``leverage`` with a dashed line at
    ``threshold``; groups above it are magenta, and groups whose removal leaves no valid Gaussian cavity
    (``valid`` False, leverage ≥ 1) are marked with a cross on the left two panels.

    Parameters
    ----------
    group_ds : xarray.Dataset
        :meth:`numpyro_mpe.Fit.sensitivities` with ``groups=...``: variables ``lpd``, ``elpd_loo``,
        ``p_loo``, ``sensitivity``, ``leverage``, ``valid`` and ``size`` over one group dimension (its
        coordinate gives the labels).  ``valid``, ``p_loo`` and ``size`` are optional.
    ax : sequence of three matplotlib.axes.Axes, optional
        Axes for the three panels, left to right; ``None`` creates a figure with three panels sharing
        the vertical axis.
    threshold : float, default 0.7
        Leverage flag line.
    sort : bool, default False
        Order the groups by sensitivity (largest at the top) instead of their order in ``group_ds``.

    Returns
    -------
    numpy.ndarray of matplotlib.axes.Axes
        ``[ax_elpd, ax_sensitivity, ax_leverage]``.

    Examples
    --------
    >>> import numpy as np, xarray as xr
    >>> from numpyro_mpe.io.plots import plot_groups
    >>> ds = xr.Dataset(
    ...     {"lpd": ("firm", [-50.1, -61.0, -48.3]), "elpd_loo": ("firm", [-55.2, -70.4, -49.0]),
    ...      "p_loo": ("firm", [5.1, 9.4, 0.7]), "sensitivity": ("firm", [1.2, 3.4, 0.4]),
    ...      "leverage": ("firm", [0.35, 0.81, 0.12]), "valid": ("firm", [True, True, True]),
    ...      "size": ("firm", [20, 20, 20])},
    ...     coords={"firm": ["GM", "US Steel", "GE"]})
    >>> axes = plot_groups(ds)
    >>> [a.get_xlabel() for a in axes]
    ['group elpd (log density)', 'sensitivity (posterior sd)', 'leverage']
    """
    if not hasattr(group_ds, "data_vars"):
        raise TypeError(f"expected an xarray.Dataset (fit.sensitivities(groups=...)), got "
                        f"{type(group_ds).__name__}")
    missing = [v for v in GROUP_VARIABLES if v not in group_ds.data_vars]
    if missing:
        raise ValueError(f"the group dataset has no variable(s) {missing}; expected "
                         "fit.sensitivities(groups=...)")
    dims = {d for v in GROUP_VARIABLES for d in group_ds[v].dims}
    if len(dims) != 1:
        raise ValueError(f"expected one group dimension, got dims {sorted(dims)}")
    (dim,) = dims
    n = int(group_ds.sizes[dim])

    def values(name, default):
        if name in group_ds.data_vars:
            return np.asarray(group_ds[name].values).reshape(n)
        return np.full(n, default)

    lpd = values("lpd", np.nan).astype(float)
    elpd = values("elpd_loo", np.nan).astype(float)
    sens = values("sensitivity", np.nan).astype(float)
    lev = values("leverage", np.nan).astype(float)
    valid = values("valid", True).astype(bool) & np.isfinite(elpd) & np.isfinite(sens)
    size = values("size", -1)
    names = [str(v) for v in (group_ds[dim].values if dim in group_ds.coords else range(n))]
    labels = [f"{g}  (n={int(s)})" if int(s) >= 0 else g for g, s in zip(names, size)]

    order = np.arange(n)
    if sort:
        order = np.argsort(-np.nan_to_num(sens, nan=np.inf), kind="stable")
    pos = np.empty(n)
    pos[order] = np.arange(n)[::-1]  # the first group (in the chosen order) at the top

    if ax is None:
        import matplotlib.pyplot as plt

        height = max(2.8, 0.3 * n + 1.5)
        fig, axes = plt.subplots(1, 3, figsize=(10.0, height), sharey=True, layout="constrained",
                                 gridspec_kw={"width_ratios": [1.3, 1.0, 1.0]})
        ax_e, ax_s, ax_l = axes
    else:
        if isinstance(ax, (Sequence, np.ndarray)) and len(ax) == 3:
            ax_e, ax_s, ax_l = ax
        else:
            raise ValueError("ax must be a sequence of three Axes (elpd, sensitivity, leverage)")
    for a in (ax_e, ax_s, ax_l):
        _style(a)
        a.grid(False, axis="y")

    # elpd: lpd (hollow) -> elpd_loo (filled); the segment is p_loo
    fin = np.isfinite(lpd) & np.isfinite(elpd)
    ax_e.hlines(pos[fin], elpd[fin], lpd[fin], color=_GREY, linewidth=1.0, alpha=0.6, zorder=2)
    ok_l = np.isfinite(lpd)
    ax_e.scatter(lpd[ok_l], pos[ok_l], s=32, facecolors="white", edgecolors=_BLUE, linewidths=1.2,
                 zorder=3, label="lpd (all data)", gid="lpd")
    ax_e.scatter(elpd[valid], pos[valid], s=32, color=_BLUE, zorder=4, label="elpd_loo (group left out)",
                 gid="elpd_loo")
    if (~valid).any():
        xs = np.where(np.isfinite(lpd), lpd, 0.0)[~valid]
        ax_e.plot(xs, pos[~valid], "x", color=_FLAG, markersize=8, mew=1.6, zorder=5,
                  label="no cavity (leverage ≥ 1)", gid="invalid")
    ax_e.set_xlabel("group elpd (log density)")
    if ax is None:  # our own figure: one legend under the panels, clear of the data
        handles, texts = ax_e.get_legend_handles_labels()
        ax_e.figure.legend(handles, texts, loc="outside lower center", ncol=len(texts), fontsize=8.5,
                           frameon=False)
    else:
        ax_e.legend(loc="best", fontsize=8, frameon=False)
    ax_e.set_title("Group predictive density", fontsize=11, loc="left")

    # sensitivity: lollipops from 0
    ax_s.hlines(pos[valid], 0.0, sens[valid], color=_BLUE, linewidth=1.6, zorder=2)
    ax_s.scatter(sens[valid], pos[valid], s=28, color=_BLUE, zorder=3, gid="sensitivity")
    if (~valid).any():
        ax_s.plot(np.zeros((~valid).sum()), pos[~valid], "x", color=_FLAG, markersize=8, mew=1.6, zorder=5,
                  gid="invalid")
    ax_s.set_xlim(left=0.0)
    ax_s.set_xlabel("sensitivity (posterior sd)")
    ax_s.set_title("Shift of the posterior mean", fontsize=11, loc="left")

    # leverage with the threshold
    flag = lev > threshold
    ok = np.isfinite(lev)
    ax_l.scatter(lev[ok & ~flag], pos[ok & ~flag], s=30, color=_BLUE, zorder=3, label="leverage",
                 gid="leverage")
    if flag.any():
        ax_l.scatter(lev[flag], pos[flag], s=40, color=_FLAG, zorder=4, label=f"leverage > {threshold:g}",
                     gid="flagged")
    ax_l.axvline(threshold, color=_GREY, linestyle="--", linewidth=1.0, gid="threshold")
    ax_l.text(threshold, 1.0, f"{threshold:g}", transform=ax_l.get_xaxis_transform(), ha="center",
              va="bottom", fontsize=9, color=_GREY)
    lev_fin = lev[ok]
    ax_l.set_xlim(min(0.0, float(lev_fin.min(initial=0.0))) - 0.02,
                  max(1.0, float(lev_fin.max(initial=1.0))) * 1.05)
    ax_l.set_xlabel("leverage")
    ax_l.set_title("Leverage", fontsize=11, loc="left")

    for a in (ax_e, ax_s, ax_l):
        a.set_ylim(-0.7, n - 0.3)
    if n <= 60:
        ax_e.set_yticks(pos)
        ax_e.set_yticklabels(labels, fontsize=8 if n > 20 else 9)
        if ax is not None:  # axes not sharing y: mark the others' rows too, without text
            for a in (ax_s, ax_l):
                a.set_yticks(pos)
                a.set_yticklabels([])
    ax_e.set_ylabel(str(dim))
    return np.array([ax_e, ax_s, ax_l], dtype=object)


#: Columns of a training history that :func:`plot_training` draws, with their legend labels.
_TRAINING_CURVES = {
    "train_nll": "training NLL",
    "heldout_nll": "held-out NLL",
    "loo_nll": "MPE leave-one-out NLL",
}


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        return history
    if isinstance(history, dict):
        return pd.DataFrame({k: np.asarray(v).reshape(-1) for k, v in history.items()})
    if isinstance(history, Sequence) and history and all(isinstance(r, dict) for r in history):
        return pd.DataFrame(list(history))
    raise TypeError(f"expected a pandas.DataFrame, a dict of columns or a list of records, got "
                    f"{type(history).__name__}")


def plot_training(history: Any, ax: Any = None, *, num_obs: int | None = None):
    """Training curves: the MPE leave-one-out estimate against training and held-out NLL by step.

    The paper's Fig. 1b: during training the MPE estimate of the leave-one-out negative log-likelihood,
    computed from the optimizer's current Gaussian, tracks the held-out NLL, so it can stop training or pick
    hyperparameters without a validation set.  All curves are per-observation averages; the step with the
    lowest value of each of the LOO and held-out curves is marked, and the Spearman rank correlation between
    the two over the common checkpoints is shown.

    Parameters
    ----------
    history : pandas.DataFrame, dict of columns, or list of records
        Columns ``step`` (else the row number is used), ``loo_nll`` or ``elpd_loo_mpe``, and optionally
        ``heldout_nll`` and ``train_nll``; NaN where a column was not recorded at a step (e.g. the LOO
        estimate only every k steps).  ``elpd_loo_mpe`` is the total MPE ``elpd_loo`` over ``num_obs``
        observations and is drawn as ``−elpd_loo_mpe / num_obs``.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; ``None`` creates a figure.
    num_obs : int, optional
        Number of training observations, to put ``elpd_loo_mpe`` on the per-observation NLL scale; else
        ``history.attrs["num_obs"]`` when present.  Without it, ``elpd_loo_mpe`` can only be drawn alone
        (as ``−elpd_loo_mpe``).

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import numpy as np
    >>> from numpyro_mpe.io.plots import plot_training
    >>> steps = np.arange(0, 1000, 100)
    >>> hist = {"step": steps, "train_nll": 0.6 * np.exp(-steps / 300) + 0.20,
    ...         "heldout_nll": 0.5 * np.exp(-steps / 300) + 0.30 + 1e-4 * steps,
    ...         "loo_nll": 0.5 * np.exp(-steps / 300) + 0.28 + 1e-4 * steps}
    >>> ax = plot_training(hist)
    >>> ax.get_xlabel(), ax.get_ylabel()
    ('step', 'negative log-likelihood per observation')
    """
    frame = _history_frame(history)
    if num_obs is None:
        num_obs = getattr(frame, "attrs", {}).get("num_obs")
    steps = frame["step"].to_numpy(float) if "step" in frame.columns else np.arange(len(frame), dtype=float)
    curves: dict[str, tuple[np.ndarray, str]] = {}
    for col in ("train_nll", "heldout_nll"):
        if col in frame.columns:
            curves[col] = (frame[col].to_numpy(float), _TRAINING_CURVES[col])
    ylabel = "negative log-likelihood per observation"
    if "loo_nll" in frame.columns:
        curves["loo_nll"] = (frame["loo_nll"].to_numpy(float), _TRAINING_CURVES["loo_nll"])
    elif "elpd_loo_mpe" in frame.columns:
        elpd = frame["elpd_loo_mpe"].to_numpy(float)
        if num_obs is not None:
            curves["loo_nll"] = (-elpd / float(num_obs), _TRAINING_CURVES["loo_nll"])
        elif curves:
            raise ValueError(
                "elpd_loo_mpe is a total over the observations and the other curves are per-observation "
                "NLLs: pass num_obs= (or history.attrs['num_obs']) to draw them on one scale, or give loo_nll"
            )
        else:
            curves["loo_nll"] = (-elpd, "−elpd_loo (MPE)")
            ylabel = "−elpd_loo (MPE)"
    else:
        raise ValueError(f"the history needs a loo_nll or elpd_loo_mpe column; got {list(frame.columns)}")

    if ax is None:
        ax = _new_axes(1, figsize=(6.5, 4.2))
    _style(ax)
    styles = {"train_nll": dict(color=_GREY, linewidth=1.2, alpha=0.8),
              "heldout_nll": dict(color=_ORANGE, linewidth=1.8),
              "loo_nll": dict(color=_BLUE, linewidth=1.8, marker="o", markersize=3.5)}
    best_marker = {"heldout_nll": _ORANGE, "loo_nll": _BLUE}
    for name, (vals, label) in curves.items():
        ok = np.isfinite(vals) & np.isfinite(steps)
        ax.plot(steps[ok], vals[ok], label=label, gid=name, **styles[name])
        if name in best_marker and ok.any():
            j = np.flatnonzero(ok)[np.argmin(vals[ok])]
            ax.plot([steps[j]], [vals[j]], linestyle="", marker="*", markersize=12, color=best_marker[name],
                    markeredgecolor="white", zorder=5, gid=f"best_{name}")
    if "heldout_nll" in curves:
        a, b = curves["loo_nll"][0], curves["heldout_nll"][0]
        both = np.isfinite(a) & np.isfinite(b)
        if both.sum() >= 3:
            rho = float(pd.Series(a[both]).corr(pd.Series(b[both]), method="spearman"))
            ax.text(0.98, 0.97, f"Spearman ρ(LOO, held-out) = {rho:.2f}  ({int(both.sum())} checkpoints)",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8.5, color=_GREY,
                    gid="spearman")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.92), fontsize=9, frameon=False)
    ax.set_title("Training: MPE leave-one-out vs held-out NLL", fontsize=11, loc="left")
    return ax





def plot_tuning(table: pd.DataFrame, ax: Any = None, *, logx: bool | None = None):
    """The tuning curves of :func:`tune_prior`: MPE LOO-NLL, held-out NLL and brute-force LOO by value.

    All curves are per-observation negative log predictive densities: −elpd_loo / N for the MPE (line,
    with ±SE/N band), the held-out NLL (line), and −elpd_loo_exact / N at the ``exact_at`` values (diamonds;
    over the subset size when ``exact_indices`` was a subset).  Stars mark the value picked by each curve.

    Parameters
    ----------
    table : pandas.DataFrame
        The result of :func:`tune_prior`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; ``None`` creates a figure.
    logx : bool, optional
        Log-scale x axis; default when all values are positive and span more than a factor 10.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.plots import plot_tuning
    >>> t = pd.DataFrame({"value": [0.1, 1.0, 10.0], "elpd_loo": [-30.0, -25.0, -27.0], "se": [3.0] * 3,
    ...                   "heldout_nll": [0.9, 0.8, 0.85]})
    >>> t.attrs.update(num_obs=30, arg_name="prior_scale")
    >>> ax = plot_tuning(t)
    >>> ax.get_xscale()
    'log'
    """
    n = table.attrs.get("num_obs") or 1
    x = table["value"].to_numpy(float)
    if logx is None:
        logx = bool(np.all(x > 0) and x.max() / x.min() > 10)
    if ax is None:
        ax = _new_axes(1, figsize=(6.5, 4.2))
    _style(ax)
    loo = -table["elpd_loo"].to_numpy(float) / n
    ax.plot(x, loo, color=_BLUE, marker="o", markersize=4, linewidth=1.8, label="MPE leave-one-out NLL",
            gid="loo_nll")
    if "se" in table:
        se = table["se"].to_numpy(float) / n
        ax.fill_between(x, loo - se, loo + se, color=_BLUE, alpha=0.12, linewidth=0)
    j = int(np.nanargmin(loo))
    ax.plot([x[j]], [loo[j]], linestyle="", marker="*", markersize=13, color=_BLUE, markeredgecolor="white",
            zorder=5, gid="best_loo")
    if "heldout_nll" in table and table["heldout_nll"].notna().any():
        h = table["heldout_nll"].to_numpy(float)
        ax.plot(x, h, color=_ORANGE, marker="s", markersize=3.5, linewidth=1.8, label="held-out NLL",
                gid="heldout_nll")
        k = int(np.nanargmin(h))
        ax.plot([x[k]], [h[k]], linestyle="", marker="*", markersize=13, color=_ORANGE,
                markeredgecolor="white", zorder=5, gid="best_heldout")
    if "elpd_loo_exact" in table and table["elpd_loo_exact"].notna().any():
        idx = table.attrs.get("exact_indices")
        m = n if not idx else len(idx)
        ex = -table["elpd_loo_exact"].to_numpy(float) / m
        ok = np.isfinite(ex)
        ax.plot(x[ok], ex[ok], linestyle="", marker="D", markersize=7, markerfacecolor="none",
                markeredgecolor=_GREY, markeredgewidth=1.5, label="brute-force LOO (refits)", gid="exact")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(table.attrs.get("arg_name") or "value")
    ax.set_ylabel("negative log predictive density per observation")
    ax.legend(fontsize=9, frameon=False)
    ax.set_title("Hyperparameter selection by MPE leave-one-out", fontsize=11, loc="left")
    return ax


__all__ = ["K_THRESHOLD", "plot_elpd_comparison", "plot_groups", "plot_leverage_vs_k", "plot_sensitivity",
           "plot_tuning", "plot_training"]
