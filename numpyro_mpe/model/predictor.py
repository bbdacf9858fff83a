"""Per-observation predictors: the parameters of an observed site's distribution.

An observation ``i`` of an observed site depends on the latent vector θ only through the parameters of its
distribution.  Writing those parameters in their own unconstrained space (``biject_to(constraint).inv``)
and flattening them gives the predictor η_i(θ) ∈ R^K_all, and

    log p(y_i | θ) = f(η_i(θ), y_i)

with ``f`` evaluated one observation at a time.  This module finds the parameters of a NumPyro
distribution (unwrapping ``Independent``, ``ExpandedDistribution`` and ``MaskedDistribution``),
broadcasts them to the observation shape, and rebuilds the distribution from any batch of predictor
values, so that quadrature nodes can be evaluated per observation without running the model again.
"""

from __future__ import annotations

import copy
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.distributions.util import lazy_property


class ParamSpec(NamedTuple):
    """One parameter of the base distribution.

    ``event_shape`` is the parameter's own event shape (constrained space), ``unconstrained_shape`` the
    shape of its unconstrained value for one observation, including the dims reinterpreted as event.
    """

    name: str
    constraint: Any
    event_shape: tuple
    unconstrained_shape: tuple
    size: int


def unwrap(fn: dist.Distribution):
    """Peel ``Masked`` (outermost), ``Independent`` and ``Expanded`` wrappers off ``fn``.

    Returns ``(base, mask)``: the innermost distribution, whose parameters broadcast to ``B + R``
    (``B = fn.batch_shape``; ``R`` the base batch dims that ``fn`` reinterprets as event dims), and the
    boolean mask of a ``MaskedDistribution`` (or ``None``).
    """
    mask = None
    if isinstance(fn, dist.MaskedDistribution):
        mask = fn._mask
        fn = fn.base_dist
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.MaskedDistribution):
        raise NotImplementedError("a MaskedDistribution inside Independent/Expanded")
    return fn, mask


def _arg_constraints(base: dist.Distribution) -> dict:
    out = {}
    for cls in reversed(type(base).__mro__):
        ac = cls.__dict__.get("arg_constraints")
        if isinstance(ac, dict):
            out.update(ac)
    return out


def _is_lazy(base, name) -> bool:
    for cls in type(base).__mro__:
        if name in cls.__dict__:
            return isinstance(cls.__dict__[name], lazy_property)
    return False


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


class Predictor:
    """Predictor η_i of one observed site, and the per-observation likelihood f(η_i, y_i).

    Built from the site's distribution at one θ; :meth:`eta` then maps the same site's distribution at
    any θ to an ``(N, K_all)`` array, and :meth:`log_lik` evaluates ``log p(y_i | η_i)`` for a batch of
    observations (any leading size ``n``).
    """

    def __init__(self, fn: dist.Distribution, value):
        outer_event = tuple(fn.event_shape)
        base, _ = unwrap(fn)  # the mask is data: the adapter keeps it with the site's weights
        base_event = tuple(base.event_shape)
        n_r = len(outer_event) - len(base_event)
        if n_r < 0 or outer_event[n_r:] != base_event:
            raise NotImplementedError("unsupported event structure")
        self.obs_shape = tuple(fn.batch_shape)
        self.reinterpreted = outer_event[:n_r]
        self.base_event = base_event
        self.num_obs = int(np.prod(self.obs_shape, dtype=int))
        target = self.obs_shape + self.reinterpreted
        acs = _arg_constraints(base)
        specs, aux_names = [], []
        for name, val in vars(base).items():
            if name.startswith("_") or name not in acs or _is_lazy(base, name):
                continue
            if not hasattr(val, "shape") and not isinstance(val, (int, float)):
                continue
            c = acs[name]
            ev = int(getattr(c, "event_dim", 0))
            val = jnp.asarray(val)
            p_event = tuple(val.shape[val.ndim - ev :]) if ev else ()
            if not _is_float(val) or isinstance(c, (constraints._IntegerInterval,
                                                    constraints._IntegerGreaterThan)) \
                    or c is constraints.dependent or isinstance(c, type(constraints.dependent)):
                aux_names.append((name, p_event))
                continue
            t = biject_to(c)
            probe = jnp.broadcast_to(val, target + p_event)
            u_shape = tuple(t.inv(probe).shape[len(self.obs_shape) :])
            specs.append(ParamSpec(name, c, p_event, u_shape, int(np.prod(u_shape, dtype=int))))
        if not specs:
            raise NotImplementedError("no continuous parameters found")
        self.specs = tuple(specs)
        self.aux_names = tuple(aux_names)
        self.num_eta = sum(s.size for s in specs)
        self.labels = tuple(self._labels())
        # The template only supplies the distribution's class and its non-array settings: every parameter is
        # set anew by :meth:`log_lik`.  Its arrays (possibly tracers of the trace it came from) are dropped.
        self.template = copy.copy(base)
        params = {s.name for s in self.specs} | {name for name, _ in self.aux_names}
        for name, val in list(vars(self.template).items()):
            if isinstance(val, jax.Array | np.ndarray):
                if name in params:
                    setattr(self.template, name, None)
                else:  # e.g. a cached lazy property: recomputed from the parameters when needed
                    delattr(self.template, name)

    @property
    def key(self) -> tuple:
        """What the predictor's functions depend on: its class, parameters and shapes (not its values)."""
        specs = tuple((s.name, _constraint_key(s.constraint), s.event_shape, s.unconstrained_shape)
                      for s in self.specs)
        settings = tuple(sorted((k, v) for k, v in vars(self.template).items()
                                if isinstance(v, bool | int | float | str | tuple | type(None))))
        return (type(self.template), specs, self.aux_names, self.obs_shape, self.reinterpreted,
                self.base_event, settings)

    def __eq__(self, other) -> bool:
        return isinstance(other, Predictor) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def _labels(self):
        for s in self.specs:
            if s.size == 1:
                yield s.name
            else:
                for k in np.ndindex(*s.unconstrained_shape):
                    yield f"{s.name}[{','.join(map(str, k))}]"

    # ------------------------------------------------------------------ maps
    def params(self, fn: dist.Distribution, obs_shape: tuple | None = None) -> tuple:
        """(eta (n, K_all), aux dict) of the site distribution ``fn`` at some θ.

        ``obs_shape`` is the batch shape of ``fn`` when the model ran on a subset of the observations
        (default: the whole site's).
        """
        obs_shape = self.obs_shape if obs_shape is None else tuple(obs_shape)
        num = int(np.prod(obs_shape, dtype=int))
        base = unwrap(fn)[0]
        target = obs_shape + self.reinterpreted
        parts = []
        for s in self.specs:
            v = jnp.broadcast_to(jnp.asarray(getattr(base, s.name)), target + s.event_shape)
            uval = biject_to(s.constraint).inv(v)
            parts.append(jnp.reshape(uval, (num, s.size)))
        aux = {}
        for name, p_event in self.aux_names:
            v = jnp.broadcast_to(jnp.asarray(getattr(base, name)), target + p_event)
            aux[name] = jnp.reshape(v, (num,) + self.reinterpreted + p_event)
        return jnp.concatenate(parts, axis=-1), aux

    def eta(self, fn: dist.Distribution):
        """Predictor values ``(N, K_all)`` of the site distribution ``fn``."""
        return self.params(fn)[0]

    def aux(self, fn: dist.Distribution) -> dict:
        """Non-differentiable parameters (integers such as ``total_count``), per observation."""
        return self.params(fn)[1]

    def distribution(self, eta, aux: dict):
        """The base distribution at predictor values ``eta (n, K_all)`` (with the fixed parameters ``aux``):
        batch shape ``(n,) + R``, where the dims ``R`` are those the site reinterprets as event dims."""
        n = eta.shape[0]
        new = copy.copy(self.template)
        offset = 0
        for s in self.specs:
            u = jnp.reshape(eta[:, offset : offset + s.size], (n,) + s.unconstrained_shape)
            offset += s.size
            setattr(new, s.name, biject_to(s.constraint)(u))
        for name, _ in self.aux_names:
            setattr(new, name, aux[name])
        new._batch_shape = (n,) + self.reinterpreted
        return new

    def log_lik(self, eta, y, aux: dict):
        """``log p(y_i | η_i)`` for a batch: ``eta (n, K_all)``, ``y (n, *event)`` -> ``(n,)``: the
        :meth:`distribution`'s log-density with the dims reinterpreted as event summed."""
        lp = self.distribution(eta, aux).log_prob(y)
        if self.reinterpreted:
            lp = jnp.sum(lp, axis=tuple(range(1, 1 + len(self.reinterpreted))))
        return lp


def _constraint_key(c) -> tuple:
    """A hashable description of a constraint: its class and its settings (nested constraints by their own
    description, arrays by their shape, concrete scalars by value)."""
    settings = []
    for k, v in sorted(vars(c).items()):
        if isinstance(v, constraints.Constraint):
            settings.append((k, _constraint_key(v)))
        elif v is None or isinstance(v, bool | int | float | str):
            settings.append((k, v))
        elif hasattr(v, "shape") and np.ndim(v) == 0 and not isinstance(v, jax.core.Tracer):
            settings.append((k, float(v)))
        elif hasattr(v, "shape"):
            settings.append((k, ("array", tuple(np.shape(v)))))
        else:
            settings.append((k, type(v).__name__))
    return (type(c).__name__, tuple(settings))


def make_predictor(fn: dist.Distribution, value) -> Predictor | None:
    """Build a :class:`Predictor` for ``fn``, or ``None`` (with the reason) if it has none."""
    try:
        return Predictor(fn, value), None
    except Exception as err:  # noqa: BLE001 - any failure means "no predictor"
        return None, f"{type(err).__name__}: {err}"
