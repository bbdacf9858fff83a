"""LOO predictive functionals of one observation, from a mixture over its predictor.

The leave-one-out predictive of observation i is p(ỹ | y₋i) ≈ ∫ p(ỹ | η) N(η; η̂_i + Δη_i, V₋i) dη in the
active components of its predictor.  A quadrature rule (nodes ξ_q, weights w_q) turns it into a mixture
Σ_q w_q p(ỹ | η_q), η_q = η̂_i + Δη_i + V₋i^{1/2} ξ_q; weighted samples of η (importance sampling) give the
same kind of mixture.  Every functional is computed from the mixture by :func:`observation_functionals`,
written for one observation:

* ``"pit"``: ``pit_lower`` = F(y) (continuous) or F(y − 1) (discrete) and ``pit_mass`` = p(y) (discrete; 0
  otherwise), F the mixture CDF: the randomized PIT is ``pit_lower + u · pit_mass``, u ~ U(0, 1);
* ``"moments"``: ``mean`` = Σ w_q μ_q and ``var`` = Σ w_q σ²_q + Σ w_q (μ_q − mean)² (total variance);
* ``"quantiles"``: F(q) = p solved by bisection (continuous) or the smallest integer q with F(q) ≥ p
  (discrete), for each of :attr:`PredictiveSpec.probs`, inside a bracket from the mixture's mean ± 10 sd
  (widened where it does not hold p);
* ``"crps"``: ``crps`` = E|Ỹ − y| − ½ E|Ỹ − Ỹ′|, ``abs_error`` = E|Ỹ − y| and ``mean_abs_diff`` =
  E|Ỹ − Ỹ′|: closed forms for a Normal likelihood (a mixture of normals); otherwise ∫ (F(t) − 1{t ≥ y})² dt
  and 2∫ F(1 − F) dt by Gauss–Legendre on either side of y (continuous) or as sums over the integers
  (discrete; exact while the bracket spans at most :attr:`PredictiveSpec.grid` integers, else sums with a
  step h corrected to second order).

Where the distribution has no ``cdf`` but a finite integer support (Bernoulli, Binomial, Categorical as
ordinal codes), F is the probability mass summed over the support values ≤ t.  :func:`predictive_spec` checks
a site once on the host and returns the static :class:`PredictiveSpec` the chunk kernel of
:mod:`numpyro_mpe.engine.site` takes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.scipy.stats import norm

from numpyro_mpe.engine.quadrature import psd_sqrt
from numpyro_mpe.errors import MPEError
from numpyro_mpe.programs import jit

#: The functionals, each a set of per-row outputs.
FUNCTIONALS = {"pit": ("pit_lower", "pit_mass"), "moments": ("mean", "var"), "quantiles": ("quantiles",),
               "crps": ("crps", "abs_error", "mean_abs_diff")}
#: Half-width of the bracket of quantiles and of the CRPS integrals, in predictive sds.
BRACKET_SDS = 10.0
#: Bisection steps of continuous and discrete quantiles; widenings of a bracket that misses p.
BISECTION_STEPS, WIDENINGS = 64, 8
#: Points of the CRPS integrals (split in two at y) where they have no closed form.
GRID_POINTS = 512
#: Rows × nodes × points per batch of the chunk's rows.
WORK_BATCH = 1 << 22


class PredictiveSpec(NamedTuple):
    """Which functionals a pass computes and how (static, hashable: part of the compiled program's key).

    ``functionals``: names from :data:`FUNCTIONALS`; ``probs``: the quantiles' probabilities; ``discrete``:
    integer-valued outcomes; ``normal``: a Normal likelihood (closed-form CRPS); ``support``: ``()`` where
    the distribution has a ``cdf``, else ``(lower, size)``: F sums the probability mass over lower, …,
    lower + size − 1; ``bounds``: the support's bounds (brackets stay inside); ``grid``: points of the CRPS
    integrals.
    """

    functionals: tuple
    probs: tuple = ()
    discrete: bool = False
    normal: bool = False
    support: tuple = ()
    bounds: tuple = (-math.inf, math.inf)
    grid: int = GRID_POINTS

    @property
    def outputs(self) -> tuple:
        """The per-row outputs, in order."""
        return tuple(o for f in self.functionals for o in FUNCTIONALS[f])

    def covers(self, other: PredictiveSpec | None) -> bool:
        """Whether a pass with these functionals also gives every output of ``other`` (``None``: a pass
        without functionals): its functionals are a subset, with the same quantile probabilities where it
        asks for quantiles, of the same site description.

        Examples
        --------
        >>> full = PredictiveSpec(("pit", "moments", "quantiles"), (0.05, 0.95))
        >>> full.covers(PredictiveSpec(("moments",))), full.covers(None)
        (True, True)
        >>> full.covers(PredictiveSpec(("quantiles",), (0.5,))), full.covers(PredictiveSpec(("crps",)))
        (False, False)
        """
        if other is None:
            return True
        same_site = self._replace(functionals=(), probs=()) == other._replace(functionals=(), probs=())
        return (same_site and set(other.functionals) <= set(self.functionals)
                and ("quantiles" not in other.functionals or other.probs == self.probs))


def check_probs(probs, option: str = "probs") -> tuple:
    """``probs`` as a tuple of floats, each strictly inside (0, 1) (else :class:`MPEError` naming
    ``option``)."""
    values = tuple(float(p) for p in np.atleast_1d(np.asarray(probs, dtype=float)))
    bad = [p for p in values if not 0.0 < p < 1.0]
    if bad or not values:
        raise MPEError(f"{option} must be probabilities strictly between 0 and 1, got "
                       f"{list(values) or probs}")
    return values


def predictive_spec(predictor, site_name: str, functionals, probs=(), *, eta, aux, value,
                    grid: int = GRID_POINTS) -> PredictiveSpec:
    """The :class:`PredictiveSpec` of a site, checked on the host at predictor values ``eta`` (n, K_all)
    with fixed parameters ``aux`` and observed ``value`` (n,).

    Raises :class:`MPEError` naming the site for an unknown functional, probabilities outside (0, 1),
    observations that are not scalars, or a distribution without the CDF (or mean and variance) a
    functional needs.
    """
    functionals = tuple(functionals)
    unknown = [f for f in functionals if f not in FUNCTIONALS]
    if unknown:
        raise MPEError(f"unknown LOO predictive functional(s) {unknown}; known: {list(FUNCTIONALS)}")
    probs = check_probs(probs) if "quantiles" in functionals else ()
    cls = type(predictor.template).__name__
    if predictor.reinterpreted or predictor.base_event:
        raise MPEError(f"site '{site_name}': LOO predictive checks need scalar observations; its {cls} "
                       f"observations have event shape {predictor.reinterpreted + predictor.base_event}")
    info = _probe(predictor, eta, aux, value)
    lower, upper, e_lower, e_upper = (float(v) for v in _support_bounds(predictor, eta, aux,
                                                                         info["enumerate"]))
    support = ()
    if not info["cdf"]:
        if info["discrete"] and (np.isfinite(lower) and np.isfinite(upper) or info["enumerate"]):
            if not (np.isfinite(lower) and np.isfinite(upper)):  # the values of a support without bounds
                lower, upper = e_lower, e_upper
            support = (int(lower), int(upper - lower) + 1)
        if not support and set(functionals) & {"pit", "quantiles", "crps"}:
            raise MPEError(
                f"site '{site_name}': its distribution {cls} has no CDF (numpyro's {cls}.cdf is not "
                "implemented and its support is not a finite set of integers), which the LOO-PIT, quantiles "
                "and CRPS need; loo_expectations(kind='mean'|'var'|'sd') works without one")
    if "moments" in functionals and not support and not info["moments"]:
        raise MPEError(f"site '{site_name}': numpyro's {cls} has no mean or variance, which the LOO "
                       "expectations need")
    discrete = info["discrete"]
    import numpyro.distributions as dist

    return PredictiveSpec(functionals, probs, discrete, type(predictor.template) is dist.Normal, support,
                          (lower, upper), int(grid))


def _implemented(fn) -> bool:
    try:
        fn()
    except NotImplementedError:
        return False
    return True


def _probe(predictor, eta, aux, value) -> dict:
    """What the site's distribution implements, found by tracing it abstractly (nothing is compiled):
    ``discrete`` support, ``cdf``, ``moments`` (mean and variance), ``enumerate`` (enumerable support)."""
    info = {}

    def probe(eta, aux, value):
        d = predictor.distribution(eta, aux)
        info["discrete"] = bool(d.support.is_discrete)
        info["cdf"] = _implemented(lambda: d.cdf(value.astype(eta.dtype)))
        info["moments"] = _implemented(lambda: (d.mean, d.variance))
        info["enumerate"] = _implemented(lambda: d.enumerate_support(expand=False))
        return eta

    jax.eval_shape(probe, eta, aux, value)
    return info


@functools.partial(jit, static_argnums=(0, 3))
def _support_bounds(predictor, eta, aux, enumerate_support: bool):
    """The support's smallest lower and largest upper bound over the rows (±inf where it has none), and the
    smallest and largest value of an enumerable support (±inf where it is not)."""
    d = predictor.distribution(eta, aux)
    sup, dtype = d.support, eta.dtype
    lo = jnp.min(jnp.asarray(getattr(sup, "lower_bound", -jnp.inf), dtype))
    hi = jnp.max(jnp.asarray(getattr(sup, "upper_bound", jnp.inf), dtype))
    if not enumerate_support:
        return lo, hi, jnp.asarray(-jnp.inf, dtype), jnp.asarray(jnp.inf, dtype)
    vals = jnp.asarray(d.enumerate_support(expand=False), dtype)
    return lo, hi, jnp.min(vals), jnp.max(vals)


# ------------------------------------------------------------------ the mixture of one observation
def quadrature_points(nodes, mean, cov, eta_all, active):
    """η_q (Q, K_all): ``eta_all`` with its ``active`` components at mean + cov^{1/2} ξ_q."""
    pts = mean + nodes @ psd_sqrt(cov).T
    return jnp.broadcast_to(eta_all, (nodes.shape[0],) + eta_all.shape).at[:, active].set(pts)


def _node_distribution(predictor, eta_q, aux):
    q = eta_q.shape[0]
    return predictor.distribution(eta_q, {k: jnp.broadcast_to(v, (q,) + v.shape) for k, v in aux.items()})


def _pmf_table(spec: PredictiveSpec, d, dtype):
    """Support values (size,) and their probabilities under each node (size, Q)."""
    lower, size = spec.support
    ks = lower + jnp.arange(size, dtype=dtype)
    inside = d.support(ks[:, None])
    return ks, jnp.where(inside, jnp.exp(d.log_prob(jnp.where(inside, ks[:, None], lower))), 0.0)


def _node_cdf(spec: PredictiveSpec, d, table, t):
    """F_q(t) at points ``t`` (T,): (T, Q)."""
    if spec.support:
        ks, pm = table
        return (t[:, None] >= ks[None, :]).astype(pm.dtype) @ pm
    lo, hi = spec.bounds
    tc = jnp.clip(jnp.floor(t) if spec.discrete else t, lo if math.isfinite(lo) else None,
                  hi if math.isfinite(hi) else None)
    f = d.cdf(tc[:, None])
    return jnp.where(t[:, None] < lo, 0.0, jnp.where(t[:, None] >= hi, 1.0, f))


def _node_moments(spec: PredictiveSpec, d, table, q: int, dtype):
    if spec.support:
        ks, pm = table
        m = ks @ pm
        return m, jnp.clip((ks * ks) @ pm - m * m, 0.0, None)
    return (jnp.broadcast_to(jnp.asarray(d.mean, dtype), (q,)),
            jnp.broadcast_to(jnp.asarray(d.variance, dtype), (q,)))


def _expected_abs_normal(mu, s):
    """E|X| for X ~ N(mu, s²)."""
    z = mu / s
    return mu * (2.0 * norm.cdf(z) - 1.0) + 2.0 * s * norm.pdf(z)


@functools.lru_cache(maxsize=8)
def _legendre(n: int):
    x, w = np.polynomial.legendre.leggauss(n)
    return x, w


def _crps_normal(d, w, y):
    loc, scale = jnp.broadcast_arrays(d.loc, d.scale)
    abs_error = w @ _expected_abs_normal(loc - y, scale)
    pair = _expected_abs_normal(loc[:, None] - loc[None, :], jnp.hypot(scale[:, None], scale[None, :]))
    return abs_error, w @ pair @ w


def _crps_grid(spec: PredictiveSpec, cdf, y, lo, hi):
    """∫ (F − 1{t ≥ y})² and 2∫ F(1 − F) over [lo, hi] ∪ {y}, split at y."""
    half = spec.grid // 2
    a, b = jnp.minimum(lo, y), jnp.maximum(hi, y)
    if spec.discrete:  # sums over the integers t ≤ y − 1 and t ≥ y, with a step h where they are long
        h = jnp.maximum(1.0, jnp.ceil(jnp.maximum(y - 1.0 - a, b - y) / (half - 1)))
        j = jnp.arange(half, dtype=y.dtype)
        left, right = y - 1.0 - h * j, y + h * j
        fl, fr = cdf(left), cdf(right)
        corr = (h - 1.0) / 2.0  # Euler–Maclaurin: h Σ_j g(t₀ + jh) − Σ_{t ≥ t₀} g(t) ≈ (h − 1) g(t₀) / 2

        def total(gl, gr):
            return h * (jnp.sum(gl) + jnp.sum(gr)) - corr * (gl[0] + gr[0])

        return total(fl * fl, (1.0 - fr) ** 2), 2.0 * total(fl * (1.0 - fl), fr * (1.0 - fr))
    x, wx = (jnp.asarray(v, y.dtype) for v in _legendre(half))
    left = 0.5 * (y - a) * x + 0.5 * (y + a)
    right = 0.5 * (b - y) * x + 0.5 * (b + y)
    fl, fr = cdf(left), cdf(right)
    wl, wr = 0.5 * (y - a) * wx, 0.5 * (b - y) * wx
    return wl @ (fl * fl) + wr @ (1.0 - fr) ** 2, 2.0 * (wl @ (fl * (1.0 - fl)) + wr @ (fr * (1.0 - fr)))


def _bracket(spec: PredictiveSpec, mean, sd):
    """mean ± :data:`BRACKET_SDS` sd inside the support (discrete: integers, the lower end where F = 0)."""
    lo, hi = mean - BRACKET_SDS * sd, mean + BRACKET_SDS * sd
    if spec.discrete:
        return jnp.maximum(jnp.floor(lo), spec.bounds[0]) - 1.0, jnp.minimum(jnp.ceil(hi), spec.bounds[1])
    return jnp.maximum(lo, spec.bounds[0]), jnp.minimum(hi, spec.bounds[1])


def _quantiles(spec: PredictiveSpec, cdf, probs, lo, hi):
    """The mixture's quantiles at ``probs`` (P,) from the bracket [lo, hi]."""
    lo_b, hi_b = spec.bounds
    floor = lo_b - 1.0 if spec.discrete else lo_b  # F = 0 there
    lo = jnp.full_like(probs, lo)
    hi = jnp.full_like(probs, hi)

    def widen(_, b):
        lo, hi = b
        width = hi - lo
        lo = jnp.where(cdf(lo) >= probs if spec.discrete else cdf(lo) > probs, lo - width, lo)
        hi = jnp.where(cdf(hi) < probs, hi + width, hi)
        return jnp.maximum(lo, floor), jnp.minimum(hi, hi_b)

    lo, hi = jax.lax.fori_loop(0, WIDENINGS, widen, (lo, hi))

    def halve(_, b):
        lo, hi = b
        mid = jnp.floor(0.5 * (lo + hi)) if spec.discrete else 0.5 * (lo + hi)
        below = cdf(mid) < probs
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, BISECTION_STEPS, halve, (lo, hi))
    return hi if spec.discrete else 0.5 * (lo + hi)


def observation_functionals(predictor, spec: PredictiveSpec, eta_q, log_w, y, aux) -> dict:
    """The functionals of ``spec`` for one observation whose predictive is Σ_q w_q p(ỹ | η_q).

    Parameters
    ----------
    predictor : Predictor
        The site's predictor (:meth:`~numpyro_mpe.model.predictor.Predictor.distribution` at η_q).
    spec : PredictiveSpec
        What to compute (:func:`predictive_spec`).
    eta_q : (Q, K_all)
        Predictor values: quadrature points (:func:`quadrature_points`) or samples.
    log_w : (Q,)
        Their log-weights (normalized here).
    y : scalar
        The observation.
    aux : dict
        Its fixed parameters (one observation's).

    Returns
    -------
    dict
        ``{output: value}`` for :attr:`PredictiveSpec.outputs` (``quantiles``: (P,)).
    """
    dtype = eta_q.dtype
    y = jnp.asarray(y, dtype)
    w = jnp.exp(log_w - logsumexp(log_w))
    d = _node_distribution(predictor, eta_q, aux)
    table = _pmf_table(spec, d, dtype) if spec.support else None

    def cdf(t):  # the mixture CDF at points t (any shape)
        return jnp.reshape(_node_cdf(spec, d, table, jnp.ravel(t)) @ w, jnp.shape(t))

    out = {}
    if set(spec.functionals) & {"moments", "quantiles", "crps"}:
        m_q, v_q = _node_moments(spec, d, table, eta_q.shape[0], dtype)
        mean = w @ m_q
        var = w @ v_q + w @ (m_q - mean) ** 2
        lo, hi = _bracket(spec, mean, jnp.sqrt(var))
    if "pit" in spec.functionals:
        if spec.discrete:
            out["pit_lower"] = cdf(y - 1.0)
            out["pit_mass"] = w @ jnp.exp(d.log_prob(y))
        else:
            out["pit_lower"], out["pit_mass"] = cdf(y), jnp.zeros((), dtype)
    if "moments" in spec.functionals:
        out["mean"], out["var"] = mean, var
    if "quantiles" in spec.functionals:
        out["quantiles"] = _quantiles(spec, cdf, jnp.asarray(spec.probs, dtype), lo, hi)
    if "crps" in spec.functionals:
        if spec.normal:
            abs_error, mad = _crps_normal(d, w, y)
            out["crps"] = abs_error - 0.5 * mad
        else:
            out["crps"], mad = _crps_grid(spec, cdf, y, lo, hi)
            abs_error = out["crps"] + 0.5 * mad
        out["abs_error"], out["mean_abs_diff"] = abs_error, mad
    return {k: out[k] for k in spec.outputs}


def quadrature_functionals(predictor, spec: PredictiveSpec, rule, mean, cov, eta_all, active, y, aux) -> dict:
    """:func:`observation_functionals` of one observation whose predictor's ``active`` components are
    N(mean, cov), by the quadrature ``rule``."""
    eta_q = quadrature_points(rule.nodes, mean, cov, eta_all, active)
    return observation_functionals(predictor, spec, eta_q, rule.log_weights, y, aux)


def weighted_functionals(predictor, spec: PredictiveSpec, eta_samples, log_weights, y, aux) -> dict:
    """:func:`observation_functionals` of one observation from weighted samples of its whole predictor
    (``eta_samples`` (S, K_all), ``log_weights`` (S,), normalized or not): the observations repaired by
    importance sampling."""
    return observation_functionals(predictor, spec, jnp.asarray(eta_samples), jnp.asarray(log_weights), y,
                                   aux)


def rows_functionals(predictor, spec: PredictiveSpec, rule, means, covs, eta_all, active, y, aux) -> dict:
    """:func:`quadrature_functionals` over rows (c, ...), in batches that bound rows × nodes × points."""
    n = means.shape[0]
    per_row = rule.nodes.shape[0] * max(spec.grid if "crps" in spec.functionals else 1,
                                        rule.nodes.shape[0] if spec.normal else 1,
                                        spec.support[1] if spec.support else 1, len(spec.probs) or 1)
    batch = int(max(1, min(n, WORK_BATCH // per_row)))
    act = np.asarray(active)

    def one(args):
        return quadrature_functionals(predictor, spec, rule, args[0], args[1], args[2], act, *args[3:])

    return jax.lax.map(one, (means, covs, eta_all, y, aux), batch_size=batch)


__all__ = ["FUNCTIONALS", "PredictiveSpec", "check_probs", "observation_functionals", "predictive_spec",
           "quadrature_functionals", "quadrature_points", "rows_functionals", "weighted_functionals"]
