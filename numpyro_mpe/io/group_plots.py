"""The figure of leave-group-out: :func:`plot_groups`, from ``Fit.sensitivities(groups=...)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from numpyro_mpe.io.style import BLUE, FLAG, GREY, K_THRESHOLD, leverage_limits, style_axes, threshold_line

#: Variables of the group Dataset that :func:`plot_groups` draws (``Fit.sensitivities(groups=...)``).
GROUP_VARIABLES = ("lpd", "elpd_loo", "sensitivity", "leverage")


@dataclass
class _Groups:
    """The variables of a group Dataset as arrays over the groups, and their row labels."""

    dim: str
    lpd: np.ndarray
    elpd: np.ndarray
    sens: np.ndarray
    lev: np.ndarray
    valid: np.ndarray
    labels: list[str]

    @classmethod
    def read(cls, group_ds: Any) -> _Groups:
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

        elpd = values("elpd_loo", np.nan).astype(float)
        sens = values("sensitivity", np.nan).astype(float)
        names = [str(v) for v in (group_ds[dim].values if dim in group_ds.coords else range(n))]
        labels = [f"{g}  (n={int(s)})" if int(s) >= 0 else g for g, s in zip(names, values("size", -1))]
        valid = values("valid", True).astype(bool) & np.isfinite(elpd) & np.isfinite(sens)
        return cls(dim, values("lpd", np.nan).astype(float), elpd, sens,
                   values("leverage", np.nan).astype(float), valid, labels)


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
    g = _Groups.read(group_ds)
    n = len(g.labels)
    order = np.argsort(-np.nan_to_num(g.sens, nan=np.inf), kind="stable") if sort else np.arange(n)
    pos = np.empty(n)
    pos[order] = np.arange(n)[::-1]  # the first group (in the chosen order) at the top
    ax_e, ax_s, ax_l = _group_axes(ax, n)
    _draw_elpd(ax_e, g, pos, own_figure=ax is None)
    _draw_sensitivity(ax_s, g, pos)
    _draw_leverage(ax_l, g, pos, threshold)
    for a in (ax_e, ax_s, ax_l):
        a.set_ylim(-0.7, n - 0.3)
    if n <= 60:
        ax_e.set_yticks(pos)
        ax_e.set_yticklabels(g.labels, fontsize=8 if n > 20 else 9)
        if ax is not None:  # axes not sharing y: mark the others' rows too, without text
            for a in (ax_s, ax_l):
                a.set_yticks(pos)
                a.set_yticklabels([])
    ax_e.set_ylabel(str(g.dim))
    return np.array([ax_e, ax_s, ax_l], dtype=object)


def _group_axes(ax: Any, n: int) -> tuple:
    """The three styled panels of :func:`plot_groups`: ``ax``, or a new figure sized for ``n`` rows."""
    if ax is None:
        import matplotlib.pyplot as plt

        height = max(2.8, 0.3 * n + 1.5)
        _, axes = plt.subplots(1, 3, figsize=(10.0, height), sharey=True, layout="constrained",
                               gridspec_kw={"width_ratios": [1.3, 1.0, 1.0]})
    elif isinstance(ax, (Sequence, np.ndarray)) and len(ax) == 3:
        axes = ax
    else:
        raise ValueError("ax must be a sequence of three Axes (elpd, sensitivity, leverage)")
    for a in axes:
        style_axes(a)
        a.grid(False, axis="y")
    return tuple(axes)


def _cross_invalid(ax, x: np.ndarray, y: np.ndarray, **kwargs) -> None:
    """Crosses at ``(x, y)`` for the groups without a cavity."""
    ax.plot(x, y, "x", color=FLAG, markersize=8, mew=1.6, zorder=5, gid="invalid", **kwargs)


def _draw_elpd(ax, g: _Groups, pos: np.ndarray, own_figure: bool) -> None:
    """lpd (hollow) -> elpd_loo (filled); the segment between them is p_loo."""
    fin = np.isfinite(g.lpd) & np.isfinite(g.elpd)
    ax.hlines(pos[fin], g.elpd[fin], g.lpd[fin], color=GREY, linewidth=1.0, alpha=0.6, zorder=2)
    ok_l = np.isfinite(g.lpd)
    ax.scatter(g.lpd[ok_l], pos[ok_l], s=32, facecolors="white", edgecolors=BLUE, linewidths=1.2,
               zorder=3, label="lpd (all data)", gid="lpd")
    ax.scatter(g.elpd[g.valid], pos[g.valid], s=32, color=BLUE, zorder=4, label="elpd_loo (group left out)",
               gid="elpd_loo")
    if (~g.valid).any():
        _cross_invalid(ax, np.where(np.isfinite(g.lpd), g.lpd, 0.0)[~g.valid], pos[~g.valid],
                       label="no cavity (leverage ≥ 1)")
    ax.set_xlabel("group elpd (log density)")
    if own_figure:  # one legend under the panels, clear of the data
        handles, texts = ax.get_legend_handles_labels()
        ax.figure.legend(handles, texts, loc="outside lower center", ncol=len(texts), fontsize=8.5,
                         frameon=False)
    else:
        ax.legend(loc="best", fontsize=8, frameon=False)
    ax.set_title("Group predictive density", fontsize=11, loc="left")


def _draw_sensitivity(ax, g: _Groups, pos: np.ndarray) -> None:
    """Lollipops from 0 for the valid groups, crosses at 0 for the others."""
    ax.hlines(pos[g.valid], 0.0, g.sens[g.valid], color=BLUE, linewidth=1.6, zorder=2)
    ax.scatter(g.sens[g.valid], pos[g.valid], s=28, color=BLUE, zorder=3, gid="sensitivity")
    if (~g.valid).any():
        _cross_invalid(ax, np.zeros((~g.valid).sum()), pos[~g.valid])
    ax.set_xlim(left=0.0)
    ax.set_xlabel("sensitivity (posterior sd)")
    ax.set_title("Shift of the posterior mean", fontsize=11, loc="left")


def _draw_leverage(ax, g: _Groups, pos: np.ndarray, threshold: float) -> None:
    """Group leverages (flagged ones magenta) with the threshold line."""
    flag = g.lev > threshold
    ok = np.isfinite(g.lev)
    ax.scatter(g.lev[ok & ~flag], pos[ok & ~flag], s=30, color=BLUE, zorder=3, label="leverage",
               gid="leverage")
    if flag.any():
        ax.scatter(g.lev[flag], pos[flag], s=40, color=FLAG, zorder=4, label=f"leverage > {threshold:g}",
                   gid="flagged")
    threshold_line(ax, threshold, vertical=True, gid="threshold")
    ax.text(threshold, 1.0, f"{threshold:g}", transform=ax.get_xaxis_transform(), ha="center",
            va="bottom", fontsize=9, color=GREY)
    ax.set_xlim(*leverage_limits(g.lev))
    ax.set_xlabel("leverage")
    ax.set_title("Leverage", fontsize=11, loc="left")


__all__ = ["GROUP_VARIABLES", "plot_groups"]
