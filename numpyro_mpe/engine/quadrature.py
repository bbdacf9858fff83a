"""Rules for E_{η ~ N(μ, V)}[p(y | η)] in the K-dimensional predictor space.

A rule is a set of standard-normal nodes ξ_q ∈ R^K with log-weights; the expectation is
log Σ_q w_q p(y | μ + V^{1/2} ξ_q).  Gauss–Hermite tensor rules for small K (exact for polynomials of
high degree, and to round-off for the Gaussian likelihoods of linear models), Monte Carlo with common
random numbers for larger K.

Over a block of observations, :func:`expected_log_lik_block` picks the number of Gauss–Hermite points per
block: an n-point rule integrates polynomials of degree 2n − 1 exactly, so its error on
E p(y | μ + V^{1/2}ξ) falls like Vⁿ where the likelihood varies little over ±√V (large N).  The block's
hardest rows (largest V, largest change of log p over ±√V) are integrated with every rule in
:data:`GAUSS_HERMITE_TIERS`, and the block uses the fewest points whose result there is within ``tol`` of
the full rule's (:data:`GAUSS_HERMITE_POINTS`).

For one active predictor component (K = 1) a cheaper tier comes first: the expansion of
log E p(y | η̂ + δ), δ ~ N(Δ, s), in the Taylor coefficients of log p at η̂
(:func:`expected_log_lik_taylor`, error O(s³ + Δ³)), which needs no likelihood evaluation beyond the
coefficients and serves both the posterior (Δ = 0) and the leave-one-out (Δ = Δη_i) integrals.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from numpyro_mpe.engine import rowlinalg
from numpyro_mpe.gaussian import antithetic_normal

try:  # experimental: where it is gone, log_lik_series uses nested forward mode
    from jax.experimental.jet import jet
except ImportError:  # pragma: no cover
    jet = None

#: Gauss–Hermite points per dimension for K = 1, 2, 3; larger K uses Monte Carlo.
GAUSS_HERMITE_POINTS = {1: 48, 2: 20, 3: 10}
#: Points per dimension tried, fewest first, by :func:`expected_log_lik_block` (the last is the full rule).
GAUSS_HERMITE_TIERS = {1: (2, 3, 5, 12, 48), 2: (2, 3, 6, 20), 3: (2, 3, 10)}
#: Rows per block whose integrals decide the rule: the largest tr V + (change of log p over ±√V) of
#: each of PROBE_ROWS segments.
PROBE_ROWS = 32
#: Rows × nodes per batch of a Gauss–Hermite branch (XLA sizes the temporaries of every branch of the
#: tier switch at each call, taken or not: 48 nodes over 65536 rows unbatched cost ~0.6 ms per chunk).
NODE_BATCH = 1 << 16
#: Order of the Taylor coefficients of log p used by :func:`expected_log_lik_taylor`.
TAYLOR_ORDER = 4


class Rule(NamedTuple):
    """Nodes ``(Q, K)`` of N(0, I) and their log-weights ``(Q,)`` (summing to one)."""

    nodes: jax.Array
    log_weights: jax.Array
    kind: str


@functools.lru_cache(maxsize=64)
def _gauss_hermite_np(dim: int, points: int, dtype: np.dtype) -> Rule:
    x, w = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-x^2/2)
    w = w / w.sum()
    nodes = np.array(list(itertools.product(x, repeat=dim)), dtype=dtype)
    weights = np.prod(np.array(list(itertools.product(w, repeat=dim))), axis=1)
    nodes.flags.writeable = False
    log_weights = np.log(weights).astype(dtype)
    log_weights.flags.writeable = False
    return Rule(nodes, log_weights, "gauss-hermite")


def gauss_hermite(dim: int, points: int, dtype=jnp.float64) -> Rule:
    """Tensor-product Gauss–Hermite rule for N(0, I_dim) with ``points`` nodes per dimension (read-only
    NumPy constants, memoized: building them costs more than a small pass)."""
    return _gauss_hermite_np(dim, points, np.dtype(jax.dtypes.canonicalize_dtype(dtype)))


def monte_carlo(dim: int, num_samples: int, rng_key, dtype=jnp.float64) -> Rule:
    """``num_samples`` standard-normal draws (antithetic pairs), equal weights."""
    nodes = antithetic_normal(rng_key, num_samples, dim, dtype)
    return Rule(nodes, jnp.full((num_samples,), -np.log(num_samples), dtype), "monte-carlo")


def default_rule(dim: int, rng_key, dtype=jnp.float64, num_samples: int = 2000) -> Rule:
    """Gauss–Hermite for ``dim`` ≤ 3, Monte Carlo with ``num_samples`` common draws above."""
    if dim in GAUSS_HERMITE_POINTS:
        return gauss_hermite(dim, GAUSS_HERMITE_POINTS[dim], dtype)
    return monte_carlo(dim, num_samples, rng_key, dtype)


def default_tol(dtype) -> float:
    """Largest accepted difference in log E p between a cheaper rule and the full one: 1e-11 in float64
    (so sums over 10⁷ observations move by at most 1e-4, and outputs agree to 1e-10 whichever blocks the rows
    fall in), 1e-5 in float32 (about 100 ulps of a log-density of order 1)."""
    return 1e-11 if jnp.dtype(dtype) == jnp.float64 else 1e-5


def log_lik_at_nodes(log_lik_fn, nodes, mean, cov, eta_all, active, y, aux, weight):
    """weight · log p(y | η_q) at η_q = mean + cov^{1/2} ξ_q for standard-normal ``nodes`` ξ (Q, K), in
    the ``active`` components of one observation's predictor (the others fixed at ``eta_all``)."""
    pts = mean + nodes @ psd_sqrt(cov).T  # (Q, K)
    q = pts.shape[0]
    eta_q = jnp.broadcast_to(eta_all, (q,) + eta_all.shape).at[:, active].set(pts)
    y_q = jnp.broadcast_to(y, (q,) + y.shape)
    aux_q = {k: jnp.broadcast_to(v, (q,) + v.shape) for k, v in aux.items()}
    return log_lik_fn(eta_q, y_q, aux_q) * weight


def expected_log_lik_one(log_lik_fn, rule: Rule, mean, cov, eta_all, active, y, aux, weight):
    """log E_{η ~ N(mean, cov)} p(y | η)^weight for one observation, by ``rule`` in the ``active``
    components of its predictor (the others fixed at ``eta_all``)."""
    ll = log_lik_at_nodes(log_lik_fn, rule.nodes, mean, cov, eta_all, active, y, aux, weight)
    return logsumexp(rule.log_weights + ll)


def expected_log_lik_block(log_lik_fn, mean, cov, eta_all, active, y, aux, weight, e, lam, *,
                           tol: float, rules: tuple[Rule, ...] | None = None, series=None):
    """log E_{η_i ~ N(mean_i, cov_i)} p(y_i | η_i) for a block of rows, by the cheapest tier (the Taylor
    expansion when ``series`` is given, then Gauss–Hermite with ever more points) that reproduces the full
    rule to ``tol`` on the block's hardest rows.

    Parameters
    ----------
    log_lik_fn : callable
        ``(eta (Q, K_all), y (Q, ...), aux) -> (Q,)`` log-likelihoods.
    mean, cov : (c, K), (c, K, K), or tuples of them
        The Gaussian over each row's active predictor components (NaN rows give NaN).  Tuples: several
        integrals over the same rows (the posterior and the leave-one-out one), which share the probed rows
        and one tier, the cheapest within ``tol`` for all of them.
    eta_all, y, aux, weight : per-row predictor (all components), data, fixed parameters, weights.
    e, lam : (c, K), (c, K, K)
        Gradient and Hessian of −log p at the predictor, used to rank the rows: the change of log p over
        ±√V is about ‖e‖√tr V + ‖Λ‖ tr V.
    tol : float
        Accepted difference, in log E p, from the full rule on the probed rows (0: always the full rule).
    rules : tuple of Rule, optional
        Rules from fewest to most points (default: Gauss–Hermite with :data:`GAUSS_HERMITE_TIERS`).
    series : tuple of TAYLOR_ORDER + 1 arrays (c,), optional
        K = 1 only: Taylor coefficients of w·log p at ``eta_all`` (:func:`log_lik_series`).  The expansion
        :func:`expected_log_lik_taylor` is then tried first; it is taken only if, besides agreeing on the
        probed rows, it is finite on every row where the Gaussian is (or the weight is 0).

    Returns
    -------
    values : (c,), or a tuple of them
    points : int array
        Points per dimension of the rule used (0 for the Taylor expansion).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from jax.scipy.stats import norm
    >>> f = lambda eta, y, aux: norm.logpdf(y, eta[:, 0], 1.0)
    >>> m, v = jnp.zeros((3, 1)), jnp.full((3, 1, 1), 1e-4)
    >>> vals, pts = expected_log_lik_block(f, m, v, m, jnp.array([0]), jnp.zeros(3), {}, jnp.ones(3),
    ...                                    jnp.zeros((3, 1)), jnp.ones((3, 1, 1)), tol=1e-6)
    >>> int(pts), bool(jnp.allclose(vals, norm.logpdf(0.0, 0.0, jnp.sqrt(1 + 1e-4))))
    (2, True)
    """
    several = isinstance(mean, (tuple, list))
    means, covs = (tuple(mean), tuple(cov)) if several else ((mean,), (cov,))
    k = means[0].shape[-1]
    if rules is None:
        rules = tuple(gauss_hermite(k, n, means[0].dtype) for n in GAUSS_HERMITE_TIERS[k])
    points = jnp.asarray([round(r.nodes.shape[0] ** (1.0 / k)) for r in rules])

    def rows(rule):  # in batches of ≤ NODE_BATCH row-nodes: the temporaries of an unused branch still cost
        def one(args):  # every integral of one row: one loop, one compiled body
            m, c, rest = args[0], args[1], args[2:]
            return jax.vmap(lambda mj, cj: expected_log_lik_one(log_lik_fn, rule, mj, cj, rest[0], active,
                                                                *rest[1:]))(m, c)

        batch = _batch_size(means[0].shape[0], NODE_BATCH // (rule.nodes.shape[0] * len(means)))
        vals = jax.lax.map(one, (jnp.stack(means, 1), jnp.stack(covs, 1), eta_all, y, aux, weight),
                           batch_size=batch)
        return tuple(vals[:, j] for j in range(len(means)))

    def result(vals, pts):
        return (vals if several else vals[0]), pts

    n = means[0].shape[0]
    if series is not None and k != 1:
        raise ValueError(f"the Taylor tier needs one active predictor component, got K = {k}")
    if (len(rules) == 1 and series is None) or tol <= 0:
        return result(rows(rules[-1]), points[-1])
    tr = functools.reduce(jnp.maximum, [jnp.trace(c, axis1=-2, axis2=-1) for c in covs])
    spread = (jnp.linalg.norm(e, axis=-1) * jnp.sqrt(jnp.clip(tr, 0.0, None))
              + jnp.linalg.norm(lam, axis=(-2, -1)) * tr)

    def hardest(score):  # the largest of each of PROBE_ROWS segments (so the overall largest too): O(n)
        seg = min(PROBE_ROWS, n)
        score = jnp.where(jnp.isfinite(score), score, -jnp.inf)
        if n % seg:
            score = jnp.concatenate([score, jnp.full((-n) % seg, -jnp.inf, score.dtype)])
        score = jnp.reshape(score, (seg, -1))
        # the first position of each segment's maximum: one variadic reduction (0.16 ms for 62500 rows,
        # against 0.27 ms for a max, a compare and a min, with jax 0.10)
        top = jnp.argmax(score, axis=1) + jnp.arange(seg) * score.shape[1]
        return jnp.minimum(top, n - 1)

    idx = hardest(tr + spread)  # one score: each selection is two passes over the block
    # every rule on the probed rows from one evaluation at all their nodes (one compiled likelihood)
    nodes = jnp.concatenate([r.nodes for r in rules])
    ends = np.cumsum([r.nodes.shape[0] for r in rules])

    def at_nodes(m, c, ea, yy, ax, w):
        return log_lik_at_nodes(log_lik_fn, nodes, m, c, ea, active, yy, ax, w)

    probes = []  # per integral, per rule: values on the probed rows
    for m, c in zip(means, covs):
        ll = jax.vmap(at_nodes)(*jax.tree_util.tree_map(lambda a: a[idx], (m, c, eta_all, y, aux, weight)))
        probes.append([logsumexp(r.log_weights + ll[:, e - r.nodes.shape[0]:e], axis=1)
                       for r, e in zip(rules, ends)])

    def error(p, ref):  # equal values (both −inf, or both NaN: invalid rows) agree; one non-finite does not
        same = (p == ref) | (jnp.isnan(p) & jnp.isnan(ref))
        d = jnp.where(same, 0.0, jnp.abs(p - ref))
        return jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d))

    def worst(per_integral):  # the largest error over the integrals
        return functools.reduce(jnp.maximum, [error(p, pr[-1]) for p, pr in zip(per_integral, probes)])

    errs = [worst([pr[j] for pr in probes]) for j in range(len(rules))]
    branches = [lambda rule=r: rows(rule) for r in rules]
    if series is not None:
        taylor = tuple(expected_log_lik_taylor(series, m[:, 0] - eta_all[:, active[0]], c[:, 0, 0])
                       for m, c in zip(means, covs))
        fine = jnp.all(functools.reduce(jnp.logical_and, [  # one reduction over the rows
            jnp.isfinite(t) | ~jnp.isfinite(m[:, 0] + c[:, 0, 0]) | (weight == 0)
            for t, m, c in zip(taylor, means, covs)]))
        errs = [jnp.where(fine, worst([t[idx] for t in taylor]), jnp.inf)] + errs
        branches = [lambda: taylor] + branches
        points = jnp.concatenate([jnp.zeros(1, points.dtype), points])
    tier = jnp.argmax(jnp.stack(errs) <= tol)  # the full rule's own error is 0
    return result(jax.lax.switch(tier, branches), points[tier])


def _batch_size(n: int, target: int) -> int:
    """Rows per batch, at most ``target``: the largest divisor of ``n`` if it is at least half of
    ``target`` (no remainder batch: one compiled body, not two), else ``target``."""
    target = max(1, min(n, target))
    for d in range(target, (target + 1) // 2 - 1, -1):
        if n % d == 0:
            return d
    return target


def _jet_derivatives(g, x, order):
    if jet is None:
        raise NotImplementedError("jax.experimental.jet is not available")
    series = (jnp.ones_like(x),) + (jnp.zeros_like(x),) * (order - 1)
    primal, terms = jet(g, (x,), (series,))
    return [primal] + list(terms)


def _nested_derivatives(g, x, order):
    fns = [g]
    for _ in range(order):
        fns.append(lambda z, h=fns[-1]: jax.jvp(h, (z,), (jnp.ones_like(z),))[1])
    return [f(x) for f in fns]


def log_lik_series(log_lik_fn, active: int, eta_all, y, aux, weight, order: int = TAYLOR_ORDER):
    """Taylor coefficients a_k = w ℓ⁽ᵏ⁾(η̂)/k!, k = 0 … ``order``, of ℓ = log p(y_i | η) in the one
    ``active`` predictor component at each row's η̂ (the others fixed): a tuple of ``order + 1`` arrays
    ``(c,)`` (stacked, XLA would recompute the shared transcendentals for each coefficient).

    Taylor mode (``jax.experimental.jet``: the transcendental functions evaluated once per row) where it
    can trace the likelihood; otherwise nested forward mode (every primitive has a rule there, but the
    work grows as 2^order).  Traceable.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from jax.scipy.stats import norm
    >>> f = lambda eta, y, aux: norm.logpdf(y, eta[:, 0], 1.0)
    >>> a = log_lik_series(f, 0, jnp.zeros((1, 1)), jnp.ones(1), {}, jnp.ones(1))
    >>> bool(jnp.allclose(jnp.stack(a)[:, 0], jnp.array([norm.logpdf(1.0), 1.0, -0.5, 0.0, 0.0])))
    True
    """
    inv_fact = [1.0 / math.factorial(k) for k in range(order + 1)]

    def coefficients(derivatives):
        def one(ea, yy, ax, w):
            mask = jnp.arange(ea.shape[0]) == active  # select, not scatter: jet has no scatter rule

            def g(x):
                eta = jnp.where(mask, x, ea)
                tree = jax.tree_util.tree_map(lambda a: a[None], (eta, yy, ax))
                return log_lik_fn(*tree)[0] * w

            return tuple(d * f for d, f in zip(derivatives(g, ea[active], order), inv_fact))

        return jax.vmap(one)(eta_all, y, aux, weight)

    try:
        return coefficients(_jet_derivatives)
    except Exception:  # a primitive without a jet rule (or a custom_jvp jet cannot trace)
        return coefficients(_nested_derivatives)


def expected_log_lik_taylor(series, delta, var):
    """log E p(y | η̂ + δ), δ ~ N(Δ, s), from the Taylor coefficients a_k of log p at η̂ (rows).

    With z = 2a₂s, up to terms of third order in (s, Δ):
    a₀ + (a₁²s/2 + a₁Δ)(1 + z) + a₂Δ² + z/2 + z²/4 + 3a₃s(a₁s + Δ) + 3a₄s² — the Gaussian part
    E exp(a₁δ + a₂δ²) in closed form, expanded, plus a₃ E′δ³ + a₄ E′δ⁴ under the tilted Gaussian.  The
    error is O((s + |Δ|)³), about 1e-14 at s = 1e-4 for a logistic likelihood; no transcendental function
    is evaluated.

    Parameters
    ----------
    series : tuple of five (c,) arrays
        a₀ … a₄ (:func:`log_lik_series`).
    delta, var : (c,)
        Mean offset Δ from η̂ and variance s.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> r, s = 0.5, 0.01  # log p = −(y − η)²/2 (+ const) at y − η̂ = r: a = (−r²/2, r, −1/2, 0, 0)
    >>> a = tuple(jnp.array([x]) for x in (-r * r / 2, r, -0.5, 0.0, 0.0))
    >>> exact = -r * r / (2 * (1 + s)) - 0.5 * jnp.log1p(s)  # log N(y; η̂, 1 + s) (+ the same const)
    >>> float(jnp.abs(expected_log_lik_taylor(a, jnp.zeros(1), jnp.full(1, s))[0] - exact)) < 1e-6
    True
    """
    a0, a1, a2, a3, a4 = series
    z = 2.0 * a2 * var
    return (a0 + (0.5 * a1 * a1 * var + a1 * delta) * (1.0 + z) + a2 * delta * delta + 0.5 * z
            + 0.25 * z * z + 3.0 * a3 * var * (a1 * var + delta) + 3.0 * a4 * var * var)


def psd_sqrt(cov):
    """A square root C with C Cᵀ = cov for a symmetric PSD ``cov`` (singular allowed).

    Closed form for 1×1; otherwise a Cholesky factor with a jitter of 1e-13·trace (far below the
    quadrature's error), falling back to the eigendecomposition where the factorization fails; both from
    :mod:`numpyro_mpe.engine.rowlinalg`, so that mapped over rows they form no batched LAPACK call.
    """
    k = cov.shape[-1]
    if k == 1:
        return jnp.sqrt(jnp.clip(cov, 0.0, None))
    sym = 0.5 * (cov + cov.T)
    jitter = 1e-13 * jnp.trace(sym) / k + jnp.finfo(cov.dtype).tiny
    chol = rowlinalg.cholesky(sym + jitter * jnp.eye(k, dtype=cov.dtype))

    return jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda _: chol, lambda _: rowlinalg.psd_root(sym), None)
