"""Brute-force leave-one-out: refit without each observation, by the fit's own method — the ground truth the
MPE approximates.

For each listed observation i of an observed site, :func:`exact_loo` runs the backend's refit
(:class:`~numpyro_mpe.inference.base.Refit`) with weight 0 on i: Newton on U₋i(θ) = U(θ) + log p(y_i | θ)
from the fit's mean for Laplace (the refit's Laplace approximation q₋i = N(m₋i, ∇²U₋i(m₋i)⁻¹)), warm-started
SVI or NGVI for variational fits (the refit's Gaussian).  It integrates log E_{q₋i}[p(y_i | θ)] by Monte Carlo
in θ-space with antithetic draws common to every observation.  Nothing here uses the package's memories,
cavities or predictor quadrature, so the results are an independent check of
:meth:`numpyro_mpe.Fit.sensitivities`:

* Laplace, ``max_steps=1``: one plain Newton step θ₁ = m − ∇²U₋i(m)⁻¹ ∇U₋i(m), which the MPE shift
  m₋i − m = (S − Ĥ_i)⁻¹ ĝ_i equals to round-off (∇U(m) = 0);
* the converged refit (default) is the exact Laplace (or SVI, NGVI) leave-one-out posterior.

Cost: one refit and ``num_samples`` evaluations of the site's log-likelihood per observation, so use it on a
few observations or small data.  :func:`exact_group_loo` removes whole groups (Laplace).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

from numpyro_mpe.derivatives import value_grad_hessian
from numpyro_mpe.errors import MPEError
from numpyro_mpe.gaussian import antithetic_normal, standard_normal
from numpyro_mpe.inference.laplace import LaplaceRefit, newton_refit
from numpyro_mpe.inference.newton import converged, minimize
from numpyro_mpe.loo.common import flat_indices, label_list
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit


@partial(jit, static_argnames=("name",))
def _summary(adapter: ModelAdapter, post, weights, m_ref, mean_i, chol_i, z, name: str):
    """Shift, sensitivity, leverage and the Monte Carlo ``elpd_loo`` of one refit without the observations
    whose weight is 0 (``z``: standard-normal draws, none for no ``elpd_loo``)."""
    removed = weights == 0

    def ll_removed(t):
        return jnp.sum(jnp.where(removed, adapter.log_lik(t, name), 0.0))

    shift = mean_i - m_ref
    h = -jax.hessian(ll_removed)(post.mean)  # ∇²ℓ_G(m)
    a_w = post.whiten(post.whiten(0.5 * (h + h.T)).T)
    out = {"shift": shift, "sensitivity": _precision_norm(post, shift),
           "leverage": jnp.linalg.eigvalsh(0.5 * (a_w + a_w.T))[-1]}
    ok = jnp.all(jnp.isfinite(chol_i))
    if z.shape[0]:
        chol_i = jnp.where(ok, chol_i, jnp.eye(shift.shape[0], dtype=shift.dtype))
        draws = mean_i + solve_triangular(chol_i.T, z.T, lower=False).T  # θ_s ~ N(m₋i, S₋i⁻¹)
        ll = jax.lax.map(ll_removed, draws, batch_size=min(z.shape[0], 256))
        w = jnp.exp(ll - jnp.max(ll))
        out["elpd_loo"] = jnp.where(ok, logsumexp(ll) - jnp.log(z.shape[0]), jnp.nan)
        out["elpd_loo_mcse"] = jnp.where(ok, jnp.std(w) / jnp.mean(w) / jnp.sqrt(z.shape[0]), jnp.nan)
    else:
        out["elpd_loo"] = out["elpd_loo_mcse"] = jnp.asarray(jnp.nan, shift.dtype)
    return out


def _precision_norm(post, d):
    """√(dᵀ S d), the shift in posterior-sd units."""
    return jnp.sqrt(jnp.clip(d @ post.precision_matvec(d), 0.0, None))


def refit_dataset(adapter: ModelAdapter, site, idx, arrays: dict) -> xr.Dataset:
    """The Dataset of brute-force refits over dim ``obs``: ``shift (n, P)``, ``sensitivity``, ``elpd_loo``,
    ``elpd_loo_mcse``, ``leverage``, ``converged`` and ``steps`` for the flat indices ``idx``, with the site's
    observation coordinates attached."""
    name = site.name
    coords: dict[str, Any] = {"obs": idx, "param": adapter.param_labels()}
    for dim, pos in zip(site.dims, np.unravel_index(idx, site.obs_shape)):
        cname = dim if dim not in ("obs", "param") else f"{name}_{dim}"
        coords[cname] = ("obs", np.asarray(pos))
    return xr.Dataset(
        {
            "shift": (("obs", "param"), arrays["shift"]),
            "sensitivity": ("obs", arrays["sensitivity"]),
            "elpd_loo": ("obs", arrays["elpd_loo"]),
            "elpd_loo_mcse": ("obs", arrays["elpd_loo_mcse"]),
            "leverage": ("obs", arrays["leverage"]),
            "converged": ("obs", np.asarray(arrays["converged"]).astype(bool)),
            "steps": ("obs", np.asarray(arrays["steps"]).astype(int)),
        },
        coords=coords,
    )


def _checked_num_samples(num_samples) -> int:
    num_samples = int(num_samples)
    if num_samples == 1 or num_samples < 0:
        raise MPEError(f"num_samples must be 0 (no elpd_loo) or at least 2, got {num_samples}")
    return num_samples


def _draws(num_samples: int, p: int, dtype, rng_key):
    return antithetic_normal(rng_key, _checked_num_samples(num_samples), p, dtype)


def exact_loo(fit, indices: int | Sequence[int] | np.ndarray | None, var_name: str | None = None, *,
              num_samples: int = 4000, rng_key=None, progress: bool = True, max_steps: int | None = None,
              gtol: float | None = None, coupled: bool | None = None) -> xr.Dataset:
    """Leave-one-out by brute force: refit without each listed observation, by the fit's own method.

    For each flat index i the backend's refit runs with weight 0 on i (:class:`~numpyro_mpe.inference.base.
    Refit`; a Laplace fit: Newton on U₋i(θ) = U(θ) + log p(y_i | θ) from the fit's mean m, then the refit's
    Laplace approximation q₋i = N(m₋i, S₋i⁻¹), S₋i = ∇²U₋i(m₋i); SVI and NGVI fits: SVI or NGVI warm-started
    from the fit).  This is the exact counterpart of the closed-form MPE outputs of
    :meth:`numpyro_mpe.Fit.sensitivities`, and independent of them (no memories, cavities or predictor
    quadrature are used).

    Parameters
    ----------
    fit : numpyro_mpe.Fit
        A fitted model.
    indices : int, sequence of int, or None
        Flat indices into the observations of ``var_name`` (C order over its observation dims, as the rows of
        ``fit.site_mpe(var_name)``); negative values count from the end; ``None`` means all.
    var_name : str, optional
        Observed site; required when the model has several.
    num_samples : int, default 4000
        Draws from q₋i for ``elpd_loo`` (antithetic pairs of standard-normal draws, common to all
        observations); ``0`` skips ``elpd_loo`` (NaN), leaving only the refits.
    rng_key : jax.random.PRNGKey, optional
        Key of those draws (and of the refits' own draws, for SVI and NGVI).
    progress : bool, default True
        Show a progress bar over the observations.
    max_steps, gtol : optional
        Laplace fits: Newton steps per refit (default 100; ``max_steps=1`` is exactly one undamped Newton step
        θ₁ = m − ∇²U₋i(m)⁻¹∇U₋i(m), which the MPE posterior-mean shift equals to round-off) and the
        convergence tolerance on ‖∇U₋i‖_∞ relative to max(1, |U₋i|) (default 1e-10).
    coupled : bool, optional
        Refits that share their random numbers (SVI): shift relative to a reference refit with every
        observation kept (default), so that the noise the runs share cancels; ``False``: relative to m.

    Returns
    -------
    xarray.Dataset
        Over dim ``obs`` (coordinate: the flat index; the site's own observation dims are attached as
        non-index coordinates) and ``param`` (labels of the unconstrained θ entries):

        * ``shift`` (obs, param): m₋i − m in unconstrained space (read it as ``ds["shift"]``: ``ds.shift`` is
          xarray's ``Dataset.shift`` method);
        * ``sensitivity``: √(shiftᵀ S shift), S the full-data precision;
        * ``elpd_loo``: log E_{q₋i}[p(y_i | θ)] by Monte Carlo in θ-space, and ``elpd_loo_mcse`` its
        Monte Carlo
          standard error (delta method); NaN where S₋i is not positive definite;
        * ``leverage``: largest eigenvalue of S^{-1/2} ∇²ℓ_i(m) S^{-1/2}, ℓ_i = −log p(y_i | θ);
        * ``converged`` (bool): the refit converged; ``steps``: its steps.

        ``attrs["refit"]`` says what one refit is; ``attrs["reference_shift"]`` (coupled refits) is √(δᵀSδ)
        of the reference refit's offset δ = m_ref − m.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> import jax.numpy as jnp, numpyro_mpe as mpe
    >>> ds = mpe.exact_loo(fit, [0, 19], progress=False)
    >>> ds.sensitivity.dims, bool(ds.converged.all())
    (('obs',), True)
    >>> mpe_shift = fit.site_mpe().shift[jnp.array([0, 19])]   # closed-form MPE
    >>> bool(jnp.allclose(ds["shift"].values, mpe_shift))  # exact for a linear-Gaussian model
    True
    """
    adapter = fit.adapter
    site = adapter.observed_site(var_name)
    name = site.name
    idx = flat_indices(indices, site.num_obs, name)
    refit = fit.refit
    if refit is None or max_steps is not None or gtol is not None:
        if refit is not None:
            raise MPEError("max_steps and gtol apply to the Newton refits of Laplace fits; this "
                           f"{fit.method} fit refits by its own method")
        refit = LaplaceRefit(100 if max_steps is None else max_steps, 1e-10 if gtol is None else gtol)
    post = fit.posterior
    m = jnp.asarray(post.mean)
    p, dtype = m.shape[0], m.dtype
    if fit.refit is None:  # Newton refits are deterministic: the key is the draws' own
        z = _draws(num_samples, p, dtype, jax.random.PRNGKey(0) if rng_key is None else rng_key)
        key_fit = None
    else:
        key_fit, key_z = jax.random.split(jax.random.PRNGKey(1) if rng_key is None else rng_key)
        z = _draws(num_samples, p, dtype, key_z)
    run = refit.prepare(fit, name, key_fit)
    ones = jnp.ones(site.num_obs, dtype)
    coupled = refit.coupled if coupled is None else bool(coupled) and refit.coupled
    m_ref = run(ones).mean if coupled else m
    keys = ("shift", "sensitivity", "leverage", "elpd_loo", "elpd_loo_mcse")
    out: dict[str, list] = {k: [] for k in (*keys, "converged", "steps")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for i in tqdm(idx, desc=f"exact LOO {name}", disable=not progress, leave=False):
            w = ones.at[int(i)].set(0.0)
            r = run(w)
            s = jax.device_get(_summary(adapter, post, w, m_ref, r.mean, r.chol, z, name))
            for k in keys:
                out[k].append(s[k])
            out["converged"].append(bool(r.converged))
            out["steps"].append(int(r.steps))
    arrays = {k: np.asarray(v) for k, v in out.items()}
    if not len(idx):
        arrays["shift"] = np.zeros((0, p), dtype)
    not_conv = idx[~arrays["converged"].astype(bool)]
    if not_conv.size:
        warnings.warn(
            f"exact_loo: {not_conv.size} refit(s) of '{name}' did not converge ({refit.describe()}; flat "
            f"indices {label_list(not_conv)}); look at `converged` and `steps`", stacklevel=2)
    no_cav = idx[np.isnan(arrays["elpd_loo"])] if int(num_samples) else idx[:0]
    if no_cav.size:
        warnings.warn(
            f"exact_loo: at {no_cav.size} refit(s) of '{name}' the refit's precision is not positive "
            f"definite (flat indices {label_list(no_cav)}): the leave-one-out Gaussian does not exist there "
            "and elpd_loo is NaN", stacklevel=2)
    ds = refit_dataset(adapter, site, idx, arrays)
    integration = (f"Monte Carlo in θ-space ({int(num_samples)} antithetic draws from the refit's Gaussian)"
                   if int(num_samples) else "not computed (num_samples=0)")
    ds.attrs.update(var_name=name, method=refit.label, refit=refit.describe(), num_samples=int(num_samples),
                    elpd_integration=integration, coupled=bool(coupled))
    if coupled:
        ds.attrs["reference_shift"] = float(_precision_norm(post, m_ref - m))
    if isinstance(refit, LaplaceRefit):
        ds.attrs.update(max_steps=refit.max_steps, gtol=refit.gtol)
    ds["shift"].attrs["description"] = "m_-i - m (unconstrained space), brute-force refit without i"
    ds["sensitivity"].attrs["description"] = "sqrt(shift' S shift), S the full-data precision"
    ds["leverage"].attrs["description"] = "max eig of S^-1/2 Hess(-log p(y_i|theta))(m) S^-1/2"
    return ds


# ------------------------------------------------------------------ leave-group-out
@partial(jit, static_argnames=("name",))
def _group_refit(adapter: ModelAdapter, m, mask, max_steps, gtol, name: str):
    """The refit without the group ``mask`` and the Laplace approximation of q₋G(θ) p(y_G | θ) (a second
    Newton solve from m: the second component of the importance proposal for ``elpd_loo``)."""
    state = newton_refit(adapter, m, jnp.where(mask, 0.0, 1.0).astype(m.dtype), max_steps, gtol, name)
    theta_c, h_cav = state.theta, state.hess

    def tilted(t):  # −log [q₋G(t) p(y_G | t)] up to a constant
        d = t - theta_c
        return 0.5 * d @ h_cav @ d - jnp.sum(jnp.where(mask, adapter.log_lik(t, name), 0.0))

    tilt = minimize(value_grad_hessian(tilted), m, gtol=gtol, max_steps=max_steps, damping=0.0, polish=0)
    return (state.theta, jnp.linalg.cholesky(h_cav), converged(state.value, state.grad, gtol)
            & jnp.isfinite(state.value), state.steps, tilt.theta, jnp.linalg.cholesky(tilt.hess))


@partial(jit, static_argnames=("name",))
def _group_elpd(adapter: ModelAdapter, mask, theta_c, l_c, theta_t, l_t, z, name: str):
    """Defensive importance sampling of log E_{q₋G}[p(y_G | θ)]: half the draws from q₋G, half from the
    tilted Laplace approximation; and its Monte Carlo standard error."""
    num = z.shape[0]
    n_a = num - num // 2
    alpha = n_a / num
    ok = jnp.all(jnp.isfinite(l_c)) & jnp.all(jnp.isfinite(l_t))
    eye = jnp.eye(theta_c.shape[0], dtype=theta_c.dtype)
    l_c = jnp.where(ok, l_c, eye)
    l_t = jnp.where(ok, l_t, eye)
    draws = jnp.concatenate([
        theta_c + solve_triangular(l_c.T, z[:n_a].T, lower=False).T,  # from q₋G
        theta_t + solve_triangular(l_t.T, z[n_a:].T, lower=False).T,  # from the tilted Laplace
    ])

    def log_gauss(t, mean, lo):
        return -0.5 * jnp.sum(((t - mean) @ lo) ** 2, -1) + jnp.sum(jnp.log(jnp.diagonal(lo)))

    ll = jax.lax.map(lambda t: jnp.sum(jnp.where(mask, adapter.log_lik(t, name), 0.0)), draws,
                     batch_size=min(num, 256))
    lq_c = log_gauss(draws, theta_c, l_c)
    lq_t = log_gauss(draws, theta_t, l_t)
    log_w = ll + lq_c - jnp.logaddexp(jnp.log(alpha) + lq_c, jnp.log1p(-alpha) + lq_t)
    value = logsumexp(log_w) - jnp.log(num)
    mcse = jnp.std(jnp.exp(log_w - value)) / jnp.sqrt(num)
    return jnp.where(ok, value, jnp.nan), jnp.where(ok, mcse, jnp.nan)


def exact_group_loo(fit, groups, var_name: str | None = None, *, max_steps: int = 100,
                    num_samples: int = 4000, rng_key=None, progress: bool = True,
                    gtol: float = 1e-10) -> xr.Dataset:
    """Leave-group-out by brute force: refit the Laplace posterior without each whole group.

    For each group G, minimizes U₋G(θ) = U(θ) + Σ_{i∈G} log p(y_i | θ) by Newton's method warm-started at
    the full fit's mean m and takes the refit's Laplace approximation q₋G = N(m₋G, S₋G⁻¹),
    S₋G = ∇²U₋G(m₋G): the exact counterpart of the closed-form :func:`numpyro_mpe.loo.groups.group_dataset`,
    computed without its memories, cavities or proposals.

    ``elpd_loo`` = log E_{q₋G}[Π_{i∈G} p(y_i | θ)] is integrated in θ-space by importance sampling with a
    defensive mixture proposal: half the draws from q₋G, half from the Laplace approximation of the integrand
    q₋G(θ) p(y_G | θ) (a second Newton solve from m).  The estimate is unbiased for the same quantity as plain
    Monte Carlo from q₋G, whose variance is hopeless when the group's joint likelihood is much narrower than
    q₋G (a whole firm or class); the weights are bounded by twice those of plain Monte Carlo.

    Parameters
    ----------
    fit : numpyro_mpe.Fit
        A fitted model.
    groups : str or array_like
        The name of an observation dim (plate) or labels aligned with the observations; see
        :func:`numpyro_mpe.loo.groups.resolve_groups`.
    var_name : str, optional
        Observed site; required when the model has several.
    max_steps : int, default 100
        Newton steps per refit; ``max_steps=1`` is one undamped Newton step from m, which the MPE shift
        equals to round-off.
    num_samples : int, default 4000
        Draws per group for ``elpd_loo``; ``0`` skips it (NaN).
    rng_key : jax.random.PRNGKey, optional
        Key of those draws (common to all groups); ``PRNGKey(0)`` by default.
    progress : bool, default True
        Progress bar over the groups.
    gtol : float, default 1e-10
        Convergence tolerance on ‖∇U₋G‖_∞ relative to max(1, |U₋G|).

    Returns
    -------
    xarray.Dataset
        Over the group dim (the plate name, or ``"group"``; coordinate: the labels) and ``param``:
        ``shift`` (m₋G − m), ``sensitivity`` (√(shiftᵀ S shift)), ``elpd_loo`` and ``elpd_loo_mcse``,
        ``leverage`` (largest eigenvalue of S^{-1/2} ∇²ℓ_G(m) S^{-1/2}), ``converged``, ``steps`` and
        ``size``.  Where S₋G is not positive definite ``elpd_loo`` is NaN, with a warning.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit()
    >>> import jax.numpy as jnp, numpyro_mpe as mpe
    >>> labels = ["left"] * 10 + ["right"] * 10
    >>> ex = mpe.exact_group_loo(fit, labels, progress=False, num_samples=1000)
    >>> ds = fit.sensitivities(groups=labels)
    >>> bool(jnp.allclose(ex["shift"].values, ds["shift"].values))  # exact for a linear-Gaussian model
    True
    """
    from numpyro_mpe.loo.groups import resolve_groups

    adapter = fit.adapter
    site = adapter.observed_site(var_name)
    name = site.name
    codes, labels, dim = resolve_groups(site, groups)
    post = fit.posterior
    m = jnp.asarray(post.mean)
    p = m.shape[0]
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(post.chol)))):
        raise MPEError("the fit's precision has no Cholesky factor (not positive definite)")
    max_steps = int(max_steps)
    num_samples = _checked_num_samples(num_samples)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    z = standard_normal(rng_key, (max(num_samples, 2), p), m.dtype)
    keys = ("shift", "sensitivity", "leverage", "converged", "steps", "elpd_loo", "elpd_loo_mcse")
    out: dict[str, list] = {k: [] for k in keys}
    ones = jnp.ones(site.num_obs, m.dtype)
    no_z = jnp.zeros((0, p), m.dtype)
    for k in tqdm(range(len(labels)), desc=f"exact leave-group-out {name}", disable=not progress,
                  leave=False):
        mask = jnp.asarray(codes == k)
        theta_c, l_c, conv, steps, theta_t, l_t = _group_refit(adapter, m, mask, max_steps, float(gtol), name)
        s = _summary(adapter, post, jnp.where(mask, 0.0, ones), m, theta_c, l_c, no_z, name)
        r = {"shift": s["shift"], "sensitivity": s["sensitivity"], "leverage": s["leverage"],
             "converged": conv, "steps": steps}
        if num_samples:
            r["elpd_loo"], r["elpd_loo_mcse"] = _group_elpd(adapter, mask, theta_c, l_c, theta_t, l_t, z,
                                                            name)
        else:
            r["elpd_loo"] = r["elpd_loo_mcse"] = jnp.asarray(jnp.nan, m.dtype)
        r = jax.device_get(r)
        for key in keys:
            out[key].append(r[key])
    arrays = {k: np.asarray(v) for k, v in out.items()}
    conv = arrays["converged"].astype(bool)
    if max_steps > 1 and not conv.all():
        bad = labels[~conv]
        warnings.warn(
            f"exact_group_loo: {bad.size} refit(s) of '{name}' did not converge in {max_steps} Newton steps "
            f"(groups {label_list(bad)}); raise max_steps, or look at `converged` and `steps`", stacklevel=2)
    if num_samples:
        no_cav = labels[np.isnan(arrays["elpd_loo"])]
        if no_cav.size:
            warnings.warn(
                f"exact_group_loo: at {no_cav.size} refit(s) of '{name}' the Hessian of U₋G is not positive "
                f"definite (groups {label_list(no_cav)}): the Laplace leave-group-out posterior does not "
                "exist there and elpd_loo is NaN", stacklevel=2)
    ds = xr.Dataset(
        {
            "shift": ((dim, "param"), arrays["shift"].reshape(len(labels), p)),
            "sensitivity": (dim, arrays["sensitivity"]),
            "elpd_loo": (dim, arrays["elpd_loo"]),
            "elpd_loo_mcse": (dim, arrays["elpd_loo_mcse"]),
            "leverage": (dim, arrays["leverage"]),
            "converged": (dim, conv),
            "steps": (dim, arrays["steps"].astype(int)),
            "size": (dim, np.bincount(codes, minlength=len(labels))),
        },
        coords={dim: labels, "param": adapter.param_labels()},
    )
    integration = (f"defensive importance sampling in θ-space ({num_samples} draws per group: half from the "
                   "refit's Laplace posterior, half from the Laplace approximation of q₋G(θ) p(y_G|θ))"
                   if num_samples else "not computed (num_samples=0)")
    ds.attrs.update(var_name=name, method="exact_group_loo", max_steps=max_steps, num_samples=num_samples,
                    gtol=gtol, elpd_integration=integration)
    ds["shift"].attrs["description"] = "m_-G - m (unconstrained space), brute-force refit without the group"
    ds["sensitivity"].attrs["description"] = "sqrt(shift' S shift), S the full-data precision"
    ds["leverage"].attrs["description"] = "max eig of S^-1/2 Hess(-log p(y_G|theta))(m) S^-1/2"
    return ds


def exact_loo_svi(fit, indices, var_name: str | None = None, **options) -> xr.Dataset:
    """:func:`exact_loo` of a fit made by :class:`numpyro_mpe.SVI` or :func:`numpyro_mpe.from_svi` (refits by
    SVI); ``options`` as there."""
    from numpyro_mpe.inference.svi_refit import SVIRefit

    if not isinstance(fit.refit, SVIRefit):
        raise MPEError("exact_loo_svi needs a fit made by mpe.SVI or mpe.from_svi, got "
                       f"method={fit.method!r}; use mpe.exact_loo")
    return exact_loo(fit, indices, var_name, **options)


def exact_loo_ngvi(fit, indices, var_name: str | None = None, *, num_steps: int | None = None,
                   lr: float | None = None, control: bool = True, **options) -> xr.Dataset:
    """:func:`exact_loo` of a fit made by :class:`numpyro_mpe.NGVI` (refits by NGVI continued from the fit's
    optimizer state, ``num_steps`` steps at the constant learning rate ``lr``, with the paired all-ones run as
    a control variate when ``control``); ``options`` as there."""
    from numpyro_mpe.inference.ngvi import NGVIRefit

    if not isinstance(fit.refit, NGVIRefit):
        raise TypeError(f"exact_loo_ngvi needs a fit made by mpe.NGVI, got method={fit.method!r}; use "
                        "mpe.exact_loo")
    refit = NGVIRefit(fit.refit.ngvi, num_steps=num_steps, lr=lr, control=control)
    return exact_loo(_with_refit(fit, refit), indices, var_name, **options)


def _with_refit(fit, refit):
    """The same fit with another refit (the cache is shared)."""
    import copy

    other = copy.copy(fit)
    other.refit = refit
    return other
