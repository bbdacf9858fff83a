"""Prediction-space (GGN) MPE streamed over chunks of observations and sharded over devices.

For an observed site with a predictor η_i(θ) ∈ R^K, every per-observation quantity comes from
(η_i, J_i = ∂η_i/∂θ, e_i = ∇_η ℓ_i, Λ_i = ∇²_η ℓ_i) at the posterior mean and from the posterior through
S⁻¹J_iᵀ alone (:meth:`cov_matvec`): V_i = J_i S⁻¹ J_iᵀ, then :func:`numpyro_mpe.engine.mpe.cavity_k` in
K dimensions.
Nothing of size N×P or S×N is formed: the model runs on one chunk of rows at a time (its per-observation
arguments sliced, see :class:`RowPlan`), J is formed per chunk (``chunk·K·P``), and the sums over
observations (the GGN precision Σ_i J_iᵀΛ_iJ_i, the gradient) are accumulated in P² (or P) memory.

With ``curvature="ggn"`` Λ_i is projected onto the PSD cone (the generalized Gauss–Newton); with
``"exact"`` it is kept as it is, which is the exact Hessian of ℓ_i where η_i is linear in θ.

Devices: the per-observation arrays are padded (with weight-0 rows) to a whole number of chunks, laid out
``(chunks, chunk, ...)`` and placed once with ``NamedSharding`` along the rows of each chunk, so every
device holds its own rows of every chunk; per-observation work stays local and the sums are collectives
inserted by XLA.  The outputs are those of one device up to the order of floating-point sums.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

try:
    from jax import shard_map
except ImportError:  # jax < 0.7
    from jax.experimental.shard_map import shard_map
from numpyro import handlers
from numpyro.infer.util import potential_energy
from tqdm.auto import tqdm

from numpyro_mpe.engine import rowlinalg
from numpyro_mpe.engine.assembly import Assembly, HostPool
from numpyro_mpe.engine.quadrature import (
    GAUSS_HERMITE_TIERS,
    TAYLOR_ORDER,
    default_tol,
    expected_log_lik_block,
    gauss_hermite,
    log_lik_series,
    monte_carlo,
)
from numpyro_mpe.errors import MPEError, check_chunk_size
from numpyro_mpe.gaussian import row_gram
from numpyro_mpe.model import rankone
from numpyro_mpe.model.adapter import ModelAdapter

CURVATURES = ("exact", "ggn")
#: The per-observation pass keeps the N×P shifts by default up to this N·P (80 MB in float64).
KEEP_SHIFT_LIMIT = 10_000_000


def auto_chunk_size(num_params: int, num_eta: int, itemsize: int = 8) -> int:
    """Rows per chunk when none is given: the largest power of two in [256, 65536] whose chunk·K·P
    Jacobian takes at most 16 MiB.

    Larger per-chunk arrays are mapped fresh from the OS at every call (glibc's mmap threshold is at most
    32 MiB) and their page faults then cost more than the chunk's maths: at N = 10⁶, P = 20 the pass took
    0.38 s with chunks of 4096 rows, 0.20 s with 65536 and 0.26 s with 262144, and a Newton pass 0.19,
    0.11 and 0.28 s.

    Examples
    --------
    >>> auto_chunk_size(20, 1), auto_chunk_size(100_001, 1)
    (65536, 256)
    """
    rows = (16 << 20) // max(1, num_params * num_eta * itemsize)
    return int(min(65536, max(256, 1 << max(0, rows.bit_length() - 1))))



# ---------------------------------------------------------------- running the model on rows
class RowPlan(NamedTuple):
    """How to run the model on a subset of the rows of one observed site.

    ``batched[j]`` says whether leaf j of ``(args, kwargs)`` carries one row per observation along its first
    axis (it is sliced); the others are passed whole.  ``prior_ok`` says whether the model with the site
    blocked, run on one row, gives the prior part R(θ) of the potential (so that the MAP can stream).
    """

    treedef: Any
    leaves: tuple
    batched: tuple
    prior_ok: bool

    def rebuild(self, rows: list):
        it = iter(rows)
        leaves = [next(it) if b else leaf for leaf, b in zip(self.leaves, self.batched)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def batched_leaves(self) -> list:
        return [jnp.asarray(leaf) for leaf, b in zip(self.leaves, self.batched) if b]


def row_plan(adapter: ModelAdapter, var_name: str) -> tuple[RowPlan | None, str | None]:
    """A :class:`RowPlan` for ``var_name`` if running the model on sliced arguments reproduces its
    rows (checked at two θ on four rows together and one at a time), else ``(None, reason)``."""
    site = adapter.observed[var_name]
    if len(site.obs_shape) != 1:
        return None, f"the site's observations have shape {site.obs_shape}; row slicing needs one plate dim"
    n = site.obs_shape[0]
    if n < 2:
        return None, "the site has a single observation"
    leaves, treedef = jax.tree_util.tree_flatten((adapter.args, adapter.kwargs))
    batched = tuple(bool(np.ndim(x) >= 1 and np.shape(x)[0] == n) for x in leaves)
    if not any(batched):
        return None, f"no model argument has the site's {n} observations along its first axis"
    plan = RowPlan(treedef, tuple(leaves), batched, False)
    idx = np.unique(np.array([0, 1, n // 2, n - 1]))
    rows = [x[idx] for x in plan.batched_leaves()]
    theta0 = adapter.init_theta
    thetas = [theta0, theta0 + 0.1 * jax.random.normal(jax.random.PRNGKey(3), theta0.shape, theta0.dtype)]
    tol = 1e-8 if theta0.dtype == jnp.float64 else 1e-4

    def check(ad, theta, rows):
        full_eta = ad.eta(theta, var_name)[idx]
        full_ll = ad.log_lik(theta, var_name)[idx]
        tr = rows_site(ad, plan, var_name, theta, rows)
        eta = site.predictor.params(tr["fn"], (len(idx),))[0]
        ll = ad._site_log_lik(tr, len(idx))

        def single(row):  # the engine also runs the model on one row at a time (vmapped)
            tr1 = rows_site(ad, plan, var_name, theta, [x[None] for x in row])
            return site.predictor.params(tr1["fn"], (1,))[0][0]

        return full_eta, eta, full_ll, ll, jax.vmap(single)(rows)

    check = adapter.jit(check)
    try:
        for th in thetas:
            fe, e, fl, ll, e1 = check(th, rows)
            same = [a.shape == b.shape and bool(jnp.allclose(a, b, rtol=tol, atol=tol))
                    for a, b in ((fe, e), (fe, e1), (fl, ll))]
            if not all(same):
                return None, ("running the model on a subset of rows (its arguments with "
                              f"{n} rows sliced) does not reproduce those rows' predictor and log-likelihood")
    except Exception as err:  # noqa: BLE001 - any failure means the model cannot run on row subsets
        return None, f"running the model on a subset of rows failed ({type(err).__name__}: {err})"
    # R(θ) = U(θ) + Σ_i log p(y_i|θ), from the model with the site blocked, run on one row
    try:
        prior = jax.jit(lambda t: prior_potential(adapter, plan, var_name, t))
        full = adapter.jit(lambda ad, t: ad.potential(t) + jnp.sum(ad.log_lik(t, var_name)))
        ok = True
        for th in thetas:  # each full-data evaluation is a pass over all N rows: once per θ
            ref = full(th)
            ok = ok and bool(jnp.abs(prior(th) - ref) <= tol * (1.0 + jnp.abs(ref)))
    except Exception:  # noqa: BLE001
        ok = False
    return plan._replace(prior_ok=ok), None


def rows_site(adapter: ModelAdapter, plan: RowPlan, var_name: str, theta, rows: list) -> dict:
    """The site's trace entry when the model runs at ``theta`` on the given rows."""
    args, kwargs = plan.rebuild(rows)
    return adapter.trace_with(theta, args, kwargs)[var_name]


def prior_potential(adapter: ModelAdapter, plan: RowPlan, var_name: str, theta):
    """R(θ): the potential with the site's likelihood removed (model on its first row, site blocked)."""
    args, kwargs = plan.rebuild([x[:1] for x in plan.batched_leaves()])
    blocked = handlers.block(adapter.model, hide=[var_name])
    return potential_energy(blocked, args, kwargs, adapter.unravel(theta))


# ---------------------------------------------------------------- layout over chunks and devices
class Layout(NamedTuple):
    """``num`` rows padded to ``num_chunks × chunk`` and sharded along each chunk's rows over ``mesh``; the
    chunks are balanced (at most ``chunk_size`` rows each, as many as that needs, as even as the devices
    allow), so that the last chunk wastes little work on padding."""

    num: int
    chunk: int
    num_chunks: int
    mesh: Mesh

    @classmethod
    def build(cls, num: int, chunk_size: int, devices=None) -> Layout:
        chunk_size = check_chunk_size(chunk_size)
        if chunk_size is None:
            raise MPEError("chunk_size must be a positive integer, got None")
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise MPEError("devices= is empty")
        nd = len(devices)
        chunk = min(int(chunk_size), num)
        chunk = math.ceil(num / math.ceil(num / chunk))  # balanced: the padding is less than one row a chunk
        chunk = nd * math.ceil(chunk / nd)  # every device gets the same number of rows
        return cls(num, chunk, math.ceil(num / chunk), Mesh(np.array(devices), ("obs",)))

    @property
    def padded(self) -> int:
        return self.chunk * self.num_chunks

    def place(self, x, pad_value=None) -> list:
        """``(num, ...)`` → ``num_chunks`` arrays ``(chunk, ...)``, each sharded along its rows; the last is
        padded with its last row (or ``pad_value``).  One array per chunk: a chunk sliced out of a stacked
        array inside a program is copied first, which costs more than the chunk's maths."""
        sharding = NamedSharding(self.mesh, PS("obs"))
        out = []
        for j in range(self.num_chunks):
            lo, hi = j * self.chunk, min((j + 1) * self.chunk, self.num)
            part = x[lo:hi]
            if hi - lo < self.chunk:
                shape = (self.chunk - (hi - lo),) + part.shape[1:]
                fill = part[-1:] if pad_value is None else jnp.full(shape, pad_value, part.dtype)
                part = jnp.concatenate([jnp.asarray(part), jnp.broadcast_to(fill, shape)])
            out.append(jax.device_put(part, sharding))
        return out

    def unpad(self, parts: list):
        """Per-chunk outputs (pytrees of ``(chunk, ...)`` arrays, one per chunk) → one pytree of
        ``(num, ...)`` arrays."""
        into = self.assembly()
        for j, part in enumerate(parts):
            into.add(j, part)
        return into.result()

    def assembly(self, pool: HostPool | None = None) -> Assembly:
        """An :class:`numpyro_mpe.engine.assembly.Assembly` of per-chunk outputs into ``(num, ...)``
        arrays (on
        CPU in host buffers from ``pool``)."""
        return Assembly(self, pool)


# ---------------------------------------------------------------- the per-chunk maths
class ChunkTerms(NamedTuple):
    """Per-observation pieces of one chunk of c rows: η (c, K_all), ``jac`` (c, K, r), e (c, K),
    Λ (c, K, K), aux, y, w, and for K = 1 optionally the Taylor coefficients a₀ … a₄ of w·log p at η
    (``series``, five (c,) arrays; then ℓ = −a₀, e = −a₁, Λ = −2a₂).

    ``jac[i]`` = J_i T for a P×r matrix T: T = I (the Jacobian of the active components) or T = L⁻ᵀ under a
    posterior with precision S = L Lᵀ (then ``jac[i]`` = B_i = J_i L⁻ᵀ and B_i B_iᵀ = J_i S⁻¹ J_iᵀ).
    ``blocks``: the same columns cut per latent site (ravel order; ``jac`` is their concatenation) where
    the Jacobian was formed that way (P > 256), else ``[jac]``; sums over observations taken per block
    never form ``jac`` (XLA drops what is not used).  ``cov``: V_i = B_i B_iᵀ (c, K, K) under a posterior.
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


def _index(active: np.ndarray):
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


class StreamingSite:
    """The prediction-space MPE of one observed site, streamed over chunks (and devices).

    Parameters
    ----------
    adapter : ModelAdapter
    var_name : str
        An observed site with a predictor.
    chunk_size : int, optional
        Rows per chunk (rounded up to a multiple of the number of devices); default
        :func:`auto_chunk_size`.
    curvature : {"exact", "ggn"}
        Λ_i as it is (exact where η is linear in θ) or projected onto the PSD cone (GGN).
    devices : sequence of jax.Device, optional
        Devices to shard the rows over (default: all of ``jax.devices()``).

    Notes
    -----
    On CPU the per-observation outputs are written into host buffers from ``pool``
    (:class:`numpyro_mpe.engine.assembly.HostPool`): once a result is released its memory serves the next pass
    instead of fresh, page-faulted memory.  The pool keeps at most one pass's outputs (about 57 bytes per
    observation for a K = 1 site) while the engine lives; ``eng.pool.clear()`` hands them back.

    Examples
    --------
    >>> eng = StreamingSite(fit.adapter, "y", chunk_size=4096, curvature="ggn")  # doctest: +SKIP
    >>> outputs = eng.site_mpe(fit.posterior)  # doctest: +SKIP
    """

    def __init__(self, adapter: ModelAdapter, var_name: str, *, chunk_size: int | None = None,
                 curvature: str = "exact", devices=None, progress: bool = True):
        if curvature not in CURVATURES:
            raise MPEError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        site = adapter.observed[var_name]
        if site.predictor is None:
            raise MPEError(f"site '{var_name}' has no predictor ({site.no_predictor_reason})")
        self.adapter, self.name, self.site = adapter, var_name, site
        self.curvature, self.progress = curvature, progress
        self.dtype = adapter.init_theta.dtype
        self.num = site.num_obs
        if chunk_size is None:
            chunk_size = auto_chunk_size(adapter.num_params, site.predictor.num_eta, self.dtype.itemsize)
        self.layout = Layout.build(self.num, chunk_size, devices)
        self.plan, self.no_plan_reason = row_plan(adapter, var_name)
        w = adapter.predictor_mask(var_name)
        self.weights = self.layout.place(np.ones(self.num, self.dtype) if w is None
                                         else np.asarray(w, self.dtype), pad_value=0)
        self.y = self.layout.place(site.flat_value)
        # rows of the per-observation arguments, or (without a plan) the whole-model η, J filled at first use
        self.rows = None if self.plan is None else [self.layout.place(x) for x in self.plan.batched_leaves()]
        self.full = None
        self._active = None
        self._stacked = None
        self._fns: dict = {}
        self.pool = HostPool()  # host buffers of the outputs, reused once a result is released

    # ------------------------------------------------------------ sources of η, J
    @property
    def streams(self) -> bool:
        """Whether the model runs on chunks of rows (no N×P array); otherwise J is held for all N."""
        return self.plan is not None

    def _eta_rows(self, theta, rows):
        tr = rows_site(self.adapter, self.plan, self.name, theta, rows)
        c = rows[0].shape[0]
        return self.site.predictor.params(tr["fn"], (c,))

    def _full_source(self, theta):
        """η, J, aux for every row from the whole model (used when it cannot run on row subsets)."""
        if self.full is None or not bool(jnp.all(self.full[0] == theta)):
            if self.num * self.adapter.num_params > 5e7:
                warnings.warn(
                    f"site '{self.name}': {self.no_plan_reason}; the predictor Jacobian is held for all "
                    f"{self.num} observations ({self.num}x{self.adapter.num_params}); pass the "
                    "per-observation data as model arguments, observations along the first axis, to stream",
                    stacklevel=4)
            eta = self.adapter.jit(lambda ad, t: ad.eta(t, self.name))(theta)
            jac = self.adapter.jit(lambda ad, t: jax.jacfwd(lambda tt: ad.eta(tt, self.name))(t))(theta)
            aux = self.adapter.predictor_aux(theta, self.name)
            placed = {"eta": self.layout.place(eta), "jac": self.layout.place(jac),
                      "aux": {k: self.layout.place(v) for k, v in aux.items()}}
            self.full = (theta, placed)
        return self.full[1]

    def active(self, theta) -> np.ndarray:
        """Predictor components that depend on θ: those that move along two random directions of θ on the
        first chunk (two forward-mode products, ``chunk·K`` memory; a zero by coincidence has probability
        0)."""
        if self._active is None:
            k_all = self.site.predictor.num_eta
            if self.plan is None:
                moved = self._full_source(theta)["jac"][0]
            else:
                rows = [r[0] for r in self.rows]
                dirs = jax.random.normal(jax.random.PRNGKey(13), (2, theta.shape[0]), theta.dtype)
                moved = jax.jit(lambda t, rows, dirs: jax.vmap(
                    lambda d: jax.jvp(lambda tt: self._eta_rows(tt, rows)[0], (t,), (d,))[1])(dirs))(
                        theta, rows, dirs)  # (2, chunk, K_all)
                moved = jnp.moveaxis(moved, 0, -1)
            nz = np.asarray(jnp.any(moved != 0, axis=(0, 2)))
            self._active = np.flatnonzero(nz)
            if self._active.size == 0:
                raise MPEError(f"the predictor of '{self.name}' does not depend on θ ({k_all} components)")
        return self._active

    def _row_fn(self, active, tree=None):
        """θ, one row's arguments ↦ that row's active predictor components (K,), with its whole predictor
        and aux as the auxiliary output (the primal of a forward or backward pass: computed once).  With
        ``tree`` (the latent arrays' treedef), θ is given as the list of unconstrained latent arrays."""
        idx = _index(active)

        def f(t, row):
            if tree is not None:
                t = jax.tree_util.tree_unflatten(tree, t)
            eta, aux = self._eta_rows(t, [x[None] for x in row])
            return eta[0, idx], (eta[0], jax.tree_util.tree_map(lambda a: a[0], aux))
        return f

    def _terms(self, theta, data, active, post=None):
        """η, aux, the blocks of J_i T (see :class:`ChunkTerms`) of one chunk ``data`` and, under a
        posterior, V_i = J_i S⁻¹ J_iᵀ (else ``None``); traceable.

        P ≤ 256: forward mode along the columns of T, vmapped over rows outside the tangents, so the
        products come out row-major (c, K, P) — vmapping the tangents over the whole chunk instead gives a
        tangent-major array that XLA on CPU reduces ~15× slower.  P > 256: reverse mode per row, one block
        of J_i per latent site (:meth:`_site_jacobians`); under a diagonal or low-rank posterior B_i and V_i
        are formed per block (``post.whiten_blocks``), so that the flat (c, K, P) array is formed only
        where it is used (the shifts).
        """
        p = theta.shape[0]
        if self.plan is None:
            eta, aux, blocks = data["eta"], data["aux"], [data["jac"][:, active, :]]
        else:
            f = self._row_fn(active)
            if p <= 256:
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

            eta, aux, blocks = self._site_jacobians(theta, data["rows"], active)
        if post is None:
            return eta, aux, blocks, None
        # B_i and V_i by the posterior's structure (per block under a diagonal or low-rank q)
        return (eta, aux) + post.whiten_blocks(blocks, self._split if len(blocks) > 1 else lambda x: [x])

    def _split(self, x) -> list:
        """A θ-sized leading axis cut into the latent sites' blocks (ravel order, as in
        :meth:`_site_jacobians`)."""
        return [x[s.start:s.stop] for s in self.adapter.latent]

    def _site_jacobians(self, theta, rows, active):
        """η, aux and the blocks of J_i = ∂η_i/∂θ per latent array, in ravel order, by reverse mode per row.

        An array that enters through one product with the row's input (a dense layer's weights; found in
        the predictor's jaxpr, :func:`numpyro_mpe.model.rankone.product_plan`) comes as a
        :class:`~numpyro_mpe.model.rankone.RankOneBlock` a_i ⊗ g_i, g_i the derivative at a zero probe
        added to
        that product; the others as (c, K, size) arrays.  One reverse pass per row gives both.
        Differentiating with respect to the arrays, not the flat θ, spares XLA the concatenation of every
        row's cotangents (95 ms of a 430 ms chunk of a P = 10⁵ MLP)."""
        leaves, tree = jax.tree_util.tree_flatten(self.adapter.unravel(theta))
        f = self._row_fn(active, tree)
        try:
            plan = rankone.product_plan(f, [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
                                        [jax.ShapeDtypeStruct(r.shape[1:], r.dtype) for r in rows])
        except Exception:  # noqa: BLE001 - a jaxpr the search cannot walk: every block dense, as below
            plan = None
        if plan is None or not plan.weights:  # every block dense: reverse mode through the model itself
            def dense_row(row):
                jac, (eta, aux) = jax.jacrev(f, has_aux=True)(leaves, row)
                return eta, aux, jac

            eta, aux, jac = jax.vmap(dense_row)(rows)
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

        eta, aux, d_probe, d_other, inputs = jax.vmap(one)(rows)
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

    def chunk_data(self, theta, j) -> dict:
        """The stored arrays of chunk ``j`` (rows or the full-model η, J), with y and weights."""
        d = {"y": self.y[j], "w": self.weights[j]}
        if self.plan is None:
            src = self._full_source(theta)
            d.update(eta=src["eta"][j], jac=src["jac"][j], aux={k: v[j] for k, v in src["aux"].items()})
        else:
            d["rows"] = [r[j] for r in self.rows]
        return d

    def _derivs_fn(self, active):
        from numpyro_mpe.engine.mpe import predictor_derivs

        derivs = predictor_derivs(self.site.predictor.log_lik, active)
        if self.curvature != "ggn":
            return jax.vmap(derivs)

        def ggn(eta_all, y, aux, wi):
            val, g, h = derivs(eta_all, y, aux, wi)
            return val, g, psd_project(h)

        return jax.vmap(ggn)

    def terms(self, theta, data, active, post=None, series: bool = False) -> tuple[ChunkTerms, jax.Array]:
        """:class:`ChunkTerms` of one chunk and w_i ℓ_i of each row (traceable).  ``series`` (K = 1): ℓ, e
        and Λ from the Taylor coefficients of w·log p (:func:`numpyro_mpe.engine.quadrature.log_lik_series`),
        which the expansion tier of the integrals needs anyway, instead of a separate differentiation."""
        eta, aux, blocks, cov = self._terms(theta, data, active, post)
        jac = rankone.join(blocks)  # dropped where unused
        coeffs = None
        if series:
            coeffs = log_lik_series(self.site.predictor.log_lik, int(active[0]), eta, data["y"], aux,
                                    data["w"], TAYLOR_ORDER)
            val, e, lam = -coeffs[0], -coeffs[1][:, None], -2.0 * coeffs[2][:, None, None]
            if self.curvature == "ggn":
                lam = jnp.clip(lam, 0.0, None)
        else:
            val, e, lam = self._derivs_fn(active)(eta, data["y"], aux, data["w"])
        val = jnp.where(data["w"] != 0, val, 0.0)
        return ChunkTerms(eta, jac, e, lam, aux, data["y"], data["w"], coeffs, blocks, cov), val

    def _per_device(self, x):
        """Rows ``(c, ...)`` → ``(devices, c / devices, ...)``, each device's rows on its own device."""
        nd = self.layout.mesh.size
        x = jnp.reshape(x, (nd, -1) + x.shape[1:])
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.layout.mesh, PS("obs")))

    # ------------------------------------------------------------ passes
    def map(self, fn, desc: str | None = None, into: Any = None):
        """``[fn(j) for j in chunks]``, waiting for each chunk's result (and, with ``into``, handing it to
        ``into.add``) before the next is dispatched; with ``into``, ``into.result()`` is returned.

        Asynchronous dispatch of many large programs at once can leave the XLA CPU runtime stuck
        (jax-ml/jax#25861; seen three times on a 2-core machine, in benchmark and test runs), and so did
        copying one chunk's result to the host while the next chunk ran (once, in the test suite); one chunk
        in flight and nothing else costs nothing measurable at these chunk sizes.  A chunk program
        that never finished even alone was a different cause, inside the program: two batched LAPACK
        calls waiting for each other on XLA's CPU pool (:mod:`numpyro_mpe.engine.rowlinalg`); the per-row
        algebra no longer forms them.
        """
        idx = range(self.layout.num_chunks) if desc is None else self.chunk_indices(desc)
        outs = []
        for j in idx:
            out = jax.block_until_ready(fn(j))
            if into is None:
                outs.append(out)
            else:
                into.add(j, out)
        return outs if into is None else into.result()

    def chunk_indices(self, desc: str):
        n = self.layout.num_chunks
        bar = tqdm(range(n), desc=desc, disable=not self.progress or n < 2, leave=False)
        return bar

    def reduce(self, theta, kind: str, structure: str = "full", probe=None):
        """Σ over observations at ``theta``: value Σ w ℓ, gradient Σ J ᵀ e and the curvature
        Σ JᵀΛJ — ``"full"`` (P×P), ``"diag"`` (P) or ``"matvec"`` (P×r, times ``probe``).

        ``kind="value"`` returns the value only.
        """
        active = self.active(theta)
        key = ("reduce", kind, structure, tuple(active.tolist()), probe is None)
        if key not in self._fns:
            def fn(t, data, probe):
                # sums per device (no collective inside the pass); the devices are summed once at the end
                tm, val = self.terms(t, data, active)
                val = jnp.sum(self._per_device(val), axis=1)
                if kind == "value":
                    return val
                e, lam = self._per_device(tm.e), self._per_device(tm.lam)
                if structure == "full":  # P×P: from the whole Jacobian
                    jac = self._per_device(tm.jac)
                    lam_jac = jnp.sum(lam[..., None] * jac[:, :, None, :, :], axis=3)  # Λ_i J_i, (d, c, K, P)
                    return val, jnp.einsum("dckp,dck->dp", jac, e), jnp.einsum("dckp,dckq->dpq", jac, lam_jac)
                # per block of columns (per latent site where J was formed so): no (c, K, P) array
                blocks = [b.map_rows(self._per_device) if isinstance(b, rankone.RankOneBlock)
                          else self._per_device(b) for b in tm.blocks]
                sizes = [rankone.block_size(b) for b in blocks]
                ends = np.cumsum(sizes)
                starts = ends - sizes

                def sums(blocks, e, lam):  # one device's rows
                    grad = jnp.concatenate([rankone.block_gradient(b, e) for b in blocks])
                    if structure == "diag":  # Σ_i diag(J_iᵀ Λ_i J_i)
                        return grad, jnp.concatenate([rankone.block_curvature_diag(b, lam) for b in blocks])
                    # Σ_i J_iᵀ Λ_i J_i M for M = probe (P, r): a projection, then a transposed product
                    jac_probe = sum(rankone.block_project(b, probe[lo:hi])
                                    for b, lo, hi in zip(blocks, starts, ends))
                    lam_probe = jnp.einsum("ckl,clr->ckr", lam, jac_probe)
                    return grad, jnp.concatenate([rankone.block_gradient(b, lam_probe) for b in blocks])

                grad, curv = jax.vmap(sums)(blocks, e, lam)
                return val, grad, curv
            self._fns[key] = jax.jit(fn)
        fn = self._fns[key]
        outs = self.map(lambda j: fn(theta, self.chunk_data(theta, j), probe))

        def total(*parts):  # per chunk and per device partial sums, added on the host
            return jnp.asarray(np.sum([np.sum(np.asarray(x), axis=0) for x in parts], axis=0))

        return jax.tree_util.tree_map(total, *outs)

    def memories(self, theta):
        """Factored memories (J_i, Λ_i, e_i) of every observation (N×K×P: for moderate N only)."""
        from numpyro_mpe.engine.mpe import Memories

        active = self.active(theta)
        key = ("memories", tuple(active.tolist()))
        if key not in self._fns:
            def fn(t, data):
                tm, _ = self.terms(t, data, active)
                return tm.jac, tm.lam, tm.e
            self._fns[key] = jax.jit(fn)
        jac, lam, e = self.map(lambda j: self._fns[key](theta, self.chunk_data(theta, j)), None,
                               self.layout.assembly(self.pool))
        return Memories(jnp.einsum("nkp,nk->np", jac, e), jac=jac, lam=lam, resid=e)

    def _expectation(self, rules, tol, mean, cov, tm: ChunkTerms, active):
        """log E p(y_i | η_i), η_i ~ N(mean_i, cov_i) (or tuples of integrals sharing one rule), for the rows
        of one chunk; each device picks its own rule
        (:func:`numpyro_mpe.engine.quadrature.expected_log_lik_block`,
        with the Taylor tier when ``tm`` carries the coefficients) on its own rows, no collective."""
        f = self.site.predictor.log_lik

        def block(mean, cov, eta, y, aux, w, e, lam, *series):  # mean, cov: one integral or a tuple
            vals, pts = expected_log_lik_block(f, mean, cov, eta, active, y, aux, w, e, lam,
                                               tol=tol, rules=rules, series=series[0] if series else None)
            return vals, jnp.reshape(pts, (1,))

        spec = PS("obs")
        fn = shard_map(block, mesh=self.layout.mesh, in_specs=spec, out_specs=(spec, spec))
        extra = () if tm.series is None else (tm.series,)
        return fn(mean, cov, tm.eta, tm.y, tm.aux, tm.w, tm.e, tm.lam, *extra)

    def _cavities(self, t, data, post, active, series: bool = False):
        """:class:`ChunkTerms` of one chunk under ``post`` (``jac`` = B_i) and the cavities of its rows
        (:func:`numpyro_mpe.engine.mpe.cavity_k` with V_i = B_i B_iᵀ)."""
        from numpyro_mpe.engine.mpe import cavity_k

        tm, _ = self.terms(t, data, active, post, series)  # tm.cov: V_i = B_i B_iᵀ = J_i S⁻¹ J_iᵀ
        return tm, jax.vmap(lambda e, lam, v: cavity_k(e, lam, v=v))(tm.e, tm.lam, tm.cov)

    @staticmethod
    def _shift_rows(post, b, w):
        """Δm_i = L⁻ᵀ B_iᵀ w_i = S⁻¹ J_iᵀ w_i as rows (c, P)."""
        bw = jnp.sum(b * w[:, :, None], axis=1)  # B_iᵀ w_i
        p = bw.shape[-1]
        if p <= 256:
            return bw @ post.unwhiten(jnp.eye(p, dtype=bw.dtype)).T
        return post.unwhiten(bw.T).T

    def map_shifts(self, post, fn, desc: str = "shifts"):
        """``fn`` applied to the MPE shifts Δm_i = S⁻¹J_iᵀw_i of every observation, chunk by chunk: the
        N×P shifts are never held at once, only ``fn``'s outputs (``fn``: rows (c, P) → (c, ...),
        traceable).

        Examples
        --------
        >>> norms = eng.map_shifts(fit.posterior, lambda d: jnp.linalg.norm(d, axis=1))  # doctest: +SKIP
        """
        theta = post.mean
        active = self.active(theta)

        def chunk_fn(t, data, post):
            tm, out = self._cavities(t, data, post, active)
            return fn(self._shift_rows(post, tm.jac, out["w"]))

        jfn = jax.jit(chunk_fn)
        into = self.layout.assembly(self.pool)
        return self.map(lambda j: jfn(theta, self.chunk_data(theta, j), post), desc, into)

    def site_mpe(self, post, *, num_samples: int = 2000, rng_key=None, keep_shift: bool | None = None,
                 quadrature_tol: float | None = None):
        """All per-observation MPE outputs (:class:`numpyro_mpe.engine.mpe.SiteMPE`) under ``post``.

        Per chunk: B_i = J_i L⁻ᵀ by forward mode along the columns of L⁻ᵀ (or reverse mode per row for
        P > 256), V_i = B_i B_iᵀ, the cavity in K dimensions (:func:`numpyro_mpe.engine.mpe.cavity_k`), then
        ``lpd`` and ``elpd_loo`` in η: for K = 1 by the expansion in the Taylor coefficients of log p at η̂
        where it is within ``quadrature_tol`` of the full Gauss–Hermite rule, else (and for K ≤ 3) by
        Gauss–Hermite with the fewest points within ``quadrature_tol`` of the full rule (see
        :func:`numpyro_mpe.engine.quadrature.expected_log_lik_block`), or Monte Carlo with
        ``num_samples`` common
        draws (K > 3).

        ``keep_shift``: also return Δm_i = L⁻ᵀB_iᵀw_i = S⁻¹J_iᵀw_i for every observation (N×P); by default
        only when N·P ≤ 10⁷ (:meth:`map_shifts` streams them otherwise).  ``quadrature_tol``: default
        1e-11 (float64) or 1e-5 (float32); 0 always uses the full rule.
        """
        from numpyro_mpe.engine.mpe import SiteMPE

        theta = post.mean
        active = self.active(theta)
        k = len(active)
        p = theta.shape[0]
        if keep_shift is None:
            keep_shift = self.num * p <= KEEP_SHIFT_LIMIT
        tol = default_tol(self.dtype) if quadrature_tol is None else float(quadrature_tol)
        if k in GAUSS_HERMITE_TIERS:
            rules = tuple(gauss_hermite(k, n, self.dtype) for n in GAUSS_HERMITE_TIERS[k])
        else:
            rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
            rules = (monte_carlo(k, num_samples, rng_key, self.dtype),)
        act = _index(active)
        series = k == 1 and rules[0].kind == "gauss-hermite" and tol > 0

        def fn(t, data, post):
            tm, out = self._cavities(t, data, post, active, series)
            eta_a = tm.eta[:, act]  # both integrals share the probed rows and the rule
            (lpd, elpd), pts = self._expectation(rules, tol, (eta_a, eta_a + out["dEta"]),
                                                 (out["v"], out["v_cav"]), tm, active)
            elpd = jnp.where(out["valid"], elpd, jnp.nan)
            res = {"lpd": lpd, "elpd_loo": elpd, "p_loo": lpd - elpd, "leverage": out["leverage"],
                   "valid": out["valid"], "sensitivity": out["sensitivity"],  # NaN where invalid (cavity_k)
                   "dEta": out["dEta"], "v": out["v"]}
            if keep_shift:
                res["shift"] = self._shift_rows(post, tm.jac, out["w"])
            return res, pts

        key = ("mpe", tuple(active.tolist()), keep_shift, tuple(r.nodes.shape for r in rules), tol,
               type(post).__name__)
        if key not in self._fns:
            self._fns[key] = jax.jit(fn)
        jfn = self._fns[key]
        rows, tiers = self.layout.assembly(self.pool), []

        class Into:  # the rows of every output assembled; the rule each device used, per chunk
            def add(self, j, out):
                rows.add(j, out[0])
                tiers.append(np.asarray(out[1]))

            def result(self):
                return rows.result()

        res = self.map(lambda j: jfn(theta, self.chunk_data(theta, j), post), f"MPE {self.name}", Into())
        labels = tuple(self.site.predictor.labels[i] for i in active)
        if rules[0].kind == "monte-carlo":
            method = f"monte-carlo in predictor space (K={k}, {num_samples} common draws)"
        else:
            pts = np.concatenate(tiers)
            full = GAUSS_HERMITE_TIERS[k][-1]
            within = f", within {tol:g} of {full} points" if tol > 0 else ""
            if pts.max() == 0:
                method = (f"taylor expansion in predictor space (K={k}, order {TAYLOR_ORDER}, within {tol:g} "
                          f"of {full}-point gauss-hermite)")
            else:
                lo = "taylor expansion" if pts.min() == 0 else f"{pts.min()}"
                used = lo if pts.min() == pts.max() else f"{lo} to {pts.max()}"
                method = f"gauss-hermite in predictor space (K={k}, {used} points per dimension{within})"
        return SiteMPE.from_outputs(self.name, res, labels, method, self.num)

    def is_linear(self, theta) -> bool:
        """Whether the active components of η are linear in θ: ∇²(Σ_ik c_ik η_ik)·v = 0 for random c, v
        on the first chunk (zero for every c, v only if each ∇²η_ik vanishes, but for a null set)."""
        if self.plan is None:
            from numpyro_mpe.engine.mpe import predictor_is_linear

            return predictor_is_linear(self.adapter, theta, self.name, self.active(theta))
        active = self.active(theta)
        rows = self.chunk_data(theta, 0)["rows"]
        k1, k2 = jax.random.split(jax.random.PRNGKey(7))
        c = jax.random.normal(k1, (rows[0].shape[0], len(active)), theta.dtype)
        v = jax.random.normal(k2, (2, theta.shape[0]), theta.dtype)

        def weighted(t):
            return jnp.sum(self._eta_rows(t, rows)[0][:, active] * c)

        @jax.jit
        def probe(t):
            g = jax.grad(weighted)(t)
            hv = jax.vmap(lambda d: jax.jvp(jax.grad(weighted), (t,), (d,))[1])(v)
            return g, hv

        g, hv = probe(theta)
        eps = 1e-9 if theta.dtype == jnp.float64 else 1e-3
        tol = eps * (1.0 + jnp.max(jnp.abs(g))) * (1.0 + jnp.max(jnp.abs(theta)))
        tol = tol * (1.0 + jnp.max(jnp.abs(v)))
        return bool(jnp.all(jnp.isfinite(hv)) & (jnp.max(jnp.abs(hv)) <= tol))

    def total_loss_fn(self):
        """θ ↦ Σ_i w_i ℓ_i(θ) over every chunk inside one program (``lax.map`` over the chunk axis, each
        chunk rematerialized in the backward pass), for optimizers that need a traceable objective."""
        if self.plan is None:
            raise MPEError(f"site '{self.name}': {self.no_plan_reason}")
        f = self.site.predictor.log_lik

        @jax.checkpoint
        def chunk_loss(t, data):
            eta, aux = self._eta_rows(t, data["rows"])
            ll = f(eta, data["y"], aux)
            return -jnp.sum(jnp.where(data["w"] != 0, ll * data["w"], 0.0))

        if self._stacked is None:  # lax.map needs the chunks stacked: a second copy of the rows
            self._stacked = {"rows": [jnp.stack(r) for r in self.rows], "y": jnp.stack(self.y),
                             "w": jnp.stack(self.weights)}
        data = self._stacked

        def total(t):
            return jnp.sum(jax.lax.map(lambda d: chunk_loss(t, d), data))

        return total
