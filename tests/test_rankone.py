"""Rank-one Jacobian blocks of weights used once in a product (:mod:`numpyro_mpe.model.rankone`).

Independent truths: the per-row Jacobian from ``jax.jacrev`` of the same function, and the engine's dense
per-site path (the same sums from (c, K, |W|) Jacobian blocks) on the same model and data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_mpe.engine import terms
from numpyro_mpe.engine.layout import Layout
from numpyro_mpe.engine.site import PassOptions, predictor_pass
from numpyro_mpe.engine.sums import site_sums
from numpyro_mpe.gaussian import DiagGaussianPosterior, LowRankGaussianPosterior
from numpyro_mpe.model import rankone
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.rows import row_plan

numpyro.enable_x64()
KEY = jax.random.PRNGKey(0)


@jax.jit
def _helper_layer(x, w):  # a product inside a jitted helper: inlined before the search
    return jnp.einsum("d,hd->h", x, w)


def f_right(leaves, row):  # x @ W, W (d, h): contracted on its first axis
    w, v = leaves
    return jnp.tanh(row[0][None] @ w)[0] @ v, ()


def f_left(leaves, row):  # W @ x, W (h, d): contracted on its last axis
    w, v = leaves
    return jnp.tanh(w @ row[0]) @ v, ()


def f_three_axes(leaves, row):  # tensordot with a (d, 2, 3) weight, two outputs (K = 2)
    w, v = leaves
    h = jnp.tanh(jnp.tensordot(row[0], w, axes=1)).reshape(-1)
    return jnp.stack([h @ v, jnp.sum(h**2)]), ()


def f_helper(leaves, row):
    w, v = leaves
    return jnp.sin(_helper_layer(row[0], w)) @ v, ()


def f_relu_scan(leaves, row):  # a custom_jvp activation and a scan after the product
    w, v = leaves
    h = jax.nn.relu(row[0][None] @ w)[0] + 0.1

    def step(carry, x):
        return carry * 0.5 + jnp.sin(x), None

    return jax.lax.scan(step, h, jnp.arange(3.0))[0] @ v, ()


def f_twice(leaves, row):  # W used in two products: not rank one
    w, v = leaves
    return jnp.tanh(row[0] @ w) @ v + jnp.sum(row[0] @ w), ()


def f_transposed(leaves, row):  # x @ W.T: W reaches the product through a transpose
    w, v = leaves
    return jnp.tanh(row[0] @ w.T) @ v, ()


def f_sequence(leaves, row):  # the row's input is a (T, d) matrix: J = Σ_t a_t ⊗ g_t has rank T
    w, v = leaves
    return jnp.sum(jnp.tanh(row[0].reshape(3, -1) @ w) @ v), ()


CASES = {  # name: (fn, leaf shapes, row shape, leaves expected to be rank one)
    "right": (f_right, [(4, 5), (5,)], (4,), {0, 1}),
    "left": (f_left, [(5, 4), (5,)], (4,), {0, 1}),
    "three_axes": (f_three_axes, [(4, 2, 3), (6,)], (4,), {0, 1}),
    "helper": (f_helper, [(5, 4), (5,)], (4,), {0, 1}),
    "relu_scan": (f_relu_scan, [(4, 5), (5,)], (4,), {0, 1}),
    "twice": (f_twice, [(4, 5), (5,)], (4,), {1}),
    "transposed": (f_transposed, [(5, 4), (5,)], (4,), {1}),
    "sequence": (f_sequence, [(2, 5), (5,)], (6,), set()),
}


def _rows_and_leaves(leaf_shapes, row_shape, n=7, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), len(leaf_shapes) + 1)
    leaves = [jax.random.normal(k, s) for k, s in zip(ks[1:], leaf_shapes)]
    rows = [jax.random.normal(ks[0], (n,) + row_shape)]
    return leaves, rows


def _blocks(fn, leaves, rows):
    """The rank-one path as the engine runs it, and the dense per-row Jacobians from jacrev."""
    plan = rankone.product_plan(fn, leaves, [r[0] for r in rows])

    def one(row):
        def g(probes):
            (eta, _), inputs = rankone.evaluate(plan, leaves, row, probes)
            return eta, inputs

        probes = {j: rankone.zero_probe(plan, j) for j in plan.weights}
        d, inputs = jax.jacrev(g, has_aux=True)(probes)
        return d, inputs

    d, inputs = jax.vmap(one)(rows) if plan.weights else ({}, {})
    c = rows[0].shape[0]
    blocks = {}
    for j, w in plan.weights.items():
        k = 1 if d[j].ndim == 1 + rankone.zero_probe(plan, j).ndim else d[j].shape[1]
        blocks[j] = rankone.RankOneBlock(inputs[j], jnp.reshape(d[j], (c, k, w.num_out)), w.shape, w.perm)
    truth = jax.vmap(lambda row: jax.jacrev(lambda lv: jnp.atleast_1d(fn(lv, row)[0]))(leaves))(rows)
    truth = [jnp.reshape(t, t.shape[:2] + (-1,)) for t in truth]
    return plan, blocks, truth


@pytest.mark.parametrize("name", list(CASES))
def test_rank_one_weights_found_and_their_blocks_equal_jacrev(name):
    fn, shapes, row_shape, expect = CASES[name]
    leaves, rows = _rows_and_leaves(shapes, row_shape)
    plan, blocks, truth = _blocks(fn, leaves, rows)
    assert set(plan.weights) == expect
    # the plan's jaxpr computes fn itself
    np.testing.assert_allclose(jax.vmap(lambda r: rankone.evaluate(plan, leaves, r, {})[0][0])(rows),
                               jax.vmap(lambda r: fn(leaves, r)[0])(rows), rtol=1e-13)
    rng = np.random.default_rng(1)
    for j, b in blocks.items():
        jt = truth[j]  # (c, K, |W|)
        np.testing.assert_allclose(b.dense(), jt, rtol=1e-12, atol=1e-14)
        r = jnp.asarray(rng.uniform(0.1, 2.0, jt.shape[-1]))
        m = jnp.asarray(rng.normal(size=(jt.shape[-1], 3)))
        e = jnp.asarray(rng.normal(size=jt.shape[:2]))
        e3 = jnp.asarray(rng.normal(size=jt.shape[:2] + (3,)))
        a = rng.normal(size=jt.shape[:1] + (jt.shape[1],) * 2)
        lam = jnp.asarray(a + np.swapaxes(a, 1, 2))
        np.testing.assert_allclose(b.quadratic_form(r), jnp.einsum("ckp,p,clp->ckl", jt, r, jt), rtol=1e-12)
        np.testing.assert_allclose(b.project(m), jnp.einsum("ckp,pq->ckq", jt, m), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(b.gradient(e), jnp.einsum("ckp,ck->p", jt, e), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(b.gradient(e3), jnp.einsum("ckp,ckq->pq", jt, e3), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(b.curvature_diag(lam), jnp.einsum("ckp,ckl,clp->p", jt, lam, jt),
                                   rtol=1e-12, atol=1e-13)


def tangled(X, y=None, hidden=6):
    """K = 2 (loc, log-scale) from weights in three layouts: x @ W (one axis), an einsum with W on the left
    (a jitted helper), a three-axis tensordot, plus a bias (dense block)."""
    d = X.shape[1]
    w_a = numpyro.sample("w_a", dist.Normal(0, 0.5).expand([d, hidden]).to_event(2))
    w_b = numpyro.sample("w_b", dist.Normal(0, 0.5).expand([hidden, d]).to_event(2))
    w_c = numpyro.sample("w_c", dist.Normal(0, 0.5).expand([d, 2, hidden // 2]).to_event(3))
    bias = numpyro.sample("bias", dist.Normal(0, 1).expand([hidden]).to_event(1))
    v = numpyro.sample("v", dist.Normal(0, 0.5).expand([3 * hidden, 2]).to_event(2))
    h = jnp.concatenate([jnp.tanh(X @ w_a + bias), jnp.sin(jnp.einsum("hd,nd->nh", w_b, X)),
                         jnp.tanh(jnp.tensordot(X, w_c, axes=1)).reshape(X.shape[0], -1)], axis=1)
    out = h @ v
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(out[:, 0], jnp.exp(0.3 * out[:, 1])), obs=y)


def _tangled_data(n=300, d=14, seed=4):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    return X, np.sin(X[:, 0]) + 0.5 * rng.standard_t(4, n)


@pytest.mark.filterwarnings("ignore:.*leverage >= 1")
def test_engine_sums_equal_the_dense_per_site_path(monkeypatch):
    """Gradient, diagonal curvature and curvature times a probe over chunks, and V_i, elpd_loo and leverage
    under a diagonal and a low-rank q: the rank-one path equals the dense (c, K, |W|) blocks (the fallback
    where the jaxpr cannot be searched) to 1e-10, on a model with weights in three layouts, at a random θ
    (both paths compute the same sums at any θ; the MAP is not needed).  The whitened P×P path under a
    diagonal and low-rank q, through rank-one blocks, is checked in ``test_scale.py`` (wide models)."""
    X, y = _tangled_data()
    adapter = ModelAdapter.build(tangled, KEY, (X,), {"y": y})
    assert adapter.num_params > 256  # the per-site reverse-mode path
    theta = 0.5 * jax.random.normal(jax.random.PRNGKey(1), adapter.init_theta.shape)
    probe = jax.random.normal(KEY, (theta.shape[0], 3))

    def sums():
        site = terms.SiteData(adapter, "y", Layout.build(len(y), 128), curvature="ggn", stream=True,
                              plan=row_plan(adapter, "y")[0])
        blocks = jax.eval_shape(lambda t, rows: terms._site_jacobians(adapter, site.rows, t, rows)[2],
                                theta, site.chunk(0, theta)["rows"])
        grad, curv_diag = site_sums(site, theta, "all", "diag")[1:]
        out = {"grad": grad, "diag": curv_diag, "matvec": site_sums(site, theta, "all", "matvec", probe)[2]}
        opts = PassOptions.make(len(site.rows.active), len(y), adapter.num_params, adapter.structure.dtype)
        diag = DiagGaussianPosterior(theta, 4.0 + curv_diag)  # a prior precision of 4 plus the GGN diagonal
        low = LowRankGaussianPosterior.build(theta, 4.0 + curv_diag, probe)
        for tag, post in (("diag", diag), ("lowrank", low)):
            res = predictor_pass(site, post._replace(mean=theta), opts)
            out[tag] = {f: np.asarray(getattr(res, f)) for f in ("prediction_var", "elpd_loo", "leverage")}
        return out, blocks

    fast, blocks = sums()
    assert sum(isinstance(b, rankone.RankOneBlock) for b in blocks) == 4  # w_a, w_b, w_c, v; not bias
    assert np.mean(np.isfinite(fast["lowrank"]["elpd_loo"])) > 0.5  # not a comparison of NaNs
    assert np.ptp(fast["diag"]["prediction_var"]) > 0

    def unwalkable(*args):
        raise NotImplementedError("a jaxpr the search cannot walk")

    monkeypatch.setattr(rankone, "product_plan", unwalkable)  # the engine falls back to dense blocks
    slow, blocks = sums()
    assert not any(isinstance(b, rankone.RankOneBlock) for b in blocks)
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(slow)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
