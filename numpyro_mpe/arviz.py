"""Export a :class:`~numpyro_mpe.Fit` to ArviZ, on either ArviZ line.

* :func:`elpd_data` — the MPE leave-one-out as the installed ArviZ's own ELPD object
  (``arviz.stats.stats_utils.ELPDData`` on arviz 0.x, ``arviz_stats.utils.ELPDDataLOO`` on arviz ≥ 1), so that
  ``az.compare`` and ``az.plot_compare`` accept it beside ordinary PSIS-LOO results.
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
``observed_data``
    Every observed site's values with its observation dims and event dims ``f"{site}_dim_{k}"`` (numbered
    as above).
``mpe``
    For every observed site ``s`` and every output ``o`` of ``fit.sensitivities(s)`` one variable
    ``f"{s}_{o}"`` (``y_elpd_loo``, ``y_leverage``, ``y_valid``, ``y_prediction_shift``, ...) over the
    observation dims; the predictor axis of site ``s`` is the dim ``f"{s}_predictor"``.  Each variable's
    attrs carry ``var_name`` and ``elpd_integration`` of its site.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import re
import warnings
from typing import TYPE_CHECKING

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
from scipy.special import logsumexp

from .mpe import map_chunks

if TYPE_CHECKING:
    from .fit import Fit

#: True on the arviz ≥ 1 line (DataTree, arviz_stats).
ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1
#: Threshold on leverage (MPE) and Pareto k̂ (PSIS) above which an observation is flagged.
GOOD_K = 0.7
#: Name of the group holding the MPE outputs.
MPE_GROUP = "mpe"
#: Elements (draws × log-likelihood values) per chunk when evaluating the model on draws.
_DRAW_CHUNK_ELEMENTS = 2**22
SAMPLE_DIMS = ("chain", "draw")


# ------------------------------------------------------------------ small helpers
def _library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _attrs(fit: Fit, **extra) -> dict:
    """Group attributes in the style of ArviZ's ``make_attrs`` (netCDF-serializable values only)."""
    attrs = {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "arviz_version": az.__version__,
        "creation_library": "numpyro_mpe",
        "creation_library_version": _library_version("numpyro_mpe"),
        "creation_library_language": "Python",
        "inference_library": "numpyro",
        "inference_library_version": _library_version("numpyro"),
        "mpe_method": fit.method,
    }
    attrs.update(extra)
    return attrs


def _set_attrs(ds: xr.Dataset, fit: Fit, sample_dims: tuple, **extra) -> xr.Dataset:
    """Attach :func:`_attrs`, with ``sample_dims`` as arviz ≥ 1 records it."""
    ds.attrs = _attrs(fit, **extra)
    if ARVIZ_1:
        ds.attrs["sample_dims"] = list(sample_dims)
    return ds


def _se(values) -> float:
    """Standard error of a sum of pointwise values, with the installed ArviZ's convention."""
    values = np.asarray(values, dtype=float).ravel()
    n = values.size
    if n < 2:
        return 0.0
    # arviz 0.x: sqrt(n var) with ddof=0; arviz_stats: ddof=1.
    return float(np.sqrt(n * np.var(values, ddof=1 if ARVIZ_1 else 0)))


def _container(groups: dict[str, xr.Dataset]):
    """``InferenceData`` (arviz 0.x) or ``DataTree`` (arviz ≥ 1) holding ``groups``."""
    if ARVIZ_1:
        return xr.DataTree.from_dict(dict(groups))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not defined in the InferenceData scheme")
        return az.InferenceData(**groups)


def _group(data, name: str) -> xr.Dataset:
    """Group ``name`` of an ``InferenceData`` or ``DataTree`` as an ``xarray.Dataset``."""
    grp = data[name]
    return grp.to_dataset() if hasattr(grp, "to_dataset") and not isinstance(grp, xr.Dataset) else grp


def pointwise_elpd(elpd) -> xr.DataArray:
    """Pointwise ELPD of an ArviZ ELPD object (``loo_i`` on arviz 0.x, ``elpd_i`` on arviz ≥ 1)."""
    return elpd["elpd_i"] if ARVIZ_1 else elpd["loo_i"]


def _named_dims(name: str, dims: tuple, ndim: int) -> list[str]:
    """``dims`` padded at the end with ``f"{name}_dim_{k}"``, as the installed ArviZ pads unnamed axes.

    arviz 0.x numbers an unnamed axis by its position (``theta_dim_1`` after one plate dim); arviz ≥ 1
    counts the unnamed axes from 0 (``theta_dim_0``).
    """
    dims = list(dims)[:ndim]
    if ARVIZ_1:
        k0 = sum(1 for d in dims if re.fullmatch(rf"{re.escape(name)}_dim_\d+", str(d)))
        return dims + [f"{name}_dim_{k0 + j}" for j in range(ndim - len(dims))]
    return dims + [f"{name}_dim_{k}" for k in range(len(dims), ndim)]


def _latent_dims(fit: Fit) -> dict[str, tuple]:
    """Plate names (sorted by ``dim``) of every latent and deterministic site, as ``arviz.from_numpyro``."""
    tr = fit.adapter._trace(fit.posterior.mean)  # one model pass at the mean
    out = {}
    for name, site in tr.items():
        if site["type"] in ("sample", "deterministic") and not site.get("is_observed", False):
            frames = sorted(site.get("cond_indep_stack", []), key=lambda f: f.dim)
            out[name] = tuple(f.name for f in frames) + tuple(site.get("infer", {}).get("event_dims", []))
    return out


def _with_coords(ds: xr.Dataset, coords: dict | None = None) -> xr.Dataset:
    """Integer coordinates for every dim without one (as ArviZ's converters add them)."""
    coords = dict(coords or {})
    for dim, size in ds.sizes.items():
        if dim not in ds.coords and dim not in coords:
            coords[dim] = np.arange(size)
    return ds.assign_coords(coords)


# ------------------------------------------------------------------ the model on draws from q
def _draw_chunk(per_draw: int, num_samples: int) -> int:
    return int(max(1, min(num_samples, _DRAW_CHUNK_ELEMENTS // max(1, per_draw))))


def _log_lik_on_draws(fit: Fit, draws, var_name: str, idx=None) -> np.ndarray:
    """``log p(y_i | θ_s)``, shape ``(S, N)`` (or ``(S, len(idx))``), evaluated in chunks of draws."""
    site = fit.adapter.observed[var_name]
    sel = None if idx is None else jnp.asarray(idx)

    def one(theta):
        ll = fit.adapter.log_lik(theta, var_name)
        return ll if sel is None else ll[sel]

    width = site.num_obs if idx is None else len(idx)
    fn = jax.jit(jax.vmap(one))
    chunk = _draw_chunk(site.num_obs, draws.shape[0])
    out = map_chunks(fn, draws, draws.shape[0], chunk, f"log-lik {var_name}", fit.progress)
    return np.asarray(out).reshape(draws.shape[0], width)


def _sample_groups(fit: Fit, num_samples: int, rng_key, var_names: list[str]) -> dict[str, xr.Dataset]:
    """``posterior`` and ``log_likelihood`` groups for ``num_samples`` draws from q."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    num_samples = int(num_samples)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    ad = fit.adapter
    draws = fit.posterior.sample(rng_key, num_samples)  # (S, P), unconstrained

    def one(theta):
        lls = ad.log_lik_all(theta)
        return ad.constrain(theta), {n: lls[n] for n in var_names}

    per_draw = sum(ad.observed[n].num_obs for n in var_names) + 4 * ad.num_params
    chunk = _draw_chunk(per_draw, num_samples)
    values, lls = map_chunks(jax.jit(jax.vmap(one)), draws, num_samples, chunk, "draws from q", fit.progress)
    del draws

    dims = _latent_dims(fit)
    post = {}
    for name, v in values.items():
        v = np.asarray(v)[None]
        post[name] = xr.DataArray(v, dims=list(SAMPLE_DIMS) + _named_dims(name, dims.get(name, ()),
                                                                          v.ndim - 2))
    source = (f"{num_samples} independent draws from q = N(m, S^-1), the {fit.method} Gaussian approximation "
              "in unconstrained space, mapped to constrained space")
    posterior = _with_coords(xr.Dataset(post), {"chain": [0], "draw": np.arange(num_samples)})
    _set_attrs(posterior, fit, SAMPLE_DIMS, posterior_source=source)
    ll_vars = {}
    for name in var_names:
        site = ad.observed[name]
        arr = np.asarray(lls[name]).reshape((1, num_samples) + tuple(site.obs_shape))
        ll_vars[name] = xr.DataArray(arr, dims=list(SAMPLE_DIMS) + list(site.dims))
    log_lik = _with_coords(xr.Dataset(ll_vars), {"chain": [0], "draw": np.arange(num_samples)})
    _set_attrs(log_lik, fit, SAMPLE_DIMS, posterior_source=source)
    return {"posterior": posterior, "log_likelihood": log_lik}


def _observed_group(fit: Fit) -> xr.Dataset:
    data = {}
    for name, site in fit.adapter.observed.items():
        v = np.asarray(site.value)
        data[name] = xr.DataArray(v, dims=_named_dims(name, site.dims, v.ndim))
    return _set_attrs(_with_coords(xr.Dataset(data)), fit, ())


def _mpe_group(fit: Fit) -> xr.Dataset:
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
    out = xr.Dataset(data, coords=coords)
    return _set_attrs(out, fit, (), observed_sites=list(fit.adapter.observed),
                      num_params=int(fit.adapter.num_params),
                      variables="f'{site}_{output}' for every observed site and output of fit.sensitivities")


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
        ``(chain, draw, *obs_dims)``), ``observed_data`` and ``mpe`` (variables ``f"{site}_{output}"`` with
        the outputs of :meth:`Fit.sensitivities`; see :func:`read_sensitivities`).  Both round-trip through
        netCDF (``to_netcdf`` / ``az.from_netcdf`` or ``xarray.open_datatree``).

    Notes
    -----
    The model is evaluated on the draws in chunks, so intermediates stay bounded; the returned object
    holds the ``num_samples × N`` log-likelihood matrix of every observed site, as ``az.loo`` needs it.

    Examples
    --------
    >>> idata = fit.to_inference_data(num_samples=500)  # doctest: +SKIP
    >>> az.loo(idata, var_name="y")  # doctest: +SKIP
    >>> idata["mpe"]["y_leverage"]  # doctest: +SKIP
    """
    groups = _sample_groups(fit, num_samples, rng_key, list(fit.adapter.observed))
    groups["observed_data"] = _observed_group(fit)
    groups[MPE_GROUP] = _mpe_group(fit)
    return _container(groups)


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

    Examples
    --------
    >>> from numpyro_mpe.arviz import read_sensitivities
    >>> ds = read_sensitivities(az.from_netcdf("fit.nc"))  # doctest: +SKIP
    """
    grp = _group(data, MPE_GROUP)
    sites = grp.attrs.get("observed_sites")
    sites = [sites] if isinstance(sites, str) else list(np.atleast_1d(sites)) if sites is not None else []
    if var_name is None:
        if len(sites) != 1:
            raise ValueError(f"the export has several observed sites {sites}; pass var_name= to pick one")
        var_name = sites[0]
    prefix = f"{var_name}_"
    names = {v: v[len(prefix):] for v in grp.data_vars
             if v.startswith(prefix) and grp[v].attrs.get("var_name") == var_name}
    if not names:
        raise ValueError(f"no MPE outputs of '{var_name}' in the export; observed sites: {sites}")
    ds = grp[list(names)].rename(names)
    if f"{var_name}_predictor" in ds.dims:
        ds = ds.rename({f"{var_name}_predictor": "predictor"})
    ds = ds.drop_vars([c for c in ds.coords if c not in ds.dims and c != "predictor"], errors="ignore")
    ds.attrs = {"var_name": var_name}
    return ds


# ------------------------------------------------------------------ ELPD objects
def _psis_on_q(fit: Fit, var_name: str, idx: np.ndarray, num_samples: int, rng_key):
    """PSIS-LOO with ``num_samples`` draws from q for the flat observations ``idx`` of ``var_name``.

    Runs the installed ArviZ's own ``loo`` on those observations only; returns pointwise elpd and k̂.
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    draws = fit.posterior.sample(rng_key, num_samples)
    ll = _log_lik_on_draws(fit, draws, var_name, idx)  # (S, n_bad)
    dims = ["chain", "draw", "__obs__"]
    groups = {
        "posterior": xr.Dataset({"__theta__": (("chain", "draw"), np.zeros((1, num_samples)))}),
        "log_likelihood": xr.Dataset({var_name: (dims, ll[None])}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = az.loo(_container(groups), pointwise=True, var_name=var_name, reff=1.0)
    return np.asarray(pointwise_elpd(res)).ravel(), np.asarray(res["pareto_k"]).ravel()


def elpd_data(fit: Fit, var_name: str | None = None, *, method: str = "mpe", groups=None,
              num_samples: int = 2000, rng_key=None):
    """The MPE leave-one-out of one observed site as the installed ArviZ's ELPD object.

    Built as ``az.loo(..., pointwise=True)`` builds its result, so that ``az.compare`` and
    ``az.plot_compare`` take it beside ordinary PSIS-LOO results:

    * ``elpd_loo`` (arviz 0.x) / ``elpd`` (arviz ≥ 1): Σ_i ``elpd_loo``\\_i of :meth:`Fit.sensitivities`;
      ``se`` the standard error with the installed ArviZ's convention (√(N·var), ddof 0 on 0.x, 1 on ≥ 1);
      ``p_loo`` / ``p``: Σ_i ``p_loo``\\_i;
    * ``loo_i`` / ``elpd_i``: the pointwise values over the observation dims;
    * ``pareto_k``: the MPE **leverage** (the closed-form twin of k̂; same 0.7 threshold, ``good_k = 0.7``);
    * ``warning``: True when some leverage exceeds 0.7 or some cavity is invalid;
    * ``n_samples``: the posterior draws behind the numbers — 0 where ``elpd_loo`` is closed form
      (quadrature in predictor space), ``fit.num_samples`` where it was integrated by Monte Carlo, raised to
      ``num_samples`` when the PSIS fallback below ran;
    * ``scale``: ``"log"``.

    Observations whose cavity is invalid (leverage ≥ 1: ``valid`` False, ``elpd_loo`` NaN) have no Gaussian
    leave-one-out posterior.  To keep the totals finite, their ``elpd_loo`` is replaced by PSIS-LOO on
    ``num_samples`` draws from q (for those observations only; ``p_loo`` = MPE ``lpd`` − that value), and a
    warning says so.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    var_name : str, optional
        Observed site; required when the model has several (as in ``az.loo``).
    num_samples : int, default 2000
        Draws from q for the PSIS fallback on invalid cavities (unused when all are valid).
    rng_key : jax.random.PRNGKey, optional
        Key for those draws; ``PRNGKey(0)`` when omitted.

    Returns
    -------
    arviz.stats.stats_utils.ELPDData or arviz_stats.utils.ELPDDataLOO

    Examples
    --------
    >>> loo_mpe = fit.loo()  # doctest: +SKIP
    >>> az.compare({"mpe": loo_mpe, "nuts": az.loo(idata_nuts)})  # doctest: +SKIP
    """
    if method not in ("mpe", "mpe-is"):
        raise ValueError(f"method must be 'mpe' or 'mpe-is', got '{method}'")
    if method != "mpe" or groups is not None:
        raise NotImplementedError("method='mpe-is' and groups= are not wired in yet")
    site = fit.adapter.observed_site(var_name)
    ds = fit.sensitivities(site.name)
    elpd_i = ds["elpd_loo"].copy()
    p_loo_i = ds["p_loo"].copy()
    leverage = ds["leverage"].copy()
    valid = np.asarray(ds["valid"]).ravel()
    bad = np.flatnonzero(~valid | ~np.isfinite(np.asarray(elpd_i)).ravel())
    n_samples = fit.num_samples if str(ds.attrs.get("elpd_integration", "")).startswith("Monte Carlo") else 0
    if bad.size:
        elpd_bad, k_bad = _psis_on_q(fit, site.name, bad, num_samples, rng_key)
        flat_elpd = np.asarray(elpd_i).ravel().copy()
        flat_p = np.asarray(p_loo_i).ravel().copy()
        flat_elpd[bad] = elpd_bad
        flat_p[bad] = np.asarray(ds["lpd"]).ravel()[bad] - elpd_bad
        elpd_i.values = flat_elpd.reshape(elpd_i.shape)
        p_loo_i.values = flat_p.reshape(p_loo_i.shape)
        n_samples = max(n_samples, int(num_samples))
        warnings.warn(
            f"{bad.size} of {site.num_obs} observations of '{site.name}' have an invalid MPE cavity "
            f"(leverage >= 1, flat indices {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}); their "
            f"elpd_loo is PSIS-LOO on {num_samples} draws from q instead (Pareto k-hat "
            f"{np.array2string(k_bad[:10], precision=2)}{' ...' if bad.size > 10 else ''}), so the totals "
            "mix MPE and PSIS; pareto_k keeps the leverage",
            stacklevel=2,
        )
    elpd_i.name = "elpd_i" if ARVIZ_1 else "loo_i"
    leverage.name = "pareto_k"
    for da in (elpd_i, leverage, p_loo_i):
        da.attrs = {}
    elpd = float(np.sum(elpd_i.values))
    se = _se(elpd_i.values)
    p_loo = float(np.sum(p_loo_i.values))
    n_data = int(site.num_obs)
    warn = bool(np.any(np.asarray(leverage) > GOOD_K) or bad.size > 0)
    if ARVIZ_1:
        from arviz_stats.utils import ELPDDataLOO

        return ELPDDataLOO(elpd=elpd, se=se, p=p_loo, n_samples=int(n_samples), n_data_points=n_data,
                           scale="log", warning=warn, good_k=GOOD_K, elpd_i=elpd_i, pareto_k=leverage,
                           approx_posterior=False, p_loo_i=p_loo_i.rename("p_loo_i"))
    from arviz.stats.stats_utils import ELPDData

    return ELPDData(
        data=[elpd, se, p_loo, int(n_samples), n_data, warn, elpd_i, leverage, "log", GOOD_K],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i", "pareto_k",
               "scale", "good_k"],
    )


def log_likelihood_array(data, var_name: str) -> xr.DataArray:
    """Log-likelihood of ``var_name`` in an ``InferenceData`` or ``DataTree``: ``(chain, draw, ...)``."""
    grp = _group(data, "log_likelihood")
    if var_name not in grp:
        raise ValueError(f"the log_likelihood group has no variable '{var_name}'; "
                         f"it has {list(grp.data_vars)}")
    return grp[var_name]


def logmeanexp_draws(da: xr.DataArray) -> xr.DataArray:
    """log of the mean of ``exp(da)`` over ``chain`` and ``draw`` (the ``lpd`` of a posterior sample)."""
    other = [d for d in da.dims if d not in SAMPLE_DIMS]
    arr = da.transpose(*SAMPLE_DIMS, *other).values
    s = arr.shape[0] * arr.shape[1]
    out = logsumexp(arr.reshape((s,) + arr.shape[2:]), axis=0) - np.log(s)
    return xr.DataArray(out, dims=other, coords={d: da[d] for d in other if d in da.coords})
