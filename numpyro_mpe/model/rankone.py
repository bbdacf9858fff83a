"""Rank-one Jacobian blocks of latent arrays that enter the predictor through one dot product.

A latent array W used once, in a product z = a·W that contracts all of the row's input a (its other
dimensions of size 1), has the per-observation Jacobian

    ∂η_k / ∂W_cf = a_c g_kf,        g_k = ∂η_k / ∂z,

an outer product of the layer's input and the derivative at its output.  Sums over W's entries then need
no (K, |W|) array per observation (R, M: weights or directions laid out as the C×F matrix W):

    Σ_cf J_kcf J_lcf R_cf = Σ_f [(a∘a) R]_f g_kf g_lf      (a weighted norm: V_i under a diagonal q)
    Σ_cf J_kcf M_cf       = aᵀ M g_k                        (a projection: the low-rank part of V_i)
    Σ_i J_iᵀ e_i          = Σ_i a_i (Σ_k e_ik g_ik)ᵀ        (the gradient, one matrix product)
    Σ_i Σ_kl Λ_ikl J_ikcf J_ilcf = Σ_i a_ic² Σ_kl Λ_ikl g_ikf g_ilf   (the diagonal curvature)

the identities behind "ghost norms" in per-example gradient clipping.  For a dense layer each costs one
matrix product of the size of the layer's forward pass, where the per-row Jacobian costs |W| per row.

:func:`product_plan` finds such arrays in the jaxpr of the per-row predictor (calls inlined, dead code
ignored); :func:`evaluate` runs that jaxpr with a zero probe added at each of their products, so that one
reverse pass gives g (the derivative at the probes) together with the dense Jacobian of the other arrays.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> def f(leaves, row):  # one row's predictor; leaves: the latent arrays W, b
...     w, b = leaves
...     return jnp.tanh(row[0][None] @ w + b)[0] @ jnp.ones(3), ()
>>> leaves = [jnp.ones((2, 3)), jnp.zeros(3)]
>>> plan = product_plan(f, leaves, [jnp.ones(2)])
>>> sorted(plan.weights), plan.weights[0].num_in, plan.weights[0].num_out
([0], 2, 3)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Literal

#: call primitives (with a ``jaxpr`` parameter) whose body is inlined before the jaxpr is searched: a
#: product inside a jitted helper (``jnp.einsum`` included) still counts
_CALLS = ("jit", "pjit")


class ProductWeight(NamedTuple):
    """Where a latent array (its key in :attr:`ProductPlan.weights`) enters: the ``eqn``-th equation (a
    ``dot_general``), as operand ``pos``; ``input_perm`` orders the other operand's axes as (contracted,
    paired with W's; the rest, of size 1), ``perm`` orders W's axes as (contracted; free)."""

    eqn: int
    pos: int
    input_perm: tuple
    perm: tuple
    shape: tuple
    num_in: int
    num_out: int


class ProductPlan(NamedTuple):
    """The per-row predictor's jaxpr (calls inlined), which equations are live, and the latent arrays
    that enter through one product (by leaf index)."""

    jaxpr: Any
    consts: list
    live: tuple
    weights: dict
    out_tree: Any


@jax.tree_util.register_pytree_node_class
class RankOneBlock:
    """The rows' Jacobian of one latent array as outer products: J_i = a_i ⊗ g_i, ``a`` (c, C),
    ``g`` (c, K, F), entries laid out as W transposed by ``perm`` to (C, F); :meth:`dense` gives the
    (c, K, |W|) block in W's ravel order."""

    def __init__(self, a, g, shape: tuple, perm: tuple):
        self.a, self.g, self.shape, self.perm = a, g, tuple(shape), tuple(perm)

    def tree_flatten(self):
        return (self.a, self.g), (self.shape, self.perm)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=int))

    def map_rows(self, fn) -> RankOneBlock:
        """The same block with ``fn`` applied to the row axis of ``a`` and ``g`` (e.g. a split per device)."""
        return RankOneBlock(fn(self.a), fn(self.g), self.shape, self.perm)

    def as_matrix(self, x):
        """A W-sized leading axis of ``x`` (|W|, ...) as (C, F, ...)."""
        rest = x.shape[1:]
        y = jnp.reshape(x, self.shape + rest)
        y = jnp.transpose(y, self.perm + tuple(range(len(self.shape), y.ndim)))
        return jnp.reshape(y, (self.a.shape[-1], self.g.shape[-1]) + rest)

    def from_matrix(self, m):
        """(..., C, F) back to (..., |W|) in W's ravel order."""
        lead = m.shape[:-2]
        permuted = tuple(self.shape[p] for p in self.perm)
        y = jnp.reshape(m, lead + permuted)
        inv = np.argsort(self.perm)
        y = jnp.transpose(y, tuple(range(len(lead))) + tuple(len(lead) + int(i) for i in inv))
        return jnp.reshape(y, lead + (self.size,))

    def dense(self):
        """J_i, (c, K, |W|)."""
        return self.from_matrix(self.a[:, None, :, None] * self.g[:, :, None, :])

    def quadratic_form(self, r):
        """J_i diag(r) J_iᵀ, (c, K, K), for weights ``r`` (|W|,)."""
        s = (self.a * self.a) @ self.as_matrix(r)  # (c, F)
        return jnp.einsum("cf,ckf,clf->ckl", s, self.g, self.g)

    def project(self, m):
        """J_i M, (c, K, q), for ``m`` (|W|, q)."""
        mm = self.as_matrix(m)  # (C, F, q)
        am = jnp.reshape(self.a @ jnp.reshape(mm, (mm.shape[0], -1)), (self.a.shape[0],) + mm.shape[1:])
        return jnp.einsum("cfq,ckf->ckq", am, self.g)

    def gradient(self, e):
        """Σ_i J_iᵀ e_i, (|W|,), for ``e`` (c, K); (|W|, q) for ``e`` (c, K, q)."""
        if e.ndim == 2:
            return self.from_matrix(self.a.T @ jnp.einsum("ck,ckf->cf", e, self.g))
        m = jnp.einsum("ckq,ckf->cqf", e, self.g)
        out = jnp.reshape(self.a.T @ jnp.reshape(m, (m.shape[0], -1)), (self.a.shape[-1],) + m.shape[1:])
        return self.from_matrix(jnp.moveaxis(out, 1, 0)).T  # (C, q, F) → (q, |W|) → (|W|, q)

    def curvature_diag(self, lam):
        """Σ_i diag(J_iᵀ Λ_i J_i), (|W|,), for ``lam`` (c, K, K)."""
        m = jnp.einsum("ckl,ckf,clf->cf", lam, self.g, self.g)
        return self.from_matrix((self.a * self.a).T @ m)


def dense(block):
    """A Jacobian block as a (c, K, n) array (rank-one blocks expanded)."""
    return block.dense() if isinstance(block, RankOneBlock) else block


def join(blocks: list):
    """Column blocks (c, K, n_b), rank-one ones expanded, joined into one (c, K, Σ n_b) array."""
    return jnp.concatenate([dense(b) for b in blocks], axis=-1)


def block_size(block) -> int:
    """The number of columns (latent entries) of a Jacobian block."""
    return block.size if isinstance(block, RankOneBlock) else int(block.shape[-1])


def block_project(block, m):
    """J_i M per row, (c, K, q), for a Jacobian block (c, K, n) or :class:`RankOneBlock` and M (n, q)."""
    return block.project(m) if isinstance(block, RankOneBlock) else jnp.einsum("ckn,nq->ckq", block, m)


def block_gradient(block, e):
    """Σ_i J_iᵀ e_i over the rows: (n,) for ``e`` (c, K), (n, q) for ``e`` (c, K, q)."""
    if isinstance(block, RankOneBlock):
        return block.gradient(e)
    return jnp.einsum("ckn,ck->n", block, e) if e.ndim == 2 else jnp.einsum("ckn,ckq->nq", block, e)


def block_curvature_diag(block, lam):
    """Σ_i diag(J_iᵀ Λ_i J_i), (n,): for a dense block as products of rows weighted over i (one
    matrix-vector product per (k, l); as a reduction over the rows XLA on CPU took ~50× longer)."""
    if isinstance(block, RankOneBlock):
        return block.curvature_diag(lam)
    k = lam.shape[-1]
    return sum((block[:, a, :] * block[:, b, :]).T @ lam[:, a, b] for a in range(k) for b in range(k))


def _live(jaxpr) -> tuple:
    """Which equations contribute to the outputs."""
    needed = {v for v in jaxpr.outvars if not isinstance(v, Literal)}
    live = [False] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if any(v in needed for v in eqn.outvars):
            live[i] = True
            needed.update(v for v in eqn.invars if not isinstance(v, Literal))
    return tuple(live)


def _bind(eqn, invals):
    """One equation applied to ``invals`` (as ``jax.core.eval_jaxpr`` does)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _run(jaxpr, consts, args, *, live=None, inline=False, probes=None, pos=None):
    """Evaluate ``jaxpr`` (only the ``live`` equations); ``inline``: evaluate call bodies in place;
    ``pos``: {equation: operand position of its weight}, whose other operand is returned; ``probes``:
    {equation: array added to its output}."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    inputs = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if live is not None and not live[i]:
            continue
        invals = [read(v) for v in eqn.invars]
        body = eqn.params.get("jaxpr")
        if inline and eqn.primitive.name in _CALLS and isinstance(body, ClosedJaxpr):
            outs, _ = _run(body.jaxpr, body.consts, invals, inline=True)
        else:
            outs = _bind(eqn, invals)
        if pos is not None and i in pos:
            inputs[i] = invals[1 - pos[i]]
            if i in probes:
                outs = [outs[0] + probes[i]]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars], inputs


def product_plan(fn, leaves: list, row: list) -> ProductPlan:
    """Trace ``fn(leaves, row)`` (one row's predictor and its auxiliary outputs) and find the latent
    arrays (``leaves``) used exactly once, as an operand of a ``dot_general`` without batch dimensions
    whose other operand has size 1 outside the contracted axes (see the module docstring).

    ``leaves`` and ``row`` may be arrays or ``jax.ShapeDtypeStruct``.
    """
    closed, shapes = jax.make_jaxpr(fn, return_shape=True)(leaves, row)
    flat_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]

    def inlined(*args):
        return _run(closed.jaxpr, closed.consts, args, inline=True)[0]

    closed = jax.make_jaxpr(inlined)(*flat_avals)
    jaxpr = closed.jaxpr
    live = _live(jaxpr)
    uses: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if live[i]:
            for v in eqn.invars:
                if not isinstance(v, Literal):
                    uses[v] = uses.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses[v] = uses.get(v, 0) + 1
    leaf_of = {v: j for j, v in enumerate(jaxpr.invars[:len(leaves)])}
    weights = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if not live[i] or eqn.primitive.name != "dot_general":
            continue
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            continue
        for pos in (0, 1):
            w, other = eqn.invars[pos], eqn.invars[1 - pos]
            if isinstance(w, Literal) or w not in leaf_of or uses.get(w) != 1:
                continue
            if not jnp.issubdtype(w.aval.dtype, jnp.floating):
                continue
            wc, ac = (tuple(lc), tuple(rc)) if pos == 0 else (tuple(rc), tuple(lc))
            a_free = tuple(d for d in range(len(other.aval.shape)) if d not in ac)
            if int(np.prod([other.aval.shape[d] for d in a_free], dtype=int)) != 1:
                continue
            w_free = tuple(d for d in range(len(w.aval.shape)) if d not in wc)
            shape = tuple(w.aval.shape)
            weights[leaf_of[w]] = ProductWeight(
                i, pos, ac + a_free, wc + w_free, shape,
                int(np.prod([shape[d] for d in wc], dtype=int)),
                int(np.prod([shape[d] for d in w_free], dtype=int)))
    return ProductPlan(jaxpr, list(closed.consts), live, weights, jax.tree_util.tree_structure(shapes))


def evaluate(plan: ProductPlan, leaves: list, row: list, probes: dict):
    """``fn(leaves, row)`` from the plan's jaxpr with ``probes[leaf]`` (:func:`zero_probe`) added to the
    output of that weight's product; returns the outputs (``fn``'s structure) and each weight's input,
    flattened to (C,) in the order of its contracted axes."""
    eqn_probes = {plan.weights[j].eqn: p for j, p in probes.items()}
    pos = {w.eqn: w.pos for w in plan.weights.values()}
    args = jax.tree_util.tree_leaves((leaves, row))
    outs, inputs = _run(plan.jaxpr, plan.consts, args, live=plan.live, probes=eqn_probes, pos=pos)
    flat_inputs = {}
    for j, w in plan.weights.items():
        a = inputs[w.eqn]
        flat_inputs[j] = jnp.reshape(jnp.transpose(a, w.input_perm), (w.num_in,))
    return jax.tree_util.tree_unflatten(plan.out_tree, outs), flat_inputs


def zero_probe(plan: ProductPlan, leaf: int):
    """Zeros of the shape and dtype of the product in which latent array ``leaf`` enters (the probe)."""
    aval = plan.jaxpr.eqns[plan.weights[leaf].eqn].outvars[0].aval
    return jnp.zeros(aval.shape, aval.dtype)
