"""Leave-group-out in closed form: removing a set G of observations as one rank-|G| memory update.

With the memories of the group summed, ĝ_G = Σ_{i∈G} ĝ_i and Ĥ_G = Σ_{i∈G} Ĥ_i, the MPE gives

    S₋G = S − Ĥ_G,   m₋G = m + S₋G⁻¹ ĝ_G

(the same whitened cavity as one observation: Ã_G = L⁻¹Ĥ_G L⁻ᵀ, ``leverage`` its largest eigenvalue, valid iff
< 1; ``sensitivity`` = √(Δmᵀ S Δm)).  The group's joint predictive densities

    elpd_loo(G) = log E_{q₋G}[Π_{i∈G} p(y_i | θ)],   lpd(G) = log E_q[Π_{i∈G} p(y_i | θ)]

are integrated in θ-space with the exact likelihood.  A group's joint likelihood is far more concentrated
than q₋G (a whole firm, a whole class), so plain Monte Carlo from q₋G has a huge variance.  Instead each is a
defensive importance-sampling estimate with a two-component mixture proposal: for ``elpd_loo``, half the
draws from q₋G and half from q — and q is *exactly* the Laplace approximation of the integrand
q₋G(θ) p(y_G | θ) (its gradient at m is S₋G(m − m₋G) + ĝ_G = 0 and its Hessian S₋G + Ĥ_G = S), so the
weights are constant when the group's log-likelihood is quadratic; for ``lpd``, half from q and half from
q₊G = N(m − (S + Ĥ_G)⁻¹ĝ_G, (S + Ĥ_G)⁻¹), the Laplace approximation of q(θ) p(y_G | θ).  The weights are
bounded by twice the integrand's ratio to either component, so the estimate is never worse than plain Monte
Carlo from q₋G by more than a factor 2 in variance.  ``elpd_loo_mcse`` is its Monte Carlo standard error.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from tqdm.auto import tqdm

from numpyro_mpe.engine.cavity import whitened_memory
from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import standard_normal
from numpyro_mpe.loo.common import label_list, log_mean_exp
from numpyro_mpe.programs import jit

#: Model log-likelihood values (draws × observations) evaluated per batch.
_BATCH_ELEMENTS = 2**22


class GroupMPE(NamedTuple):
    """MPE leave-group-out outputs per group (in the order of ``labels``)."""

    labels: np.ndarray
    dim: str  # name of the group dim
    codes: np.ndarray  # (N,) group index of every observation
    size: np.ndarray
    lpd: np.ndarray
    elpd_loo: np.ndarray
    elpd_loo_mcse: np.ndarray
    p_loo: np.ndarray
    sensitivity: np.ndarray
    leverage: np.ndarray
    valid: np.ndarray
    shift: np.ndarray  # (G, P): m₋G − m
    method: str  # how elpd_loo was integrated


# ------------------------------------------------------------------ labels
def resolve_groups(site, groups) -> tuple[np.ndarray, np.ndarray, str]:
    """Group codes ``(N,)``, the unique labels and the group dim name from ``groups``.

    Parameters
    ----------
    site : ObservedSite
        The observed site whose observations are grouped.
    groups : str or array_like
        The name of one of the site's observation dims (a plate: one group per index along it), or labels
        aligned with the observations, of shape ``(N,)`` (flattened, C order) or the site's observation shape:
        a numpy array, list, ``pandas.Series``, ``pandas.Categorical`` (groups in category order) or
        ``xarray.DataArray``.

    Returns
    -------
    codes : ndarray ``(N,)``, the group index of every observation.
    labels : ndarray ``(G,)``, one label per group (sorted, or in category order).
    dim : str, the plate name when ``groups`` names one, else ``"group"``.

    Raises
    ------
    MPEError
        For an unknown dim name, labels of the wrong shape (naming the shape and the number of
        observations), missing labels (NaN/None), or an empty group (an unused category).

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace
    >>> site = SimpleNamespace(name="y", dims=("firm", "year"), obs_shape=(2, 3), num_obs=6)
    >>> codes, labels, dim = resolve_groups(site, "firm")
    >>> codes.tolist(), labels.tolist(), dim
    ([0, 0, 0, 1, 1, 1], [0, 1], 'firm')
    >>> resolve_groups(site, ["b", "a", "b", "a", "a", "a"])[1].tolist()
    ['a', 'b']
    """
    if isinstance(groups, str):
        if groups not in site.dims:
            raise MPEError(f"groups='{groups}' is not an observation dim of '{site.name}'; its observation "
                           f"dims are {list(site.dims)} (or pass one label per observation)")
        axis = list(site.dims).index(groups)
        shape = [-1 if k == axis else 1 for k in range(len(site.dims))]
        codes = np.broadcast_to(np.arange(site.obs_shape[axis]).reshape(shape), site.obs_shape).reshape(-1)
        return codes.astype(int), np.arange(site.obs_shape[axis]), groups

    import pandas as pd

    categories = None
    values = groups
    if isinstance(groups, pd.Series | pd.Index) and isinstance(groups.dtype, pd.CategoricalDtype):
        values = pd.Categorical(groups)
    if isinstance(values, pd.Categorical):
        categories = np.asarray(values.categories)
        values = np.asarray(values.codes)
    arr = np.asarray(values)
    shape = arr.shape
    if shape == tuple(site.obs_shape):
        arr = arr.reshape(-1)
    if arr.shape != (site.num_obs,):
        raise MPEError(
            f"group labels of shape {shape} ({arr.size} labels) do not match the {site.num_obs} observations "
            f"of '{site.name}' (observation shape {tuple(site.obs_shape)}, dims {list(site.dims)}); pass one "
            "label per observation, or the name of an observation dim"
        )
    missing = (arr < 0) if categories is not None else np.asarray(pd.isna(arr), dtype=bool)
    if missing.any():
        bad = np.flatnonzero(missing)
        raise MPEError(f"{bad.size} group label(s) of '{site.name}' are missing (NaN/None) at flat indices "
                       f"{label_list(bad)}; give every observation a group")
    if categories is not None:
        counts = np.bincount(arr, minlength=categories.size)
        empty = categories[counts == 0]
        if empty.size:
            raise MPEError(
                f"empty group(s) {label_list(empty.tolist())}: these categories of the group labels have no "
                f"observation of '{site.name}', so there is nothing to leave out; drop them first, e.g. "
                "labels.cat.remove_unused_categories()"
            )
        return arr.astype(int), categories, "group"
    try:
        labels, codes = np.unique(arr, return_inverse=True)
    except TypeError as err:
        raise MPEError(f"group labels of '{site.name}' cannot be sorted (mixed types?): {err}") from None
    return codes.reshape(-1).astype(int), labels, "group"


# ------------------------------------------------------------------ closed form
def _draw_batches(fn, draws, num_obs: int):
    """``fn`` mapped over the rows of ``draws`` in batches that keep draws × observations moderate."""
    batch = int(max(1, min(draws.shape[0], _BATCH_ELEMENTS // max(num_obs, 1))))
    return jax.lax.map(fn, draws, batch_size=batch)


def group_mpe(fit, groups, var_name=None, *, num_samples: int = 2000, rng_key=None,
              progress: bool | None = None) -> GroupMPE:
    """Closed-form leave-group-out for the groups of one observed site (see the module docstring).

    Parameters
    ----------
    fit : Fit
        A fitted model.
    groups : str or array_like
        Name of an observation dim (plate) or labels aligned with the observations; see
        :func:`resolve_groups`.
    var_name : str, optional
        Observed site; required when the model has several.
    num_samples : int, default 2000
        Draws per group for ``elpd_loo`` and for ``lpd`` (half from each mixture component), common random
        numbers across groups; each costs one evaluation of the site's log-likelihood.
    rng_key : jax.random.PRNGKey, optional
        Key of the draws (``PRNGKey(0)`` by default).
    progress : bool, optional
        Progress bar over the groups (default: the fit's setting).

    Returns
    -------
    GroupMPE
        Per group: ``size``, ``lpd``, ``elpd_loo`` and its ``elpd_loo_mcse``, ``p_loo``, ``sensitivity``,
        ``leverage``, ``valid`` and the posterior-mean ``shift`` m₋G − m ``(G, P)``.  A group whose removal
        leaves no valid cavity (leverage ≥ 1) has ``valid`` False and NaN ``elpd_loo``, ``p_loo``,
        ``sensitivity`` and ``shift``, with a warning naming it.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> res = group_mpe(fit, x > 0)      # two groups: x <= 0 and x > 0
    >>> res.labels.tolist(), res.size.tolist()
    ([False, True], [10, 10])
    >>> bool(res.valid.all()), res.shift.shape
    (True, (2, 1))
    """
    site = fit.adapter.observed_site(var_name)
    codes, labels, dim = resolve_groups(site, groups)
    num_samples = int(num_samples)
    if num_samples < 4:
        raise ValueError(f"num_samples must be at least 4, got {num_samples}")
    n_groups = len(labels)
    name = site.name
    n_obs = site.num_obs
    mem = fit.memories(name)
    post = fit.posterior
    adapter = fit.adapter
    p = post.mean.shape[0]
    dtype = post.mean.dtype
    codes_j = jnp.asarray(codes)
    g_sum = jax.ops.segment_sum(mem.grad, codes_j, n_groups)
    h_sum = jax.ops.segment_sum(mem.hess, codes_j, n_groups)
    linv = jax.scipy.linalg.solve_triangular(post.chol, jnp.eye(p, dtype=dtype), lower=True)

    @jit
    def whitened(g, h):
        g_w, lam, q = whitened_memory(linv, g, h)
        valid = lam[-1] < 1.0
        inv = jnp.where(valid, 1.0 / jnp.where(valid, 1.0 - lam, 1.0), jnp.nan)
        u = q @ (inv * (q.T @ g_w))
        return g_w, lam, q, u, valid

    g_w, lam, qmat, u, valid = jax.vmap(whitened)(g_sum, h_sum)

    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    n_a = num_samples - num_samples // 2  # draws from the group's own component (q₋G or q₊G)
    n_b = num_samples // 2  # draws from q, shared by all groups
    alpha = n_a / num_samples
    z = standard_normal(rng_key, (num_samples, p), dtype)
    z_a, z_b = z[:n_a], z[n_a:]

    def theta_of(w):
        return post.mean + post.unwhiten(w)

    def loglik_all(w):
        return adapter.log_lik(theta_of(w), name)

    @jit
    def loglik_groups(ws):  # (S, P) whitened -> (S, G)
        return _draw_batches(lambda w: jax.ops.segment_sum(loglik_all(w), codes_j, n_groups), ws, n_obs)

    def log_gauss(w, shift, lam_k, q_k, sign):
        """log N(w; shift, (I + sign·Ã)⁻¹) up to the constant −P/2 log 2π (common to every density)."""
        d = (w - shift) @ q_k
        prec = 1.0 + sign * lam_k
        return -0.5 * jnp.sum(prec * d * d, -1) + 0.5 * jnp.sum(jnp.log(prec))

    @jit
    def one_group(g_k, lam_k, q_k, mask, ll_b):
        """Log-weights of elpd_loo and lpd for one group; ``ll_b`` its log-lik at the shared q draws."""
        def group_ll(ws):
            ll = _draw_batches(loglik_all, ws, n_obs)
            return jnp.sum(jnp.where(mask, ll, 0.0), -1)

        # elpd_loo: mixture of q₋G (n_a draws) and q (n_b draws); integrand p(y_G|θ) q₋G(θ)
        ok_rem = lam_k[-1] < 1.0
        lam_r = jnp.where(ok_rem, lam_k, 0.0)
        u_r = q_k @ ((q_k.T @ g_k) / (1.0 - lam_r))
        w_r = u_r + (z_a * (1.0 / jnp.sqrt(1.0 - lam_r))) @ q_k.T
        def log_w_rem(w, ll):
            lr = log_gauss(w, u_r, lam_r, q_k, -1.0)
            lq = -0.5 * jnp.sum(w * w, -1)
            return ll + lr - jnp.logaddexp(jnp.log(alpha) + lr, jnp.log1p(-alpha) + lq)
        lw_elpd = jnp.concatenate([log_w_rem(w_r, group_ll(w_r)), log_w_rem(z_b, ll_b)])
        lw_elpd = jnp.where(ok_rem, lw_elpd, jnp.nan)
        # lpd: mixture of q₊G (n_a draws) and q (n_b draws); integrand p(y_G|θ) q(θ).  Where I + Ã is not
        # positive definite (a non-convex group log-likelihood), q₊G falls back to q (plain Monte Carlo).
        ok_add = lam_k[0] > -1.0
        lam_p = jnp.where(ok_add, lam_k, 0.0)
        u_p = jnp.where(ok_add, -(q_k @ ((q_k.T @ g_k) / (1.0 + lam_p))), 0.0)
        w_p = u_p + (z_a * (1.0 / jnp.sqrt(1.0 + lam_p))) @ q_k.T
        def log_w_add(w, ll):
            lp = log_gauss(w, u_p, lam_p, q_k, 1.0)
            lq = -0.5 * jnp.sum(w * w, -1)
            return ll + lq - jnp.logaddexp(jnp.log(alpha) + lp, jnp.log1p(-alpha) + lq)
        lw_lpd = jnp.concatenate([log_w_add(w_p, group_ll(w_p)), log_w_add(z_b, ll_b)])
        return lw_elpd, lw_lpd

    size = np.bincount(codes, minlength=n_groups)
    multi = np.flatnonzero(size > 1)  # a group of one observation is that observation's leave-one-out
    progress = fit.progress if progress is None else progress
    lw_elpd = np.zeros((n_groups, num_samples))
    lw_lpd = np.zeros((n_groups, num_samples))
    if multi.size:
        ll_b = np.asarray(loglik_groups(z_b))  # (n_b, G)
    for k in tqdm(multi, desc=f"groups {name}", disable=not progress or multi.size < 2, leave=False):
        mask = jnp.asarray(codes == k)
        a, b = one_group(g_w[k], lam[k], qmat[k], mask, jnp.asarray(ll_b[:, k]))
        lw_elpd[k], lw_lpd[k] = np.asarray(a), np.asarray(b)
    elpd, mcse = log_mean_exp(lw_elpd)
    lpd, _ = log_mean_exp(lw_lpd)
    single = np.flatnonzero(size == 1)
    if single.size:  # the per-observation pass (quadrature in predictor space where the site has one)
        loo = fit.site_mpe(name)
        obs = np.array([np.flatnonzero(codes == k)[0] for k in single])
        elpd[single] = np.asarray(loo.elpd_loo)[obs]
        lpd[single] = np.asarray(loo.lpd)[obs]
        mcse[single] = 0.0 if loo.integration.num_samples == 0 else np.nan
    valid = np.asarray(valid)
    elpd = np.where(valid, elpd, np.nan)
    mcse = np.where(valid, mcse, np.nan)
    sens = np.where(valid, np.linalg.norm(np.asarray(u), axis=-1), np.nan)
    shift = np.asarray(post.unwhiten(u.T).T)
    lev = np.asarray(lam[:, -1])
    if not valid.all():
        bad = labels[~valid]
        warnings.warn(
            f"{bad.size} of {n_groups} groups of '{name}' have leverage >= 1 (labels "
            f"{label_list(bad.tolist())}, leverage {np.array2string(lev[~valid][:10], precision=3)}): "
            "removing them leaves a cavity "
            "precision S - sum of H_i that is not positive definite, so their leave-group-out Gaussian does "
            "not exist; their elpd_loo, p_loo, sensitivity and shift are NaN and `valid` is False",
            stacklevel=2,
        )
    method = (f"defensive importance sampling in θ-space ({num_samples} draws per group: {n_a} from q₋G, "
              f"{n_b} from q; lpd: {n_a} from q₊G, {n_b} from q); a group of one observation: its "
              "leave-one-out")
    return GroupMPE(labels, dim, codes, size, lpd, elpd, mcse, lpd - elpd, sens, lev, valid, shift, method)


def group_dataset(fit, groups, var_name=None, num_samples: int = 2000, rng_key=None) -> xr.Dataset:
    """Leave-group-out MPE outputs of one observed site as an ``xarray.Dataset`` over a group dim.

    Each group G is removed as one rank-|G| update of the posterior (see :mod:`numpyro_mpe.loo.groups`).

    Parameters
    ----------
    fit : Fit
        A fitted model.
    groups : str or array_like
        The name of one of the site's observation dims (a plate: leave one index along it out), or labels
        aligned with the observations (shape ``(N,)`` or the observation shape; a ``pandas.Categorical``
        keeps its category order).  See :func:`resolve_groups`.
    var_name : str, optional
        Observed site; required when the model has several.
    num_samples : int, default 2000
        Draws per group for the θ-space integrals of ``lpd`` and ``elpd_loo``.
    rng_key : jax.random.PRNGKey, optional
        Key of those draws (``PRNGKey(0)`` by default).

    Returns
    -------
    xarray.Dataset
        Over the dim named by the plate when ``groups`` is a dim name, else ``"group"``; its coordinate is
        the unique labels.  Variables: ``lpd`` (log E_q Π_{i∈G} p(y_i|θ)), ``elpd_loo`` (log E_{q₋G} Π_{i∈G}
        p(y_i|θ)), ``elpd_loo_mcse``, ``p_loo`` (lpd − elpd_loo), ``sensitivity`` (√(Δmᵀ S Δm)),
        ``leverage`` (largest eigenvalue of S^{-1/2} Σ_{i∈G} Ĥ_i S^{-1/2}), ``valid`` (leverage < 1),
        ``size`` (observations in the group) and ``shift`` (m₋G − m over dim ``param``; read it as
        ``ds["shift"]``).  ``attrs["elpd_integration"]`` says how the integrals were computed.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> ds = fit.sensitivities(groups=["left"] * 10 + ["right"] * 10)
    >>> ds.sizes["group"], ds.group.values.tolist(), ds["size"].values.tolist()
    (2, ['left', 'right'], [10, 10])
    """
    res = group_mpe(fit, groups, var_name, num_samples=num_samples, rng_key=rng_key)
    site = fit.adapter.observed_site(var_name)
    dim = res.dim
    data = {
        "lpd": (dim, res.lpd),
        "elpd_loo": (dim, res.elpd_loo),
        "elpd_loo_mcse": (dim, res.elpd_loo_mcse),
        "p_loo": (dim, res.p_loo),
        "sensitivity": (dim, res.sensitivity),
        "leverage": (dim, res.leverage),
        "valid": (dim, res.valid.astype(bool)),
        "size": (dim, res.size.astype(int)),
        "shift": ((dim, "param"), res.shift),
    }
    ds = xr.Dataset(data, coords={dim: res.labels, "param": fit.adapter.param_labels()})
    ds.attrs.update(var_name=site.name, method=fit.method, groups=dim, num_samples=int(num_samples),
                    elpd_integration=res.method, num_params=fit.adapter.num_params)
    ds["sensitivity"].attrs["description"] = (
        "sqrt(dm' S dm): posterior-mean shift if the group is removed, in posterior-sd units")
    ds["leverage"].attrs["description"] = (
        "max eig of S^-1/2 (sum of H_i over the group) S^-1/2; the cavity is valid iff < 1")
    ds["elpd_loo"].attrs["description"] = "log E_{q_-G}[prod_{i in G} p(y_i | theta)] (MPE cavity)"
    return ds
