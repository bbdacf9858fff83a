"""Scale (issue #4): prediction-space (GGN) MPE, structured posteriors, streaming over chunks, sharding.

Independent truths: the dense exact path (forward-over-forward Hessians of each ℓ_i and whitened P×P
cavities: :func:`numpyro_mpe.engine.memories.exact_memories` through
:func:`numpyro_mpe.engine.site.memory_pass`), the full-model damped Newton, and the same computation on one
device in another process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.flatten_util import ravel_pytree
from scipy.stats import spearmanr

import numpyro_mpe as mpe
from numpyro_mpe.engine.memories import exact_memories
from numpyro_mpe.engine.site import PassOptions, memory_pass, predictor_chunk
from numpyro_mpe.engine.terms import chunk_terms
from numpyro_mpe.model.rows import row_plan

KEY = jax.random.PRNGKey(0)
OUTS = ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage", "prediction_shift", "prediction_var", "shift")


def logistic(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)


def poisson(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(X @ b)), obs=y)


def probit(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        p = jax.scipy.stats.norm.cdf(X @ b)
        numpyro.sample("y", dist.Bernoulli(probs=p), obs=y)


def normal_scale(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, 5).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ b, sigma), obs=y)


def data(n=300, p=4, seed=0, kind="bernoulli"):
    rng = np.random.default_rng(seed)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    lin = X @ np.linspace(0.8, -0.5, p)
    if kind == "bernoulli":
        y = (rng.random(n) < 1 / (1 + np.exp(-lin))).astype(float)
    elif kind == "poisson":
        y = rng.poisson(np.exp(0.5 * lin)).astype(float)
    else:
        y = lin + rng.standard_t(3, n)
    return X, y


def site_mpe(fit, post, name, memories):
    """The pass over held memories under ``post`` (P×P whitened cavities for dense memories), the full
    quadrature rule on every row."""
    pred = fit.predictor_state(name)
    opts = PassOptions.make(len(pred.active), fit.adapter.observed[name].num_obs, fit.adapter.num_params,
                            fit.adapter.structure.dtype, tol=0.0)
    return memory_pass(fit.adapter, post, name, memories, pred, opts, chunk_size=4096)


def dense_exact(fit, name="y"):
    """The dense exact path: exact per-observation Hessians, whitened P×P eigendecompositions."""
    return site_mpe(fit, fit.posterior, name, exact_memories(fit.adapter, fit.posterior.mean, name))


def max_err(a, b, fields=OUTS):
    return {f: float(np.nanmax(np.abs(np.asarray(getattr(a, f)) - np.asarray(getattr(b, f)))))
            for f in fields}


# ===================================================================== GGN vs exact
@pytest.mark.parametrize("model,kind", [(logistic, "bernoulli"), (poisson, "poisson")])
def test_ggn_equals_exact_on_canonical_glms(model, kind):
    X, y = data(kind=kind)
    fit = mpe.Laplace(model, curvature="ggn", chunk_size=64, progress=False).run(KEY, X, y=y)
    assert fit.info["streamed"] and fit.site_data("y").rows.source == "rows"
    ref = mpe.Laplace(model, progress=False).run(KEY, X, y=y)
    # same MAP and precision as the full-model damped Newton with the exact Hessian
    np.testing.assert_allclose(fit.posterior.mean, ref.posterior.mean, atol=1e-9)
    np.testing.assert_allclose(fit.posterior.precision, ref.posterior.precision, rtol=1e-9)
    err = max_err(fit.site_mpe("y"), dense_exact(ref))
    print(f"\n  {model.__name__}: GGN vs dense exact, max abs error per output {err}")
    assert max(err.values()) < 1e-8


def test_ggn_close_to_exact_elsewhere():
    """Non-canonical links and an indefinite Λ_i (Normal with unknown σ): GGN is an approximation."""
    figures = {}
    for model, kind in [(probit, "bernoulli"), (normal_scale, "t")]:
        X, y = data(kind=kind, seed=1)
        ggn = mpe.Laplace(model, curvature="ggn", progress=False).run(KEY, X, y=y)
        ex = mpe.Laplace(model, progress=False).run(KEY, X, y=y)
        a, b = ggn.site_mpe("y"), dense_exact(ex)
        d_elpd = np.abs(np.asarray(a.elpd_loo) - np.asarray(b.elpd_loo))
        rho = spearmanr(a.sensitivity, b.sensitivity)[0]
        figures[model.__name__] = dict(max_d_elpd=float(d_elpd.max()), median_d_elpd=float(np.median(d_elpd)),
                                       spearman_sensitivity=float(rho),
                                       spearman_leverage=float(spearmanr(a.leverage, b.leverage)[0]),
                                       total_elpd=(float(a.elpd_loo.sum()), float(b.elpd_loo.sum())))
        assert rho > 0.95 and np.median(d_elpd) < 0.01 and d_elpd.max() < 0.2
        # the GGN really differs from the exact Hessian here (the test is not vacuous)
        assert float(jnp.max(jnp.abs(ggn.posterior.precision - ex.posterior.precision))) > 1e-3
    print(f"\n  GGN vs exact (non-canonical): {json.dumps(figures, indent=1)}")


# ===================================================================== streaming
def test_streaming_same_outputs_for_any_chunk_size():
    X, y = data(n=61)
    fits = [mpe.Laplace(logistic, curvature="ggn", chunk_size=c, progress=False).run(KEY, X, y=y)
            for c in (1, 7, 10_000)]
    ref = fits[-1].site_mpe("y")
    for f in fits[:-1]:
        assert max(max_err(f.site_mpe("y"), ref).values()) < 1e-10
        np.testing.assert_allclose(f.posterior.mean, fits[-1].posterior.mean, atol=1e-10)
    assert fits[0].site_data("y").layout.num_chunks == 61


def test_streaming_memory_is_per_chunk():
    """The per-chunk Jacobian is chunk×K×P; no array of the pass is N×P (shift is not kept when asked)."""
    X, y = data(n=500)
    fit = mpe.Laplace(logistic, curvature="ggn", chunk_size=50, progress=False).run(KEY, X, y=y)
    site = fit.site_data("y")
    res = fit.site_mpe("y", keep_shift=False)
    assert res.shift is None and res.elpd_loo.shape == (500,)
    tm, _ = chunk_terms(fit.adapter, site.rows, site.chunk(0, fit.posterior.mean), fit.posterior.mean)
    assert tm.jac.shape == (50, 1, 4)
    np.testing.assert_allclose(res.elpd_loo, fit.site_mpe("y").elpd_loo, atol=1e-12)


def test_assembly_on_host_equals_one_program_and_outlives_its_buffers():
    """Chunks written into aligned NumPy buffers and wrapped without a copy give the same arrays as XLA's
    assembly (padding dropped, bool and multi-dimensional leaves); the arrays stay valid after every
    NumPy reference is gone."""
    import gc

    from numpyro_mpe.engine.assembly import _assemble
    from numpyro_mpe.engine.layout import Layout

    lay = Layout.build(10_003, 512)
    rng = np.random.default_rng(0)
    parts = [{"a": jnp.asarray(rng.normal(size=512)), "b": jnp.asarray(rng.normal(size=(512, 2, 3))),
              "ok": jnp.asarray(rng.random(512) < 0.5)} for _ in range(lay.num_chunks)]
    ref = _assemble(parts, lay.num, lay.chunk)
    out = lay.unpad(parts)
    del parts
    gc.collect()
    _ = [np.full(10**5, 7.0) for _ in range(50)]  # would reuse the buffers' memory had they been freed
    for k in ("a", "b", "ok"):
        assert out[k].shape == ref[k].shape == (10_003,) + ref[k].shape[1:] and out[k].dtype == ref[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]))


def test_pooled_buffers_are_reused_only_once_released():
    """An assembly from a pool writes into the memory of a released result, never into one still held
    (as a JAX array or as a NumPy view of one), and the pool keeps at most one assembly's bytes."""
    import gc

    from numpyro_mpe.engine.assembly import HostPool
    from numpyro_mpe.engine.layout import Layout

    if jax.devices()[0].platform != "cpu":
        pytest.skip("host buffers are used on CPU devices only")
    lay, pool = Layout.build(5_000, 1024), HostPool()

    def assemble(value):
        into = lay.assembly(pool)
        for j in range(lay.num_chunks):
            into.add(j, {"x": jnp.full(lay.chunk, value), "m": jnp.full((lay.chunk, 3), value)})
        return into.result()

    def ptr(a):
        return np.asarray(a).ctypes.data

    a = assemble(1.0)
    held = np.asarray(a["x"])  # a NumPy view keeps the memory of a["x"] as much as a["x"] does
    b = assemble(2.0)
    assert ptr(b["x"]) != ptr(a["x"]) and ptr(b["m"]) != ptr(a["m"])
    a_m = ptr(a["m"])
    del a
    gc.collect()
    c = assemble(3.0)  # a["m"]'s memory was released; a["x"]'s is still viewed by `held`
    assert ptr(c["m"]) == a_m and ptr(c["x"]) != ptr(held)
    np.testing.assert_array_equal(held, 1.0)
    np.testing.assert_array_equal(np.asarray(b["x"]), 2.0)
    np.testing.assert_array_equal(np.asarray(c["x"]), 3.0)
    np.testing.assert_array_equal(np.asarray(c["m"]), 3.0)
    del b, c, held
    gc.collect()
    one_pass = lay.num * 4 * 8 + 2 * 64
    assert 0 < pool.nbytes <= one_pass
    free = {x.ctypes.data + (-x.ctypes.data) % 64 for x in pool._free}
    d = assemble(4.0)
    assert {ptr(d["x"]), ptr(d["m"])} & free
    np.testing.assert_array_equal(np.asarray(d["m"]), 4.0)
    pool.clear()
    assert pool.nbytes == 0


def closure_model_factory(X):
    def model(y=None):  # X is a constant of the model, not an argument: rows cannot be sliced
        b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)
    return model


def test_model_that_cannot_run_on_rows_falls_back():
    X, y = data(n=120)
    model = closure_model_factory(jnp.asarray(X))
    fit = mpe.Laplace(model, curvature="ggn", chunk_size=32, progress=False).run(KEY, y=y)
    plan, why = row_plan(fit.adapter, "y")
    assert plan is None and "subset of rows" in why
    assert not fit.info["streamed"] and fit.site_data("y").rows.source == "held"
    ref = mpe.Laplace(logistic, curvature="ggn", chunk_size=32, progress=False).run(KEY, X, y=y)
    assert max(max_err(fit.site_mpe("y"), ref.site_mpe("y")).values()) < 1e-9


# ===================================================================== posterior structures
def test_structured_posteriors_match_the_dense_path():
    """diag and lowrank precisions: the streamed K-space pass equals the whitened P×P path under the same
    (densified) posterior; lowrank of full rank is the full posterior."""
    X, y = data(n=150, p=5)
    full = mpe.Laplace(logistic, curvature="ggn", progress=False).run(KEY, X, y=y)
    s = np.asarray(full.posterior.precision)
    for kw in (dict(posterior="diag"), dict(posterior="lowrank", rank=2), dict(posterior="lowrank", rank=5)):
        fit = mpe.Laplace(logistic, curvature="ggn", progress=False, **kw).run(KEY, X, y=y)
        post = fit.posterior
        assert post.structure == kw["posterior"]
        dense = site_mpe(fit, post.dense(), "y", fit.memories("y"))
        assert max(max_err(fit.site_mpe("y"), dense).values()) < 1e-10
        # the structure keeps the exact diagonal of S
        np.testing.assert_allclose(np.diag(np.asarray(post.precision)), np.diag(s), rtol=1e-10)
    lr = mpe.Laplace(logistic, curvature="ggn", posterior="lowrank", rank=5, progress=False).run(KEY, X, y=y)
    np.testing.assert_allclose(lr.posterior.precision, s, rtol=1e-9, atol=1e-9)
    assert max(max_err(lr.site_mpe("y"), full.site_mpe("y")).values()) < 1e-9


def mlp(X, y=None, hidden=12):
    d = X.shape[1]
    w1 = numpyro.sample("w1", dist.Normal(0, 1 / np.sqrt(d)).expand([d, hidden]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0, 1).expand([hidden]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0, 1 / np.sqrt(hidden)).expand([hidden]).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0, 1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=jnp.tanh(X @ w1 + b1) @ w2 + b2), obs=y)


def test_lbfgs_over_chunks_finds_the_newton_map():
    X, y = data(n=150, p=5)
    kw = dict(curvature="ggn", chunk_size=40, progress=False)
    a = mpe.Laplace(logistic, optimizer="lbfgs", **kw).run(KEY, X, y=y)
    b = mpe.Laplace(logistic, optimizer="newton", **kw).run(KEY, X, y=y)
    assert a.info["optimizer"] == "lbfgs" and b.info["optimizer"] == "newton"
    np.testing.assert_allclose(a.posterior.mean, b.posterior.mean, atol=1e-6)
    # a smaller max_steps is honoured (it used to be raised to 500), and not converging warns
    with pytest.warns(UserWarning, match="did not converge in 3 steps"):
        c = mpe.Laplace(logistic, optimizer="lbfgs", max_steps=3, **kw).run(KEY, X, y=y)
    assert c.info["steps"] == 3


@pytest.mark.slow  # > 20 s
def test_wide_model_diag_per_observation_reverse_mode():
    """A nonlinear predictor with P = 361 > 256 (per-observation reverse-mode Jacobians), the MAP by
    L-BFGS over chunks (the default above P = 2048 is forced here): a stationary point, and the same
    outputs as the dense whitened path under the diag q."""
    X, y = data(n=200, p=28, seed=3)
    fit = mpe.Laplace(mlp, optimizer="lbfgs", curvature="ggn", posterior="diag", chunk_size=64,
                      progress=False, init_strategy=numpyro.infer.init_to_sample).run(KEY, X, y=y)
    assert fit.adapter.num_params == 361 and fit.info["optimizer"] == "lbfgs"
    grad = jax.grad(fit.adapter.potential)(fit.posterior.mean)
    assert float(jnp.max(jnp.abs(grad))) < 1e-5
    assert not fit.site_data("y").is_linear(fit.posterior.mean)
    res = fit.site_mpe("y")
    dense = site_mpe(fit, fit.posterior.dense(), "y", fit.memories("y"))
    assert max(max_err(res, dense).values()) < 1e-9
    # the diagonal precision, summed per latent site over chunks, is the diagonal of the GGN formed from
    # the whole model's Jacobian (forward mode over all rows) plus the prior precisions (1/σ²)
    th = fit.posterior.mean
    jac = jax.jacfwd(lambda t: fit.adapter.eta(t, "y")[:, 0])(th)  # (N, P): the logits
    p = jax.nn.sigmoid(fit.adapter.eta(th, "y")[:, 0])
    prior, _ = ravel_pytree({"w1": jnp.full((28, 12), 28.0), "b1": jnp.ones(12), "w2": jnp.full(12, 12.0),
                             "b2": jnp.ones(())})
    expect = jnp.sum(jac**2 * (p * (1 - p))[:, None], axis=0) + prior
    np.testing.assert_allclose(fit.posterior.precision_diag, expect, rtol=1e-10)


def mlp_two_outputs(X, y=None, hidden=12):
    """A wide heteroscedastic regression: K = 2 active predictor components (loc and scale) from shared
    tanh features, P = 28·12 + 12 + 12 = 360 over three latent sites."""
    d = X.shape[1]
    w1 = numpyro.sample("w1", dist.Normal(0, 1 / np.sqrt(d)).expand([d, hidden]).to_event(2))
    w_loc = numpyro.sample("w_loc", dist.Normal(0, 1 / np.sqrt(hidden)).expand([hidden]).to_event(1))
    w_scale = numpyro.sample("w_scale", dist.Normal(0, 0.2).expand([hidden]).to_event(1))
    h = jnp.tanh(X @ w1)
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(h @ w_loc, jnp.exp(h @ w_scale)), obs=y)


@pytest.mark.slow  # > 20 s (whichever structure runs first)
@pytest.mark.parametrize("structure", [dict(posterior="diag"), dict(posterior="lowrank", rank=4)])
def test_wide_model_two_components_per_site_blocks_match_the_dense_path(structure):
    """Per-site Jacobian blocks (P > 256) with K = 2 under a diagonal or low-rank q: V_i summed over the
    blocks, and the shifts from the blocks of B_i, equal the dense whitened path to 1e-9."""
    X, y = data(n=400, p=28, seed=5, kind="t")
    fit = mpe.Laplace(mlp_two_outputs, optimizer="lbfgs", curvature="ggn", chunk_size=150, progress=False,
                      init_strategy=numpyro.infer.init_to_sample, **structure).run(KEY, X, y=y)
    assert fit.adapter.num_params == 360 and fit.posterior.structure == structure["posterior"]
    assert len(fit.site_data("y").rows.active) == 2
    res = fit.site_mpe("y")
    dense = site_mpe(fit, fit.posterior.dense(), "y", fit.memories("y"))
    assert max(max_err(res, dense).values()) < 1e-9
    assert np.all(np.asarray(res.leverage) > 0) and np.mean(np.asarray(res.valid)) > 0.8


# ===================================================================== devices
SHARD_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, numpyro
    numpyro.enable_x64()
    sys.path.insert(0, {tests!r})
    import numpyro_mpe as mpe
    from test_scale import KEY, OUTS, data, logistic, mlp
    X, y = data(n=203)
    out = {{"devices": len(jax.devices())}}
    for tag, model, kw, (Xd, yd) in [
            ("logistic", logistic, dict(chunk_size=24), (X, y)),
            ("mlp_diag", mlp, dict(chunk_size=30, posterior="diag", gtol=1e-12), data(n=101, p=28, seed=3))]:
        fit = mpe.Laplace(model, curvature="ggn", progress=False, init_strategy=numpyro.infer.init_to_sample,
                          **kw).run(KEY, Xd, y=yd)
        res = fit.site_mpe("y")
        d = {{f: np.asarray(getattr(res, f)).tolist() for f in OUTS}}
        d["mean"] = np.asarray(fit.posterior.mean).tolist()
        d["layout"] = [fit.site_data("y").layout.chunk, fit.site_data("y").layout.num_chunks]
        out[tag] = d
    print("RESULT" + json.dumps(out))
""")


def run_on_devices(n_devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               JAX_PLATFORMS="cpu")
    code = SHARD_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow  # subprocesses
def test_sharded_equals_single_device():
    """4 CPU devices (chunks of 24 rows, 203 = 8·24 + 11 observations: padded, not refused) against one."""
    four, one = run_on_devices(4), run_on_devices(1)
    assert four["devices"] == 4 and one["devices"] == 1
    assert four["logistic"]["layout"] == [24, 9]
    assert four["mlp_diag"]["layout"][0] % 4 == 0
    for tag in ("logistic", "mlp_diag"):
        for f in (*OUTS, "mean"):
            a, b = np.asarray(four[tag][f], float), np.asarray(one[tag][f], float)
            assert a.shape == b.shape and np.all(np.isfinite(a) == np.isfinite(b))
            assert np.nanmax(np.abs(a - b)) <= 1e-10, (tag, f, np.nanmax(np.abs(a - b)))


# ===================================================================== other backends
@pytest.mark.slow  # > 20 s
def test_vi_backends_take_posterior_and_curvature():
    X, y = data(n=120)
    fit = mpe.SVI(logistic, posterior="full", num_steps=300, progress=False, curvature="ggn").run(KEY, X, y=y)
    assert fit.curvature == "ggn" and fit.uses_predictor("y")
    ref = site_mpe(fit, fit.posterior, "y", fit.memories("y"))
    assert max(max_err(fit.site_mpe("y"), ref).values()) < 1e-10
    with pytest.raises(ValueError, match="NGVI cannot provide posterior='lowrank'"):
        mpe.NGVI(logistic, posterior="lowrank")
    with pytest.raises(ValueError, match="posterior='full' and guide='diag' disagree"):
        mpe.SVI(logistic, guide="diag", posterior="full")


# ===================================================================== bad input
@pytest.mark.parametrize("backend", ["Laplace", "SVI", "NGVI"])
@pytest.mark.parametrize("chunk", [0, -3, 2.5, "64", True])
def test_bad_chunk_size(backend, chunk):
    """Every backend refuses the same bad sizes at construction, with the same message (a float, a
    string or a bool is not silently truncated or compared)."""
    with pytest.raises(mpe.MPEError, match=rf"chunk_size must be a positive integer, got {chunk!r}"):
        getattr(mpe, backend)(logistic, chunk_size=chunk)


def test_bad_options():
    with pytest.raises(mpe.MPEError, match=r"curvature must be one of \('exact', 'ggn'\), got 'hessian'"):
        mpe.Laplace(logistic, curvature="hessian")
    with pytest.raises(mpe.MPEError, match=r"posterior must be one of \('full', 'diag', 'lowrank'\), got"):
        mpe.Laplace(logistic, posterior="kron")
    with pytest.raises(mpe.MPEError, match="rank must be a positive integer"):
        mpe.Laplace(logistic, posterior="lowrank", rank=0)
    X, y = data(n=50)
    with pytest.raises(mpe.MPEError, match="devices= is empty"):
        mpe.Laplace(logistic, curvature="ggn", devices=[], progress=False).run(KEY, X, y=y)


def test_full_posterior_refused_when_too_wide(monkeypatch):
    import numpyro_mpe.inference.laplace as lap

    monkeypatch.setattr(lap, "DENSE_LIMIT", 3)
    X, y = data(n=50)
    with pytest.raises(mpe.MPEError, match=r"posterior='full' needs a dense 4x4 precision \(P = 4 > 3\)"):
        mpe.Laplace(logistic, progress=False).run(KEY, X, y=y)


def test_ggn_without_predictor_warns_and_uses_exact():
    def mixture(y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("data", y.shape[0]):
            mix = dist.MixtureSameFamily(dist.Categorical(jnp.array([0.5, 0.5])),
                                         dist.Normal(jnp.stack([mu, mu + 3.0]), 1.0))
            numpyro.sample("y", mix, obs=y)

    y = np.random.default_rng(0).normal(size=40)
    fit = mpe.Laplace(mixture, curvature="ggn", progress=False).run(KEY, y=y)
    with pytest.warns(UserWarning, match="curvature='ggn': site 'y' has no predictor"):
        res = fit.site_mpe("y")
    assert np.all(np.isfinite(np.asarray(res.elpd_loo)))


def test_streaming_site_needs_a_predictor():
    def mixture(y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("data", y.shape[0]):
            mix = dist.MixtureSameFamily(dist.Categorical(jnp.array([0.5, 0.5])),
                                         dist.Normal(jnp.stack([mu, mu + 3.0]), 1.0))
            numpyro.sample("y", mix, obs=y)

    fit = mpe.Laplace(mixture, progress=False).run(KEY, y=np.random.default_rng(0).normal(size=30))
    with pytest.raises(mpe.MPEError, match="site 'y' has no predictor"):
        fit.site_data("y")


# ===================================================================== XLA's CPU runtime
def softmax(X, y=None, prior_sd=0.1):
    """Ten-class softmax regression: K = 10 active predictor components (Monte Carlo integrals)."""
    W = numpyro.sample("W", dist.Normal(0, prior_sd).expand([X.shape[1], 10]).to_event(2))
    b = numpyro.sample("b", dist.Normal(0, prior_sd).expand([10]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=X @ W + b), obs=y)


def digits_features(n_features=4):
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    X, y = load_digits(return_X_y=True)
    Z = PCA(n_features, random_state=0).fit_transform(X)
    return Z / Z.std(0), y


FACTORIZATIONS = ("lu", "cholesky", "triangular_solve", "eigh", "svd", "geqrf", "householder_product")


def batched_factorizations(jaxpr) -> list[str]:
    """LAPACK calls (factorizations, eigh, triangular solves) in ``jaxpr`` (sub-jaxprs included) whose
    operands are stacks of matrices, i.e. that XLA runs as one batched LAPACK call."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in FACTORIZATIONS and any(v.aval.ndim > 2 for v in eqn.invars):
            found.append(f"{eqn.primitive.name}{[tuple(v.aval.shape) for v in eqn.invars]}")
        stack = list(eqn.params.values())
        while stack:
            p = stack.pop()
            if isinstance(p, (list, tuple)):
                stack.extend(p)
            elif hasattr(p, "eqns"):
                found += batched_factorizations(p)
            elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
                found += batched_factorizations(p.jaxpr)
    return found


@pytest.mark.parametrize("case", ["softmax K=10", "normal loc-scale K=2"])
def test_per_observation_pass_has_no_batched_lapack_factorization(case):
    """jaxlib 0.10 splits a batched LAPACK call (getrf, potrf, trsm, syevd) over XLA's CPU thread pool
    and blocks a pool thread until the parts finish: two of them in flight on a 2-thread pool wait for
    each other forever.  The per-row K×K algebra of the pass (cavity, PSD projection, quadrature square
    roots) goes through :mod:`numpyro_mpe.engine.rowlinalg` instead; the walker must see the batched call of a
    vmapped ``jnp.linalg.solve`` and ``jnp.linalg.eigh``."""
    if case.startswith("softmax"):
        X, y = digits_features()
        fit = mpe.Laplace(softmax, progress=False).run(KEY, X[:300], y=y[:300])
    else:
        X, y = data(n=300, p=4, seed=1, kind="t")
        fit = mpe.Laplace(normal_scale, curvature="ggn", progress=False).run(KEY, X, y=y)
    res = fit.site_mpe("y")
    assert np.mean(np.asarray(res.valid)) > 0.9
    site = fit.site_data("y")
    opts = fit.pass_options("y")
    theta = fit.posterior.mean

    def program(data, post):
        return predictor_chunk(fit.adapter, site.rows, data, post, KEY, opts=opts, mesh=site.layout.mesh)

    jaxpr = jax.make_jaxpr(program)(site.chunk(0, theta), fit.posterior)
    assert batched_factorizations(jaxpr.jaxpr) == []
    solve = jax.make_jaxpr(jax.vmap(jnp.linalg.solve))(jnp.ones((3, 2, 2)), jnp.ones((3, 2)))
    assert batched_factorizations(solve.jaxpr)
    assert batched_factorizations(jax.make_jaxpr(jnp.linalg.eigh)(jnp.ones((3, 2, 2))).jaxpr)


TWO_THREAD_SCRIPT = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])  # XLA sizes its CPU pool from this
    import jax, numpy as np, numpyro
    numpyro.enable_x64()
    sys.path.insert(0, {tests!r})
    import numpyro_mpe as mpe
    from test_scale import KEY, digits_features, loc_scale, loc_scale_data, softmax
    X, y = digits_features()
    fit = mpe.Laplace(softmax, progress=False).run(KEY, X, y=y)
    res = fit.site_mpe("y")
    print("RESULT", int(np.isfinite(np.asarray(res.elpd_loo)).sum()), len(y))
    X, y = loc_scale_data(200_000)
    fit = mpe.Laplace(loc_scale, curvature="ggn", progress=False).run(KEY, X, y=y)
    res = fit.site_mpe("y")
    print("RESULT", int(np.isfinite(np.asarray(res.elpd_loo)).sum()), len(y))
""")


def loc_scale(X, y=None):
    """Normal regression with a log-linear scale: K = 2 active components."""
    b = numpyro.sample("b", dist.Normal(0, 5).expand([X.shape[1]]).to_event(1))
    s = numpyro.sample("s", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ b, jnp.exp(0.3 * X @ s)), obs=y)


def loc_scale_data(n):
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 4))])
    return X, X @ np.linspace(1, -1, 5) + np.exp(0.2 * X[:, 1]) * rng.normal(size=n)


@pytest.mark.slow  # a subprocess
def test_passes_finish_on_a_two_thread_pool():
    """On a 2-thread XLA pool, the digits softmax pass (1797 rows in one chunk, K = 10) deadlocked at its
    first call with the cavity solved by batched LU, and a loc-scale GGN pass (200,000 rows, K = 2) with
    batched eigh, every time (jaxlib 0.10.2, this machine); both must finish."""
    code = TWO_THREAD_SCRIPT.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the per-observation passes did not finish within 240 s on a 2-thread pool (deadlock)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [tuple(map(int, s.split()[1:])) for s in proc.stdout.splitlines() if s.startswith("RESULT")]
    assert [n for _, n in results] == [1797, 200_000]
    assert all(finite >= 0.99 * n for finite, n in results)
