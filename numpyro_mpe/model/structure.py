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
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_sample

from numpyro_mpe.errors import ModelError
from numpyro_mpe.model.inputs import DataBinding, argument_name
from numpyro_mpe.model.predictor import Predictor, make_predictor, unwrap


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


def _discrete_message(name: str, site: dict) -> str:
    kind = type(unwrap(site["fn"])[0]).__name__ if not isinstance(site["fn"], dist.MaskedDistribution) \
        else type(site["fn"]).__name__
    head = (f"latent site '{name}' is discrete ({kind}); the Gaussian posterior of numpyro_mpe needs "
            "continuous latent sites")
    if site.get("infer", {}).get("enumerate"):
        return (head + f": it is marked for enumeration (infer={{'enumerate': "
                f"'{site['infer']['enumerate']}'}}), which numpyro_mpe does not run; sum it out in the model "
                "instead, e.g. a MixtureSameFamily or MixtureGeneral likelihood, or numpyro.factor with a "
                "logsumexp over its values")
    return head + ": sum it out in the model (e.g. a mixture likelihood) or observe it"


def _check_value_shape(name: str, site: dict, data) -> None:
    """Refuse an observed value whose shape would broadcast the log-density beyond the distribution's
    shape (e.g. ``y`` of shape ``(N, 1)`` against a batch shape ``(N,)``: an N×N log-likelihood)."""
    fn, value = site["fn"], site["value"]
    expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
    shape = tuple(jnp.shape(value))
    try:
        ok = tuple(np.broadcast_shapes(shape, expected)) == expected
    except ValueError:
        ok = False
    if ok:
        return
    found = [argument_name(p) for p, v in jax.tree_util.tree_flatten_with_path(data)[0] if v is value]
    arg = f" (argument '{found[0]}')" if found else ""
    raise ModelError(
        f"observed site '{name}'{arg} has values of shape {shape}, but its distribution has batch shape "
        f"{tuple(fn.batch_shape)} and event shape {tuple(fn.event_shape)}: the log-likelihood would "
        f"broadcast to {_broadcast_or_none(shape, expected)}; pass the observations with shape {expected} "
        "(e.g. y.ravel() for a column)")


def _broadcast_or_none(a: tuple, b: tuple):
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return "nothing (the shapes do not broadcast)"


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
                _check_value_shape(name, site, (a, kw))
                pred, why = make_predictor(site["fn"], site["value"])
                weighted = site.get("mask") is not None or site.get("scale") is not None
                sites.append(SiteSpec(name, tuple(site["fn"].batch_shape), tuple(site["fn"].event_shape),
                                      _obs_dims(name, site), pred, why, weighted))
            elif _is_discrete(site):
                raise ModelError(_discrete_message(name, site))
            else:
                u = biject_to(site["fn"].support).inv(site["value"])
                latent.append((name, tuple(jnp.shape(u)), jnp.result_type(u)))
        observed = {spec.name for spec in sites}
        for lname, _, _ in latent:
            base = lname[: -len("_unobserved")]
            if lname.endswith("_unobserved") and base + "_observed" in observed:
                raise ModelError(
                    f"site '{base}' uses obs_mask=: NumPyro then samples a latent '{lname}' at every "
                    "position, also the observed ones, where it has no density, so the posterior is flat "
                    f"along them and has no Gaussian approximation; leave the missing values out instead: "
                    f"numpyro.handlers.mask(mask=...) around the observed site '{base}'")
        out.update(latent=latent, sites=sites, det=det)
        return 0

    jax.eval_shape(run, values, rng_key)
    return out["latent"], out["sites"], out["det"]
