"""Export a :class:`~numpyro_mpe.Fit` to ArviZ, on either ArviZ line.

* :func:`to_inference_data` — draws from q in constrained space with their log-likelihoods, the observed data
  and the MPE outputs: ``arviz.InferenceData`` on arviz 0.x, ``xarray.DataTree`` on arviz ≥ 1.
* :func:`read_sensitivities` — the MPE outputs of one observed site back from such an export, as
  :meth:`Fit.sensitivities <numpyro_mpe.Fit.sensitivities>` returns them.

Groups of the export
--------------------
``posterior``
    Every latent and deterministic site, ``(chain=1, draw, *shape)``; dims named by the site's plates as
    ``arviz.from_numpyro`` names them (plates sorted by ``dim``), other axes ``f"{site}_dim_{k}"`` numbered
    as the installed ArviZ numbers them (by axis position on 0.x, counting unnamed axes on ≥ 1).
``log_likelihood``
    Every observed site, ``(chain=1, draw, *obs_shape)`` with the site's observation dims (event dims summed).
``sample_stats``
    ``log_p`` (−U(θ), NumPyro's log joint in unconstrained space incl. log|det J|) and ``log_q``
    (log q(θ) in the same space) of every draw, ``(chain=1, draw)``: the ``log_p`` and ``log_q`` arguments of
    arviz ≥ 1 ``loo_approximate_posterior`` and ``loo_subsample``.
``observed_data``
    Every observed site's values with its observation dims and event dims ``f"{site}_dim_{k}"`` (numbered
    as above).
``mpe``
    For every observed site ``s`` and every output ``o`` of ``fit.sensitivities(s)`` one variable
    ``f"{s}_{o}"`` (``y_elpd_loo``, ``y_leverage``, ``y_valid``, ``y_prediction_shift``, ...) over the
    observation dims; the predictor axis of site ``s`` is the dim ``f"{s}_predictor"``.  Each variable's
    attrs carry ``var_name`` and ``elpd_integration`` of its site.  Where the site has them, the LOO
    predictive checks (:mod:`numpyro_mpe.loo.predictive`) ``f"{s}_loo_pit"`` (with the calibration tests in
    its attrs), ``f"{s}_loo_mean"`` and ``f"{s}_loo_sd"``, attrs ``kind="loo_predictive"``
    (:func:`read_loo_predictive`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr

from numpyro_mpe.errors import MPEError
from numpyro_mpe.loo.arviz_compat import (
    MPE_GROUP,
    container,
    group,
    named_dims,
    sample_groups,
    set_attrs,
    with_coords,
)

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


def _observedgroup(fit: Fit) -> xr.Dataset:
    data = {}
    for name, site in fit.adapter.observed.items():
        v = np.asarray(site.value)
        data[name] = xr.DataArray(v, dims=named_dims(name, site.dims, v.ndim))
    return set_attrs(with_coords(xr.Dataset(data)), fit, ())


def _mpegroup(fit: Fit) -> xr.Dataset:
    """The MPE outputs of every observed site: variables ``f"{site}_{output}"``."""
    data, coords = {}, {}
    for name in fit.adapter.observed:
        ds = fit.sensitivities(name)
        if "predictor" in ds.dims:
            ds = ds.rename({"predictor": f"{name}_predictor"})
        for var, da in ds.data_vars.items():
            da = da.copy()
            da.attrs.update(var_name=name, elpd_integration=str(ds.attrs.get("elpd_integration", "")))
            data[f"{name}_{var}"] = da
        coords.update({k: v.values for k, v in ds.coords.items()})
        data.update(_predictive_group(fit, name))
    out = xr.Dataset(data, coords=coords)
    return set_attrs(out, fit, (), observed_sites=list(fit.adapter.observed),
                      num_params=int(fit.adapter.num_params),
                      variables="f'{site}_{output}' for every observed site and output of fit.sensitivities; "
                               "f'{site}_loo_pit', '_loo_mean', '_loo_sd' (attrs kind='loo_predictive') "
                               "where the site has LOO predictive checks")


#: Marks the LOO predictive checks in the ``mpe`` group (``attrs["kind"]``).
LOO_PREDICTIVE = "loo_predictive"


def _predictive_group(fit: Fit, name: str) -> dict:
    """``f"{name}_loo_pit"``, ``_loo_mean`` and ``_loo_sd``, or nothing where the site has no LOO predictive
    checks (no predictor, vector observations, no CDF)."""
    from numpyro_mpe.loo.predictive import loo_expectations, loo_pit

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid cavities are reported by the site's other outputs
            pit = loo_pit(fit, name)
            values = {"pit": pit[name], "mean": loo_expectations(fit, name)[0],
                      "sd": loo_expectations(fit, name, "sd")[0]}
    except MPEError:
        return {}
    tests = {k: (int(v) if isinstance(v, bool) else v) for k, v in pit.attrs.items()
             if isinstance(v, bool | int | float | str)}
    out = {}
    for key, da in values.items():
        da = da.copy()
        da.attrs = {"var_name": name, "kind": LOO_PREDICTIVE, **(tests if key == "pit" else {})}
        out[f"{name}_loo_{key}"] = da.rename(f"{name}_loo_{key}")
    return out


def to_inference_data(fit: Fit, num_samples: int = 1000, rng_key=None):
    """Export a fit: draws from q, their log-likelihoods, the observed data and the MPE outputs.

    Parameters
    ----------
    fit : Fit
        A fitted model, e.g. from :class:`numpyro_mpe.Laplace`.
    num_samples : int, default 1000
        Draws from the Gaussian posterior q (one chain).  They are independent, so ``az.loo`` on the
        export uses a relative efficiency of 1.
    rng_key : jax.random.PRNGKey, optional
        Key for the draws; ``PRNGKey(0)`` when omitted.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``InferenceData`` on arviz 0.x, ``DataTree`` on arviz ≥ 1, with groups ``posterior`` (every latent
        and deterministic site in constrained space), ``log_likelihood`` (every observed site,
        ``(chain, draw, *obs_dims)``), ``sample_stats`` (``log_p`` and ``log_q`` of every draw, below),
        ``observed_data`` and ``mpe`` (variables ``f"{site}_{output}"`` with the outputs of
        :meth:`Fit.sensitivities`; see :func:`read_sensitivities`).  All round-trip through netCDF
        (``to_netcdf`` / ``az.from_netcdf`` or ``xarray.open_datatree``).

    Notes
    -----
    The model is evaluated on the draws in chunks, so intermediates stay bounded; the returned object
    holds the ``num_samples × N`` log-likelihood matrix of every observed site, as ``az.loo`` needs it.

    ``sample_stats`` holds, over ``(chain, draw)``, the two log densities that arviz ≥ 1
    ``loo_approximate_posterior`` (and ``loo_subsample``) take as ``log_p`` and ``log_q`` to correct
    PSIS-LOO for sampling from q instead of the posterior.  The draws are made in NumPyro's unconstrained
    space, so both densities are taken there:

    * ``log_p`` = −U(θ_s), NumPyro's log joint density ``log p(y, θ)`` *including* ``log|det J|`` of the
      constraining transforms (``-fit.adapter.potential``), i.e. the unnormalized posterior density of θ;
    * ``log_q`` = log N(θ_s; m, S⁻¹) (``fit.posterior.log_prob``).

    ``log_p − log_q`` is then the importance ratio p(θ | y)/q(θ) up to a constant, whichever transforms
    the model uses (a Jacobian on one side only would bias it).  On arviz 0.x nothing reads them; they are
    exported all the same.

    Examples
    --------
    >>> idata = fit.to_inference_data(num_samples=500)  # doctest: +SKIP
    >>> az.loo(idata, var_name="y")  # doctest: +SKIP
    >>> idata["mpe"]["y_leverage"]  # doctest: +SKIP

    PSIS-LOO corrected for the approximation (arviz ≥ 1):

    >>> from arviz_stats import loo_approximate_posterior  # doctest: +SKIP
    >>> stats = idata["sample_stats"]  # doctest: +SKIP
    >>> loo_approximate_posterior(idata, stats["log_p"], stats["log_q"], var_name="y")  # doctest: +SKIP
    """
    groups = sample_groups(fit, num_samples, rng_key, list(fit.adapter.observed), log_density=True)
    groups["observed_data"] = _observedgroup(fit)
    groups[MPE_GROUP] = _mpegroup(fit)
    return container(groups)


def read_sensitivities(data, var_name: str | None = None) -> xr.Dataset:
    """The MPE outputs of one observed site from an export of :func:`to_inference_data`.

    Undoes the naming of the ``mpe`` group: variables ``f"{var_name}_{output}"`` become ``output`` and the
    dim ``f"{var_name}_predictor"`` becomes ``predictor``, as :meth:`Fit.sensitivities` returns them.

    Parameters
    ----------
    data : arviz.InferenceData or xarray.DataTree
        The export (possibly read back from netCDF).
    var_name : str, optional
        Observed site; required when the export has several.

    Returns
    -------
    xarray.Dataset
        The variables and dims of :meth:`Fit.sensitivities` for ``var_name``; attrs ``{"var_name": ...}``.

    Examples
    --------
    >>> from numpyro_mpe.io.export import read_sensitivities
    >>> ds = read_sensitivities(az.from_netcdf("fit.nc"))  # doctest: +SKIP
    """
    grp = group(data, MPE_GROUP)
    sites = grp.attrs.get("observed_sites")
    sites = [sites] if isinstance(sites, str) else list(np.atleast_1d(sites)) if sites is not None else []
    if var_name is None:
        if len(sites) != 1:
            raise ValueError(f"the export has several observed sites {sites}; pass var_name= to pick one")
        var_name = sites[0]
    prefix = f"{var_name}_"
    names = {v: v[len(prefix):] for v in grp.data_vars
             if v.startswith(prefix) and grp[v].attrs.get("var_name") == var_name
             and grp[v].attrs.get("kind") != LOO_PREDICTIVE}
    if not names:
        raise ValueError(f"no MPE outputs of '{var_name}' in the export; observed sites: {sites}")
    ds = grp[list(names)].rename(names)
    if f"{var_name}_predictor" in ds.dims:
        ds = ds.rename({f"{var_name}_predictor": "predictor"})
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims and c != "predictor"], errors="ignore")
    ds.attrs = {"var_name": var_name}
    return ds



def read_loo_predictive(data, var_name: str) -> xr.Dataset:
    """The LOO predictive checks of one observed site from an export of :func:`to_inference_data`.

    Parameters
    ----------
    data : arviz.InferenceData or xarray.DataTree
        The export (possibly read back from netCDF).
    var_name : str
        Observed site.

    Returns
    -------
    xarray.Dataset
        ``loo_pit`` (its attrs: the calibration tests), ``loo_mean`` and ``loo_sd`` over the observation dims;
        empty where the site has none.

    Examples
    --------
    >>> from numpyro_mpe.io.export import read_loo_predictive
    >>> ds = read_loo_predictive(az.from_netcdf("fit.nc"), "y")  # doctest: +SKIP
    """
    grp = group(data, MPE_GROUP)
    prefix = f"{var_name}_"
    names = {v: v[len(prefix):] for v in grp.data_vars
             if v.startswith(prefix) and grp[v].attrs.get("kind") == LOO_PREDICTIVE
             and grp[v].attrs.get("var_name") == var_name}
    ds = grp[list(names)].rename(names)
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims], errors="ignore")
    ds.attrs = {"var_name": var_name}
    return ds
