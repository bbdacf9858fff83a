"""THE per-observation pass: every MPE output of every observation of one site, chunk by chunk.

For each chunk of rows the terms come from one of two sources and go through the same kernel:

* **predictor** (:class:`~numpyro_mpe.engine.terms.SiteData`): η_i, B_i = J_i L⁻ᵀ, V_i = B_iB_iᵀ, e_i, Λ_i at
  the mean, computed in the chunk's program (streamed rows, the whole model, or held η and J); the cavity in
  K dimensions (:func:`~numpyro_mpe.engine.cavity.cavity_k`).  ``expect_q`` replaces e_i, Λ_i by their
  expectations over q's predictive N(η_i, V_i) (the variational memories of a linearized predictor);
* **memories** (:class:`~numpyro_mpe.engine.memories.Memories` held per row): factored (e_i, Λ_i, J_i: the
  cavity in K dimensions) or dense (ĝ_i, Ĥ_i: the cavity in P dimensions,
  :func:`~numpyro_mpe.engine.cavity.cavity_one`).

``lpd`` = log E_{N(η_i, V_i)} p(y_i | η) and ``elpd_loo`` = log E_{N(η_i + Δη_i, V₋i)} p(y_i | η) are
integrated
in predictor space (:mod:`numpyro_mpe.engine.quadrature`: the Taylor expansion, Gauss–Hermite with the fewest
points within ``tol`` of the full rule, or Monte Carlo for K > 3), or — for a site without a predictor — by
Monte Carlo in θ-space (:func:`theta_space_elpd`).  How is recorded in an :class:`Integration`.

Each chunk's program is a module-level function of (adapter, chunk data, posterior) with the site's static
description and :class:`PassOptions` as static arguments: it is compiled once per model structure, shapes and
options, and reused by every fit, refit and training checkpoint.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from jax.sharding import PartitionSpec as PS

try:
    from jax import shard_map
except ImportError:  # jax < 0.7
    from jax.experimental.shard_map import shard_map

from numpyro_mpe.derivatives import value_grad_hessian
from numpyro_mpe.engine.cavity import cavity_k, cavity_one, cavity_support, row_support
from numpyro_mpe.engine.layout import Layout, run_chunks
from numpyro_mpe.engine.predictive import FUNCTIONALS, PredictiveSpec, rows_functionals
from numpyro_mpe.engine.quadrature import (
    GAUSS_HERMITE_TIERS,
    TAYLOR_ORDER,
    default_tol,
    expected_log_lik_block,
    gauss_hermite,
    log_lik_at_nodes,
    monte_carlo,
)
from numpyro_mpe.engine.terms import SiteData, SiteRows, active_index, chunk_terms, predictor_nll
from numpyro_mpe.gaussian import standard_normal
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit, small_work

#: Outputs of the LOO predictive functionals (in ``SiteMPE.extra``).
FUNCTIONAL_OUTPUTS = tuple(o for outs in FUNCTIONALS.values() for o in outs)
#: The pass keeps the N×P shifts by default up to this N·P (80 MB in float64).
KEEP_SHIFT_LIMIT = 10_000_000
#: Up to this many row × node evaluations (N times the full rule's nodes: 48 for K = 1, 20² for K = 2, 10³
#: for K = 3) every row takes the full rule: one branch, compiled in a third of the time of the tier switch
#: (1.0 s against 3.7 s for the first pass of a logistic regression at N = 10⁵, whose full rule runs in
#: 0.12 s); above, each block of rows takes the cheapest tier within ``tol`` of the full rule.
FULL_RULE_NODES = 1 << 23


class Integration(NamedTuple):
    """How ``lpd`` and ``elpd_loo`` were integrated.

    ``space``: ``"predictor"`` or ``"theta"``; ``kind``: ``"gauss-hermite"``, ``"taylor"`` (the
    expansion in the
    Taylor coefficients of log p), ``"taylor+gauss-hermite"`` (blocks took either) or ``"monte-carlo"``;
    ``dims``: K (predictor components) or P; ``points``: (fewest, most) Gauss–Hermite points per
    dimension used
    (0 for the Taylor tier); ``num_samples``: Monte Carlo draws (0 for quadrature); ``tol``: accepted
    difference from the full rule.
    """

    space: str
    kind: str
    dims: int
    points: tuple = ()
    num_samples: int = 0
    tol: float = 0.0

    def __str__(self) -> str:
        if self.space == "theta":
            return f"monte-carlo in θ-space ({self.num_samples} draws from q)"
        if self.kind == "monte-carlo":
            return f"monte-carlo in predictor space (K={self.dims}, {self.num_samples} common draws)"
        full = GAUSS_HERMITE_TIERS[self.dims][-1]
        if self.kind == "taylor":
            return (f"taylor expansion in predictor space (K={self.dims}, order {TAYLOR_ORDER}, within "
                    f"{self.tol:g} of {full}-point gauss-hermite)")
        lo, hi = self.points
        low = "taylor expansion" if lo == 0 else f"{lo}"
        used = low if lo == hi else f"{low} to {hi}"
        within = f", within {self.tol:g} of {full} points" if self.tol > 0 else ""
        return f"gauss-hermite in predictor space (K={self.dims}, {used} points per dimension{within})"


class SiteMPE(NamedTuple):
    """MPE outputs of every observation of one observed site (flattened to ``N``)."""

    lpd: jax.Array
    elpd_loo: jax.Array
    p_loo: jax.Array
    sensitivity: jax.Array
    leverage: jax.Array
    valid: jax.Array
    shift: jax.Array | None  # m₋i − m, (N, P), where kept
    prediction_shift: jax.Array | None  # Δη_i, (N, K)
    prediction_var: jax.Array | None  # V_i, (N, K, K)
    prediction_labels: tuple
    integration: Integration
    extra: dict | None = None  # first-order outputs of training checkpoints; LOO predictive functionals

    @property
    def method(self) -> str:
        """How ``elpd_loo`` was integrated, in words."""
        return str(self.integration)


class PassOptions(NamedTuple):
    """Static options of the pass (hashable: part of the compiled program's key).

    ``points``: Gauss–Hermite points per dimension tried, fewest first (the last is the full rule; empty for
    Monte Carlo); ``tol``: accepted difference from the full rule (0: the full rule on every row);
    ``num_samples``: Monte Carlo nodes for K > 3; ``taylor``: try the Taylor expansion first (K = 1);
    ``keep_shift``: return the N×P shifts; ``first_order``: the first-order outputs of training checkpoints;
    ``expect_q``: e_i, Λ_i averaged over q's predictive (training checkpoints); ``predictive``: the LOO
    predictive functionals of every row (:mod:`numpyro_mpe.engine.predictive`, by the full rule), returned
    in ``SiteMPE.extra``.
    """

    points: tuple
    tol: float
    num_samples: int = 2000
    taylor: bool = False
    keep_shift: bool = True
    first_order: bool = False
    expect_q: bool = False
    predictive: PredictiveSpec | None = None

    @classmethod
    def make(cls, k: int, num: int, num_params: int, dtype, *, num_samples: int = 2000,
             tol: float | None = None, keep_shift: bool | None = None, first_order: bool = False,
             expect_q: bool = False, predictive: PredictiveSpec | None = None) -> PassOptions:
        """Options for K active components over ``num`` rows of a model with ``num_params`` parameters: the
        full rule up to :data:`FULL_RULE_NODES` row-nodes (and for ``tol=0``), else the tiers within ``tol``
        (default 1e-11 in float64, 1e-5 in float32); the shifts kept while N·P ≤ :data:`KEEP_SHIFT_LIMIT`
        unless ``keep_shift`` says."""
        if keep_shift is None:
            keep_shift = num * num_params <= KEEP_SHIFT_LIMIT
        if k not in GAUSS_HERMITE_TIERS:
            return cls((), 0.0, int(num_samples), False, keep_shift, first_order, expect_q, predictive)
        if tol is None:
            tol = 0.0 if num * GAUSS_HERMITE_TIERS[k][-1] ** k <= FULL_RULE_NODES else default_tol(dtype)
        tol = float(tol)
        points = GAUSS_HERMITE_TIERS[k] if tol > 0 else GAUSS_HERMITE_TIERS[k][-1:]
        return cls(points, tol, int(num_samples), k == 1 and tol > 0 and not expect_q, keep_shift,
                   first_order, expect_q, predictive)

    def rules(self, k: int, dtype, mc_key):
        if not self.points:
            return (monte_carlo(k, self.num_samples, mc_key, dtype),)
        return tuple(gauss_hermite(k, n, dtype) for n in self.points)


def _integrals(log_lik_fn, opts: PassOptions, rules, mesh, means, covs, eta, active, y, aux, w, e, lam,
               series=None):
    """log E p(y_i | η_i) under each Gaussian (η_i ~ N(means[j]_i, covs[j]_i)) for the rows of one chunk;
    each device picks its own tier (:func:`~numpyro_mpe.engine.quadrature.expected_log_lik_block`) on its
    own rows, no collective.  Returns the values and the points per dimension each device used."""

    def block(means, covs, eta, y, aux, w, e, lam, *series):
        vals, pts = expected_log_lik_block(log_lik_fn, means, covs, eta, np.asarray(active), y, aux, w,
        e, lam,
                                           tol=opts.tol, rules=rules, series=series[0] if series else None)
        return vals, jnp.reshape(pts, (1,))

    spec = PS("obs")
    fn = shard_map(block, mesh=mesh, in_specs=spec, out_specs=(spec, spec))
    extra = () if series is None else (series,)
    return fn(tuple(means), tuple(covs), eta, y, aux, w, e, lam, *extra)


def _functionals(predictor, spec: PredictiveSpec, rule, mesh, mean, cov, eta, active, y, aux):
    """The LOO predictive functionals of the rows of one chunk (each device on its own rows)."""

    def block(mean, cov, eta, y, aux):
        return rows_functionals(predictor, spec, rule, mean, cov, eta, active, y, aux)

    spec_rows = PS("obs")
    return shard_map(block, mesh=mesh, in_specs=spec_rows, out_specs=spec_rows)(mean, cov, eta, y, aux)


def _expected_derivs(log_lik_fn, active, rule, e, lam, cov, eta, y, aux, w):
    """E_{η ~ N(η_i, V_i)}[e(η)], E[Λ(η)] per row by ``rule``: the memories under q through the linearized
    predictor (exact expectations under q for a GLM)."""
    from numpyro_mpe.engine.quadrature import psd_sqrt

    nll = predictor_nll(log_lik_fn, active)
    act = np.asarray(active)
    wq = jnp.exp(rule.log_weights)

    def one(vi, ea, yi, ai, wi):
        pts = ea[act] + rule.nodes @ psd_sqrt(vi).T  # (Q, K)

        def at(x):
            _, g, h = value_grad_hessian(nll)(x, ea, yi, ai, wi)
            return g, 0.5 * (h + h.T)

        gq, hq = jax.vmap(at)(pts)
        return wq @ gq, jnp.einsum("q,qkl->kl", wq, hq)

    return jax.vmap(one)(cov, eta, y, aux, w)


def _first_order(log_lik_fn, active, v, e, eta, y, aux, w):
    """Δη_i⁽¹⁾ = V_i e_i and −log p(y_i | η_i + V_i e_i): the paper's "prediction variance × error"."""
    nll = predictor_nll(log_lik_fn, active)
    act = np.asarray(active)
    d1 = jnp.einsum("ckl,cl->ck", v, e)
    nll1 = jax.vmap(lambda dd, ea, yi, ai, wi: nll(ea[act] + dd, ea, yi, ai, wi))(d1, eta, y, aux, w)
    return d1, nll1


def _shift_rows(post, b, w):
    """Δm_i = L⁻ᵀ B_iᵀ w_i = S⁻¹ J_iᵀ w_i as rows (c, P)."""
    bw = jnp.sum(b * w[:, :, None], axis=1)  # B_iᵀ w_i
    p = bw.shape[-1]
    if p <= 256:
        return bw @ post.unwhiten(jnp.eye(p, dtype=bw.dtype)).T
    return post.unwhiten(bw.T).T


def _outputs(predictor, opts, rules, mesh, out, eta, active, y, aux, w, e, lam, series=None):
    """The integrals and the per-row outputs of one chunk from its cavities ``out``."""
    log_lik_fn = predictor.log_lik
    eta_a = eta[:, active_index(active)]
    (lpd, elpd), pts = _integrals(log_lik_fn, opts, rules, mesh, (eta_a, eta_a + out["dEta"]),
                                  (out["v"], out["v_cav"]), eta, active, y, aux, w, e, lam, series)
    elpd = jnp.where(out["valid"], elpd, jnp.nan)
    res = {"lpd": lpd, "elpd_loo": elpd, "p_loo": lpd - elpd, "leverage": out["leverage"],
           "valid": out["valid"], "sensitivity": jnp.where(out["valid"], out["sensitivity"], jnp.nan),
           "dEta": out["dEta"], "v": out["v"]}
    if opts.first_order:
        res["prediction_shift_first_order"], res["nll_first_order"] = _first_order(
            log_lik_fn, active, out["v"], e, eta, y, aux, w)
    if opts.predictive is not None:
        vals = _functionals(predictor, opts.predictive, rules[-1], mesh, eta_a + out["dEta"], out["v_cav"],
                            eta, active, y, aux)
        res.update({k: jnp.where(jnp.reshape(out["valid"], (-1,) + (1,) * (v.ndim - 1)), v, jnp.nan)
                    for k, v in vals.items()})
    return res, pts


def _quick_pass(adapter, rows, data: dict, post, *args, opts: PassOptions, **kwargs) -> bool:
    """A pass compiles quickly (:func:`numpyro_mpe.programs.jit`) when its work, about rows × P² (a P × P
    solve per row), is small, and it computes no LOO predictive functionals (quadrature, quantile search,
    sums over a discrete support: compute-bound even on few rows)."""
    leaves = jax.tree_util.tree_leaves(data)
    chunk = int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 1
    return opts.predictive is None and small_work(chunk, int(post.mean.shape[0]))


@partial(jit, static_argnames=("rows", "opts", "mesh"), quick=_quick_pass)
def predictor_chunk(adapter: ModelAdapter, rows: SiteRows, data: dict, post, mc_key, *, opts: PassOptions,
                    mesh):
    """Every output of one chunk of a site with a predictor under ``post`` (terms at the mean)."""
    predictor = adapter.observed[rows.name].predictor
    f = predictor.log_lik
    k = len(rows.active)
    rules = opts.rules(k, post.mean.dtype, mc_key)
    tm, _ = chunk_terms(adapter, rows, data, post.mean, post, opts.taylor)
    e, lam = tm.e, tm.lam
    if opts.expect_q:
        e, lam = _expected_derivs(f, rows.active, rules[-1], e, lam, tm.cov, tm.eta, tm.y, tm.aux, tm.w)
    out = jax.vmap(lambda e_, l_, v_: cavity_k(e_, l_, v=v_))(e, lam, tm.cov)
    res, pts = _outputs(predictor, opts, rules, mesh, out, tm.eta, rows.active, tm.y, tm.aux, tm.w, e, lam,
                        tm.series)
    if opts.keep_shift:
        res["shift"] = _shift_rows(post, tm.jac, out["w"])
    return res, pts


@partial(jit, static_argnames=("name", "active", "dense", "opts", "mesh"))
def memory_chunk(adapter: ModelAdapter, data: dict, post, mc_key, *, name: str, active: tuple | None,
                 dense: bool, opts: PassOptions, mesh):
    """Every output of one chunk of rows with held memories: ``data`` holds ``g`` ``(c, P)`` and ``h``
    ``(c, P, P)`` (``dense``; with ``idx`` ``(c, r)``, the coordinates each row touches, the cavity is
    solved in those r, :func:`~numpyro_mpe.engine.cavity.cavity_support`) or ``e`` ``(c, K)`` and ``lam``
    ``(c, K, K)`` (factored through the predictor, Ĥ_i = J_iᵀΛ_iJ_i), and where the site has a predictor
    (``active`` not None) its state ``eta``, ``jac``, ``aux``, ``y``, ``w`` at the mean."""
    p = post.mean.shape[0]
    dtype = post.mean.dtype
    linv = post.whiten(jnp.eye(p, dtype=dtype))  # L⁻¹
    has_pred = active is not None
    c = data["g"].shape[0] if dense else data["e"].shape[0]
    b_w = data["jac"] @ linv.T if has_pred else jnp.zeros((c, 0, p), dtype)  # B_i = J_i L⁻ᵀ

    def one(row, b):
        if dense and "idx" in row:
            idx = row["idx"]
            return cavity_support(row["g"][idx], row["h"][idx][:, idx], linv[:, idx].T, b)
        if dense:
            return cavity_one(linv @ row["g"], linv @ row["h"] @ linv.T, b)
        out = cavity_k(row["e"], row["lam"], b)
        out["logdet"] = jnp.zeros((), dtype)  # only used by the θ-space integrals
        return out

    mapped = ("g", "h", "idx") if dense else ("e", "lam")
    out = jax.vmap(one)({k: data[k] for k in mapped if k in data}, b_w)
    res = {"leverage": out["leverage"], "valid": out["valid"],
           "sensitivity": jnp.where(out["valid"], out["sensitivity"], jnp.nan),
           "u": out["u"], "logdet": out["logdet"]}
    if opts.keep_shift:
        res["shift"] = post.unwhiten(out["u"].T).T
    if not has_pred:
        return res, jnp.zeros((mesh.size,), jnp.int32)
    predictor = adapter.observed[name].predictor
    k = len(active)
    rules = opts.rules(k, dtype, mc_key)
    e = data["e"] if not dense else jnp.zeros((c, k), dtype)  # used only to rank rows for the tiers
    lam = data["lam"] if not dense else jnp.zeros((c, k, k), dtype)
    preds, pts = _outputs(predictor, opts._replace(first_order=False), rules, mesh, out, data["eta"], active,
                          data["y"], data["aux"], data["w"], e, lam)
    res.update({k: v for k, v in preds.items() if k not in res})
    return res, pts


# ---------------------------------------------------------------- driver
def predictor_pass(site: SiteData, post, opts: PassOptions, *, rng_key=None, pool=None,
                   progress: bool = False) -> SiteMPE:
    """:class:`SiteMPE` of a site with a predictor under ``post``, terms at the mean."""
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    lay = site.layout
    rows = site.rows
    assembly, tiers = lay.assembly(pool), []

    class Into:  # the rows of every output assembled; the tier each device used, per chunk
        def add(self, j, out):
            assembly.add(j, out[0])
            tiers.append(np.asarray(out[1]))

        def result(self):
            return assembly.result()

    res = run_chunks(lambda j: predictor_chunk(site.adapter, rows, site.chunk(j, post.mean), post, key,
                                               opts=opts, mesh=lay.mesh),
                     lay.num_chunks, desc=f"MPE {site.name}", progress=progress, into=Into())
    labels = tuple(site.site.predictor.labels[i] for i in rows.active)
    integration = _integration(opts, len(rows.active), np.concatenate(tiers))
    others = len(rows.names) - 1
    name = site.name if not others else f"{site.name}' and the {others} sites like it ('{site.name}"
    return assemble(name, res, labels, integration, lay.num)


def memory_pass(adapter: ModelAdapter, post, name: str, memories, pred, opts: PassOptions, *,
                chunk_size: int, rng_key=None, progress: bool = False, num_samples: int = 2000) -> SiteMPE:
    """:class:`SiteMPE` of a site from held memories (and its predictor state ``pred``, or ``None``: then
    ``elpd_loo`` by Monte Carlo in θ-space, :func:`theta_space_elpd`)."""
    site = adapter.observed[name]
    n = site.num_obs
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    dense = not memories.factored
    arrays = {"g": memories.grad, "h": memories.dense} if dense else {"e": memories.resid, "lam":
    memories.lam}
    support = row_support(memories.grad, memories.dense) if dense else None
    if support is not None:  # each row's memory touches few coordinates: its cavity in those
        arrays["idx"] = support
    if pred is not None:
        arrays.update(eta=pred.eta, jac=pred.jac, aux=pred.aux, y=pred.y, w=pred.weights)
    lay = Layout.build(n, chunk_size, jax.devices()[:1])
    placed = jax.tree_util.tree_map(lay.place, arrays)
    chunk = [jax.tree_util.tree_map(lambda parts, j=j: parts[j], placed,
                                    is_leaf=lambda v: isinstance(v, list)) for j in range(lay.num_chunks)]
    active = None if pred is None else tuple(pred.active)
    tiers: list = []
    assembly = lay.assembly()

    class Into:
        def add(self, j, out):
            assembly.add(j, out[0])
            tiers.append(np.asarray(out[1]))

        def result(self):
            return assembly.result()

    res = run_chunks(lambda j: memory_chunk(adapter, chunk[j], post, key, name=name, active=active,
                                            dense=dense, opts=opts, mesh=lay.mesh),
                     lay.num_chunks, desc=f"MPE {name}", progress=progress, into=Into())
    if pred is None:
        a_w = _whitened_hessians(post, memories.hess)
        lpd, elpd = theta_space_elpd(adapter, post, name, a_w, res["u"], res["logdet"], rng_key=key,
                                     num_samples=num_samples)
        res.update(lpd=lpd, elpd_loo=jnp.where(res["valid"], elpd, jnp.nan))
        res["p_loo"] = res["lpd"] - res["elpd_loo"]
        integration = Integration("theta", "monte-carlo", int(post.mean.shape[0]), (), int(num_samples))
        return assemble(name, res, (), integration, n)
    labels = tuple(site.predictor.labels[i] for i in pred.active)
    return assemble(name, res, labels, _integration(opts, len(pred.active), np.concatenate(tiers)), n)


@jit
def _whitened_hessians(post, hess):
    p = post.mean.shape[0]
    linv = post.whiten(jnp.eye(p, dtype=post.mean.dtype))
    return jnp.einsum("ab,nbc,dc->nad", linv, hess, linv)


def _integration(opts: PassOptions, k: int, pts: np.ndarray) -> Integration:
    if not opts.points:
        return Integration("predictor", "monte-carlo", k, (), opts.num_samples)
    lo, hi = int(pts.min()), int(pts.max())
    kind = "taylor" if hi == 0 else ("taylor+gauss-hermite" if lo == 0 else "gauss-hermite")
    return Integration("predictor", kind, k, (lo, hi), 0, opts.tol)


def assemble(name: str, res: dict, labels: tuple, integration: Integration, n: int) -> SiteMPE:
    """A :class:`SiteMPE` from per-observation arrays (``lpd, elpd_loo, p_loo, sensitivity, leverage, valid``
    with NaN already set where the cavity is invalid, optionally ``shift``, ``dEta``, ``v`` and first-order
    outputs); invalid cavities get one warning naming them."""
    valid = np.asarray(res["valid"])
    n_bad = int(n - np.count_nonzero(valid))
    if n_bad:
        bad = np.flatnonzero(~valid)
        warnings.warn(
            f"{n_bad} of {n} observations of '{name}' have leverage >= 1: removing them leaves a cavity "
            "precision S - H_i that is not positive definite, so their leave-one-out Gaussian does not "
            f"exist (flat indices {bad[:10].tolist()}{' ...' if n_bad > 10 else ''}); their elpd_loo, p_loo, "
            "sensitivity and shifts are NaN and `valid` is False",
            stacklevel=4,
        )
    extra = {k: res[k] for k in ("prediction_shift_first_order", "nll_first_order", *FUNCTIONAL_OUTPUTS)
             if k in res} or None
    return SiteMPE(res["lpd"], res["elpd_loo"], res["p_loo"], res["sensitivity"], res["leverage"],
                   res["valid"], res.get("shift"), res.get("dEta"), res.get("v"), labels, integration, extra)


# ---------------------------------------------------------------- θ-space Monte Carlo (no predictor)
@partial(jit, static_argnames=("name",))
def _theta_space_step(adapter: ModelAdapter, post, name: str, z, a_w, u, logdet):
    theta = post.mean + post.unwhiten(z.T).T  # (b, P)
    ll = jax.vmap(lambda t: adapter.log_lik(t, name))(theta)  # (b, N)
    d = z[:, None, :] - u[None]  # (b, N, P)
    quad = jnp.sum(d * d, -1) - jnp.einsum("bnp,npq,bnq->bn", d, a_w, d)
    log_ratio = -0.5 * quad + 0.5 * jnp.sum(z * z, -1)[:, None] + 0.5 * logdet[None]
    return logsumexp(ll, 0), logsumexp(ll + log_ratio, 0)


def theta_space_elpd(adapter: ModelAdapter, post, name: str, a_w, u, logdet, *, rng_key, num_samples: int):
    """``lpd`` and ``elpd_loo`` by Monte Carlo in θ-space, for sites without a predictor.

    Draws θ_s = m + L⁻ᵀ z_s from q (common to all observations, ``num_samples`` model passes) and uses
    E_{q₋i}[p(y_i|θ)] = E_q[p(y_i|θ) q₋i(θ)/q(θ)], streaming over draws (no S×N matrix is kept).  The ratio is
    exactly constant when ℓ_i is quadratic, so the estimate is exact in the Gaussian case; its variance is
    finite for leverage < 0.5.
    """
    n, p = u.shape
    batch = max(1, min(num_samples, 64))
    z_all = standard_normal(rng_key, (num_samples, p), post.mean.dtype)
    acc_lpd = jnp.full((n,), -jnp.inf, post.mean.dtype)
    acc_elpd = jnp.full((n,), -jnp.inf, post.mean.dtype)
    for s in range(0, num_samples - num_samples % batch, batch):
        a, b = _theta_space_step(adapter, post, name, z_all[s: s + batch], a_w, u, logdet)
        acc_lpd, acc_elpd = jnp.logaddexp(acc_lpd, a), jnp.logaddexp(acc_elpd, b)
    used = num_samples - num_samples % batch
    return acc_lpd - jnp.log(used), acc_elpd - jnp.log(used)


__all__ = ["Integration", "PassOptions", "SiteMPE", "assemble", "log_lik_at_nodes", "map_shifts",
           "memory_pass", "predictor_pass", "theta_space_elpd"]


@partial(jit, static_argnames=("rows", "project", "mesh"))
def _shift_chunk(adapter: ModelAdapter, rows: SiteRows, data: dict, post, args, *, project, mesh):
    tm, _ = chunk_terms(adapter, rows, data, post.mean, post)
    out = jax.vmap(lambda e_, l_, v_: cavity_k(e_, l_, v=v_))(tm.e, tm.lam, tm.cov)
    return project(_shift_rows(post, tm.jac, out["w"]), *args)


def map_shifts(site: SiteData, post, project, args=(), *, progress: bool = False, desc: str = "shifts"):
    """``project(Δm, *args)`` of the MPE shifts Δm_i = S⁻¹J_iᵀw_i of every observation, chunk by chunk: the
    N×P shifts are never held at once, only the projections (``project``: a module-level function, rows
    (c, P) → (c, ...); ``args``: its array arguments)."""
    lay = site.layout
    return run_chunks(lambda j: _shift_chunk(site.adapter, site.rows, site.chunk(j, post.mean), post, args,
                                             project=project, mesh=lay.mesh),
                      lay.num_chunks, desc=desc, progress=progress, into=lay.assembly())
