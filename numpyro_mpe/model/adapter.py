"""A NumPyro model seen as functions of one flat unconstrained vector θ.

:class:`ModelAdapter` traces the model once and exposes

* ``potential(θ)``: NumPyro's potential energy U(θ) = −log p(y, θ) − log|det J| (unconstrained space);
* ``log_lik(θ, site)``: the per-observation log-likelihood ``log p(y_i | θ)`` of an observed site,
  flattened to ``(N,)`` (one observation = one element of the site's batch shape, event dims summed);
* ``site.predictor``: the distribution parameters η_i(θ) per observation, where they can be taken;
* ``constrain(θ)``: every latent and deterministic site in constrained space.

Data reach the model as ``*args, **kwargs``, exactly as in NumPyro.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_median, init_to_sample
from numpyro.infer.util import constrain_fn, potential_energy

from numpyro_mpe.errors import ModelError, PosteriorError
from numpyro_mpe.model.predictor import Predictor, make_predictor


@dataclass(frozen=True)
class ObservedSite:
    """An observed sample site: its observations, their shape and dimension names."""

    name: str
    obs_shape: tuple  # batch shape: one element = one observation
    event_shape: tuple
    dims: tuple  # names of the observation dims (plate names where known, as arviz.from_numpyro)
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


def _obs_dims(name: str, site: dict) -> tuple:
    """Observation dim names, as ``arviz.from_numpyro`` names them (plates sorted by dim)."""
    batch_ndim = len(site["fn"].batch_shape)
    plates = {f.dim: f.name for f in site["cond_indep_stack"]}
    dims = []
    for k in range(batch_ndim):
        dim = k - batch_ndim
        dims.append(plates.get(dim, f"{name}_dim_{k}"))
    return tuple(dims)


class DataBinding(NamedTuple):
    """The model's data ``(args, kwargs)`` split into numeric arrays (passed to jitted functions as arguments,
    so that XLA neither embeds nor constant-folds them: compile time and memory independent of N) and the
    other leaves (Python numbers, strings, None: closed over)."""

    treedef: Any
    leaves: tuple
    dynamic: tuple  # indices of the array leaves

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> DataBinding:
        leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
        dyn = tuple(i for i, x in enumerate(leaves)
                    if hasattr(x, "shape") and hasattr(x, "dtype") and np.ndim(x) > 0
                    and np.dtype(x.dtype).kind in "biufc")
        return cls(treedef, tuple(leaves), dyn)

    def values(self) -> list:
        return [self.leaves[i] for i in self.dynamic]

    def rebuild(self, values) -> tuple:
        leaves = list(self.leaves)
        for i, v in zip(self.dynamic, values):
            leaves[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


#: Errors raised when a model uses its data as concrete values (e.g. ``np.unique(group)``) while tracing.
_CONCRETE_DATA_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                         jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def jit_with_data(fn: Callable, args: tuple, kwargs: dict) -> Callable:
    """``fn(args, kwargs, *rest)`` jitted with the data arrays as arguments: returns ``g(*rest)``.

    A model that needs its data as concrete values while tracing (NumPy calls on them) cannot take them as
    arguments; for it the data are closed over as constants instead (compile time then grows with N).
    """
    binding = DataBinding.of(args, kwargs)
    dynamic = jax.jit(lambda values, *rest: fn(*binding.rebuild(values), *rest))
    mode: list = []

    def call(*rest):
        if not mode:
            try:
                out = dynamic(binding.values(), *rest)
                mode.append("arguments")
                return out
            except _CONCRETE_DATA_ERRORS:
                mode.append(jax.jit(lambda *r: fn(args, kwargs, *r)))
        if mode[0] == "arguments":
            return dynamic(binding.values(), *rest)
        return mode[0](*rest)

    return call


def _initial_point(model, args, kwargs, rng_key, init_strategy, latent_names, max_tries: int = 20):
    """A finite initial point in unconstrained space.

    Like ``numpyro.infer.util.initialize_model`` but compiled as one program (NumPyro's version runs op by
    op, which costs one XLA compilation per operation).  Returns ``None`` if no try is finite.
    """

    def attempt(a, kw, key):
        traced = handlers.substitute(handlers.seed(model, key), substitute_fn=init_strategy)
        tr = handlers.trace(traced).get_trace(*a, **kw)
        z = {n: biject_to(tr[n]["fn"].support).inv(tr[n]["value"]) for n in latent_names}
        value, grad = jax.value_and_grad(lambda zz: potential_energy(model, a, kw, zz))(z)
        flat_grad = ravel_pytree(grad)[0]
        return z, jnp.isfinite(value) & jnp.all(jnp.isfinite(flat_grad))

    attempt = jit_with_data(attempt, args, kwargs)
    for key in jax.random.split(rng_key, max_tries):
        z, ok = attempt(key)
        if bool(ok):
            return z
    return None


def _non_finite_sites(tr) -> list[str]:
    """Sites of a trace whose log-density (or factor) is not finite."""
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


def _is_discrete(site: dict) -> bool:
    fn = site["fn"]
    return bool(getattr(fn, "is_discrete", False)) or getattr(fn.support, "is_discrete", False)


@dataclass(frozen=True)
class ModelAdapter:
    """A NumPyro model with its data bound, as functions of a flat unconstrained θ ∈ R^P.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 1))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (jnp.arange(3.0),), {"y": jnp.ones(3)})
    >>> ad.num_params, ad.observed["y"].dims
    (1, ('data',))
    """

    model: Callable
    args: tuple
    kwargs: dict
    init_theta: Any
    unravel: Callable = field(repr=False)
    latent: tuple  # of LatentSite
    observed: dict  # name -> ObservedSite
    deterministic: tuple  # names of deterministic sites

    # ----------------------------------------------------------- building
    @classmethod
    def build(cls, model: Callable, rng_key, args: tuple = (), kwargs: dict | None = None,
              init_strategy=init_to_median) -> ModelAdapter:
        """Trace ``model(*args, **kwargs)`` and check it can be handled.

        Raises :class:`~numpyro_mpe.errors.ModelError` for a model with no observed site, a discrete
        latent site, or NaN/inf observed values, naming the site.
        """
        kwargs = dict(kwargs or {})
        traced = handlers.substitute(handlers.seed(model, rng_key), substitute_fn=init_to_sample)
        tr = handlers.trace(traced).get_trace(*args, **kwargs)
        observed, latent_names, det = [], [], []
        for name, site in tr.items():
            if site["type"] == "deterministic":
                det.append(name)
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                observed.append(name)
            else:
                if _is_discrete(site):
                    raise ModelError(
                        f"latent site '{name}' is discrete ({type(site['fn']).__name__}); the Gaussian "
                        "posterior of numpyro_mpe needs continuous latent sites: marginalize it out "
                        "(e.g. with funsor enumeration in the model) or observe it"
                    )
                latent_names.append(name)
        if not observed:
            raise ModelError(
                "the model has no observed sample site (numpyro.sample(..., obs=...)); pass the data "
                "as model arguments, e.g. mpe.Laplace(model).run(key, X, y=y)"
            )
        if not latent_names:
            raise ModelError("the model has no latent sample site: there is no posterior to perturb")
        for name in observed:
            value = np.asarray(tr[name]["value"])
            if np.issubdtype(value.dtype, np.number) and not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.isfinite(value).sum())
                raise ModelError(
                    f"observed site '{name}' has {bad} non-finite value(s) (NaN or inf) in data of shape "
                    f"{value.shape}; remove them or model them as missing (obs_mask=...)"
                )
        z0 = _initial_point(model, args, kwargs, rng_key, init_strategy, latent_names)
        if z0 is None:
            bad = _non_finite_sites(tr)
            raise PosteriorError(
                "the potential energy is not finite at any initial point tried"
                + (f"; non-finite log-density in site(s) {bad}" if bad else "")
                + "; check the priors, the support of the likelihood and the data, or pass "
                "init_strategy=numpyro.infer.init_to_value(values=...)"
            )
        theta0, unravel = ravel_pytree(z0)
        latent, start = [], 0
        leaves = jax.tree_util.tree_flatten_with_path(z0)[0]
        for path, leaf in leaves:
            name = path[0].key
            size = int(np.size(leaf))
            latent.append(LatentSite(name, tuple(np.shape(leaf)), start, start + size))
            start += size
        sites = {}
        for name in observed:
            s = tr[name]
            pred, why = make_predictor(s["fn"], s["value"])
            sites[name] = ObservedSite(
                name=name,
                obs_shape=tuple(s["fn"].batch_shape),
                event_shape=tuple(s["fn"].event_shape),
                dims=_obs_dims(name, s),
                value=jnp.asarray(s["value"]),
                predictor=pred,
                no_predictor_reason=why,
            )
        ad = cls(model, tuple(args), kwargs, theta0, unravel, tuple(latent), sites, tuple(det))
        return ad._validated_predictors(theta0)

    def _validated_predictors(self, theta0) -> ModelAdapter:
        """Keep a site's predictor only if f(η_i(θ), y_i) reproduces the model's log-likelihood."""
        key = jax.random.PRNGKey(1)
        thetas = [theta0, theta0 + 0.3 * jax.random.normal(key, theta0.shape, theta0.dtype)]
        changed = {}
        for name, site in self.observed.items():
            if site.predictor is None:
                continue
            ok, why = True, None
            both = self.jit(lambda ad, th, name=name: (ad.log_lik(th, name), ad._predictor_log_lik(th, name)))
            try:
                for th in thetas:
                    ref, got = both(th)
                    scale = 1.0 + jnp.abs(ref)
                    if not bool(jnp.all(jnp.abs(got - ref) <= 1e-4 * scale)):
                        ok, why = False, "rebuilt distribution does not reproduce log_prob"
                        break
            except Exception as err:  # noqa: BLE001
                ok, why = False, f"{type(err).__name__}: {err}"
            if not ok:
                changed[name] = ObservedSite(site.name, site.obs_shape, site.event_shape, site.dims,
                                             site.value, None, why)
        if not changed:
            return self
        obs = dict(self.observed)
        obs.update(changed)
        return ModelAdapter(self.model, self.args, self.kwargs, self.init_theta, self.unravel,
                            self.latent, obs, self.deterministic)

    # ------------------------------------------------------------- views
    @property
    def num_params(self) -> int:
        return int(self.init_theta.shape[0])

    def site_names_of(self, indices) -> list[str]:
        """Latent site names owning the flat indices ``indices``."""
        out = []
        for s in self.latent:
            if any(s.start <= int(i) < s.stop for i in np.atleast_1d(indices)):
                out.append(s.name)
        return out

    def param_labels(self) -> list[str]:
        """One label per entry of θ, e.g. ``beta[2]``."""
        labels = []
        for s in self.latent:
            if s.stop - s.start == 1 and not s.unconstrained_shape:
                labels.append(s.name)
            else:
                labels.extend(f"{s.name}[{','.join(map(str, k))}]"
                              for k in np.ndindex(*s.unconstrained_shape))
        return labels

    def observed_site(self, var_name: str | None) -> ObservedSite:
        """The observed site ``var_name``; required when the model has several (as in ``az.loo``)."""
        names = list(self.observed)
        if var_name is None:
            if len(names) > 1:
                raise ModelError(
                    f"the model has several observed sites {names}; pass var_name= to pick one"
                )
            return self.observed[names[0]]
        if var_name not in self.observed:
            raise ModelError(f"var_name='{var_name}' is not an observed site; observed sites: {names}")
        return self.observed[var_name]

    # ------------------------------------------------------------ functions of θ
    def potential(self, theta):
        """U(θ): NumPyro's potential energy at the flat unconstrained ``theta``."""
        return potential_energy(self.model, self.args, self.kwargs, self.unravel(theta))

    def jit(self, fn: Callable) -> Callable:
        """``fn(adapter, *rest)`` jitted with the data as arguments (not constants): returns ``g(*rest)``.

        Use it for every function that runs the whole model, so that compile time and memory do not grow
        with N.
        """
        return jit_with_data(lambda a, kw, *rest: fn(dataclasses.replace(self, args=a, kwargs=kw), *rest),
                             self.args, self.kwargs)

    def _trace(self, theta):
        return self.trace_with(theta, self.args, self.kwargs)

    def trace_with(self, theta, args: tuple, kwargs: dict):
        """The model's trace at ``theta`` on the data ``*args, **kwargs`` (e.g. a subset of the rows);
        ``theta`` flat, or already as the dict of unconstrained latent arrays."""
        latent = theta if isinstance(theta, dict) else self.unravel(theta)
        params = constrain_fn(self.model, args, kwargs, latent)
        model = handlers.substitute(handlers.seed(self.model, 0), data=params)
        return handlers.trace(model).get_trace(*args, **kwargs)

    @staticmethod
    def _site_log_lik(site: dict, num_obs: int):
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None:
            lp = jnp.where(site["mask"], lp, 0.0)
        if site.get("scale") is not None:
            lp = lp * site["scale"]
        return jnp.reshape(jnp.broadcast_to(lp, site["fn"].batch_shape), (num_obs,))

    def log_lik(self, theta, var_name: str):
        """``log p(y_i | θ)`` for every observation of ``var_name``, flattened to ``(N,)``."""
        site = self.observed[var_name]
        return self._site_log_lik(self._trace(theta)[var_name], site.num_obs)

    def log_lik_all(self, theta) -> dict:
        """:meth:`log_lik` of every observed site from one model pass."""
        tr = self._trace(theta)
        return {n: self._site_log_lik(tr[n], s.num_obs) for n, s in self.observed.items()}

    def eta(self, theta, var_name: str):
        """Predictor η(θ) of ``var_name``: ``(N, K_all)`` unconstrained distribution parameters."""
        site = self.observed[var_name]
        return site.predictor.eta(self._trace(theta)[var_name]["fn"])

    def predictor_aux(self, theta, var_name: str) -> dict:
        site = self.observed[var_name]
        return site.predictor.aux(self._trace(theta)[var_name]["fn"])

    def predictor_mask(self, var_name: str):
        """Per-observation weights (0 for masked-out observations) or ``None``; ``(N,)``."""
        site = self.observed[var_name]
        tr_site = self._trace(self.init_theta)[var_name]
        w = None
        if site.predictor is not None and site.predictor.mask is not None:
            w = site.predictor.mask.astype(self.init_theta.dtype)
        for key in ("mask", "scale"):
            v = tr_site.get(key)
            if v is not None:
                v = jnp.broadcast_to(jnp.asarray(v, self.init_theta.dtype), site.obs_shape)
                v = jnp.reshape(v, (-1,))
                w = v if w is None else w * v
        return w

    def _predictor_log_lik(self, theta, var_name: str):
        site = self.observed[var_name]
        tr_site = self._trace(theta)[var_name]
        eta = site.predictor.eta(tr_site["fn"])
        aux = site.predictor.aux(tr_site["fn"])
        ll = site.predictor.log_lik(eta, site.flat_value, aux)
        w = self.predictor_mask(var_name)
        return ll if w is None else jnp.where(w != 0, ll * w, 0.0)

    def constrain(self, theta, deterministic: bool = True) -> dict:
        """Every latent (and deterministic) site in constrained space at ``theta``."""
        return constrain_fn(self.model, self.args, self.kwargs, self.unravel(theta),
                            return_deterministic=deterministic)
