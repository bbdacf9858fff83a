"""Curves of the MPE leave-one-out NLL against the held-out NLL: by training step and by hyperparameter.

* :func:`plot_training` — by optimizer step, from a training history of the VI backends (the paper's
  Fig. 1b);
* :func:`plot_tuning` — by hyperparameter value, from :func:`numpyro_mpe.tune_prior`.

In both a star marks the minimum of each curve: the step or the value each would pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from numpyro_mpe.io.style import BLUE, GREY, ORANGE, styled_axes

#: Columns of a training history that :func:`plot_training` draws, with their legend labels.
_TRAINING_CURVES = {
    "train_nll": "training NLL",
    "heldout_nll": "held-out NLL",
    "loo_nll": "MPE leave-one-out NLL",
}

_TRAINING_STYLES = {"train_nll": dict(color=GREY, linewidth=1.2, alpha=0.8),
                    "heldout_nll": dict(color=ORANGE, linewidth=1.8),
                    "loo_nll": dict(color=BLUE, linewidth=1.8, marker="o", markersize=3.5)}


def _mark_minimum(ax, x: np.ndarray, y: np.ndarray, color: str, gid: str, size: float = 12) -> None:
    """A star at the smallest finite ``y``."""
    j = int(np.nanargmin(y))
    ax.plot([x[j]], [y[j]], linestyle="", marker="*", markersize=size, color=color, markeredgecolor="white",
            zorder=5, gid=gid)


def _history_frame(history: Any) -> pd.DataFrame:
    if isinstance(history, pd.DataFrame):
        return history
    if isinstance(history, dict):
        return pd.DataFrame({k: np.asarray(v).reshape(-1) for k, v in history.items()})
    if isinstance(history, Sequence) and history and all(isinstance(r, dict) for r in history):
        return pd.DataFrame(list(history))
    raise TypeError(f"expected a pandas.DataFrame, a dict of columns or a list of records, got "
                    f"{type(history).__name__}")


_Curves = dict[str, tuple[np.ndarray, str]]


def _training_curves(frame: pd.DataFrame, num_obs: int | None) -> tuple[_Curves, str]:
    """The curves of a history by name, ``(values, legend label)``, and the y axis label."""
    curves: _Curves = {}
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
    return curves, ylabel


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
        The step on x, the per-observation NLL on y.

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
    curves, ylabel = _training_curves(frame, num_obs)
    ax = styled_axes(ax, figsize=(6.5, 4.2))
    best_marker = {"heldout_nll": ORANGE, "loo_nll": BLUE}
    for name, (vals, label) in curves.items():
        ok = np.isfinite(vals) & np.isfinite(steps)
        ax.plot(steps[ok], vals[ok], label=label, gid=name, **_TRAINING_STYLES[name])
        if name in best_marker and ok.any():
            _mark_minimum(ax, steps, np.where(ok, vals, np.nan), best_marker[name], f"best_{name}")
    if "heldout_nll" in curves:
        _spearman_note(ax, curves["loo_nll"][0], curves["heldout_nll"][0])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.92), fontsize=9, frameon=False)
    ax.set_title("Training: MPE leave-one-out vs held-out NLL", fontsize=11, loc="left")
    return ax


def _spearman_note(ax, loo: np.ndarray, heldout: np.ndarray) -> None:
    """The rank correlation of the two curves over their common checkpoints (at least 3), top right."""
    both = np.isfinite(loo) & np.isfinite(heldout)
    if both.sum() >= 3:
        rho = float(pd.Series(loo[both]).corr(pd.Series(heldout[both]), method="spearman"))
        ax.text(0.98, 0.97, f"Spearman ρ(LOO, held-out) = {rho:.2f}  ({int(both.sum())} checkpoints)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8.5, color=GREY, gid="spearman")


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
        Its x axis is the hyperparameter (labelled with ``table.attrs["arg_name"]``).

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
    ax = styled_axes(ax, figsize=(6.5, 4.2))
    loo = -table["elpd_loo"].to_numpy(float) / n
    ax.plot(x, loo, color=BLUE, marker="o", markersize=4, linewidth=1.8, label="MPE leave-one-out NLL",
            gid="loo_nll")
    if "se" in table:
        se = table["se"].to_numpy(float) / n
        ax.fill_between(x, loo - se, loo + se, color=BLUE, alpha=0.12, linewidth=0)
    _mark_minimum(ax, x, loo, BLUE, "best_loo", size=13)
    if "heldout_nll" in table and table["heldout_nll"].notna().any():
        h = table["heldout_nll"].to_numpy(float)
        ax.plot(x, h, color=ORANGE, marker="s", markersize=3.5, linewidth=1.8, label="held-out NLL",
                gid="heldout_nll")
        _mark_minimum(ax, x, h, ORANGE, "best_heldout", size=13)
    if "elpd_loo_exact" in table and table["elpd_loo_exact"].notna().any():
        idx = table.attrs.get("exact_indices")
        m = n if not idx else len(idx)
        ex = -table["elpd_loo_exact"].to_numpy(float) / m
        ok = np.isfinite(ex)
        ax.plot(x[ok], ex[ok], linestyle="", marker="D", markersize=7, markerfacecolor="none",
                markeredgecolor=GREY, markeredgewidth=1.5, label="brute-force LOO (refits)", gid="exact")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(table.attrs.get("arg_name") or "value")
    ax.set_ylabel("negative log predictive density per observation")
    ax.legend(fontsize=9, frameon=False)
    ax.set_title("Hyperparameter selection by MPE leave-one-out", fontsize=11, loc="left")
    return ax


__all__ = ["plot_training", "plot_tuning"]
