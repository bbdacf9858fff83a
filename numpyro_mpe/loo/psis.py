"""Pareto-smoothed importance sampling through the installed arviz (0.x or arviz-stats 1.x)."""

from __future__ import annotations

import numpy as np


def psis_smooth(log_weights, r_eff: float = 1.0):
    """Pareto-smooth importance log-weights along the last axis.

    Parameters
    ----------
    log_weights : array, shape ``(..., S)``
        Unnormalized log importance ratios.
    r_eff : float
        Relative efficiency of the draws (1 for independent draws).

    Returns
    -------
    smoothed : ndarray ``(..., S)``, normalized log-weights (log-sum-exp 0 along the last axis).
    khat : ndarray ``(...)``, the Pareto shape estimate of the upper tail.

    Examples
    --------
    >>> import numpy as np
    >>> lw, k = psis_smooth(np.random.default_rng(0).normal(size=(3, 1000)))
    >>> lw.shape, k.shape
    ((3, 1000), (3,))
    >>> raw = np.zeros((1, 1000)); raw[0, 0] = 5.0  # one dominant weight keeps the largest share
    >>> int(np.argmax(psis_smooth(raw + np.random.default_rng(1).normal(0, 0.1, (1, 1000)))[0]))
    0
    """
    lw = np.asarray(log_weights, dtype=float)
    try:  # arviz >= 1: array_stats.psislw takes log-likelihood-like values and smooths their negation
        from arviz_stats.base import array_stats

        smoothed, khat = array_stats.psislw(-lw, r_eff=r_eff, axis=-1)
    except ImportError:  # arviz 0.x
        import arviz as az

        smoothed, khat = az.psislw(lw, reff=r_eff)
    smoothed = np.asarray(smoothed)
    smoothed = smoothed - _logsumexp(smoothed)[..., None]
    return smoothed, np.asarray(khat)


def _logsumexp(a):
    m = np.max(a, axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(a - m[..., None]), axis=-1))
