"""Labels of observations on the figures: their text, which points get one, and where it goes.

* :func:`observation_labels` — one text per row of a table (its coordinates, else its index);
* :func:`largest` — the positions of the largest values (the points worth labelling);
* :class:`PointLabels` — labels placed next to their points, clear of each other and of the data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from numpyro_mpe.io.style import FLAG

#: Columns of :func:`numpyro_mpe.loo.compare.compare_psis` that are values, not observation coordinates.
VALUE_COLUMNS = frozenset({
    "elpd_loo_mpe", "elpd_loo_psis", "p_loo_mpe", "p_loo_psis", "pareto_k", "leverage", "sensitivity",
    "lpd", "elpd_loo", "p_loo", "valid", "elpd_diff", "observed", "y",
})


def observation_labels(frame: pd.DataFrame) -> list[str]:
    """One label per row: the observation coordinate columns (``"3"``, ``"2,5"``), else the index.

    Coordinate columns are those that are not value columns (:data:`VALUE_COLUMNS`), do not start with
    ``_`` and do not hold floats (a ``label`` column counts as one).

    Parameters
    ----------
    frame : pandas.DataFrame
        A per-observation table, e.g. :func:`numpyro_mpe.compare_psis` output.

    Returns
    -------
    list of str

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.point_labels import observation_labels
    >>> observation_labels(pd.DataFrame({"g": [0, 1], "m": [2, 5], "leverage": [0.1, 0.2]}))
    ['0,2', '1,5']
    """
    coords = [c for c in frame.columns if c not in VALUE_COLUMNS and not str(c).startswith("_")]
    coords = [c for c in coords if not pd.api.types.is_float_dtype(frame[c])]
    if coords:
        return [",".join(str(v) for v in row) for row in frame[coords].itertuples(index=False)]
    return [str(i) for i in frame.index]


def largest(values: Any, n: int) -> np.ndarray:
    """Positions of the ``n`` largest finite values, largest first.

    Parameters
    ----------
    values : array_like
        Scores; NaN and ``-inf`` ones are never picked (``-inf`` excludes a position).
    n : int
        How many at most.

    Returns
    -------
    numpy.ndarray of int

    Examples
    --------
    >>> import numpy as np
    >>> from numpyro_mpe.io.point_labels import largest
    >>> largest(np.array([0.3, np.nan, 2.0, -np.inf, 1.0]), 2)
    array([2, 4])
    """
    values = np.asarray(values, float)
    finite = np.flatnonzero(np.isfinite(values))
    if n <= 0 or finite.size == 0:
        return np.array([], dtype=int)
    order = finite[np.argsort(values[finite])[::-1]]
    return order[:n]


class PointLabels:
    """Observation labels placed next to their points, avoiding each other and the points.

    Labels are collected with :meth:`add` (or :meth:`add_flagged_and_top`) and drawn by :meth:`place`
    once the axes limits are final: each takes the first of eight positions around its point (upper right
    first) whose estimated text box overlaps no label placed before it and no data point; ``pad`` (points)
    clears the point's marker.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from numpyro_mpe.io.point_labels import PointLabels
    >>> fig, ax = plt.subplots()
    >>> _ = ax.scatter([0.0, 1.0], [0.0, 1.0])
    >>> labels = PointLabels()
    >>> labels.add(1.0, 1.0, "obs 7")
    >>> labels.place(ax, avoid=([0.0, 1.0], [0.0, 1.0]))
    >>> [t.get_text() for t in ax.texts]
    ['obs 7']
    """

    _DIRECTIONS = ((1, 0.75, "left", "bottom"), (-1, 0.75, "right", "bottom"), (1, -0.75, "left", "top"),
                   (-1, -0.75, "right", "top"), (1.4, 0, "left", "center"), (-1.4, 0, "right", "center"),
                   (0, 1.4, "center", "bottom"), (0, -1.4, "center", "top"))

    def __init__(self) -> None:
        self.items: list[tuple[float, float, str, str, float]] = []

    def add(self, x: float, y: float, text: str, color: str = "0.15", pad: float = 4.0) -> None:
        """Label the point ``(x, y)`` with ``text``, unless that text is already there or the point is not
        finite.

        Parameters
        ----------
        x, y : float
            The point, in data coordinates.
        text : str
            The label.
        color : str, default "0.15"
            Its colour.
        pad : float, default 4.0
            Gap between the point and the label, in points.
        """
        if np.isfinite(x) and np.isfinite(y) and all(it[2] != text for it in self.items):
            self.items.append((float(x), float(y), text, color, float(pad)))

    def add_flagged_and_top(self, x: Any, y: Any, texts: list[str], *, flagged: Any, scores: Any, top: int,
                            flag_pad: float = 4.0) -> None:
        """Label every ``flagged`` point (magenta), then the ``top`` points with the largest ``scores``.

        Parameters
        ----------
        x, y : array_like
            The points, one per observation.
        texts : list of str
            One label per point.
        flagged : array_like of bool
            The points labelled first, in :data:`~numpyro_mpe.io.style.FLAG` colour.
        scores : array_like
            Rank of the other points; ``-inf`` (or NaN) where a point must not be picked (the flagged).
        top : int
            How many points to label by score.
        flag_pad : float, default 4.0
            ``pad`` of the flagged labels (larger for larger markers).

        Examples
        --------
        >>> import numpy as np
        >>> labels = PointLabels()
        >>> flag = np.array([False, True, False])
        >>> labels.add_flagged_and_top([0, 1, 2], [0.2, 0.9, 0.5], ["a", "b", "c"], flagged=flag,
        ...                            scores=np.where(flag, -np.inf, [0.2, 0.9, 0.5]), top=1)
        >>> [text for _, _, text, _, _ in labels.items]
        ['b', 'c']
        """
        for i in np.flatnonzero(flagged):
            self.add(x[i], y[i], texts[i], color=FLAG, pad=flag_pad)
        for i in largest(scores, top):
            self.add(x[i], y[i], texts[i])

    def place(self, ax, avoid: tuple[Any, Any] | None = None, fontsize: float = 9.0) -> None:
        """Draw the labels on ``ax``, keeping clear of each other, their points and ``avoid``.

        Call it once the axes limits are final: positions are chosen in display space.

        Parameters
        ----------
        ax : matplotlib.axes.Axes
            The axes of the points.
        avoid : (array_like, array_like), optional
            More points ``(x, y)`` to keep clear of (all the data, typically).
        fontsize : float, default 9.0
            Size of the labels.
        """
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
            choice = next((off for off in offsets
                           if self._is_clear(self._box(X, Y, off, w, h, px), boxes, obstacles, px)),
                          offsets[0])
            boxes.append(self._box(X, Y, choice, w, h, px))
            dx, dy, ha, va = choice
            ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                        fontsize=fontsize, color=color, gid="obs_label")

    @classmethod
    def _is_clear(cls, box, boxes, obstacles: np.ndarray, px: float) -> bool:
        """``box`` overlaps no placed label and no point (a marker's radius, roughly, around each)."""
        if any(cls._overlap(box, b) for b in boxes):
            return False
        m = 2 * px
        ox, oy = obstacles[:, 0], obstacles[:, 1]
        return not bool(np.any((box[0] - m < ox) & (ox < box[2] + m) & (box[1] - m < oy) & (oy < box[3] + m)))

    @staticmethod
    def _box(X, Y, off, w, h, px):
        dx, dy, ha, va = off
        x0 = X + dx * px - {"left": 0.0, "center": w / 2, "right": w}[ha]
        y0 = Y + dy * px - {"bottom": 0.0, "center": h / 2, "top": h}[va]
        return (x0, y0, x0 + w, y0 + h)

    @staticmethod
    def _overlap(a, b) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


__all__ = ["VALUE_COLUMNS", "PointLabels", "largest", "observation_labels"]
