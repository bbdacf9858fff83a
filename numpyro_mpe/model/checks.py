"""Compiled steps of :meth:`ModelAdapter.build <numpyro_mpe.model.adapter.ModelAdapter.build>`: the observed
values and weights, a finite initial point, and the check that each site's predictor reproduces the model's
log-likelihood.  Each is one jitted program over the adapter pytree (compiled once per model structure)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_sample

from numpyro_mpe.model.predictor import unwrap
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.model.adapter import ModelAdapter


def _site_weights(site: dict, obs_shape: tuple, dtype):
    """Per-observation weights of a traced observed site: the mask of a ``MaskedDistribution``, the site's
    ``mask`` and its ``scale``, multiplied; ``None`` when it has none."""
    w = None
    parts = [unwrap(site["fn"])[1], site.get("mask"), site.get("scale")]
    for v in parts:
        if v is None or v is True:
            continue
        v = jnp.reshape(jnp.broadcast_to(jnp.asarray(v, dtype), obs_shape), (-1,))
        w = v if w is None else w * v
    return w


@jit
def observed_values(adapter: ModelAdapter):
    """Observed values and weights of every site, from one trace of the model (its prior draws are unused)."""
    seeded = handlers.substitute(handlers.seed(adapter.model, 0), substitute_fn=init_to_sample)
    tr = handlers.trace(seeded).get_trace(*adapter.args, **adapter.kwargs)
    values, weights = [], []
    for spec in adapter.structure.sites:
        site = tr[spec.name]
        values.append(jnp.broadcast_to(jnp.asarray(site["value"]), spec.obs_shape + spec.event_shape))
        weights.append(_site_weights(site, spec.obs_shape, adapter.structure.dtype))
    return tuple(values), tuple(weights)


@jit
def _init_attempt(adapter: ModelAdapter, key, attempt, init_strategy_box):
    init_strategy = init_strategy_box.fn
    model = adapter.model
    a, kw = adapter.args, adapter.kwargs
    key = jax.random.fold_in(key, attempt)
    traced = handlers.substitute(handlers.seed(model, key), substitute_fn=init_strategy)
    tr = handlers.trace(traced).get_trace(*a, **kw)
    z = {s.name: biject_to(tr[s.name]["fn"].support).inv(tr[s.name]["value"]) for s in adapter.latent}
    theta = jnp.concatenate([jnp.ravel(jnp.asarray(z[s.name], adapter.structure.dtype))
                             for s in adapter.latent])
    value, grad = jax.value_and_grad(adapter.potential)(theta)
    return theta, jnp.isfinite(value) & jnp.all(jnp.isfinite(grad))


@jax.tree_util.register_static
@dataclass(frozen=True)
class _Static:
    """A callable passed to a jitted function as static data (hashed by identity)."""

    fn: Callable


def initial_point(adapter: ModelAdapter, rng_key, init_strategy, max_tries: int = 20):
    """A finite initial point in unconstrained space (the first of ``max_tries`` keys), or ``None``.

    Like ``numpyro.infer.util.initialize_model`` but compiled as one program (NumPyro's version runs op by
    op, which costs one XLA compilation per operation).
    """
    box = _Static(init_strategy)
    for attempt in range(max_tries):
        theta, ok = _init_attempt(adapter, rng_key, np.int32(attempt), box)
        if bool(ok):
            return theta
    return None


def non_finite_sites(adapter: ModelAdapter) -> list[str]:
    """Sites whose log-density (or factor) is not finite at a prior draw (for the error message)."""
    seeded = handlers.substitute(handlers.seed(adapter.model, 0), substitute_fn=init_to_sample)
    tr = handlers.trace(seeded).get_trace(*adapter.args, **adapter.kwargs)
    bad = []
    for name, site in tr.items():
        if site["type"] != "sample":
            continue
        try:
            lp = site["fn"].log_prob(site["value"])
        except Exception:  # noqa: BLE001
            continue
        if not bool(np.all(np.isfinite(np.asarray(lp)))):
            bad.append(name)
    return bad


@jit
def _predictor_check(adapter: ModelAdapter, thetas):
    """Per site with a predictor: the largest relative difference between f(η_i(θ), y_i) and the model's
    log-likelihood at the rows of ``thetas`` (one model trace per θ for all sites)."""
    def one(theta):
        tr = adapter.trace(theta)
        errs = []
        for spec, value, w in zip(adapter.structure.sites, adapter.site_values, adapter.site_weights):
            if spec.predictor is None:
                errs.append(jnp.zeros((), thetas.dtype))
                continue
            n = int(np.prod(spec.obs_shape, dtype=int))
            ref = adapter.site_log_lik(tr[spec.name], n)
            fn = tr[spec.name]["fn"]
            got = spec.predictor.log_lik(spec.predictor.eta(fn), jnp.reshape(value, (n,) + spec.event_shape),
                                         spec.predictor.aux(fn))
            got = got if w is None else jnp.where(w != 0, got * w, 0.0)
            errs.append(jnp.max(jnp.where(jnp.isfinite(ref) | jnp.isfinite(got),
                                          jnp.abs(got - ref) / (1.0 + jnp.abs(ref)), 0.0)))
        return jnp.stack(errs)

    return jnp.max(jax.vmap(one)(thetas), axis=0)


def validated_predictors(adapter: ModelAdapter) -> ModelAdapter:
    """Keep a site's predictor only if f(η_i(θ), y_i) reproduces the model's log-likelihood."""
    if not any(s.predictor is not None for s in adapter.structure.sites):
        return adapter
    theta0 = np.asarray(adapter.init_theta)
    thetas = np.stack([theta0, theta0 + 0.3 * np.random.default_rng(1).normal(size=theta0.shape)])
    thetas = thetas.astype(theta0.dtype)
    try:
        errors = np.asarray(_predictor_check(adapter, thetas))
        failure = None
    except Exception as err:  # noqa: BLE001 - any failure means "no predictor"
        errors, failure = None, f"{type(err).__name__}: {err}"
    if failure is not None:  # find which site fails, one at a time (rare: costs a program per site)
        errors = []
        for k, spec in enumerate(adapter.structure.sites):
            if spec.predictor is None:
                errors.append(0.0)
                continue
            sites = tuple(s if j == k or s.predictor is None else
                          replace(s, predictor=None) for j, s in enumerate(adapter.structure.sites))
            single = adapter.replace(structure=adapter.structure.with_sites(sites))
            try:
                errors.append(float(np.asarray(_predictor_check(single, thetas))[k]))
            except Exception as err:  # noqa: BLE001
                errors.append(f"{type(err).__name__}: {err}")
    sites, changed = [], False
    for spec, err in zip(adapter.structure.sites, errors):
        if spec.predictor is not None and (isinstance(err, str) or not err <= 1e-4):
            why = err if isinstance(err, str) else "rebuilt distribution does not reproduce log_prob"
            spec = replace(spec, predictor=None, no_predictor_reason=why)
            changed = True
        sites.append(spec)
    if not changed:
        return adapter
    return adapter.replace(structure=adapter.structure.with_sites(tuple(sites)))
