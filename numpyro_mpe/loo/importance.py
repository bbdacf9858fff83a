"""MPE importance sampling: the MPE leave-one-out Gaussian as a proposal for the exact Bayesian LOO.

For observation i, draw θ_s ~ q₋i = N(m₋i, S₋i⁻¹), weight by r_s = −U₋i(θ_s) − log q₋i(θ_s) with
U₋i = U − ℓ_i (the potential without i), Pareto-smooth the weights (PSIS) and estimate

    log p(y_i | y₋i) ≈ log Σ_s w̃_s p(y_i | θ_s),   w̃ = normalized smoothed weights,

with the Pareto k̂ of the weights as its diagnostic.  The estimate is consistent for the exact Bayesian LOO
(not only the Gaussian one), and q₋i is much closer to p(θ | y₋i) than the full posterior that PSIS-LOO
reweights, so k̂ stays low where PSIS-LOO fails.  Where the cavity is invalid (leverage ≥ 1) the proposal
uses the eigenvalues of the whitened memory clipped at ``1 − clip``, which is still a valid proposal.

Where the log-weights are constant to ``sqrt(eps)`` (the proposal is the exact leave-one-out posterior, as
for a Gaussian linear model with known noise), there is no tail to fit: the weights are used as they are,
``ess`` is the number of draws and ``pareto_k`` is ``-inf``.

The same estimator removes a whole group G (:func:`importance_groups`): the memories of G summed, U₋G,
and log p(y_G | y₋G) = log Z(U) − log Z(U₋G), each normalizing constant estimated by importance sampling
from its own MPE Gaussian (q for U, the clipped cavity q₋G for U₋G).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from numpyro_mpe.engine.cavity import whitened_memory
from numpyro_mpe.gaussian import base_draws, base_logpdf
from numpyro_mpe.loo.common import (
    GOOD_K,
    MAX_LEVERAGE,
    flat_indices,
    obs_coords,
    smooth_log_weights,
    weighted_estimate,
)
from numpyro_mpe.programs import jit


def _whitened(post, g, h):
    """Whitened memory: L⁻¹g and the eigen-decomposition of L⁻¹ H L⁻ᵀ."""
    p = post.mean.shape[0]
    linv = jax.scipy.linalg.solve_triangular(post.chol, jnp.eye(p, dtype=post.mean.dtype), lower=True)
    return whitened_memory(linv, g, h)


def _proposal_one(post, g, h, clip):
    """Whitened shift u, square-root factor C and log det of the (clipped) cavity precision.

    Draws are θ = m + L⁻ᵀ(u + C z), z ~ N(0, I); ``logdet`` is log det S₋ (clipped), so that
    log q₋(θ) = −½‖z‖² + ½ logdet − P/2 log 2π (for the Student-t proposal, z is a t draw).
    """
    g_w, lam, q = _whitened(post, g, h)
    lam = jnp.minimum(lam, 1.0 - clip)
    u = q @ ((q.T @ g_w) / (1.0 - lam))
    c = q * (1.0 / jnp.sqrt(1.0 - lam))
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(post.chol))) + jnp.sum(jnp.log1p(-lam))
    return u, c, logdet


_jit_proposal = jit(_proposal_one)


def importance_loo(fit, indices=None, num_samples: int = 1000, rng_key=None, var_name=None, *,
                   clip: float = 0.05, df: float | None = None, defensive: float = 0.0, psis=None,
                   progress: bool | None = None) -> xr.Dataset:
    """MPE importance-sampling LOO for the observations ``indices`` of one observed site.

    For each observation i, θ_s ~ q₋i = N(m₋i, S₋i⁻¹) (the MPE leave-one-out Gaussian), log-weights
    r_s = −U₋i(θ_s) − log q₋i(θ_s), PSIS, and log p(y_i | y₋i) ≈ log Σ_s w̃_s p(y_i | θ_s).  Consistent for
    the exact Bayesian leave-one-out predictive density; k̂ of the weights says whether to trust it.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    indices : None, "flagged", int, sequence of int or boolean mask
        Flat observation indices (negative ones count from the end); ``None`` takes all, ``"flagged"``
        those with leverage > 0.5 or an invalid cavity (or PSIS k̂ > 0.7 when ``psis`` is given).
    num_samples : int, default 1000
        Draws from each q₋i (each costs one potential and one log-likelihood evaluation).
    rng_key : jax.random.PRNGKey, optional
        Common random numbers across observations (default ``PRNGKey(0)``).
    var_name : str, optional
        Observed site; required when the model has several.
    clip : float, default 0.05
        Proposal eigenvalues of the whitened memory are clipped at ``1 − clip`` (only matters for
        leverage ≥ 1 − clip; makes invalid cavities usable as proposals).
    df : float, optional
        ``None`` (default) draws from the Gaussian q₋i (exact, constant weights, for a Gaussian
        posterior).  A number draws from the multivariate Student-t with ``df`` degrees of freedom and the
        same location and scale: heavier tails than q₋i, so that the weights stay bounded where the
        posterior has heavier tails than its Laplace approximation (small data, unknown scales), which
        lowers k̂ at the price of non-constant weights in the Gaussian case.
    defensive : float, default 0
        Weight α of q itself in the proposal (1 − α)·q₋i + α·q (same family, drawn stratified): a defensive
        mixture whose weights stay bounded where q₋i is too narrow.
    psis : ELPDData or array, optional
        A PSIS-LOO result of the same site (``az.loo(..., pointwise=True)``) or its ``pareto_k`` values;
        with ``indices="flagged"``, observations with k̂ > 0.7 are flagged too.
    progress : bool, optional
        Progress bar over the observations (default: the fit's setting).

    Returns
    -------
    xarray.Dataset
        Over dim ``obs`` (flat index; the site's observation dims attached as coordinates) with
        ``elpd_loo``, ``elpd_loo_mcse`` (Monte Carlo standard error, delta method over the smoothed
        weights; ``inf`` where k̂ > 0.7 or one draw carries the weight), ``pareto_k`` (k̂ of
        the smoothed weights; −inf where they are constant), ``ess`` (1/Σ w̃²) and the MPE ``leverage``.

    Raises
    ------
    IndexError
        If an index is out of range (the message gives the valid range).

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> import jax.numpy as jnp, numpyro_mpe as mpe
    >>> ds = mpe.importance_loo(fit, [0, 19], num_samples=500)
    >>> ds.ess.values.round(6).tolist()  # linear-Gaussian: the MPE cavity is exact, the weights constant
    [500.0, 500.0]
    >>> ds.pareto_k.values.tolist()
    [-inf, -inf]
    >>> bool(jnp.allclose(ds.elpd_loo.values, fit.site_mpe().elpd_loo[jnp.array([0, 19])], atol=0.05))
    True
    """
    site = fit.adapter.observed_site(var_name)
    res = fit.site_mpe(site.name)
    khat_psis = None
    if psis is not None:
        k = psis["pareto_k"] if not isinstance(psis, np.ndarray | list | tuple) else psis
        khat_psis = np.asarray(k, dtype=float).reshape(-1)
        if khat_psis.size != site.num_obs:
            raise ValueError(f"psis has {khat_psis.size} Pareto k values, the site '{site.name}' has "
                             f"{site.num_obs} observations")
    idx = select_indices(indices, res.leverage, res.valid, site.num_obs, khat_psis, site.name)
    num_samples = int(num_samples)
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    progress = fit.progress if progress is None else progress

    def rows():
        for i, (g, h) in zip(idx, memory_rows(fit, site.name, idx)):
            yield g, h, one_hot_row(i, site.num_obs)

    est = UnitImportance(fit, site.name, num_samples, rng_key, clip=clip, df=df,
                         defensive=defensive).run(rows(), len(idx), progress)
    ds = xr.Dataset(
        {"elpd_loo": ("obs", est["elpd"]), "elpd_loo_mcse": ("obs", est["mcse"]),
         "pareto_k": ("obs", est["khat"]), "ess": ("obs", est["ess"]),
         "leverage": ("obs", np.asarray(res.leverage, dtype=float)[idx])},
        coords=obs_coords(site, idx),
    )
    proposal = "Gaussian" if df is None else f"Student-t (df={df})"
    ds.attrs.update(var_name=site.name, num_samples=num_samples, clip=clip,
                    method=f"MPE importance sampling (proposal: MPE leave-one-out {proposal}, PSIS weights)")
    ds["pareto_k"].attrs["description"] = "Pareto k-hat of the MPE-IS weights; -inf where they are constant"
    return ds


def one_hot_row(i: int, n: int) -> np.ndarray:
    """Row ``i`` of the N×N identity, built on the host (no compiled program per call)."""
    a = np.zeros(n)
    a[int(i)] = 1.0
    return a


@partial(jit, static_argnames=("name", "df", "num_defensive", "batch"))
def _cavity_draws(post, adapter, z, g, h, a, clip, *, name, df, num_defensive, batch):
    """:func:`_unit_draws` from the unit's clipped cavity (memory ĝ, Ĥ), in one program."""
    u, c, _ = _proposal_one(post, g, h, clip)
    return _unit_draws(post, adapter, z, u, c, a, name=name, df=df, num_defensive=num_defensive, batch=batch)


@partial(jit, static_argnames=("name", "df", "num_defensive", "batch"))
def _unit_draws(post, adapter, z, u, c, a, *, name, df, num_defensive, batch):
    """Importance log-ratios toward the posterior without one unit, with a (defensive) mixture proposal.

    In whitened coordinates w (θ = m + L⁻ᵀw) the proposal is (1 − α)·t_df(u, ccᵀ) + α·t_df(0, I) (the unit's
    cavity, and q itself with weight α = ``num_defensive``/S, drawn stratified: the last ``num_defensive``
    offsets of ``z`` are q's).  Returns the log-ratios −U(θ) − a·ℓ(θ) − log g(w) (up to a constant), the
    unit's log-likelihood a·ℓ(θ) and the draws w, for moment matching.
    """
    num = z.shape[0]
    n_cav = num - num_defensive
    w = jnp.concatenate([u + z[:n_cav] @ c.T, z[n_cav:]], 0)
    z_c = jnp.linalg.solve(c, (w - u).T).T
    log_g = base_logpdf(z_c, df) - jnp.linalg.slogdet(c)[1]
    if num_defensive:
        alpha = num_defensive / num
        log_g = jnp.logaddexp(jnp.log1p(-alpha) + log_g, jnp.log(alpha) + base_logpdf(w, df))
    theta = post.mean + post.unwhiten(w.T).T

    def per_draw(t):  # the unit's log-likelihood and the potential at one draw
        ll_all = adapter.log_lik(t, name)
        return jnp.sum(jnp.where(a != 0, ll_all * a, 0.0)), adapter.potential(t)

    ll, pot = jax.lax.map(per_draw, theta, batch_size=batch)
    return -(pot + ll) - log_g, ll, w


class UnitImportance:
    """Self-normalized importance sampling toward the posterior without a unit (one observation or a group),
    from its MPE cavity q₋ = N(m₋, S₋⁻¹): the engine of :func:`importance_loo` and
    :func:`importance_groups`, and of the repairs of ``fit.loo(method="auto")``.

    A unit is ``(ĝ, Ĥ, a)``: its memory and the weights a of its log-likelihood a·ℓ(θ) (a one-hot for one
    observation).  Proposal: the cavity with its whitened-memory eigenvalues clipped at ``1 − clip`` (valid
    even where leverage ≥ 1), Gaussian or Student-t (``df``), mixed with q itself with weight
    ``defensive`` (a defensive mixture: the weights stay bounded by 1/α where q covers the posterior).
    Draws share their base numbers across units (common random numbers).  :meth:`moment_match` then moves
    a unit's proposal to the weighted mean and covariance of its draws while k̂ falls (Paananen et al.
    2021, "Implicitly adaptive importance sampling"), and estimates once more from fresh draws.
    """

    def __init__(self, fit, name: str, num_samples: int, rng_key=None, *, clip: float = 0.05,
                 df: float | None = None, defensive: float = 0.0):
        if df is not None and not df > 0:
            raise ValueError(f"df must be positive (or None for a Gaussian proposal), got {df}")
        if not 0.0 <= defensive < 1.0:
            raise ValueError(f"defensive must lie in [0, 1) (the weight of q in the proposal), got "
                             f"{defensive}")
        self.fit, self.name, self.clip, self.df = fit, name, clip, df
        self.num_samples = int(num_samples)
        self.num_defensive = int(round(defensive * self.num_samples))
        p = fit.posterior.mean.shape[0]
        self.key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        self.z = base_draws(self.key, self.num_samples, p, df, fit.posterior.mean.dtype)
        self.static = {"name": name, "df": df, "num_defensive": self.num_defensive}
        self.batch = int(max(1, min(self.num_samples, 2**22 // max(fit.adapter.observed[name].num_obs, 1))))

    def draws(self, u, c, a, z=None):
        """Log-ratios, log-likelihoods and whitened draws of one unit with proposal centre u and factor c."""
        return _unit_draws(self.fit.posterior, self.fit.adapter, self.z if z is None else z, jnp.asarray(u),
                           jnp.asarray(c), jnp.asarray(a, self.z.dtype), batch=self.batch, **self.static)

    def cavity_draws(self, g, h, a):
        """:meth:`draws` from the unit's clipped cavity, memory (ĝ, Ĥ)."""
        return _cavity_draws(self.fit.posterior, self.fit.adapter, self.z, g, h, jnp.asarray(a, self.z.dtype),
                             self.clip, batch=self.batch, **self.static)

    def cavity(self, g, h):
        """The clipped cavity of memory (ĝ, Ĥ) as a proposal centre and factor in whitened coordinates."""
        u, c, _ = _jit_proposal(self.fit.posterior, g, h, self.clip)
        return u, c

    @staticmethod
    def estimate(log_r, ll) -> dict:
        """PSIS estimate of each row: ``elpd`` (log Σ w̃ p), ``mcse``, ``khat``, ``ess`` and the smoothed
        log-weights."""
        log_r, ll = np.atleast_2d(np.asarray(log_r)), np.atleast_2d(np.asarray(ll))
        log_r = np.where(np.isfinite(log_r) & np.isfinite(ll), log_r, -np.inf)
        smoothed, khat = smooth_log_weights(log_r)
        elpd, mcse, ess = weighted_estimate(smoothed, np.where(np.isfinite(ll), ll, -np.inf), khat)
        return {"elpd": elpd, "mcse": mcse, "khat": khat, "ess": ess, "smoothed": smoothed}

    def run(self, rows, num_rows: int, progress: bool = False) -> dict:
        """Estimates for the units ``rows`` (an iterable of ``(ĝ, Ĥ, a)``), as arrays over the units."""
        if not num_rows:
            empty = np.zeros(0)
            return {"elpd": empty, "mcse": empty, "khat": empty, "ess": empty}
        log_r, lls = [], []
        for g, h, a in tqdm(rows, total=num_rows, desc=f"MPE-IS {self.name}",
                            disable=not progress or num_rows < 2, leave=False):
            r, ll, _ = self.cavity_draws(g, h, a)
            log_r.append(np.asarray(r))
            lls.append(np.asarray(ll))
        est = self.estimate(np.stack(log_r), np.stack(lls))
        est.pop("smoothed")
        return est

    def moment_match(self, g, h, a, max_iter: int = 10) -> dict:
        """One unit: adapt the proposal's centre and factor to the weighted moments of its draws while k̂
        falls (full moments first, then the mean alone), at most ``max_iter`` times; returns the estimate
        (``elpd``, ``mcse``, ``khat``, ``ess`` as floats) from fresh draws of the last accepted proposal, and
        ``iterations``."""
        u, c = self.cavity(g, h)
        r, ll, w = self.cavity_draws(g, h, a)
        est = self.estimate(r, ll)
        it = 0
        while est["khat"][0] > GOOD_K and it < max_iter:
            wt = np.exp(est["smoothed"][0])
            wn = np.asarray(w)
            mean = wt @ wn
            d = wn - mean
            cov = (d * wt[:, None]).T @ d
            improved = False
            for c_try in (np.linalg.cholesky(0.5 * (cov + cov.T) + 1e-10 * np.eye(len(mean))), c):
                r2, ll2, w2 = self.draws(jnp.asarray(mean), jnp.asarray(c_try), a)
                est2 = self.estimate(r2, ll2)
                if est2["khat"][0] < est["khat"][0]:
                    u, c, w, est, improved = jnp.asarray(mean), jnp.asarray(c_try), w2, est2, True
                    break
            it += 1
            if not improved:
                break
        if it:  # estimate from fresh draws: the accepted proposal was chosen on these ones
            z = base_draws(jax.random.fold_in(self.key, 2), self.num_samples, self.z.shape[1], self.df,
                           self.z.dtype)
            est = self.estimate(*self.draws(u, c, a, z)[:2])
        return {k: float(est[k][0]) for k in ("elpd", "mcse", "khat", "ess")} | {"iterations": it}


def predictor_samples(fit, name: str, indices, num_samples: int = 2000, rng_key=None, *, df: float = 5.0,
                      defensive: float = 0.5) -> dict:
    """Weighted samples of the predictor of the observations ``indices`` under their exact leave-one-out
    posterior, by the importance sampling of ``fit.loo()``'s repairs (the clipped cavity as proposal, a
    defensive t mixture): ``{i: (eta (S, K_all), smoothed log-weights (S,))}``, the ``repaired`` argument of
    :func:`numpyro_mpe.loo.predictive_values.predictive_values`."""
    engine = UnitImportance(fit, name, num_samples, rng_key, df=df, defensive=defensive)
    n = fit.adapter.observed[name].num_obs
    out = {}
    for i, (g, h) in zip(np.asarray(indices, dtype=int).tolist(), memory_rows(fit, name, indices)):
        log_r, ll, w = engine.cavity_draws(g, h, one_hot_row(i, n))
        smoothed = engine.estimate(log_r, ll)["smoothed"][0]
        out[i] = (np.asarray(_eta_at(fit.adapter, fit.posterior, w, i, name=name)), smoothed)
    return out


@partial(jit, static_argnames=("name",))
def _eta_at(adapter, post, w, i, *, name):
    """The predictor of observation i at the whitened draws w (S, P)."""
    return jax.vmap(lambda t: adapter.eta(t, name)[i])(post.mean + post.unwhiten(w.T).T)


def memory_rows(fit, name: str, indices) -> list:
    """The memories (ĝ_i, Ĥ_i) of the observations ``indices`` as host arrays (one gather, not one compiled
    indexing program per observation)."""
    mem = fit.memories(name)
    idx = jnp.asarray(np.asarray(indices, dtype=int))
    grads, hess = np.asarray(jnp.take(mem.grad, idx, axis=0)), np.asarray(jnp.take(mem.hess, idx, axis=0))
    return list(zip(grads, hess))


def select_indices(indices, leverage, valid, num_obs: int, khat_psis=None, var_name: str = "") -> np.ndarray:
    """Resolve ``indices`` (None, "flagged", int, sequence, boolean mask) to flat indices.

    Raises ``IndexError`` naming the valid range for an index out of range, ``ValueError`` for an unknown
    string or a non-integer array.
    """
    if indices is None:
        return np.arange(num_obs)
    if isinstance(indices, str):
        if indices != "flagged":
            raise ValueError(f"indices must be None, 'flagged', integers or a boolean mask, got '{indices}'")
        flag = (np.asarray(leverage) > MAX_LEVERAGE) | ~np.asarray(valid, dtype=bool)
        if khat_psis is not None:
            flag |= np.asarray(khat_psis) > 0.7
        return np.flatnonzero(flag)
    arr = np.asarray(indices)
    if arr.dtype == bool:
        if arr.size != num_obs:
            raise IndexError(f"a boolean mask of indices must have one entry per observation ({num_obs}), "
                             f"got shape {arr.shape}")
        return np.flatnonzero(arr.reshape(-1))
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"indices must be integers (flat indices), 'flagged' or a boolean mask, got dtype "
                         f"{arr.dtype}")
    return flat_indices(arr.astype(int) if arr.size else np.zeros(0, int), num_obs, var_name)


def importance_groups(fit, groups, var_name=None, select=None, num_samples: int = 1000, rng_key=None, *,
                      clip: float = 0.05, df: float | None = None,
                      progress: bool | None = None) -> xr.Dataset:
    """MPE importance sampling for leaving out whole groups: log p(y_G | y₋G) for each selected group G.

    The same estimator as :func:`importance_loo` with the memories of the group summed: θ_s from the (clipped)
    MPE leave-group-out Gaussian q₋G, log-weights −U₋G(θ_s) − log q₋G(θ_s), PSIS, and
    log Σ_s w̃_s Π_{i∈G} p(y_i | θ_s).  Meant for groups of moderate size, and as the fallback where the
    closed-form cavity is invalid (leverage ≥ 1); for a large group the joint likelihood is much narrower
    than q₋G and k̂ says so.

    Parameters
    ----------
    fit, groups, var_name
        The fitted model, the groups (a plate name or one label per observation; see
        :func:`numpyro_mpe.loo.groups.resolve_groups`) and the observed site, as in
        :func:`numpyro_mpe.loo.groups.group_mpe`.
    select : array_like, optional
        Labels of the groups to compute (default: all).
    num_samples, rng_key, clip, df, progress
        As in :func:`importance_loo`.

    Returns
    -------
    xarray.Dataset
        Over the group dim (coordinate: the selected labels) with ``elpd_loo``, ``elpd_loo_mcse``,
        ``pareto_k``, ``ess`` and the group ``leverage``.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> ds = importance_groups(fit, x > 0, num_samples=500)
    >>> ds.ess.values.round(6).tolist()  # the cavity is exact: constant weights
    [500.0, 500.0]
    """
    from numpyro_mpe.loo.groups import resolve_groups

    site = fit.adapter.observed_site(var_name)
    codes, labels, dim = resolve_groups(site, groups)
    if select is None:
        chosen = np.arange(labels.size)
    else:
        sel = np.atleast_1d(np.asarray(select))
        pos = {lab: k for k, lab in enumerate(labels.tolist())}
        unknown = [s for s in sel.tolist() if s not in pos]
        if unknown:
            raise KeyError(f"unknown group label(s) {unknown[:10]}; the groups are {labels.tolist()[:20]}")
        chosen = np.asarray([pos[s] for s in sel.tolist()], dtype=int)
    num_samples = int(num_samples)
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    mem = fit.memories(site.name)
    codes_j = jnp.asarray(codes)
    g_sum = jax.ops.segment_sum(mem.grad, codes_j, labels.size)
    h_sum = jax.ops.segment_sum(mem.hess, codes_j, labels.size)
    lev = np.asarray(jax.vmap(lambda g, h: _whitened(fit.posterior, g, h)[1][-1])(g_sum, h_sum))
    progress = fit.progress if progress is None else progress

    g_host, h_host = np.asarray(g_sum), np.asarray(h_sum)

    def rows():
        for k in chosen:
            yield g_host[k], h_host[k], (codes == k).astype(float)

    est = UnitImportance(fit, site.name, num_samples, rng_key, clip=clip, df=df).run(rows(), chosen.size,
                                                                                      progress)
    ds = xr.Dataset(
        {"elpd_loo": (dim, est["elpd"]), "elpd_loo_mcse": (dim, est["mcse"]),
         "pareto_k": (dim, est["khat"]), "ess": (dim, est["ess"]), "leverage": (dim, lev[chosen])},
        coords={dim: labels[chosen]},
    )
    ds.attrs.update(var_name=site.name, num_samples=num_samples, clip=clip,
                    method="MPE importance sampling, leave-group-out (proposal: MPE leave-group-out "
                           "Gaussian)")
    return ds
