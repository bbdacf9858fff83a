"""ArviZ on either line (0.x: ``InferenceData``, ``arviz.stats``; ≥ 1: ``xarray.DataTree``, ``arviz_stats``),
and the model evaluated on draws from q as ArviZ groups.

Shared by the leave-one-out estimates (PSIS-LOO on draws from q, ELPD objects) and the export
(:mod:`numpyro_mpe.io.export`).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import re
import warnings
from functools import partial
from typing import TYPE_CHECKING

import arviz as az
import jax
import numpy as np
import xarray as xr
from scipy.special import logsumexp

from numpyro_mpe.engine.layout import map_rows
from numpyro_mpe.gaussian import draws as posterior_draws
from numpyro_mpe.loo.common import GOOD_K  # noqa: F401  (re-exported: leverage and k̂ threshold)
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: True on the arviz ≥ 1 line (DataTree, arviz_stats).
ARVIZ_1 = int(az.__version__.split(".")[0]) >= 1
#: Elements (draws × log-likelihood values) per chunk when evaluating the model on draws.
DRAW_CHUNK_ELEMENTS = 2**22
SAMPLE_DIMS = ("chain", "draw")
#: Name of the group holding the MPE outputs.
MPE_GROUP = "mpe"


def library_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def make_attrs(fit: Fit, **extra) -> dict:
    """Group attributes in the style of ArviZ's ``make_attrs`` (netCDF-serializable values only)."""
    attrs = {
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "arviz_version": az.__version__,
        "creation_library": "numpyro_mpe",
        "creationlibrary_version": library_version("numpyro_mpe"),
        "creation_library_language": "Python",
        "inference_library": "numpyro",
        "inferencelibrary_version": library_version("numpyro"),
        "mpe_method": fit.method,
    }
    attrs.update(extra)
    return attrs


def set_attrs(ds: xr.Dataset, fit: Fit, sample_dims: tuple, **extra) -> xr.Dataset:
    """Attach :func:`_attrs`, with ``sample_dims`` as arviz ≥ 1 records it."""
    ds.attrs = make_attrs(fit, **extra)
    if ARVIZ_1:
        ds.attrs["sample_dims"] = list(sample_dims)
    return ds


def elpd_se(values) -> float:
    """Standard error of a sum of pointwise values, with the installed ArviZ's convention."""
    values = np.asarray(values, dtype=float).ravel()
    n = values.size
    if n < 2:
        return 0.0
    # arviz 0.x: sqrt(n var) with ddof=0; arviz_stats: ddof=1.
    return float(np.sqrt(n * np.var(values, ddof=1 if ARVIZ_1 else 0)))


def container(groups: dict[str, xr.Dataset]):
    """``InferenceData`` (arviz 0.x) or ``DataTree`` (arviz ≥ 1) holding ``groups``."""
    if ARVIZ_1:
        return xr.DataTree.from_dict(dict(groups))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not defined in the InferenceData scheme")
        return az.InferenceData(**groups)


def group(data, name: str) -> xr.Dataset:
    """Group ``name`` of an ``InferenceData`` or ``DataTree`` as an ``xarray.Dataset``."""
    grp = data[name]
    return grp.to_dataset() if hasattr(grp, "to_dataset") and not isinstance(grp, xr.Dataset) else grp


def pointwise_elpd(elpd) -> xr.DataArray:
    """Pointwise ELPD of an ArviZ ELPD object (``loo_i`` on arviz 0.x, ``elpd_i`` on arviz ≥ 1)."""
    return elpd["elpd_i"] if ARVIZ_1 else elpd["loo_i"]


def named_dims(name: str, dims: tuple, ndim: int) -> list[str]:
    """``dims`` padded at the end with ``f"{name}_dim_{k}"``, as the installed ArviZ pads unnamed axes.

    arviz 0.x numbers an unnamed axis by its position (``theta_dim_1`` after one plate dim); arviz ≥ 1
    counts the unnamed axes from 0 (``theta_dim_0``).
    """
    dims = list(dims)[:ndim]
    if ARVIZ_1:
        k0 = sum(1 for d in dims if re.fullmatch(rf"{re.escape(name)}_dim_\d+", str(d)))
        return dims + [f"{name}_dim_{k0 + j}" for j in range(ndim - len(dims))]
    return dims + [f"{name}_dim_{k}" for k in range(len(dims), ndim)]


def latent_dims(fit: Fit) -> dict[str, tuple]:
    """Plate names (sorted by ``dim``) of every latent and deterministic site, as ``arviz.from_numpyro``."""
    out = {}

    def read(theta):  # one abstract model pass at the mean: shapes only, nothing compiled
        for name, site in fit.adapter.trace(theta).items():
            if site["type"] in ("sample", "deterministic") and not site.get("is_observed", False):
                frames = sorted(site.get("cond_indep_stack", []), key=lambda f: f.dim)
                out[name] = tuple(f.name for f in frames) + tuple(site.get("infer", {}).get("event_dims", []))
        return 0

    jax.eval_shape(read, fit.posterior.mean)
    return out


def with_coords(ds: xr.Dataset, coords: dict | None = None) -> xr.Dataset:
    """Integer coordinates for every dim without one (as ArviZ's converters add them)."""
    coords = dict(coords or {})
    for dim, size in ds.sizes.items():
        if dim not in ds.coords and dim not in coords:
            coords[dim] = np.arange(size)
    return ds.assign_coords(coords)


# ------------------------------------------------------------------ the model on draws from q
def draw_chunk(per_draw: int, num_samples: int) -> int:
    return int(max(1, min(num_samples, DRAW_CHUNK_ELEMENTS // max(1, per_draw))))


@partial(jit, static_argnames=("name", "idx"))
def _log_lik_rows(adapter, draws, name: str, idx: tuple | None):
    def one(theta):
        ll = adapter.log_lik(theta, name)
        return ll if idx is None else ll[np.asarray(idx)]

    return jax.vmap(one)(draws)


def log_lik_on_draws(fit: Fit, draws, var_name: str, idx=None) -> np.ndarray:
    """``log p(y_i | θ_s)``, shape ``(S, N)`` (or ``(S, len(idx))``), evaluated in chunks of draws."""
    site = fit.adapter.observed[var_name]
    idx = None if idx is None else tuple(int(i) for i in np.asarray(idx).ravel())
    chunk = draw_chunk(site.num_obs, draws.shape[0])
    out = map_rows(lambda d: _log_lik_rows(fit.adapter, d, var_name, idx), draws, draws.shape[0], chunk,
                   desc=f"log-lik {var_name}", progress=fit.progress)
    return np.asarray(out).reshape(draws.shape[0], site.num_obs if idx is None else len(idx))


@partial(jit, static_argnames=("names", "log_density"))
def _draw_values(adapter, post, draws, names: tuple, log_density: bool):
    def one(theta):
        lls = adapter.log_lik_all(theta)
        out = (adapter.constrain(theta), {n: lls[n] for n in names})
        if log_density:  # both in unconstrained space: log_p − log_q is the importance ratio of θ ~ q
            out += (-adapter.potential(theta), post.log_prob(theta))
        return out

    return jax.vmap(one)(draws)


def sample_groups(fit: Fit, num_samples: int, rng_key, var_names: list[str],
                  log_density: bool = False) -> dict[str, xr.Dataset]:
    """``posterior`` and ``log_likelihood`` groups for ``num_samples`` draws from q.

    With ``log_density``, also a ``sample_stats`` group with ``log_p`` = −U(θ_s) and ``log_q`` = log q(θ_s)
    of every draw (see :func:`numpyro_mpe.io.export.to_inference_data`).
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
    num_samples = int(num_samples)
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    ad = fit.adapter
    draws = posterior_draws(fit.posterior, num_samples, rng_key, antithetic=False)  # (S, P), unconstrained
    per_draw = sum(ad.observed[n].num_obs for n in var_names) + 4 * ad.num_params
    chunk = draw_chunk(per_draw, num_samples)
    values, lls, *log_dens = map_rows(
        lambda d: _draw_values(ad, fit.posterior, d, tuple(var_names), log_density), draws, num_samples,
        chunk, desc="draws from q", progress=fit.progress)
    del draws

    dims = latent_dims(fit)
    post = {}
    for name, v in values.items():
        v = np.asarray(v)[None]
        post[name] = xr.DataArray(v, dims=list(SAMPLE_DIMS) + named_dims(name, dims.get(name, ()),
                                                                          v.ndim - 2))
    source = (f"{num_samples} independent draws from q = N(m, S^-1), the {fit.method} Gaussian approximation "
              "in unconstrained space, mapped to constrained space")
    posterior = with_coords(xr.Dataset(post), {"chain": [0], "draw": np.arange(num_samples)})
    set_attrs(posterior, fit, SAMPLE_DIMS, posterior_source=source)
    ll_vars = {}
    for name in var_names:
        site = ad.observed[name]
        arr = np.asarray(lls[name]).reshape((1, num_samples) + tuple(site.obs_shape))
        ll_vars[name] = xr.DataArray(arr, dims=list(SAMPLE_DIMS) + list(site.dims))
    log_lik = with_coords(xr.Dataset(ll_vars), {"chain": [0], "draw": np.arange(num_samples)})
    set_attrs(log_lik, fit, SAMPLE_DIMS, posterior_source=source)
    groups = {"posterior": posterior, "log_likelihood": log_lik}
    if log_density:
        groups["sample_stats"] = log_density_group(fit, *log_dens, source)
    return groups


def log_density_group(fit: Fit, log_p, log_q, source: str) -> xr.Dataset:
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
    ds = with_coords(ds, {"chain": [0], "draw": np.arange(num_samples)})
    return set_attrs(ds, fit, SAMPLE_DIMS, posterior_source=source,
                      usage="arviz_stats.loo_approximate_posterior(data, data['sample_stats']['log_p'], "
                            "data['sample_stats']['log_q'], var_name=...)")


def log_likelihood_array(data, var_name: str) -> xr.DataArray:
    """Log-likelihood of ``var_name`` in an ``InferenceData`` or ``DataTree``: ``(chain, draw, ...)``."""
    grp = group(data, "log_likelihood")
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
