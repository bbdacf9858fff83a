"""Calibration of LOO-PIT values: the ECDF against the uniform, with simultaneous confidence bands.

Under a well-specified model the LOO-PIT values are (close to) independent uniforms on (0, 1), and so are the
randomized values of a discrete outcome.  :func:`ecdf_band` gives the simultaneous band of Säilynoja, Bürkner
and Vehtari (2022, *Graphical test for discrete uniformity and its applications in goodness-of-fit evaluation
and multiple sample comparison*, Statistics and Computing 32:32), as ArviZ's ``plot_loo_pit(ecdf=True)`` draws
it: the ECDF of n uniforms at K evaluation points z_j is binomial at each point; the pointwise level γ is
chosen by simulation so that all K points stay inside their central binomial intervals of level 1 − γ with
probability ``prob``.  :func:`pit_calibration` tests the PIT values with it — the smallest pointwise
two-sided tail probability of their ECDF, γ_obs, against the simulated ones gives a p-value, and the model is
rejected at level 1 − ``prob`` exactly when the ECDF leaves the band — and adds the Kolmogorov–Smirnov test.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

#: Evaluation points of the ECDF at most (fewer when there are fewer PIT values).
MAX_POINTS = 100
#: Simulations of the band's pointwise level.
NUM_SIMULATIONS = 2000


class ECDFBand(NamedTuple):
    """Evaluation points ``z`` (K,), the band ``lower``/``upper`` of the ECDF there, the pointwise level
    ``gamma`` and the simulated smallest tail probabilities ``simulated`` (for p-values)."""

    z: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    gamma: float
    simulated: np.ndarray
    prob: float


def _min_tail(counts, n: int, z) -> np.ndarray:
    """2 × the smallest two-sided binomial tail probability of ECDF counts (..., K) at points ``z``."""
    lower = stats.binom.cdf(counts, n, z)
    upper = stats.binom.sf(counts - 1, n, z)
    return np.minimum(1.0, 2.0 * np.min(np.minimum(lower, upper), axis=-1))


def ecdf_band(n: int, prob: float = 0.95, num_points: int | None = None,
              num_simulations: int = NUM_SIMULATIONS, seed: int = 0) -> ECDFBand:
    """The simultaneous ``prob`` band of the ECDF of ``n`` independent uniforms.

    Parameters
    ----------
    n : int
        Number of PIT values.
    prob : float, default 0.95
        Simultaneous coverage, in (0, 1).
    num_points : int, optional
        Evaluation points z_j = j / (K + 1), j = 1 … K; default min(n, :data:`MAX_POINTS`).
    num_simulations : int, default 2000
        Simulated ECDFs (multinomial counts between the points: the cost does not grow with ``n``).
    seed : int, default 0
        Seed of the simulations (the band is the same at every call).

    Returns
    -------
    ECDFBand
        The band's lower and upper ECDF bounds at the evaluation points, and its γ.

    Examples
    --------
    >>> from numpyro_mpe.loo.calibration import ecdf_band
    >>> band = ecdf_band(200)
    >>> bool((band.lower <= band.z).all() and (band.z <= band.upper).all()), 0 < band.gamma < 0.05
    (True, True)
    """
    if not 0.0 < prob < 1.0:
        from numpyro_mpe.errors import MPEError

        raise MPEError(f"prob must be strictly between 0 and 1, got {prob}")
    k = int(num_points or min(int(n), MAX_POINTS))
    z = np.arange(1, k + 1) / (k + 1)
    rng = np.random.default_rng(seed)
    widths = np.diff(np.concatenate([[0.0], z, [1.0]]))
    counts = np.cumsum(rng.multinomial(int(n), widths, size=num_simulations)[:, :-1], axis=1)
    simulated = _min_tail(counts, int(n), z)
    gamma = float(np.quantile(simulated, 1.0 - prob))
    lower = stats.binom.ppf(gamma / 2.0, n, z) / n
    upper = stats.binom.ppf(1.0 - gamma / 2.0, n, z) / n
    return ECDFBand(z, lower, upper, gamma, simulated, float(prob))


def ecdf_at(values, z) -> np.ndarray:
    """The ECDF of ``values`` (NaN left out) at the points ``z``."""
    v = np.sort(np.asarray(values, float).ravel())
    v = v[np.isfinite(v)]
    return np.searchsorted(v, np.asarray(z), side="right") / max(v.size, 1)


def pit_calibration(pit, prob: float = 0.95, seed: int = 0) -> dict:
    """Tests of the uniformity of PIT values: the simultaneous ECDF band and Kolmogorov–Smirnov.

    Parameters
    ----------
    pit : array_like
        PIT values (NaN are left out).
    prob : float, default 0.95
        Coverage of the simultaneous band; the model is rejected at level 1 − ``prob``.
    seed : int, default 0
        Seed of the band's simulations.

    Returns
    -------
    dict
        ``ecdf_pvalue`` (the share of simulated uniform samples whose ECDF strays at least as far, in
        the band's pointwise tail probability), ``ecdf_gamma`` (that tail probability of the PIT values),
        ``ecdf_outside`` (evaluation points where the ECDF leaves the band), ``ecdf_reject`` (it leaves it),
        ``ks_statistic`` and ``ks_pvalue``, ``band_prob`` and ``n``.

    Examples
    --------
    >>> import numpy as np
    >>> from numpyro_mpe.loo.calibration import pit_calibration
    >>> rng = np.random.default_rng(1)
    >>> pit_calibration(rng.uniform(size=300))["ecdf_reject"]
    False
    >>> pit_calibration(rng.beta(0.5, 0.5, size=300))["ecdf_reject"]  # U-shaped: too narrow predictives
    True
    """
    v = np.asarray(pit, float).ravel()
    v = v[np.isfinite(v)]
    n = v.size
    band = ecdf_band(n, prob, seed=seed)
    counts = np.round(ecdf_at(v, band.z) * n)
    gamma_obs = float(_min_tail(counts, n, band.z))
    outside = int(np.sum((counts / n < band.lower) | (counts / n > band.upper)))
    ks = stats.kstest(v, "uniform")
    return {"ecdf_pvalue": float((1 + np.sum(band.simulated <= gamma_obs)) / (1 + band.simulated.size)),
            "ecdf_gamma": gamma_obs, "ecdf_outside": outside, "ecdf_reject": bool(outside > 0),
            "ks_statistic": float(ks.statistic), "ks_pvalue": float(ks.pvalue), "band_prob": float(prob),
            "n": int(n)}


__all__ = ["ECDFBand", "ecdf_at", "ecdf_band", "pit_calibration"]
