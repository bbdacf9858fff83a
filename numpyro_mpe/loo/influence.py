"""Posterior influence per latent site: how far each observation moves each parameter's posterior mean.

For observation i of an observed site, the MPE gives the leave-one-out shift of q's mean in unconstrained
space, Δm_i = m₋i − m (:attr:`SiteMPE.shift <numpyro_mpe.engine.mpe.SiteMPE>`).  A modeller reads
parameters in
constrained space (σ, not log σ), so :func:`parameter_shift` maps the shift there by the delta method:

    shift_ij = [J_c Δm_i]_j / sd_j,    sd_j = √[J_c S⁻¹ J_cᵀ]_jj,    J_c = ∂c(θ)/∂θ at θ = m,

with c the map from θ to every latent (and requested deterministic) site in constrained space.  Numerator
and denominator are the first-order (delta-method) mean shift and posterior sd of c(θ) under q, so both are
computed at the same order and the ratio is exact for an affine c (coefficients of a regression).

This is the closed-form counterpart of arviz-stats' ``loo_influence(kind="mean", group="posterior")``,
which estimates |E_{p(θ|y₋i)}[c(θ)] − E_{p(θ|y)}[c(θ)]| / sd_p[c(θ)] by PSIS from posterior draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr

from numpyro_mpe.engine.layout import map_rows
from numpyro_mpe.engine.site import map_shifts
from numpyro_mpe.errors import ModelError
from numpyro_mpe.loo.arviz_compat import latent_dims, named_dims
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Elements per chunk when pushing basis directions through the linearized constrain map.
_JVP_CHUNK_ELEMENTS = 2**22


def _resolve_names(fit: Fit, var_names) -> tuple[list[str], bool]:
    """The requested sites (latent sample sites by default) and whether deterministic ones are among them."""
    latent = [s.name for s in fit.adapter.latent]
    det = list(fit.adapter.deterministic)
    if var_names is None:
        return latent, False
    names = [var_names] if isinstance(var_names, str) else list(var_names)
    if not names:
        raise ModelError(f"var_names is empty; latent sites: {latent}, deterministic sites: {det}")
    unknown = [n for n in names if n not in latent and n not in det]
    if unknown:
        observed = [n for n in unknown if n in fit.adapter.observed]
        why = f" ({observed} observed: parameter_shift is over latent sites)" if observed else ""
        raise ModelError(
            f"var_names {unknown} are not latent or deterministic sites of the model{why}; latent sites: "
            f"{latent}, deterministic sites: {det}"
        )
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen, any(n in det for n in seen)


@partial(jit, static_argnames=("names", "deterministic"))
def _jvp_rows(adapter, m, k, names: tuple, deterministic: bool):
    """Rows ``k`` of Jᵀ: the unit directions e_k pushed through the constrain map at m (forward mode)."""
    def flat(theta):
        vals = adapter.constrain(theta, deterministic=deterministic)
        return jnp.concatenate([jnp.ravel(jnp.asarray(vals[n], m.dtype)) for n in names])

    basis = jax.nn.one_hot(k, m.shape[0], dtype=m.dtype)
    return jax.vmap(lambda e: jax.jvp(flat, (m,), (e,))[1])(basis)


def _standardized(d, jac_t, inv_sd):
    return (d @ jac_t) * inv_sd


_standardized_rows = jit(_standardized)


def constrained_jacobian(fit: Fit, names: Sequence[str], deterministic: bool = False):
    """Jᵀ of θ ↦ (c_n(θ) for n in ``names``, flattened and concatenated) at the mean m: ``(P, P_c)``.

    Forward mode: the unit directions of θ are pushed through the constrain map in chunks (one jitted
    ``jvp`` per chunk, the primal pass shared within it), so no intermediate holds more than a chunk of
    tangents.  Also returns the shape of every site in ``names`` (a dict).

    Examples
    --------
    >>> jac_t, shapes = constrained_jacobian(fit, ["sigma"])  # doctest: +SKIP
    >>> jac_t.shape  # (P, 1): for sigma ~ HalfNormal, the row of log sigma holds sigma(m)  # doctest: +SKIP
    """
    ad = fit.adapter
    m = jnp.asarray(fit.posterior.mean)
    p = m.shape[0]

    spec = jax.eval_shape(lambda t: ad.constrain(t, deterministic=deterministic), m)
    shapes = {n: tuple(spec[n].shape) for n in names}
    width = sum(int(np.prod(s, dtype=int)) for s in shapes.values())
    per_dir = width + sum(s.num_obs for s in ad.observed.values()) + p
    chunk = int(max(1, min(p, _JVP_CHUNK_ELEMENTS // max(1, per_dir))))

    jac_t = map_rows(lambda a: _jvp_rows(ad, m, a, tuple(names), deterministic), jnp.arange(p), p, chunk,
                     desc="constrain Jacobian")
    return jac_t, shapes


def parameter_shift(fit: Fit, var_names=None, var_name: str | None = None,
                    chunk_size: int | None = None) -> xr.Dataset:
    """MPE shift of each latent site's posterior mean, in constrained space, for every observation.

    For observation i of ``var_name`` and every element j of every selected site,

    .. math::

        \\mathrm{shift}_{ij} = \\frac{[J_c\\,\\Delta m_i]_j}{\\sqrt{[J_c S^{-1} J_c^\\top]_{jj}}},
        \\qquad \\Delta m_i = m_{-i} - m,\\quad J_c = \\partial c(\\theta)/\\partial\\theta\\,|_{\\theta=m},

    the change of the site's posterior mean in constrained space when i is removed, in units of its
    posterior sd.  Δm_i is the MPE shift in unconstrained space (``fit.site_mpe(var_name).shift``); the map
    to constrained space is the **delta method** (Jacobian of the constrain map at q's mean m), and the sd
    is the delta-method sd of q in constrained space, the same first-order approximation, so the ratio
    is exact for sites with an affine transform (real-valued coefficients) and first-order accurate
    for the others (σ = exp(log σ): relative error of order Var_q(log σ)).  The sign is kept: positive means
    the posterior mean increases when i is removed.  arviz-stats' ``loo_influence(kind="mean",
    group="posterior")`` estimates the absolute value of the same quantity from posterior draws by PSIS.

    Cost: one linearization of the model and P Jacobian-vector products, then an (N × P) by (P × P_c)
    product streamed over chunks of ``chunk_size`` observations; nothing of size N × P × P is formed here.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    var_names : str or list of str, optional
        Sites to report; default every latent sample site.  Deterministic sites are included when named.
    var_name : str, optional
        Observed site whose observations are removed; required when the model has several.
    chunk_size : int, optional
        Observations per chunk; ``fit.chunk_size`` by default.

    Returns
    -------
    xarray.Dataset
        One variable per selected site, dims = the observation dims of ``var_name`` (as in
        :meth:`Fit.sensitivities <numpyro_mpe.Fit.sensitivities>`) followed by the site's own dims, named
        as in the ``posterior`` group of :meth:`Fit.to_inference_data <numpyro_mpe.Fit.to_inference_data>`
        (a site dim that is also an observation dim is renamed ``f"{site}_{dim}"``).  Observations whose
        leave-one-out Gaussian does not exist (leverage ≥ 1) are NaN, and the non-index coordinate
        ``valid`` over the observation dims is False there.  An element with zero posterior sd (a
        deterministic site that does not depend on θ) has shift 0.

    Raises
    ------
    ModelError
        If ``var_names`` names a site that is not latent or deterministic (the message lists them), or
        ``var_name`` is not an observed site.

    Notes
    -----
    Why the delta method rather than E_{q₋i}[c(θ)] − E_q[c(θ)] by draws: the latter adds the effect of the
    cavity's larger variance on a nonlinear c (for σ = exp(θ): E σ ∝ exp(v/2)), which is of order 1/N
    relative to the mean shift, and needs a P × P factorization and S model passes per observation; the
    delta method costs one Jacobian for all observations.  The larger error is usually q itself: for a
    scale parameter with few data, the Laplace fit (a joint mode) misses that every removal raises
    E[σ] a little (one degree of freedom fewer).  On stackloss (N = 21) that is a constant ≈ +0.05 sd,
    which leaves the signs of small σ shifts unreliable while the coefficients are unaffected.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpy as np, numpyro, numpyro.distributions as dist
    >>> import numpyro_mpe as mpe
    >>> numpyro.enable_x64()
    >>> from numpyro_mpe.io.toy import line_data
    >>> from numpyro_mpe.io.toy import line_model
    >>> def model(x, y=None):
    ...     line_model(x, y, sigma=2.0)
    >>> x, y = line_data()
    >>> fit = mpe.Laplace(model, progress=False).run(jax.random.PRNGKey(0), x, y=y)
    >>> ds = fit.parameter_shift()
    >>> sorted(ds.data_vars), ds["b"].dims
    (['b', 's'], ('data',))
    >>> int(np.argmax(np.abs(ds["b"].values))) in (0, 19)  # the end points pull the slope most
    True
    """
    ad = fit.adapter
    site = ad.observed_site(var_name)
    names, with_det = _resolve_names(fit, var_names)
    chunk_size = int(fit.chunk_size(var_name) if chunk_size is None else chunk_size)
    res = fit.site_mpe(site.name)
    dtype = fit.posterior.mean.dtype

    jac_t, shapes = constrained_jacobian(fit, names, deterministic=with_det)  # (P, P_c)
    b = fit.posterior.whiten(jac_t)  # L⁻¹ Jᵀ: column norms are the delta-method sds
    sd = jnp.sqrt(jnp.sum(b * b, axis=0))
    inv_sd = jnp.where(sd > 0, 1.0 / jnp.where(sd > 0, sd, 1.0), 0.0).astype(dtype)

    n = site.num_obs
    if res.shift is None:  # the pass did not keep the N×P shifts: recompute them chunk by chunk
        out = map_shifts(fit.site_data(site.name), fit.posterior, _standardized, (jac_t, inv_sd),
                         progress=fit.progress, desc=f"parameter shift {site.name}")
    else:
        out = map_rows(lambda d: _standardized_rows(d, jac_t, inv_sd), jnp.asarray(res.shift, dtype), n,
                       chunk_size, desc=f"parameter shift {site.name}", progress=fit.progress)
    out = np.asarray(out)

    latent = latent_dims(fit)
    obs_dims = list(site.dims)
    coords: dict = dict(site.coords())
    data = {}
    start = 0
    for name in names:
        shape = shapes[name]
        size = int(np.prod(shape, dtype=int))
        dims = named_dims(name, latent.get(name, ()), len(shape))
        dims = [f"{name}_{d}" if d in obs_dims else d for d in dims]
        for d, k in zip(dims, shape):
            if d in coords and len(coords[d]) != k:
                raise ModelError(f"dim '{d}' of site '{name}' has size {k}, but {len(coords[d])} elsewhere")
            coords.setdefault(d, np.arange(k))
        arr = out[:, start:start + size].reshape(tuple(site.obs_shape) + shape)
        data[name] = xr.DataArray(arr, dims=obs_dims + dims)
        data[name].attrs["description"] = (
            f"(E_q-i[{name}] - E_q[{name}]) / sd_q[{name}] in constrained space (delta method), "
            f"when one observation of '{site.name}' is removed"
        )
        start += size
    ds = xr.Dataset(data, coords=coords)
    ds = ds.assign_coords(valid=(obs_dims, np.asarray(res.valid).reshape(site.obs_shape)))
    ds.attrs.update(
        var_name=site.name, method=fit.method,
        transform="delta method: J_c(m) (m_-i - m) / sqrt(diag(J_c(m) S^-1 J_c(m)^T))",
        sign="positive: the posterior mean increases when the observation is removed",
    )
    return ds
