"""Per-chunk terms of an observed site with a predictor: η_i, J_i = ∂η_i/∂θ, e_i = ∇_η ℓ_i, Λ_i = ∇²_η ℓ_i.

For an observed site whose observation i depends on θ only through its distribution's parameters
η_i(θ) ∈ R^K (:class:`~numpyro_mpe.model.predictor.Predictor`), every per-observation quantity of the MPE
comes from these four and from the posterior through S⁻¹J_iᵀ: V_i = J_i S⁻¹ J_iᵀ.  The rows of one chunk come
from one of three sources (:class:`SiteRows`):

* ``"rows"``: the model runs on the chunk's rows (its per-observation arguments sliced,
  :class:`~numpyro_mpe.model.rows.RowPlan`); J is formed per chunk (``chunk·K·P``) — by forward mode along
  the columns of T (T = I, or L⁻ᵀ under a posterior) for P ≤ 256, else by reverse mode per row, one block per
  latent site, dense layers as rank-one blocks (:mod:`numpyro_mpe.model.rankone`);
* ``"whole"``: one chunk holds every row; η and J come from the whole model inside the chunk's program;
* ``"held"``: η and J of every row, computed once from the whole model and held per chunk (models that
  cannot run on a subset of their rows).

With ``curvature="ggn"`` Λ_i is projected onto the PSD cone (the generalized Gauss–Newton); with ``"exact"``
it is kept as it is, which is the exact Hessian of ℓ_i where η_i is linear in θ.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.derivatives import value_grad_hessian
from numpyro_mpe.engine import rowlinalg
from numpyro_mpe.engine.quadrature import TAYLOR_ORDER, log_lik_series
from numpyro_mpe.gaussian import row_gram
from numpyro_mpe.model import rankone
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.rows import RowPlan, rows_site
from numpyro_mpe.programs import jit

#: Above this many parameters, Jacobians of rows are formed by reverse mode per latent site.
FORWARD_MODE_LIMIT = 256


class SiteRows(NamedTuple):
    """How the rows of one observed site reach a chunk's program (static, hashable).

    ``source``: ``"rows"`` (model on sliced rows by ``plan``), ``"whole"`` (whole model, one chunk) or
    ``"held"`` (η, J held per chunk); ``active``: the predictor components that depend on θ;
    ``curvature``: ``"exact"`` or ``"ggn"``.  ``group``: for ``"whole"``, the observed sites whose rows are
    stacked (sites with equal predictors, e.g. one site per time step of a model written as a loop: one
    program serves them all); empty means ``(name,)``.
    """

    name: str
    source: str
    active: tuple
    curvature: str
    plan: RowPlan | None = None
    group: tuple = ()

    @property
    def names(self) -> tuple:
        return self.group or (self.name,)


class ChunkTerms(NamedTuple):
    """Per-observation pieces of one chunk of c rows: η (c, K_all), ``jac`` (c, K, r), e (c, K),
    Λ (c, K, K), aux, y, w, and for K = 1 optionally the Taylor coefficients a₀ … a₄ of w·log p at η
    (``series``, five (c,) arrays; then ℓ = −a₀, e = −a₁, Λ = −2a₂).

    ``jac[i]`` = J_i T for a P×r matrix T: T = I (the Jacobian of the active components) or T = L⁻ᵀ under a
    posterior with precision S = L Lᵀ (then ``jac[i]`` = B_i = J_i L⁻ᵀ and B_i B_iᵀ = J_i S⁻¹ J_iᵀ).
    ``blocks``: the same columns cut per latent site (ravel order; ``jac`` is their concatenation) where the
    Jacobian was formed that way (P > 256), else ``[jac]``; sums over observations taken per block never form
    ``jac`` (XLA drops what is not used).  ``cov``: V_i = B_i B_iᵀ (c, K, K) under a posterior.
    """

    eta: jax.Array
    jac: jax.Array
    e: jax.Array
    lam: jax.Array
    aux: dict
    y: jax.Array
    w: jax.Array
    series: tuple | None = None
    blocks: list | None = None
    cov: jax.Array | None = None


def active_index(active):
    """A static slice for contiguous ``active`` components (a gather otherwise): indexing with an array,
    even a constant one, compiles to a gather."""
    lo, hi = int(active[0]), int(active[-1]) + 1
    return slice(lo, hi) if hi - lo == len(active) else np.asarray(active)


def psd_project(lam):
    """The nearest PSD matrix (eigenvalues clipped at 0) of a symmetric ``(K, K)``."""
    if lam.shape[-1] == 1:
        return jnp.clip(lam, 0.0, None)
    vals, vecs = rowlinalg.eigh(0.5 * (lam + lam.T))
    return (vecs * jnp.clip(vals, 0.0, None)) @ vecs.T


def predictor_nll(log_lik_fn, active):
    """ℓ(x) = −w·log p(y | η) of one observation as a function of its active predictor components x (the
    others fixed at ``eta_all``): ``nll(x, eta_all, y, aux, w)``."""
    active = np.asarray(active)

    def nll(x, eta_all, y, aux, w):
        eta = eta_all.at[active].set(x)
        tree = jax.tree_util.tree_map(lambda a: a[None], (eta, y, aux))
        return -log_lik_fn(*tree)[0] * w

    return nll


def predictor_derivs(log_lik_fn, active):
    """``derivs(eta_all, y, aux, w) -> (ℓ, e, Λ)``: value, gradient and (symmetrized) Hessian of
    :func:`predictor_nll` in the active components, for one observation."""
    nll = predictor_nll(log_lik_fn, active)
    active = np.asarray(active)

    def derivs(eta_all, y, aux, w):
        x = eta_all[active]
        val, g, h = value_grad_hessian(nll)(x, eta_all, y, aux, w)
        return val, g, 0.5 * (h + h.T)

    return derivs


def row_derivs(adapter: ModelAdapter, rows: SiteRows, eta, y, aux, w):
    """(ℓ_i, e_i, Λ_i) of every row (Λ_i PSD-projected for the GGN)."""
    derivs = predictor_derivs(adapter.observed[rows.name].predictor.log_lik, rows.active)

    def one(eta_all, yi, auxi, wi):
        val, g, h = derivs(eta_all, yi, auxi, wi)
        return val, g, (psd_project(h) if rows.curvature == "ggn" else h)

    return jax.vmap(one)(eta, y, aux, w)


# ---------------------------------------------------------------- η and J of a chunk
def eta_rows(adapter: ModelAdapter, rows: SiteRows, theta, row_args):
    tr = rows_site(adapter, rows.plan, rows.name, theta, row_args)
    c = row_args[0].shape[0]
    return adapter.observed[rows.name].predictor.params(tr["fn"], (c,))


def _row_fn(adapter: ModelAdapter, rows: SiteRows, tree=None):
    """θ, one row's arguments ↦ that row's active predictor components (K,), with its whole predictor and
    aux as the auxiliary output (the primal of a forward or backward pass: computed once).  With ``tree``
    (the latent arrays' treedef), θ is given as the list of unconstrained latent arrays."""
    idx = active_index(rows.active)

    def f(t, row):
        if tree is not None:
            t = jax.tree_util.tree_unflatten(tree, t)
        eta, aux = eta_rows(adapter, rows, t, [x[None] for x in row])
        return eta[0, idx], (eta[0], jax.tree_util.tree_map(lambda a: a[0], aux))
    return f


def _site_jacobians(adapter: ModelAdapter, rows: SiteRows, theta, row_args):
    """η, aux and the blocks of J_i = ∂η_i/∂θ per latent array, in ravel order, by reverse mode per row.

    An array that enters through one product with the row's input (a dense layer's weights; found in the
    predictor's jaxpr, :func:`numpyro_mpe.model.rankone.product_plan`) comes as a
    :class:`~numpyro_mpe.model.rankone.RankOneBlock` a_i ⊗ g_i, g_i the derivative at a zero probe added
    to that product; the others as (c, K, size) arrays.  One reverse pass per row gives both.
    Differentiating with respect to the arrays, not the flat θ, spares XLA the concatenation of every row's
    cotangents (95 ms of a 430 ms chunk of a P = 10⁵ MLP)."""
    leaves, tree = jax.tree_util.tree_flatten(adapter.unravel(theta))
    f = _row_fn(adapter, rows, tree)
    try:
        plan = rankone.product_plan(f, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
                                    [jax.ShapeDtypeStruct(r.shape[1:], r.dtype) for r in row_args])
    except Exception:  # noqa: BLE001 - a jaxpr the search cannot walk: every block dense, as below
        plan = None
    if plan is None or not plan.weights:  # every block dense: reverse mode through the model itself
        def dense_row(row):
            jac, (eta, aux) = jax.jacrev(f, has_aux=True)(leaves, row)
            return eta, aux, jac

        eta, aux, jac = jax.vmap(dense_row)(row_args)
        return eta, aux, [jnp.reshape(x, x.shape[:2] + (-1,)) for x in jac]
    products = plan.weights
    others = [j for j in range(len(leaves)) if j not in products]

    def one(row):
        def g(probes, other_leaves):
            full = list(leaves)
            for j, x in zip(others, other_leaves):
                full[j] = x
            (eta_a, (eta, aux)), inputs = rankone.evaluate(plan, full, row, probes)
            return eta_a, (eta, aux, inputs)

        probes = {j: rankone.zero_probe(plan, j) for j in products}
        (d_probe, d_other), (eta, aux, inputs) = jax.jacrev(g, argnums=(0, 1), has_aux=True)(
            probes, [leaves[j] for j in others])
        return eta, aux, d_probe, d_other, inputs

    eta, aux, d_probe, d_other, inputs = jax.vmap(one)(row_args)
    blocks, rest = [], iter(d_other)
    for j in range(len(leaves)):
        if j in products:
            w = products[j]
            g = jnp.reshape(d_probe[j], d_probe[j].shape[:2] + (w.num_out,))
            blocks.append(rankone.RankOneBlock(inputs[j], g, w.shape, w.perm))
        else:
            x = next(rest)
            blocks.append(jnp.reshape(x, x.shape[:2] + (-1,)))
    return eta, aux, blocks


def whole_eta(adapter: ModelAdapter, names: tuple, theta):
    """η (N, K_all) and aux of every row of the sites ``names`` (stacked) from one trace of the model."""
    tr = adapter.trace(theta)
    parts = [adapter.observed[n].predictor.params(tr[n]["fn"]) for n in names]
    if len(parts) == 1:
        return parts[0]
    aux = {k: jnp.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return jnp.concatenate([p[0] for p in parts]), aux


def whole_eta_jac(adapter: ModelAdapter, names: tuple, theta):
    """η (N, K_all), J (N, K_all, P) and aux of every row of the sites ``names`` from the whole model
    (forward mode)."""
    eta, aux = whole_eta(adapter, names, theta)
    return eta, jax.jacfwd(lambda t: whole_eta(adapter, names, t)[0])(theta), aux


def split_latent(adapter: ModelAdapter, x) -> list:
    """A θ-sized leading axis cut into the latent sites' blocks (ravel order)."""
    return [x[s.start:s.stop] for s in adapter.latent]


def _eta_blocks(adapter: ModelAdapter, rows: SiteRows, data: dict, theta, post=None):
    """η, aux, the blocks of J_i T of one chunk ``data`` and, under a posterior, V_i = J_i S⁻¹ J_iᵀ (else
    ``None``); traceable.

    P ≤ 256 on streamed rows: forward mode along the columns of T, vmapped over rows outside the tangents, so
    the products come out row-major (c, K, P) — vmapping the tangents over the whole chunk instead gives a
    tangent-major array that XLA on CPU reduces ~15× slower.  P > 256: reverse mode per row, one block of J_i
    per latent site (:func:`_site_jacobians`); under a diagonal or low-rank posterior B_i and V_i are formed
    per block (``post.whiten_blocks``), so that the flat (c, K, P) array is formed only where it is used.
    """
    p = theta.shape[0]
    act = np.asarray(rows.active)
    if rows.source == "whole":
        eta, jac, aux = whole_eta_jac(adapter, rows.names, theta)
        blocks = [jac[:, act, :]]
    elif rows.source == "held":
        eta, aux, blocks = data["eta"], data["aux"], [data["jac"][:, act, :]]
    elif p <= FORWARD_MODE_LIMIT:
        f = _row_fn(adapter, rows)
        eye = jnp.eye(p, dtype=theta.dtype)
        tangents = eye if post is None else post.unwhiten(eye)  # columns of T = I or L⁻ᵀ

        def one(row):
            def along(d):
                _, tangent, primal = jax.jvp(lambda t: f(t, row), (theta,), (d,), has_aux=True)
                return tangent, primal

            jac, (eta, aux) = jax.vmap(along, out_axes=(-1, None))(tangents.T)
            return eta, aux, jac

        eta, aux, jac = jax.vmap(one)(data["rows"])  # already J_i T
        return eta, aux, [jac], None if post is None else row_gram(jac)
    else:
        eta, aux, blocks = _site_jacobians(adapter, rows, theta, data["rows"])
    if post is None:
        return eta, aux, blocks, None
    # B_i and V_i by the posterior's structure (per block under a diagonal or low-rank q)
    split = (lambda x: split_latent(adapter, x)) if len(blocks) > 1 else (lambda x: [x])
    return (eta, aux) + post.whiten_blocks(blocks, split)


def chunk_terms(adapter: ModelAdapter, rows: SiteRows, data: dict, theta, post=None,
                series: bool = False) -> tuple[ChunkTerms, jax.Array]:
    """:class:`ChunkTerms` of one chunk and w_i ℓ_i of each row (traceable).  ``series`` (K = 1): ℓ, e and Λ
    from the Taylor coefficients of w·log p (:func:`numpyro_mpe.engine.quadrature.log_lik_series`), which the
    expansion tier of the integrals needs anyway, instead of a separate differentiation."""
    y, w = chunk_observed(adapter, rows, data)
    eta, aux, blocks, cov = _eta_blocks(adapter, rows, data, theta, post)
    jac = rankone.join(blocks)  # dropped where unused
    coeffs = None
    if series:
        f = adapter.observed[rows.name].predictor.log_lik
        coeffs = log_lik_series(f, int(rows.active[0]), eta, y, aux, w, TAYLOR_ORDER)
        val, e, lam = -coeffs[0], -coeffs[1][:, None], -2.0 * coeffs[2][:, None, None]
        if rows.curvature == "ggn":
            lam = jnp.clip(lam, 0.0, None)
    else:
        val, e, lam = row_derivs(adapter, rows, eta, y, aux, w)
    val = jnp.where(w != 0, val, 0.0)
    return ChunkTerms(eta, jac, e, lam, aux, y, w, coeffs, blocks, cov), val


def chunk_observed(adapter: ModelAdapter, rows: SiteRows, data: dict):
    """The chunk's observed values (c, ...) and weights (c,): from ``data`` for a chunked source, from the
    adapter for ``"whole"``."""
    if rows.source == "whole":
        ys, ws = [], []
        for n in rows.names:
            site = adapter.observed[n]
            w = adapter.predictor_mask(n)
            ys.append(site.flat_value)
            ws.append(jnp.ones(site.num_obs, adapter.structure.dtype) if w is None else w)
        return (ys[0], ws[0]) if len(ys) == 1 else (jnp.concatenate(ys), jnp.concatenate(ws))
    return data["y"], data["w"]


# ---------------------------------------------------------------- the site's rows, laid out in chunks
@partial(jit, static_argnames=("rows",))
def _predictor_probe(adapter: ModelAdapter, rows: SiteRows, data: dict, theta, dirs, c, v):
    """On the chunk's rows (or all rows): Σ_rows |∂η/∂θ · d| for the directions ``dirs`` (which components
    move with θ), and the gradient and Hessian-vector products ∇²(Σ_ik c_ik η_ik)·v_j (whether η is
    linear)."""
    def eta_of(t):
        if rows.source == "rows":
            return eta_rows(adapter, rows, t, data["rows"])[0]
        return whole_eta(adapter, rows.names, t)[0]

    moved = jnp.sum(jnp.abs(jax.vmap(lambda d: jax.jvp(eta_of, (theta,), (d,))[1])(dirs)), axis=(0, 1))

    def weighted(t):
        return jnp.sum(eta_of(t) * c)

    g = jax.grad(weighted)(theta)
    return moved, g, jax.vmap(lambda d: jax.jvp(jax.grad(weighted), (theta,), (d,))[1])(v)


_held_terms = jit(whole_eta_jac, static_argnames=("names",))


class SiteData:
    """The rows of one observed site laid out in chunks over devices, and the static :class:`SiteRows`.

    Built once per (fit, site): the per-observation arrays (observed values, weights, the sliced model
    arguments or the held η and J) are placed on the devices chunk by chunk.  ``rows.source`` is ``"whole"``
    when one chunk holds every row and ``stream`` is False, else ``"rows"`` where the model runs on a subset
    of its rows (:func:`~numpyro_mpe.model.rows.row_plan`), else ``"held"``.
    """

    def __init__(self, adapter: ModelAdapter, name: str, layout, *, curvature: str = "exact",
                 stream: bool = False, plan: RowPlan | None = None, no_plan_reason: str | None = None,
                 group: tuple = ()):
        site = adapter.observed[name]
        self.adapter, self.name, self.site, self.layout = adapter, name, site, layout
        self.no_plan_reason = no_plan_reason
        dtype = adapter.structure.dtype
        if layout.num_chunks == 1 and not stream and layout.mesh.size == 1:
            source = "whole"
        else:
            source = "rows" if plan is not None else "held"
        self.plan = plan if source == "rows" else None
        w = adapter.predictor_mask(name)
        self.chunks: list[dict] = [{} for _ in range(layout.num_chunks)]
        if source != "whole":
            weights = np.ones(site.num_obs, dtype) if w is None else np.asarray(w, dtype)
            self._put("w", layout.place(weights, pad_value=0))
            self._put("y", layout.place(site.flat_value))
        if source == "rows":
            for k, x in zip(plan.batched, plan.rows_of(adapter)):
                self._put(("row", k), layout.place(x))
        if group and source != "whole":
            raise ValueError("sites are grouped only when one chunk holds all their rows")
        self.rows = SiteRows(name, source, tuple(range(site.predictor.num_eta)), curvature, self.plan,
                             tuple(group))
        self._held_at = None
        self._probes: dict = {}
        moved, _ = self._probe(adapter.init_theta)
        active = tuple(int(i) for i in np.flatnonzero(moved != 0))
        if not active:
            from numpyro_mpe.errors import MPEError

            raise MPEError(f"the predictor of '{name}' does not depend on θ ({site.predictor.num_eta} "
                           "components)")
        self.rows = self.rows._replace(active=active)

    def _put(self, key, parts):
        for chunk, part in zip(self.chunks, parts):
            chunk[key] = part

    def chunk(self, j: int, theta=None) -> dict:
        """The arrays of chunk ``j``: ``y``, ``w`` and the row arguments (``rows``), or the held η, J, aux at
        ``theta``."""
        c = self.chunks[j]
        d = {k: v for k, v in c.items() if not isinstance(k, tuple)}
        if self.rows.source == "rows":
            d["rows"] = [c["row", k] for k in self.plan.batched]
        elif self.rows.source == "held":
            d.update(self._held(theta)[j])
        return d

    def _held(self, theta):
        """η, J, aux of every row at ``theta`` from the whole model, placed per chunk (once per θ)."""
        if self._held_at is None or not bool(jnp.all(self._held_at[0] == theta)):
            eta, jac, aux = _held_terms(self.adapter, (self.name,), theta)
            lay = self.layout
            placed = {"eta": lay.place(eta), "jac": lay.place(jac),
                      "aux": {k: lay.place(v) for k, v in aux.items()}}
            per_chunk = [{"eta": placed["eta"][j], "jac": placed["jac"][j],
                          "aux": {k: v[j] for k, v in placed["aux"].items()}} for j in range(lay.num_chunks)]
            self._held_at = (theta, per_chunk)
        return self._held_at[1]

    def _probe(self, theta) -> tuple[np.ndarray, bool]:
        """Which predictor components move along two random directions of θ (a zero by coincidence has
        probability 0), and whether they are linear in θ: ∇²(Σ_ik c_ik η_ik)·v = 0 for random c, v (zero for
        every c, v only if each ∇²η_ik vanishes, but for a null set); on the first chunk's rows."""
        key = np.asarray(theta).tobytes()
        if key not in self._probes:
            rng = np.random.default_rng(7)
            dtype = np.dtype(theta.dtype)
            n = self.layout.chunk if self.rows.source == "rows" else self.layout.num
            k_all = self.site.predictor.num_eta
            dirs = rng.normal(size=(2, theta.shape[0])).astype(dtype)
            c = rng.normal(size=(n, k_all)).astype(dtype)
            v = rng.normal(size=(2, theta.shape[0])).astype(dtype)
            data = self.chunk(0, theta) if self.rows.source == "rows" else {}
            rows = self.rows._replace(active=tuple(range(k_all)))
            moved, g, hv = (np.asarray(x) for x in _predictor_probe(self.adapter, rows, data, theta, dirs,
                                                                   c, v))
            eps = 1e-9 if dtype == np.float64 else 1e-3
            tol = eps * (1.0 + np.max(np.abs(g))) * (1.0 + np.max(np.abs(np.asarray(theta))))
            tol = tol * (1.0 + np.max(np.abs(v)))
            self._probes[key] = (moved, bool(np.all(np.isfinite(hv)) and np.max(np.abs(hv)) <= tol))
        return self._probes[key]

    def is_linear(self, theta) -> bool:
        """Whether the predictor's components are linear in θ (see :meth:`_probe`)."""
        return self._probe(theta)[1]
