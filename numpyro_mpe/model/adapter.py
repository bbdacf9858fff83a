"""A NumPyro model seen as functions of one flat unconstrained vector θ.

:class:`ModelAdapter` traces the model once and exposes

* ``potential(θ)``: NumPyro's potential energy U(θ) = −log p(y, θ) − log|det J| (unconstrained space);
* ``log_lik(θ, site)``: the per-observation log-likelihood ``log p(y_i | θ)`` of an observed site,
  flattened to ``(N,)`` (one observation = one element of the site's batch shape, event dims summed);
* ``site.predictor``: the distribution parameters η_i(θ) per observation, where they can be taken;
* ``constrain(θ)``: every latent and deterministic site in constrained space.

Data reach the model as ``*args, **kwargs``, exactly as in NumPyro.

The adapter is a JAX pytree: its arrays (the model's array arguments, the observed values and weights, the
initial point) are its leaves and everything else (the model function, the sites, the shapes) its static
structure.  A jitted function that takes the adapter as an argument is therefore compiled once per model
structure and data shapes, and reused for new data of the same shapes (see :mod:`numpyro_mpe.programs`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import init_to_median
from numpyro.infer.util import constrain_fn, potential_energy

from numpyro_mpe import programs
from numpyro_mpe.errors import ModelError, PosteriorError
from numpyro_mpe.model.checks import initial_point, non_finite_sites, observed_values, validated_predictors
from numpyro_mpe.model.inputs import DataBinding, Opaque, convert_inputs, is_array, static_leaf
from numpyro_mpe.model.structure import (
    CONCRETE_DATA_ERRORS,
    LatentSite,
    ModelStructure,
    ObservedList,
    ObservedSite,
    SiteSpec,
    trace_structure,
)
from numpyro_mpe.programs import enable_persistent_cache

__all__ = ["LatentSite", "ModelAdapter", "ModelStructure", "ObservedSite", "SiteSpec"]


@jax.tree_util.register_pytree_node_class
class ModelAdapter:
    """A NumPyro model with its data bound, as functions of a flat unconstrained θ ∈ R^P.

    A pytree (see the module docstring): pass it to jitted functions as an argument.

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

    __slots__ = ("structure", "data", "init_theta", "site_values", "site_weights", "__dict__")

    def __init__(self, structure: ModelStructure, data: tuple, init_theta, site_values: tuple,
                 site_weights: tuple):
        self.structure = structure
        self.data = data
        self.init_theta = init_theta
        self.site_values = site_values
        self.site_weights = site_weights

    # ----------------------------------------------------------- pytree
    def tree_flatten(self):
        return (self.data, self.init_theta, self.site_values, self.site_weights), self.structure

    @classmethod
    def tree_unflatten(cls, structure, children):
        return cls(structure, *children)

    def replace(self, **changes) -> ModelAdapter:
        fields = {k: getattr(self, k) for k in ("structure", "data", "init_theta", "site_values",
                                                "site_weights")}
        fields.update(changes)
        return ModelAdapter(**fields)

    # ----------------------------------------------------------- building
    @classmethod
    def build(cls, model: Callable, rng_key, args: tuple = (), kwargs: dict | None = None,
              init_strategy=init_to_median) -> ModelAdapter:
        """Trace ``model(*args, **kwargs)`` and check it can be handled.

        Raises :class:`~numpyro_mpe.errors.ModelError` for a model that is not callable, has no observed
        site, a discrete latent site, or NaN/inf observed values, naming the site.
        """
        if not callable(model):
            raise ModelError(f"model must be a NumPyro model (a callable), got {type(model).__name__}")
        enable_persistent_cache()
        args, kwargs = convert_inputs(tuple(args), dict(kwargs or {}))
        lists: tuple = ()
        for _ in range(8):  # an observed list of numbers: convert its argument and trace again
            binding, values = DataBinding.of(args, kwargs)
            try:
                latent, specs, det = trace_structure(model, binding, values, rng_key)
                break
            except ObservedList as err:
                if err.path is None or err.path in lists:
                    raise ModelError("an observed site's value is a Python list; pass a NumPy "
                                     "array") from None
                lists = lists + (err.path,)
                args, kwargs = convert_inputs(args, kwargs, lists)
            except CONCRETE_DATA_ERRORS:
                latent = None
                break
        if latent is None:
            try:  # the model uses a float argument as a Python number: keep floats static
                binding, values = DataBinding.of(args, kwargs, floats_static=True)
                latent, specs, det = trace_structure(model, binding, values, rng_key)
            except CONCRETE_DATA_ERRORS:  # it uses its arrays as concrete values: close over them
                binding = DataBinding(jax.tree_util.tree_structure((tuple(args), dict(kwargs))),
                                      tuple(Opaque(x) if is_array(x) else static_leaf(x)
                                            for x in jax.tree_util.tree_leaves((tuple(args),
                                                                                dict(kwargs)))), ())
                values = ()
                latent, specs, det = trace_structure(model, binding, values, rng_key)
        if not specs:
            raise ModelError(
                "the model has no observed sample site (numpyro.sample(..., obs=...)); pass the data "
                "as model arguments, e.g. mpe.Laplace(model).run(key, X, y=y)"
            )
        if not latent:
            raise ModelError("the model has no latent sample site: there is no posterior to perturb")
        latent_sites, start = [], 0
        for name, shape, _ in sorted(latent, key=lambda s: s[0]):  # ravel order: sorted names
            size = int(np.prod(shape, dtype=int))
            latent_sites.append(LatentSite(name, shape, start, start + size))
            start += size
        dtype = jnp.result_type(*[d for _, _, d in latent])
        structure = ModelStructure(model, binding, tuple(latent_sites), tuple(specs), tuple(det),
                                   jnp.dtype(dtype))
        blank = cls(structure, values, np.zeros(start, np.dtype(dtype)), (None,) * len(specs),
                    (None,) * len(specs))
        site_values, site_weights = observed_values(blank)
        site_values = tuple(_checked_values(spec, value, weight)
                            for spec, value, weight in zip(specs, site_values, site_weights))
        ad = blank.replace(site_values=site_values, site_weights=site_weights)
        theta0 = initial_point(ad, rng_key, init_strategy)
        if theta0 is None:
            bad = non_finite_sites(ad)
            raise PosteriorError(
                "the potential energy is not finite at any initial point tried"
                + (f"; non-finite log-density in site(s) {bad}" if bad else "")
                + "; check the priors, the support of the likelihood and the data, or pass "
                "init_strategy=numpyro.infer.init_to_value(values=...)"
            )
        return validated_predictors(ad.replace(init_theta=theta0))

    # ------------------------------------------------------------- views
    @property
    def model(self) -> Callable:
        return self.structure.model

    @property
    def latent(self) -> tuple:
        return self.structure.latent

    @property
    def deterministic(self) -> tuple:
        return self.structure.deterministic

    @cached_property
    def _bound(self) -> tuple:
        return self.structure.binding.rebuild(self.data)

    @property
    def args(self) -> tuple:
        return self._bound[0]

    @property
    def kwargs(self) -> dict:
        return self._bound[1]

    @cached_property
    def observed(self) -> dict:
        """Observed sites by name (:class:`ObservedSite`, with their values)."""
        return {s.name: ObservedSite(s.name, s.obs_shape, s.event_shape, s.dims, v, s.predictor,
                                     s.no_predictor_reason)
                for s, v in zip(self.structure.sites, self.site_values)}

    def site_index(self, var_name: str) -> int:
        return [s.name for s in self.structure.sites].index(var_name)

    @property
    def num_params(self) -> int:
        return int(self.structure.latent[-1].stop)

    def unravel(self, theta) -> dict:
        """The flat θ as a dict of unconstrained latent arrays (sorted by name, as ``ravel_pytree``)."""
        return {s.name: jnp.reshape(theta[..., s.start:s.stop], theta.shape[:-1] + s.unconstrained_shape)
                for s in self.structure.latent}

    def site_names_of(self, indices) -> list[str]:
        """Latent site names owning the flat indices ``indices``."""
        idx = [int(i) for i in np.atleast_1d(indices)]
        return [s.name for s in self.latent if any(s.start <= i < s.stop for i in idx)]

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
        """``fn(adapter, *rest)`` jitted with the adapter as an argument: returns ``g(*rest)``.

        Prefer a module-level jitted function of the adapter: a new ``fn`` is a new program.
        """
        compiled = programs.jit(fn)
        return lambda *rest: compiled(self, *rest)

    def trace(self, theta):
        """The model's trace at ``theta`` on its data."""
        return self.trace_with(theta, self.args, self.kwargs)

    def trace_with(self, theta, args: tuple, kwargs: dict):
        """The model's trace at ``theta`` on the data ``*args, **kwargs`` (e.g. a subset of the rows);
        ``theta`` flat, or already as the dict of unconstrained latent arrays."""
        latent = theta if isinstance(theta, dict) else self.unravel(theta)
        params = constrain_fn(self.model, args, kwargs, latent)
        model = handlers.substitute(handlers.seed(self.model, 0), data=params)
        return handlers.trace(model).get_trace(*args, **kwargs)

    @staticmethod
    def site_log_lik(site: dict, num_obs: int):
        """Per-observation log-likelihood of a traced observed site (mask and scale applied), ``(N,)``."""
        lp = site["fn"].log_prob(site["value"])
        if site.get("mask") is not None:
            lp = jnp.where(site["mask"], lp, 0.0)
        if site.get("scale") is not None:
            lp = lp * site["scale"]
        return jnp.reshape(jnp.broadcast_to(lp, site["fn"].batch_shape), (num_obs,))

    def log_lik(self, theta, var_name: str):
        """``log p(y_i | θ)`` for every observation of ``var_name``, flattened to ``(N,)``."""
        site = self.observed[var_name]
        return self.site_log_lik(self.trace(theta)[var_name], site.num_obs)

    def log_lik_all(self, theta) -> dict:
        """:meth:`log_lik` of every observed site from one model pass."""
        tr = self.trace(theta)
        return {n: self.site_log_lik(tr[n], s.num_obs) for n, s in self.observed.items()}

    def eta(self, theta, var_name: str):
        """Predictor η(θ) of ``var_name``: ``(N, K_all)`` unconstrained distribution parameters."""
        site = self.observed[var_name]
        return site.predictor.eta(self.trace(theta)[var_name]["fn"])

    def predictor_aux(self, theta, var_name: str) -> dict:
        site = self.observed[var_name]
        return site.predictor.aux(self.trace(theta)[var_name]["fn"])

    def predictor_mask(self, var_name: str):
        """Per-observation weights (0 for masked-out observations, the site's scale) or ``None``; ``(N,)``."""
        return self.site_weights[self.site_index(var_name)]

    def _predictor_log_lik(self, theta, var_name: str):
        site = self.observed[var_name]
        tr_site = self.trace(theta)[var_name]
        eta = site.predictor.eta(tr_site["fn"])
        aux = site.predictor.aux(tr_site["fn"])
        ll = site.predictor.log_lik(eta, site.flat_value, aux)
        w = self.predictor_mask(var_name)
        return ll if w is None else jnp.where(w != 0, ll * w, 0.0)

    def constrain(self, theta, deterministic: bool = True) -> dict:
        """Every latent (and deterministic) site in constrained space at ``theta``."""
        return constrain_fn(self.model, self.args, self.kwargs, self.unravel(theta),
                            return_deterministic=deterministic)


def _checked_values(spec: SiteSpec, value, weight):
    """The observed values, refusing NaN or inf ones unless a mask (weight 0) already keeps them out: those
    are replaced by 0 in the values the engine uses (the model still sees its data, and NumPyro masks their
    log-density)."""
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or np.all(np.isfinite(arr)):
        return value
    n = int(np.prod(spec.obs_shape, dtype=int))
    bad_obs = ~np.all(np.isfinite(arr.reshape((n, -1))), axis=1)
    if weight is not None and np.all(np.asarray(weight)[bad_obs] == 0):
        return jnp.asarray(np.where(np.isfinite(arr), arr, 0).astype(arr.dtype))
    count = int(np.size(arr) - np.isfinite(arr).sum())
    hint = ("mask them too (weight 0) or drop them from the data" if spec.weighted else
            "remove them, or mask them (numpyro.handlers.mask, or obs_mask=... to impute them)")
    raise ModelError(f"observed site '{spec.name}' has {count} non-finite value(s) (NaN or inf) in data of "
                     f"shape {arr.shape}; {hint}")
