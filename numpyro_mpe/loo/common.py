"""What the leave-one-out estimates share: observation indices and coordinates, log-mean-exp with its Monte
Carlo standard error, and Pareto-smoothed importance weights (through the installed ArviZ)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy.special import logsumexp  # on the host: these are small NumPy reductions

#: Log-weights whose spread is below this are treated as constant (no Pareto tail to fit).
CONSTANT_LOG_WEIGHTS = float(np.sqrt(np.finfo(float).eps))
#: Pareto k̂ above which an importance-sampling estimate is unreliable (Vehtari et al. 2024).
GOOD_K = 0.7
#: Leverage above which the closed-form MPE of an observation is not trusted (the one-step cavity
#: overshoots): MPE importance sampling redoes it (``method="mpe-is"``, ``"auto"``, the predictive checks).
MAX_LEVERAGE = 0.5


#: The numpydoc entries of the two arguments every per-site function of this package takes first;
#: :func:`site_parameters` puts them where a docstring says ``{site_parameters}``.
SITE_PARAMETERS = """fit : Fit
        A fitted model.
    var_name : str, optional
        Observed site; required when the model has several."""


def site_parameters(fn):
    """Decorator: ``{site_parameters}`` in ``fn``'s docstring becomes :data:`SITE_PARAMETERS`."""
    fn.__doc__ = fn.__doc__.replace("{site_parameters}", SITE_PARAMETERS)
    return fn


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
    with warnings.catch_warnings(), np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # the tail fit of extreme weights overflows inside ArviZ; k̂ (inf) says so, not a bare RuntimeWarning
        warnings.simplefilter("ignore", RuntimeWarning)
        smoothed, khat = _arviz_psislw(lw, r_eff)
    smoothed = np.asarray(smoothed)
    smoothed = smoothed - _logsumexp(smoothed)[..., None]
    return smoothed, np.asarray(khat)


def _arviz_psislw(lw, r_eff):
    try:  # arviz >= 1: array_stats.psislw takes log-likelihood-like values and smooths their negation
        from arviz_stats.base import array_stats

        smoothed, khat = array_stats.psislw(-lw, r_eff=r_eff, axis=-1)
    except ImportError:  # arviz 0.x
        import arviz as az

        smoothed, khat = az.psislw(lw, reff=r_eff)
    return smoothed, khat


def _logsumexp(a):
    m = np.max(a, axis=-1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(a - m[..., None]), axis=-1))


def smooth_log_weights(log_r):
    """PSIS of the rows of ``log_r`` ``(K, S)``, robust to constant rows and ``-inf`` entries.

    Returns normalized smoothed log-weights ``(K, S)`` and k̂ ``(K,)``.  A row whose finite entries are
    constant to :data:`CONSTANT_LOG_WEIGHTS` is normalized unsmoothed with k̂ = −inf (bounded weights,
    no tail); a row with no finite entry gives NaN weights and k̂ = inf.
    """
    log_r = np.asarray(log_r, dtype=float)
    k, s = log_r.shape
    smoothed = np.full_like(log_r, np.nan)
    khat = np.full(k, np.inf)
    finite = np.isfinite(log_r)
    with np.errstate(invalid="ignore"):
        spread = np.max(np.where(finite, log_r, -np.inf), -1) - np.min(np.where(finite, log_r, np.inf), -1)
    const = finite.any(-1) & (spread <= CONSTANT_LOG_WEIGHTS)
    if const.any():  # the weights are equal: uniform over the finite draws
        smoothed[const] = np.where(finite[const], -np.log(finite[const].sum(-1, keepdims=True)), -np.inf)
        khat[const] = -np.inf
    rest = finite.any(-1) & ~const
    if rest.any():
        lr = np.where(finite[rest], log_r[rest], -np.inf)
        sm, kh = psis_smooth(lr)
        smoothed[rest], khat[rest] = sm, kh
    return smoothed, khat


def weighted_estimate(smoothed, ll, khat=None):
    """log Σ_s w̃_s p_s, its Monte Carlo standard error and the ESS 1/Σ w̃² of the smoothed weights.

    The MCSE is the delta-method one, √(Σ_s w̃_s² (p_s/p̂ − 1)²) — the variance of p under the weights over
    their effective sample size.  It is only an error bar where the weights have a finite variance: where
    ``khat`` exceeds :data:`GOOD_K` (the estimate's own k̂), or fewer than two draws carry the weight, it is
    ``inf`` (a sample that one draw dominates looks certain and is not).
    """
    ll = np.where(np.isfinite(smoothed), ll, -np.inf)
    with np.errstate(invalid="ignore"):
        est = np.asarray(logsumexp(smoothed + ll, axis=-1))
    w = np.exp(smoothed)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = np.exp(ll - est[:, None])  # p_s / p̂
        mcse = np.sqrt(np.nansum(w**2 * (rel - 1.0) ** 2, -1))
    ess = 1.0 / np.nansum(w**2, -1)
    unreliable = ess < 2.0
    if khat is not None:
        unreliable |= np.asarray(khat) > GOOD_K
    return est, np.where(unreliable, np.inf, mcse), ess


def obs_coords(site, idx):
    coords = {"obs": idx}
    for d, k in zip(site.dims, np.unravel_index(idx, site.obs_shape)):
        coords[d if d != "obs" else f"{site.name}_obs"] = ("obs", np.asarray(k))
    return coords


def flat_indices(indices, num_obs: int, var_name: str) -> np.ndarray:
    if indices is None:
        return np.arange(num_obs)
    idx = np.atleast_1d(np.asarray(indices))
    if idx.ndim != 1:
        raise IndexError(f"indices must be an int or a 1-d sequence of flat indices, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise IndexError(f"indices must be integers (flat indices into '{var_name}'), got dtype {idx.dtype}")
    idx = idx.astype(int)
    bad = (idx < -num_obs) | (idx >= num_obs)
    if bad.any():
        raise IndexError(
            f"index {int(idx[bad][0])} is out of range for the {num_obs} observations of '{var_name}': "
            f"flat indices must lie in [0, {num_obs}) (or [-{num_obs}, 0) counting from the end)"
        )
    return np.where(idx < 0, idx + num_obs, idx)


def log_mean_exp(log_w):
    """log mean exp along the last axis, and the Monte Carlo standard error of it (delta method)."""
    log_w = np.asarray(log_w, dtype=float)
    n = log_w.shape[-1]
    est = np.asarray(logsumexp(log_w, axis=-1)) - np.log(n)
    with np.errstate(invalid="ignore", over="ignore"):
        rel = np.exp(log_w - est[..., None])
        mcse = np.std(rel, axis=-1) / np.sqrt(n)
    return est, mcse


def label_list(labels, limit: int = 10) -> str:
    labels = np.asarray(labels).tolist()
    return f"{labels[:limit]}{' ...' if len(labels) > limit else ''}"


