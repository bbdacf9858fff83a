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

from numpyro_mpe.engine.mpe import map_chunks

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

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


def _sample_groups(fit: Fit, num_samples: int, rng_key, var_names: list[str],
                   log_density: bool = False) -> dict[str, xr.Dataset]:
    """``posterior`` and ``log_likelihood`` groups for ``num_samples`` draws from q.

    With ``log_density``, also a ``sample_stats`` group with ``log_p`` = −U(θ_s) and ``log_q`` = log q(θ_s)
    of every draw (see :func:`to_inference_data`).
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    num_samples = int(num_samples)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    ad = fit.adapter
    draws = fit.posterior.sample(rng_key, num_samples)  # (S, P), unconstrained

    def one(theta):
        lls = ad.log_lik_all(theta)
        out = (ad.constrain(theta), {n: lls[n] for n in var_names})
        if log_density:  # both in unconstrained space: log_p − log_q is the importance ratio of θ ~ q
            out += (-ad.potential(theta), fit.posterior.log_prob(theta))
        return out

    per_draw = sum(ad.observed[n].num_obs for n in var_names) + 4 * ad.num_params
    chunk = _draw_chunk(per_draw, num_samples)
    values, lls, *log_dens = map_chunks(jax.jit(jax.vmap(one)), draws, num_samples, chunk, "draws from q",
                                        fit.progress)
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
    groups = {"posterior": posterior, "log_likelihood": log_lik}
    if log_density:
        groups["sample_stats"] = _log_density_group(fit, *log_dens, source)
    return groups


def _log_density_group(fit: Fit, log_p, log_q, source: str) -> xr.Dataset:
    """``sample_stats`` with ``log_p`` and ``log_q`` of the draws (``loo_approximate_posterior``'s inputs)."""
    num_samples = int(np.shape(log_p)[0])
    ds = xr.Dataset({
        "log_p": (SAMPLE_DIMS, np.asarray(log_p)[None]),
        "log_q": (SAMPLE_DIMS, np.asarray(log_q)[None]),
    })
    ds["log_p"].attrs["description"] = (
        "log joint density of the model at the draw in unconstrained space, -U(theta) = log p(y, theta) "
        "including log|det J| of the constraining transforms (NumPyro's -potential_energy)")
    ds["log_q"].attrs["description"] = (
        "log density of the draw under q = N(m, S^-1) in unconstrained space, where the draws were made; "
        "log_p - log_q is the importance ratio p(theta | y) / q(theta) up to a constant")
    ds = _with_coords(ds, {"chain": [0], "draw": np.arange(num_samples)})
    return _set_attrs(ds, fit, SAMPLE_DIMS, posterior_source=source,
                      usage="arviz_stats.loo_approximate_posterior(data, data['sample_stats']['log_p'], "
                            "data['sample_stats']['log_q'], var_name=...)")


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
    groups = _sample_groups(fit, num_samples, rng_key, list(fit.adapter.observed), log_density=True)
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
    >>> from numpyro_mpe.io.export import read_sensitivities
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
              num_samples: int = 2000, rng_key=None, df: float | None = None):
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

    ``method="mpe-is"`` replaces the *flagged* observations (leverage > 0.5 or an invalid cavity) by MPE
    importance sampling (:func:`numpyro_mpe.loo.importance.importance_loo`, ``num_samples`` draws from
    each MPE
    leave-one-out Gaussian, consistent for the exact Bayesian LOO); their ``pareto_k`` is then the k̂ of the
    MPE-IS weights (−inf where the weights are constant), the others keep the leverage, and a warning names
    the observations whose MPE-IS k̂ is still above 0.7.

    ``groups`` gives leave-group-out (:func:`numpyro_mpe.loo.groups.group_dataset`): one pointwise value per
    group over the group dim, ``pareto_k`` the group leverage, ``n_data_points`` the number of groups and
    ``n_samples`` the draws per group.  A group whose cavity is invalid gets MPE importance sampling
    (:func:`numpyro_mpe.loo.importance.importance_groups`) instead, with a warning.  Two such results over the
    same groups compare with ``az.compare``.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    var_name : str, optional
        Observed site; required when the model has several (as in ``az.loo``).
    method : {"mpe", "mpe-is"}, default "mpe"
        Closed-form MPE, or MPE importance sampling for the flagged observations.
    groups : str or array_like, optional
        Leave-group-out: the name of an observation dim (plate) or labels aligned with the observations.
    num_samples : int, default 2000
        Draws for the PSIS fallback on invalid cavities, for MPE-IS per flagged observation, or per group.
    rng_key : jax.random.PRNGKey, optional
        Key for those draws; ``PRNGKey(0)`` when omitted.
    df : float, optional
        MPE-IS proposal: ``None`` the Gaussian MPE leave-one-out posterior, a number a Student-t with ``df``
        degrees of freedom around it (see :func:`numpyro_mpe.loo.importance.importance_loo`).

    Returns
    -------
    arviz.stats.stats_utils.ELPDData or arviz_stats.utils.ELPDDataLOO

    Raises
    ------
    ValueError
        For an unknown ``method``, or ``method="mpe-is"`` with ``groups``.

    Examples
    --------
    >>> loo_mpe = fit.loo()  # doctest: +SKIP
    >>> az.compare({"mpe": loo_mpe, "nuts": az.loo(idata_nuts)})  # doctest: +SKIP
    >>> loo_is = fit.loo(method="mpe-is")  # doctest: +SKIP
    >>> az.compare({"a": fit_a.loo(groups="firm"), "b": fit_b.loo(groups="firm")})  # doctest: +SKIP
    """
    if method not in ("mpe", "mpe-is"):
        raise ValueError(f"method must be 'mpe' (closed-form MPE) or 'mpe-is' (MPE importance sampling for "
                         f"the flagged observations), got '{method}'")
    site = fit.adapter.observed_site(var_name)
    if groups is not None:
        if method != "mpe":
            raise ValueError("method='mpe-is' is for leave-one-out; with groups= use method='mpe' (a group "
                             "whose cavity is invalid gets MPE importance sampling anyway)")
        from numpyro_mpe.loo.groups import group_dataset
        from numpyro_mpe.loo.importance import importance_groups

        ds = group_dataset(fit, groups, site.name, num_samples=num_samples, rng_key=rng_key)
        dim = ds["elpd_loo"].dims[0]
        elpd_i = ds["elpd_loo"].copy()
        p_loo_i = ds["p_loo"].copy()
        pareto_k = ds["leverage"].copy()
        valid = np.asarray(ds["valid"])
        n_samples = int(num_samples)
        if not valid.all():
            bad_labels = ds[dim].values[~valid]
            res = importance_groups(fit, groups, site.name, select=bad_labels, num_samples=num_samples,
                                    rng_key=rng_key, progress=False)
            elpd_i.values[~valid] = res["elpd_loo"].values
            p_loo_i.values[~valid] = ds["lpd"].values[~valid] - res["elpd_loo"].values
            warnings.warn(
                f"{bad_labels.size} of {valid.size} groups of '{site.name}' have an invalid MPE cavity "
                f"(leverage >= 1, groups {bad_labels[:10].tolist()}{' ...' if bad_labels.size > 10 else ''})"
                "; "
                f"their elpd_loo is MPE importance sampling on {num_samples} draws instead (Pareto k-hat "
                f"{np.array2string(res['pareto_k'].values[:10], precision=2)}), so the totals mix the closed "
                "form and importance sampling; pareto_k keeps the leverage",
                stacklevel=2,
            )
        n_data = int(valid.size)
        warn = bool(np.any(np.asarray(pareto_k) > GOOD_K) or not valid.all())
    else:
        ds = fit.sensitivities(site.name)
        elpd_i = ds["elpd_loo"].copy()
        p_loo_i = ds["p_loo"].copy()
        pareto_k = ds["leverage"].copy()
        valid = np.asarray(ds["valid"]).ravel()
        lpd = np.asarray(ds["lpd"]).ravel()
        flat_elpd = np.asarray(elpd_i).ravel().copy()
        flat_p = np.asarray(p_loo_i).ravel().copy()
        flat_k = np.asarray(pareto_k, dtype=float).ravel().copy()
        bad = np.flatnonzero(~valid | ~np.isfinite(flat_elpd))
        mc = str(ds.attrs.get("elpd_integration", "")).startswith("Monte Carlo")
        n_samples = fit.num_samples if mc else 0
        if method == "mpe-is":
            from numpyro_mpe.loo.importance import importance_loo

            flagged = np.union1d(np.flatnonzero(flat_k > 0.5), bad)
            if flagged.size:
                res = importance_loo(fit, flagged, num_samples=num_samples, rng_key=rng_key,
                                     var_name=site.name, df=df, progress=False)
                flat_elpd[flagged] = res["elpd_loo"].values
                flat_p[flagged] = lpd[flagged] - res["elpd_loo"].values
                flat_k[flagged] = res["pareto_k"].values
                n_samples = max(n_samples, int(num_samples))
                high = flagged[res["pareto_k"].values > GOOD_K]
                if high.size:
                    warnings.warn(
                        f"MPE importance sampling: {high.size} of the {flagged.size} flagged observations of "
                        f"'{site.name}' still have Pareto k-hat > {GOOD_K} (flat indices "
                        f"{high[:10].tolist()}{' ...' if high.size > 10 else ''}, k-hat "
                        f"{np.array2string(flat_k[high][:10], precision=2)}); their elpd_loo is unreliable: "
                        "raise num_samples, try a heavier-tailed proposal (importance_loo(..., df=5)), or "
                        "refit without them",
                        stacklevel=2,
                    )
        elif bad.size:
            elpd_bad, k_bad = _psis_on_q(fit, site.name, bad, num_samples, rng_key)
            flat_elpd[bad] = elpd_bad
            flat_p[bad] = lpd[bad] - elpd_bad
            n_samples = max(n_samples, int(num_samples))
            warnings.warn(
                f"{bad.size} of {site.num_obs} observations of '{site.name}' have an invalid MPE cavity "
                f"(leverage >= 1, flat indices {bad[:10].tolist()}{' ...' if bad.size > 10 else ''}); their "
                f"elpd_loo is PSIS-LOO on {num_samples} draws from q instead (Pareto k-hat "
                f"{np.array2string(k_bad[:10], precision=2)}{' ...' if bad.size > 10 else ''}), so the "
                "totals mix MPE and PSIS; pareto_k keeps the leverage",
                stacklevel=2,
            )
        elpd_i.values = flat_elpd.reshape(elpd_i.shape)
        p_loo_i.values = flat_p.reshape(p_loo_i.shape)
        pareto_k = pareto_k.astype(float)
        pareto_k.values = flat_k.reshape(pareto_k.shape)
        n_data = int(site.num_obs)
        warn = bool(np.any(flat_k > GOOD_K) or (method == "mpe" and bad.size > 0))
    elpd_i.name = "elpd_i" if ARVIZ_1 else "loo_i"
    pareto_k.name = "pareto_k"
    for da in (elpd_i, pareto_k, p_loo_i):
        da.attrs = {}
    elpd = float(np.sum(elpd_i.values))
    se = _se(elpd_i.values)
    p_loo = float(np.sum(p_loo_i.values))
    if ARVIZ_1:
        from arviz_stats.utils import ELPDDataLOO

        return ELPDDataLOO(elpd=elpd, se=se, p=p_loo, n_samples=int(n_samples), n_data_points=n_data,
                           scale="log", warning=warn, good_k=GOOD_K, elpd_i=elpd_i, pareto_k=pareto_k,
                           approx_posterior=False, p_loo_i=p_loo_i.rename("p_loo_i"))
    from arviz.stats.stats_utils import ELPDData

    return ELPDData(
        data=[elpd, se, p_loo, int(n_samples), n_data, warn, elpd_i, pareto_k, "log", GOOD_K],
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
