"""The look shared by the package's figures and the HTML report: palette, flag threshold, axes styling.

The look follows ArviZ's ``arviz-doc`` style: no top/right spines, a light grid behind the data, the
colour-blind friendly ``arviz-doc`` palette; thresholds are grey dashed lines and flagged observations
magenta.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Pareto k̂ / leverage threshold above which an observation is flagged (as in ``arviz.loo``).
K_THRESHOLD = 0.7

# the arviz-doc palette
#: The data.
BLUE = "#107591"
#: A second series on the same axes (the leverage on a twin axis).
CYAN = "#00c0bf"
#: The held-out curve.
ORANGE = "#f69a48"
#: Flagged observations: above the threshold, or without a Gaussian cavity.
FLAG = "#cf166e"
#: Reference lines and notes: y = x, thresholds, the training curve.
GREY = "#525252"
#: The grid.
LIGHT = "0.85"


def new_axes(nrows: int = 1, figsize: tuple[float, float] = (6.0, 4.5), sharex: bool = False):
    """A new figure with ``nrows`` stacked axes (constrained layout).

    Parameters
    ----------
    nrows : int, default 1
        Number of axes, stacked vertically.
    figsize : tuple of float, default (6.0, 4.5)
        Figure size in inches.
    sharex : bool, default False
        Share the x axis between the axes.

    Returns
    -------
    matplotlib.axes.Axes or numpy.ndarray of Axes
        One axes when ``nrows`` is 1, else an array of them, as :func:`matplotlib.pyplot.subplots`.

    Examples
    --------
    >>> from numpyro_mpe.io.style import new_axes
    >>> top, bottom = new_axes(2, figsize=(7.0, 5.5), sharex=True)
    """
    import matplotlib.pyplot as plt

    _, axes = plt.subplots(nrows, 1, figsize=figsize, sharex=sharex, layout="constrained")
    return axes


def style_axes(ax) -> None:
    """The ``arviz-doc`` look on one axes: no top/right spines, light grid behind the data.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes to style, in place.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from numpyro_mpe.io.style import style_axes
    >>> fig, ax = plt.subplots()
    >>> style_axes(ax)
    >>> ax.spines["top"].get_visible()
    False
    """
    ax.spines["top"].set_visible(False)
    ax.spines["right"].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("0.33")
        ax.spines[side].set_linewidth(0.8)
    ax.set_axisbelow(True)
    ax.grid(True, color=LIGHT, linewidth=0.6)
    ax.tick_params(colors="0.15", direction="out")


def styled_axes(ax: Any = None, figsize: tuple[float, float] = (6.0, 4.5)):
    """``ax`` styled by :func:`style_axes`, or a new styled axes of ``figsize`` when ``ax`` is ``None``.

    Parameters
    ----------
    ax : matplotlib.axes.Axes, optional
        Axes to draw on.
    figsize : tuple of float, default (6.0, 4.5)
        Size of the new figure when ``ax`` is ``None``.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from numpyro_mpe.io.style import styled_axes
    >>> ax = styled_axes(figsize=(5.5, 5.0))
    >>> ax.figure.get_size_inches().tolist(), ax.spines["right"].get_visible()
    ([5.5, 5.0], False)
    """
    if ax is None:
        ax = new_axes(1, figsize=figsize)
    style_axes(ax)
    return ax


def threshold_line(ax, value: float, *, vertical: bool = False, **kwargs):
    """The grey dashed flag line at ``value``: horizontal, or vertical with ``vertical=True``.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Axes to draw on.
    value : float
        Where the line stands (e.g. :data:`K_THRESHOLD`).
    vertical : bool, default False
        A vertical line at x = ``value`` instead of a horizontal one at y = ``value``.
    **kwargs
        Passed on to ``axhline`` / ``axvline`` (``label``, ``gid``, ...).

    Returns
    -------
    matplotlib.lines.Line2D

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from numpyro_mpe.io.style import K_THRESHOLD, threshold_line
    >>> fig, ax = plt.subplots()
    >>> threshold_line(ax, K_THRESHOLD, gid="threshold").get_linestyle()
    '--'
    """
    draw = ax.axvline if vertical else ax.axhline
    return draw(value, color=GREY, linestyle="--", linewidth=1.0, **kwargs)


def unit_range(values: Any) -> tuple[float, float]:
    """The range of the finite ``values`` widened to include 0 and 1 (leverage, Pareto k̂).

    Parameters
    ----------
    values : array_like
        Values; NaN and infinite ones are ignored.

    Returns
    -------
    tuple of float
        ``(min(0, smallest), max(1, largest))``.

    Examples
    --------
    >>> from numpyro_mpe.io.style import unit_range
    >>> unit_range([0.2, 1.4, float("nan")]), unit_range([])
    ((0.0, 1.4), (0.0, 1.0))
    """
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    return min(0.0, float(v.min(initial=0.0))), max(1.0, float(v.max(initial=1.0)))


def leverage_limits(leverages: Any) -> tuple[float, float]:
    """Axis limits for leverages: their :func:`unit_range` with a margin, 0.02 below and 5 % above.

    Parameters
    ----------
    leverages : array_like
        One leverage per observation or group (non-finite ones are left out).

    Returns
    -------
    (float, float)
        The lower and the upper limit, for ``set_ylim`` or ``set_xlim``.

    Examples
    --------
    >>> from numpyro_mpe.io.style import leverage_limits
    >>> leverage_limits([0.1, 0.5])
    (-0.02, 1.05)
    """
    lo, hi = unit_range(leverages)
    return lo - 0.02, hi * 1.05


__all__ = ["BLUE", "CYAN", "FLAG", "GREY", "K_THRESHOLD", "LIGHT", "ORANGE", "leverage_limits", "new_axes",
           "style_axes", "styled_axes", "threshold_line", "unit_range"]
