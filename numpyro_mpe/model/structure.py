"""The static structure of a bound model: its latent and observed sites, read from one abstract trace.

:func:`trace_structure` runs the model under :func:`jax.eval_shape` (no compilation, no values): it lists the
continuous latent sites with their unconstrained shapes, the observed sites as :class:`SiteSpec` (shapes,
observation dims, predictor) and the deterministic sites, and refuses discrete latent sites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_sample

from numpyro_mpe.errors import ModelError
from numpyro_mpe.model.inputs import DataBinding
from numpyro_mpe.model.predictor import Predictor, make_predictor


@dataclass(frozen=True)
class SiteSpec:
    """The static description of an observed site (its values live in the adapter's leaves)."""

    name: str
    obs_shape: tuple  # batch shape: one element = one observation
    event_shape: tuple
    dims: tuple  # names of the observation dims (plate names where known, as arviz.from_numpyro)
    predictor: Predictor | None
    no_predictor_reason: str | None = None
    weighted: bool = False  # the site has a mask or scale (per-observation weights)


@dataclass(frozen=True, eq=False)
class ObservedSite:
    """An observed sample site: its observations, their shape and dimension names."""

    name: str
    obs_shape: tuple
    event_shape: tuple
    dims: tuple
    value: Any  # observed values, shape obs_shape + event_shape
    predictor: Predictor | None
    no_predictor_reason: str | None = None

    @property
    def num_obs(self) -> int:
        return int(np.prod(self.obs_shape, dtype=int))

    @property
    def flat_value(self):
        """Observed values with the observation dims flattened: ``(N, *event_shape)``."""
        return jnp.reshape(self.value, (self.num_obs,) + tuple(self.event_shape))

    def coords(self) -> dict:
        """Integer coordinates of the observation dims."""
        return {d: np.arange(n) for d, n in zip(self.dims, self.obs_shape)}


@dataclass(frozen=True)
class LatentSite:
    """A continuous latent site and where it lives in the flat unconstrained vector."""

    name: str
    unconstrained_shape: tuple
    start: int
    stop: int


@dataclass(frozen=True)
class ModelStructure:
    """Everything about a bound model that is not an array: the static part of :class:`ModelAdapter`."""

    model: Callable
    binding: DataBinding
    latent: tuple  # of LatentSite
    sites: tuple  # of SiteSpec, in trace order
    deterministic: tuple  # names of deterministic sites
    dtype: Any  # of θ

    def with_sites(self, sites: tuple) -> ModelStructure:
        """The same structure with other observed-site specs."""
        return replace(self, sites=sites)


#: Errors raised when a model uses its data as concrete values (e.g. ``np.unique(group)``) while tracing.
CONCRETE_DATA_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                         jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _obs_dims(name: str, site: dict) -> tuple:
    """Observation dim names, as ``arviz.from_numpyro`` names them (plates sorted by dim)."""
    batch_ndim = len(site["fn"].batch_shape)
    plates = {f.dim: f.name for f in site["cond_indep_stack"]}
    return tuple(plates.get(k - batch_ndim, f"{name}_dim_{k}") for k in range(batch_ndim))


def _is_discrete(site: dict) -> bool:
    fn = site["fn"]
    return bool(getattr(fn, "is_discrete", False)) or getattr(fn.support, "is_discrete", False)


class ObservedList(Exception):
    """An observed site's value is a Python list or tuple: the argument it came from, to convert."""

    def __init__(self, path):
        super().__init__(path)
        self.path = path


def trace_structure(model, binding: DataBinding, values: tuple, rng_key):
    """Trace the model once without running it (abstract values, no compilation) and read its sites.

    Returns ``(latent, sites, deterministic, observed_names)``: latent ``(name, unconstrained shape,
    dtype)``, :class:`SiteSpec` of the observed sites, deterministic names.  Predictors are built inside the
    trace, from the distributions' shapes and constraints.
    """
    out: dict = {}

    def run(vals, key):
        a, kw = binding.rebuild(vals)
        traced = handlers.substitute(handlers.seed(model, key), substitute_fn=init_to_sample)
        tr = handlers.trace(traced).get_trace(*a, **kw)
        latent, sites, det = [], [], []
        for name, site in tr.items():
            if site["type"] == "deterministic":
                det.append(name)
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                value = site["value"]
                if isinstance(value, list | tuple):
                    found = [p for p, v in jax.tree_util.tree_flatten_with_path(
                        (a, kw), is_leaf=lambda v, value=value: v is value)[0] if v is value]
                    raise ObservedList(found[0] if found else None)
                pred, why = make_predictor(site["fn"], site["value"])
                weighted = site.get("mask") is not None or site.get("scale") is not None
                sites.append(SiteSpec(name, tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape),
                                      _obs_dims(name, site), pred, why, weighted))
            elif _is_discrete(site):
                raise ModelError(
                    f"latent site '{name}' is discrete ({type(site['fn']).__name__}); the Gaussian "
                    "posterior of numpyro_mpe needs continuous latent sites: marginalize it out "
                    "(e.g. with funsor enumeration in the model) or observe it"
                )
            else:
                u = biject_to(site["fn"].support).inv(site["value"])
                latent.append((name, tuple(jnp.shape(u)), jnp.result_type(u)))
        out.update(latent=latent, sites=sites, det=det)
        return 0

    jax.eval_shape(run, values, rng_key)
    return out["latent"], out["sites"], out["det"]
