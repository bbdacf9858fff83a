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
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

#: Gauss–Hermite points per dimension for K = 1, 2, 3; larger K uses Monte Carlo.
GAUSS_HERMITE_POINTS = {1: 48, 2: 20, 3: 10}
#: Points per dimension tried, fewest first, by :func:`expected_log_lik_block` (the last is the full rule).
GAUSS_HERMITE_TIERS = {1: (2, 3, 5, 12, 48), 2: (2, 3, 6, 20), 3: (2, 3, 10)}
#: Rows per block whose integrals decide the rule (half by V, half by the change of log p over ±√V).
PROBE_ROWS = 32


class Rule(NamedTuple):
    """Nodes ``(Q, K)`` of N(0, I) and their log-weights ``(Q,)`` (summing to one)."""

    nodes: jax.Array
    log_weights: jax.Array
    kind: str


def gauss_hermite(dim: int, points: int, dtype=jnp.float64) -> Rule:
    """Tensor-product Gauss–Hermite rule for N(0, I_dim) with ``points`` nodes per dimension."""
    x, w = np.polynomial.hermite_e.hermegauss(points)  # weight exp(-x^2/2)
    w = w / w.sum()
    nodes = np.array(list(itertools.product(x, repeat=dim)))
    weights = np.prod(np.array(list(itertools.product(w, repeat=dim))), axis=1)
    return Rule(jnp.asarray(nodes, dtype), jnp.asarray(np.log(weights), dtype), "gauss-hermite")


def monte_carlo(dim: int, num_samples: int, rng_key, dtype=jnp.float64) -> Rule:
    """``num_samples`` standard-normal draws (antithetic pairs), equal weights."""
    half = (num_samples + 1) // 2
    z = jax.random.normal(rng_key, (half, dim), dtype)
    nodes = jnp.concatenate([z, -z])[:num_samples]
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
                           tol: float, rules: tuple[Rule, ...] | None = None):
    """log E_{η_i ~ N(mean_i, cov_i)} p(y_i | η_i) for a block of rows, with the fewest Gauss–Hermite
    points that reproduce the full rule to ``tol`` on the block's hardest rows.

    Parameters
    ----------
    log_lik_fn : callable
        ``(eta (Q, K_all), y (Q, ...), aux) -> (Q,)`` log-likelihoods.
    mean, cov : (c, K), (c, K, K)
        The Gaussian over each row's active predictor components (NaN rows give NaN).
    eta_all, y, aux, weight : per-row predictor (all components), data, fixed parameters, weights.
    e, lam : (c, K), (c, K, K)
        Gradient and Hessian of −log p at the predictor, used to rank the rows: the change of log p over
        ±√V is about ‖e‖√tr V + ‖Λ‖ tr V.
    tol : float
        Accepted difference, in log E p, from the full rule on the probed rows (0: always the full rule).
    rules : tuple of Rule, optional
        Rules from fewest to most points (default: Gauss–Hermite with :data:`GAUSS_HERMITE_TIERS`).

    Returns
    -------
    values : (c,)
    points : int array
        Points per dimension of the rule used.

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
    k = mean.shape[-1]
    if rules is None:
        rules = tuple(gauss_hermite(k, n, mean.dtype) for n in GAUSS_HERMITE_TIERS[k])
    points = jnp.asarray([round(r.nodes.shape[0] ** (1.0 / k)) for r in rules])

    def rows(rule):
        def one(m, c, ea, yy, ax, w):
            return expected_log_lik_one(log_lik_fn, rule, m, c, ea, active, yy, ax, w)

        return jax.vmap(one)(mean, cov, eta_all, y, aux, weight)

    n = mean.shape[0]
    if len(rules) == 1 or tol <= 0:
        return rows(rules[-1]), points[-1]
    tr = jnp.trace(cov, axis1=-2, axis2=-1)
    spread = (jnp.linalg.norm(e, axis=-1) * jnp.sqrt(jnp.clip(tr, 0.0, None))
              + jnp.linalg.norm(lam, axis=(-2, -1)) * tr)

    def hardest(score):  # the largest of each of PROBE_ROWS/2 segments (so the overall largest too): O(n)
        seg = min(PROBE_ROWS // 2, n)
        score = jnp.where(jnp.isfinite(score), score, -jnp.inf)
        score = jnp.reshape(jnp.concatenate([score, jnp.full((-n) % seg, -jnp.inf, score.dtype)]), (seg, -1))
        pos = jnp.arange(score.size).reshape(score.shape)
        # the first position of each segment's maximum, by two plain reductions (argmax is slower on CPU)
        top = jnp.min(jnp.where(score == jnp.max(score, axis=1, keepdims=True), pos, score.size), axis=1)
        return jnp.minimum(top, n - 1)

    idx = jnp.concatenate([hardest(tr), hardest(spread)])
    # every rule on the probed rows from one evaluation at all their nodes (one compiled likelihood)
    nodes = jnp.concatenate([r.nodes for r in rules])
    sub = jax.tree_util.tree_map(lambda a: a[idx], (mean, cov, eta_all, y, aux, weight))

    def at_nodes(m, c, ea, yy, ax, w):
        return log_lik_at_nodes(log_lik_fn, nodes, m, c, ea, active, yy, ax, w)

    ll = jax.vmap(at_nodes)(*sub)
    ends = np.cumsum([r.nodes.shape[0] for r in rules])
    probes = [logsumexp(r.log_weights + ll[:, e - r.nodes.shape[0]:e], axis=1) for r, e in zip(rules, ends)]

    def error(p, ref):  # equal values (both −inf, or both NaN: invalid rows) agree; one non-finite does not
        same = (p == ref) | (jnp.isnan(p) & jnp.isnan(ref))
        d = jnp.where(same, 0.0, jnp.abs(p - ref))
        return jnp.max(jnp.where(jnp.isnan(d), jnp.inf, d))

    errs = jnp.stack([error(p, probes[-1]) for p in probes])
    tier = jnp.argmax(errs <= tol)  # the full rule's own error is 0
    branches = [lambda rule=r: rows(rule) for r in rules]
    return jax.lax.switch(tier, branches), points[tier]


def psd_sqrt(cov):
    """A square root C with C Cᵀ = cov for a symmetric PSD ``cov`` (singular allowed).

    Closed form for 1×1; otherwise a Cholesky factor with a jitter of 1e-13·trace (far below the
    quadrature's error), falling back to the eigendecomposition where the factorization fails.
    """
    k = cov.shape[-1]
    if k == 1:
        return jnp.sqrt(jnp.clip(cov, 0.0, None))
    sym = 0.5 * (cov + cov.T)
    jitter = 1e-13 * jnp.trace(sym) / k + jnp.finfo(cov.dtype).tiny
    chol = jnp.linalg.cholesky(sym + jitter * jnp.eye(k, dtype=cov.dtype))

    def by_eigh(_):
        vals, vecs = jnp.linalg.eigh(sym)
        return vecs * jnp.sqrt(jnp.clip(vals, 0.0, None))

    return jax.lax.cond(jnp.all(jnp.isfinite(chol)), lambda _: chol, by_eigh, None)
