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
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer import init_to_median, init_to_sample
from numpyro.infer.util import constrain_fn, potential_energy

from numpyro_mpe.errors import ModelError, PosteriorError
from numpyro_mpe.model.predictor import Predictor, make_predictor
from numpyro_mpe.programs import enable_persistent_cache


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


class _Opaque:
    """A static leaf that cannot be hashed (compared by identity)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Opaque) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _static(x):
    try:
        hash(x)
        return x
    except TypeError:
        return _Opaque(x)


def _is_array(x) -> bool:
    return (hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, bool)
            and np.dtype(x.dtype).kind in "biufc")


class DataBinding(NamedTuple):
    """The structure of the model's data ``(args, kwargs)``: its treedef, the leaves that are not arrays
    (Python ints, strings, None, ...: static) and the positions of the array leaves (arguments of every
    compiled program, so that XLA neither embeds nor constant-folds them and compile time does not grow
    with N).  Float scalars count as arrays (a prior scale can change without a new program)."""

    treedef: Any
    static: tuple  # the non-array leaves, None where an array leaf goes
    dynamic: tuple  # positions of the array leaves

    @classmethod
    def of(cls, args: tuple, kwargs: dict, floats_static: bool = False) -> tuple[DataBinding, tuple]:
        leaves, treedef = jax.tree_util.tree_flatten((tuple(args), dict(kwargs)))
        dyn = tuple(i for i, x in enumerate(leaves)
                    if _is_array(x) or (not floats_static and isinstance(x, float)))
        static = tuple(None if i in dyn else _static(x) for i, x in enumerate(leaves))
        values = tuple(jnp.asarray(leaves[i]) for i in dyn)
        return cls(treedef, static, dyn), values

    def rebuild(self, values) -> tuple:
        leaves = [x.obj if isinstance(x, _Opaque) else x for x in self.static]
        for i, v in zip(self.dynamic, values):
            leaves[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclass(frozen=True)
class ModelStructure:
    """Everything about a bound model that is not an array: the static part of :class:`ModelAdapter`."""

    model: Callable
    binding: DataBinding
    latent: tuple  # of LatentSite
    sites: tuple  # of SiteSpec, in trace order
    deterministic: tuple  # names of deterministic sites
    dtype: Any  # of θ


#: Errors raised when a model uses its data as concrete values (e.g. ``np.unique(group)``) while tracing.
_CONCRETE_DATA_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                         jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _obs_dims(name: str, site: dict) -> tuple:
    """Observation dim names, as ``arviz.from_numpyro`` names them (plates sorted by dim)."""
    batch_ndim = len(site["fn"].batch_shape)
    plates = {f.dim: f.name for f in site["cond_indep_stack"]}
    return tuple(plates.get(k - batch_ndim, f"{name}_dim_{k}") for k in range(batch_ndim))


def _is_discrete(site: dict) -> bool:
    fn = site["fn"]
    return bool(getattr(fn, "is_discrete", False)) or getattr(fn.support, "is_discrete", False)


def _argument_name(path) -> str:
    """``y`` or ``args[0]`` from a pytree path into ``(args, kwargs)``."""
    first = path[0].idx if hasattr(path[0], "idx") else 0
    rest = path[1:]
    if first == 1 and rest and hasattr(rest[0], "key"):
        label, rest = str(rest[0].key), rest[1:]
    elif rest and hasattr(rest[0], "idx"):
        label, rest = f"args[{rest[0].idx}]", rest[1:]
    else:
        label = "args"
    return label + "".join(str(p) for p in rest)


def _is_pandas(x) -> bool:
    return type(x).__module__.startswith("pandas") and hasattr(x, "to_numpy")


def convert_inputs(args: tuple, kwargs: dict, lists: tuple = ()) -> tuple[tuple, dict]:
    """The model's data with pandas objects (and the arguments at the paths ``lists``) as NumPy arrays.

    NumPyro's own inference takes arrays: a ``pandas.Series`` (also one with a filtered, non-contiguous
    index) or a ``DataFrame`` of numbers becomes its values; one that is not numeric is refused with an error
    naming the argument.  ``lists``: paths of lists of numbers that the model observes (found by
    :func:`_trace_structure`), converted to arrays.
    """

    def convert(path, x):
        if _is_pandas(x):
            arr = x.to_numpy()
            if arr.dtype.kind not in "biuf":
                raise ModelError(f"argument '{_argument_name(path)}' is a pandas {type(x).__name__} of dtype "
                                 f"{arr.dtype}; pass numbers (e.g. its .cat.codes, or a float column)")
            return arr
        if path in lists:
            try:
                arr = np.asarray(x)
            except ValueError:
                arr = np.asarray(x, dtype=object)
            if arr.dtype.kind not in "biuf":
                raise ModelError(f"argument '{_argument_name(path)}' is a {type(x).__name__} that is not "
                                 f"a rectangular array of numbers; pass a NumPy array")
            return arr
        return x

    def stop(x):
        return _is_pandas(x) or isinstance(x, list | tuple) and any(x is v for v in listed)

    listed: list = []
    if lists:  # the objects at those paths, to stop the traversal there
        for path, leaf in jax.tree_util.tree_flatten_with_path((tuple(args), dict(kwargs)),
                                                              is_leaf=lambda v: isinstance(v, list))[0]:
            if path in lists:
                listed.append(leaf)
    out = jax.tree_util.tree_map_with_path(convert, (tuple(args), dict(kwargs)), is_leaf=stop)
    return out[0], out[1]


class _ObservedList(Exception):
    """An observed site's value is a Python list or tuple: the argument it came from, to convert."""

    def __init__(self, path):
        super().__init__(path)
        self.path = path


def _trace_structure(model, binding: DataBinding, values: tuple, rng_key):
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
                    raise _ObservedList(found[0] if found else None)
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
                latent, specs, det = _trace_structure(model, binding, values, rng_key)
                break
            except _ObservedList as err:
                if err.path is None or err.path in lists:
                    raise ModelError("an observed site's value is a Python list; pass a NumPy "
                                     "array") from None
                lists = lists + (err.path,)
                args, kwargs = convert_inputs(args, kwargs, lists)
            except _CONCRETE_DATA_ERRORS:
                latent = None
                break
        if latent is None:
            try:  # the model uses a float argument as a Python number: keep floats static
                binding, values = DataBinding.of(args, kwargs, floats_static=True)
                latent, specs, det = _trace_structure(model, binding, values, rng_key)
            except _CONCRETE_DATA_ERRORS:  # it uses its arrays as concrete values: close over them
                binding = DataBinding(jax.tree_util.tree_structure((tuple(args), dict(kwargs))),
                                      tuple(_Opaque(x) if _is_array(x) else _static(x)
                                            for x in jax.tree_util.tree_leaves((tuple(args),
                                                                                dict(kwargs)))), ())
                values = ()
                latent, specs, det = _trace_structure(model, binding, values, rng_key)
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
        site_values, site_weights = _observed_values(blank)
        for spec, value in zip(specs, site_values):
            value = np.asarray(value)
            if np.issubdtype(value.dtype, np.number) and not np.all(np.isfinite(value)):
                bad = int(np.size(value) - np.isfinite(value).sum())
                hint = ("drop them from the data" if spec.weighted else
                        "remove them or model them as missing (obs_mask=...)")
                raise ModelError(
                    f"observed site '{spec.name}' has {bad} non-finite value(s) (NaN or inf) in data of "
                    f"shape {value.shape}; {hint}"
                )
        ad = blank.replace(site_values=site_values, site_weights=site_weights)
        theta0 = _initial_point(ad, rng_key, init_strategy)
        if theta0 is None:
            bad = _non_finite_sites(ad)
            raise PosteriorError(
                "the potential energy is not finite at any initial point tried"
                + (f"; non-finite log-density in site(s) {bad}" if bad else "")
                + "; check the priors, the support of the likelihood and the data, or pass "
                "init_strategy=numpyro.infer.init_to_value(values=...)"
            )
        return _validated_predictors(ad.replace(init_theta=theta0))

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
        compiled = jax.jit(fn)
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


# ---------------------------------------------------------------- compiled steps of the build
def _site_weights(site: dict, obs_shape: tuple, dtype):
    """Per-observation weights of a traced observed site: the mask of a ``MaskedDistribution``, the site's
    ``mask`` and its ``scale``, multiplied; ``None`` when it has none."""
    from numpyro_mpe.model.predictor import unwrap

    w = None
    parts = [unwrap(site["fn"])[1], site.get("mask"), site.get("scale")]
    for v in parts:
        if v is None or v is True:
            continue
        v = jnp.reshape(jnp.broadcast_to(jnp.asarray(v, dtype), obs_shape), (-1,))
        w = v if w is None else w * v
    return w


@jax.jit
def _observed_values(adapter: ModelAdapter):
    """Observed values and weights of every site, from one trace of the model (its prior draws are unused)."""
    seeded = handlers.substitute(handlers.seed(adapter.model, 0), substitute_fn=init_to_sample)
    tr = handlers.trace(seeded).get_trace(*adapter.args, **adapter.kwargs)
    values, weights = [], []
    for spec in adapter.structure.sites:
        site = tr[spec.name]
        values.append(jnp.broadcast_to(jnp.asarray(site["value"]), spec.obs_shape + spec.event_shape))
        weights.append(_site_weights(site, spec.obs_shape, adapter.structure.dtype))
    return tuple(values), tuple(weights)


@jax.jit
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


def _initial_point(adapter: ModelAdapter, rng_key, init_strategy, max_tries: int = 20):
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


def _non_finite_sites(adapter: ModelAdapter) -> list[str]:
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


@jax.jit
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
            ref = ModelAdapter.site_log_lik(tr[spec.name], n)
            fn = tr[spec.name]["fn"]
            got = spec.predictor.log_lik(spec.predictor.eta(fn), jnp.reshape(value, (n,) + spec.event_shape),
                                         spec.predictor.aux(fn))
            got = got if w is None else jnp.where(w != 0, got * w, 0.0)
            errs.append(jnp.max(jnp.where(jnp.isfinite(ref) | jnp.isfinite(got),
                                          jnp.abs(got - ref) / (1.0 + jnp.abs(ref)), 0.0)))
        return jnp.stack(errs)

    return jnp.max(jax.vmap(one)(thetas), axis=0)


def _validated_predictors(adapter: ModelAdapter) -> ModelAdapter:
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
                          SiteSpec(s.name, s.obs_shape, s.event_shape, s.dims, None, s.no_predictor_reason,
                                   s.weighted) for j, s in enumerate(adapter.structure.sites))
            single = adapter.replace(structure=_with_sites(adapter.structure, sites))
            try:
                errors.append(float(np.asarray(_predictor_check(single, thetas))[k]))
            except Exception as err:  # noqa: BLE001
                errors.append(f"{type(err).__name__}: {err}")
    sites, changed = [], False
    for spec, err in zip(adapter.structure.sites, errors):
        if spec.predictor is not None and (isinstance(err, str) or not err <= 1e-4):
            why = err if isinstance(err, str) else "rebuilt distribution does not reproduce log_prob"
            spec = SiteSpec(spec.name, spec.obs_shape, spec.event_shape, spec.dims, None, why, spec.weighted)
            changed = True
        sites.append(spec)
    if not changed:
        return adapter
    return adapter.replace(structure=_with_sites(adapter.structure, tuple(sites)))


def _with_sites(structure: ModelStructure, sites: tuple) -> ModelStructure:
    return ModelStructure(structure.model, structure.binding, structure.latent, sites,
                          structure.deterministic, structure.dtype)
