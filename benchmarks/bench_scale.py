"""Benchmark (issue #4 "Scale"): streamed MPE leave-one-out from N = 10^3 to 10^7 observations, against
``arviz.loo`` while its S×N matrix fits in memory, checked against brute-force refits, and on a wide model.

Parts, each phase in its own subprocess (peak memory = ``ru_maxrss`` of that process):

1. **GLM** (``--phase glm``): Bernoulli-logit regression, P = 20 (intercept + 19 standardized synthetic
   features), float64, data as model arguments.  ``mpe.Laplace(model, curvature="ggn", chunk_size=CH,
   progress=False).run(key, X, y=y)`` (CH: ``--chunk``, by default the package's own choice; streamed MAP:
   damped Newton over chunks; GGN = exact Hessian for this
   canonical-link GLM), then ``fit.site_mpe("y")`` (the per-observation pass: every output, blocked on), then
   ``fit.loo()``.  Timed as a user meets them (first call, JIT compilation included; the compile seconds are
   counted with ``jax.monitoring``), plus a *warm* per-observation pass (the engine's compiled function run
   again) and one full-batch gradient ``jax.jit(jax.grad(fit.adapter.potential))`` (warm, median of 5).
   The fit is broken down by wrapping the package's functions at run time (ModelAdapter.build, SiteData
   construction, streamed Newton and its chunk reductions, precision, site_mpe).
2. **Peer** (``--phase peer``): ``arviz.loo`` on S = ``--draws`` draws from the Laplace q
   (``fit.posterior.sample``, written by the GLM phase), the S×N log-likelihood matrix computed with JAX in
   chunks of rows.  Skipped ("does not fit") where S·N·8 bytes·3 > ``--peer-mem-gib`` (20 GiB).
3. **Accuracy** (``--phase exact``): MPE ``elpd_loo`` against ``mpe.exact_loo`` (Newton refits without the
   observation, Laplace of each refit) on ``--exact-k`` random observations at ``--exact-sizes``.
4. **Wide model** (``--phase mlp``): an MLP classifier 48 → 2000 tanh → 1 (P = 100,001), N = ``--mlp-n``,
   ``posterior="diag"`` and ``"lowrank"`` (rank 10) in float32, ``"diag"`` in float64 (``--mlp-runs``);
   L-BFGS over chunks.

Usage::

    python benchmarks/bench_scale.py                     # full run: ~9 min (2 cores, load 2)
    python benchmarks/bench_scale.py --sizes 1000 10000 --mlp-runs float32:diag
    python benchmarks/bench_scale.py --device-label h200               # writes bench_scale_h200.{md,json}

Writes ``benchmarks/results/bench_scale.md`` and ``bench_scale.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import CompileClock, max_rss_mb, source_state

HERE = Path(__file__).resolve().parent
P_FEATURES = 19  # + intercept column = 20 parameters
MLP_IN, MLP_HIDDEN = 48, 2000


# ----------------------------------------------------------------------------- helpers
def make_glm_data(n: int, seed: int):
    """Intercept column + 19 standardized Gaussian features, Bernoulli-logit responses, float64."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, P_FEATURES + 1))
    X[:, 0] = 1.0
    X[:, 1:] = rng.standard_normal((n, P_FEATURES))
    X[:, 1:] -= X[:, 1:].mean(0)
    X[:, 1:] /= X[:, 1:].std(0)
    beta = np.concatenate([[-0.3], rng.normal(scale=0.5, size=P_FEATURES)])
    logits = X @ beta
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return X, y


def glm_model(X, y=None):
    import numpyro
    import numpyro.distributions as dist

    b = numpyro.sample("b", dist.Normal(0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)


def make_mlp_data(n: int, seed: int, dtype):
    """48 standardized features; labels from a small random tanh teacher network (8 hidden units)."""
    rng = np.random.default_rng(seed + 100)
    X = rng.standard_normal((n, MLP_IN))
    W = rng.normal(scale=1.0 / np.sqrt(MLP_IN), size=(MLP_IN, 8))
    v = rng.normal(scale=2.0, size=8)
    logits = np.tanh(2.0 * X @ W) @ v
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(dtype)
    return X.astype(dtype), y


def mlp_model(X, y=None):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    d, h = X.shape[1], MLP_HIDDEN
    W1 = numpyro.sample("W1", dist.Normal(0.0, 1.0 / np.sqrt(d)).expand([d, h]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0).expand([h]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0.0, 1.0 / np.sqrt(h)).expand([h]).to_event(1))
    b2 = numpyro.sample("b2", dist.Normal(0.0, 1.0))
    logits = jnp.tanh(X @ W1 + b1) @ w2 + b2
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


class Profiler:
    """Wall and compile seconds of named package functions, wrapped at run time (the package is not
    edited).  Nested calls are recorded under their own names (so the table shows them indented)."""

    def __init__(self, clock: CompileClock):
        self.clock = clock
        self.rec: dict[str, dict] = {}
        self.missing: list[str] = []

    def wrap(self, owner, attr: str, label: str, *, classmethod_: bool = False, block: bool = False):
        import jax

        orig = getattr(owner, attr, None)
        if orig is None:  # the package changed: profile what exists
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{attr}")
            return
        fn = orig.__func__ if classmethod_ else orig

        @functools.wraps(fn)
        def timed(*a, **k):
            r = self.rec.setdefault(label, {"s": 0.0, "compile_s": 0.0, "calls": 0})  # order of entry
            c0, t0 = self.clock.total, time.perf_counter()
            out = fn(*a, **k)
            if block:
                jax.block_until_ready(out)
            r["s"] += time.perf_counter() - t0
            r["compile_s"] += self.clock.total - c0
            r["calls"] += 1
            return out

        setattr(owner, attr, classmethod(timed) if classmethod_ else timed)

    def install(self):
        """Wrap the phases of a fit and a pass.  A function is wrapped in the module that calls it (where
        it was imported by name), so the wrapper is the one that runs."""
        from numpyro_mpe import fit as fit_mod
        from numpyro_mpe.engine import terms
        from numpyro_mpe.inference import laplace, streamed
        from numpyro_mpe.model import adapter as adapter_mod

        self.wrap(adapter_mod.ModelAdapter, "build", "ModelAdapter.build", classmethod_=True)
        self.wrap(adapter_mod, "initial_point", "  initial_point (init_to_median, jitted)")
        self.wrap(adapter_mod, "validated_predictors", "  validated_predictors (full-data jit)")
        self.wrap(terms.SiteData, "__init__", "SiteData(...) (layout, row plan, data placement)")
        self.wrap(laplace, "streamed_newton", "streamed_newton (MAP)")
        self.wrap(laplace, "streamed_lbfgs", "streamed_lbfgs (MAP)")
        self.wrap(laplace, "structured_precision", "structured_precision")
        self.wrap(streamed, "site_sums", "  site_sums (one pass over all chunks)", block=True)
        self.wrap(laplace, "check_precision", "check_precision")
        self.wrap(laplace, "check_structured", "check_structured")
        self.wrap(fit_mod.Fit, "site_mpe", "Fit.site_mpe (per-observation pass)", block=True)

    def snapshot(self) -> dict:
        return {k: dict(v) for k, v in self.rec.items()}


def setup_jax(x64: bool = True):
    import jax
    import numpyro

    if x64:
        numpyro.enable_x64()
    jax.numpy.zeros(1).block_until_ready()
    return jax


def grad_timing(jax, adapter, theta, reps: int = 5) -> dict:
    """One full-batch gradient of the potential U: compile + first call, then the median of ``reps`` warm
    calls.  The reference is ``jax.grad(adapter.potential)`` jitted with the data as device-resident jit
    arguments (neither embedded as constants nor copied from host memory at each call); the package's own
    ``adapter.jit`` wrapper, which passes the NumPy data at every call, is timed beside it."""
    from numpyro.infer.util import potential_energy

    def on_device(x):
        return jax.device_put(x) if isinstance(x, np.ndarray) else x

    data = jax.tree_util.tree_map(on_device, (adapter.args, adapter.kwargs))
    model, unravel = adapter.model, adapter.unravel
    grad = jax.jit(lambda t, a, kw: jax.grad(lambda s: potential_energy(model, a, kw, unravel(s)))(t))

    def run(fn):
        t0 = time.perf_counter()
        fn(theta).block_until_ready()
        first = time.perf_counter() - t0
        times = []
        for r in range(reps):
            th = theta + (r + 1) * 1e-3
            t0 = time.perf_counter()
            fn(th).block_until_ready()
            times.append(time.perf_counter() - t0)
        return first, float(np.median(times))

    out = {}
    out["grad_first_s"], out["grad_s"] = run(lambda t: grad(t, *data))
    if hasattr(adapter, "jit"):
        out["grad_adapter_jit_first_s"], out["grad_adapter_jit_s"] = run(
            adapter.jit(lambda ad, t: jax.grad(ad.potential)(t)))
    out["rss_after_grad_mb"] = max_rss_mb()
    return out


# ----------------------------------------------------------------------------- phases
def phase_glm(a) -> dict:
    jax = setup_jax()
    import numpyro_mpe as mpe
    from numpyro_mpe.engine.assembly import HostPool
    from numpyro_mpe.engine.site import predictor_pass
    from numpyro_mpe.gaussian import DiagGaussianPosterior

    X, y = make_glm_data(a.n, a.seed)
    clock = CompileClock()
    prof = Profiler(clock)
    prof.install()
    rec = {"phase": "glm", "n": a.n, "chunk": a.chunk, "rss_baseline_mb": max_rss_mb(),
           "source": source_state()}
    key = jax.random.PRNGKey(a.seed)

    c0, t0 = clock.total, time.perf_counter()
    fit = mpe.Laplace(glm_model, curvature="ggn", chunk_size=a.chunk or None, progress=False).run(key, X, y=y)
    jax.block_until_ready(fit.posterior)
    rec["fit_s"], rec["fit_compile_s"] = time.perf_counter() - t0, clock.total - c0
    rec["rss_after_fit_mb"] = max_rss_mb()
    rec["fit_profile"] = prof.snapshot()
    rec["info"] = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in fit.info.items()}

    c0, t0 = clock.total, time.perf_counter()
    res = fit.site_mpe("y")
    res.elpd_loo.block_until_ready()
    jax.block_until_ready(res)
    rec["pass_s"], rec["pass_compile_s"] = time.perf_counter() - t0, clock.total - c0
    rec["rss_after_pass_mb"] = max_rss_mb()
    rec["elpd_integration"] = res.method

    c0, t0 = clock.total, time.perf_counter()
    elpd = fit.loo()
    rec["loo_s"], rec["loo_compile_s"] = time.perf_counter() - t0, clock.total - c0
    rec["elpd_loo_total"] = float(elpd.elpd_loo if hasattr(elpd, "elpd_loo") else elpd.elpd)
    rec["p_loo"] = float(elpd.p_loo if hasattr(elpd, "p_loo") else elpd.p)

    # warm per-observation pass: the engine's compiled per-chunk function run again on the same posterior
    # (median of 3 calls, as the gradient's is of 5), each after the previous result is released, so that
    # the engine writes into the output memory that result held (its HostPool); with fresh=True the pool is
    # emptied first and every call writes into memory the allocator hands out anew (page-faulted)
    site, opts, pool = fit.site_data("y"), fit.pass_options("y"), HostPool()

    def warm_pass(post):
        return predictor_pass(site, post, opts, rng_key=jax.random.PRNGKey(0), pool=pool)

    def warm(post, reps=3, fresh=False):
        times, compiled, out = [], [], None
        for _ in range(reps):
            del out
            if fresh:
                pool.clear()
            c0, t0 = clock.total, time.perf_counter()
            out = warm_pass(post)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - t0)
            compiled.append(clock.total - c0)
        rec.setdefault("pass_warm_all_s", []).append(times)
        return out, float(np.median(times)), float(np.max(compiled))

    res2, rec["pass_warm_s"], rec["pass_warm_compile_s"] = warm(fit.posterior)
    rec["warm_max_abs_diff"] = float(np.nanmax(np.abs(np.asarray(res2.elpd_loo) - np.asarray(res.elpd_loo))))
    del res2
    # the same pass under a diagonal posterior (the issue's "GGN/diag" target): the fit's precision diagonal
    diag = DiagGaussianPosterior(fit.posterior.mean, jax.numpy.diag(fit.posterior.precision))
    jax.block_until_ready(warm_pass(diag))  # compiles the diag variant
    _, rec["pass_warm_diag_s"], _ = warm(diag)
    _, rec["pass_warm_fresh_s"], _ = warm(fit.posterior, fresh=True)
    rec["profile"] = prof.snapshot()
    rec["rss_peak_mb"] = max_rss_mb()  # the MPE's peak: fit, pass, loo() and the warm pass

    rec.update(grad_timing(jax, fit.adapter, fit.posterior.mean))

    el, lev, valid = np.asarray(res.elpd_loo), np.asarray(res.leverage), np.asarray(res.valid)
    rec["n_invalid"] = int(np.sum(~valid))
    rec["max_leverage"] = float(np.max(lev))
    # the closed-form MPE total (fit.loo() is method="auto" now: elpd_loo_total is its estimate)
    rec["elpd_loo_mpe_total"] = float(np.nansum(el))
    if a.save_draws:  # for the peer and the agreement check
        theta = fit.posterior.sample(jax.random.PRNGKey(a.seed + 1), a.draws)
        np.save(a.workdir / f"draws_{a.n}.npy", np.asarray(theta))
        np.savez(a.workdir / f"mpe_{a.n}.npz", elpd_loo=el, leverage=lev, valid=valid)
    return rec


def phase_peer(a) -> dict:
    jax = setup_jax()
    import arviz as az
    from numpyro.infer import log_likelihood

    X, y = make_glm_data(a.n, a.seed)
    theta = np.load(a.workdir / f"draws_{a.n}.npy")
    s, n = theta.shape[0], a.n
    rec = {"phase": "peer", "n": n, "draws": s, "rss_baseline_mb": max_rss_mb()}

    @jax.jit
    def ll_chunk(b, Xc, yc):
        return log_likelihood(glm_model, {"b": b}, Xc, y=yc, parallel=True)["y"]  # (S, c)

    c = min(n, 16384)
    t0 = time.perf_counter()
    ll = np.empty((s, n))
    for start in range(0, n, c):
        stop = min(start + c, n)
        Xc, yc = X[start:stop], y[start:stop]
        if stop - start < c:  # pad the last chunk: one compiled shape
            Xc = np.concatenate([Xc, np.repeat(Xc[-1:], c - (stop - start), 0)])
            yc = np.concatenate([yc, np.repeat(yc[-1:], c - (stop - start))])
        ll[:, start:stop] = np.asarray(ll_chunk(theta, Xc, yc))[:, : stop - start]
    rec["loglik_s"] = time.perf_counter() - t0
    rec["rss_after_loglik_mb"] = max_rss_mb()

    t0 = time.perf_counter()
    idata = az.from_dict(posterior={"b": theta[None]}, log_likelihood={"y": ll[None]})
    rec["from_dict_s"] = time.perf_counter() - t0
    del ll
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = az.loo(idata, pointwise=True)
        rec["loo_s"] = time.perf_counter() - t0
    rec["loo_warnings"] = sorted({str(w.message)[:80] for w in caught})
    rec["rss_peak_mb"] = max_rss_mb()
    k = np.asarray(res.pareto_k)
    rec["max_k"] = float(np.max(k))
    rec["elpd_loo_total"] = float(res.elpd_loo)
    np.save(a.workdir / f"peer_{n}.npy", np.asarray(res.loo_i))
    return rec


def phase_exact(a) -> dict:
    jax = setup_jax()
    from scipy.stats import spearmanr

    import numpyro_mpe as mpe

    X, y = make_glm_data(a.n, a.seed)
    rec = {"phase": "exact", "n": a.n, "k": a.exact_k}
    fit = mpe.Laplace(glm_model, curvature="ggn", chunk_size=a.chunk or None, progress=False).run(
        jax.random.PRNGKey(a.seed), X, y=y)
    el = np.asarray(fit.site_mpe("y").elpd_loo)
    idx = np.sort(np.random.default_rng(a.seed + 7).choice(a.n, size=a.exact_k, replace=False))
    t0 = time.perf_counter()
    ds = mpe.exact_loo(fit, indices=idx, progress=False)
    rec["exact_s"] = time.perf_counter() - t0
    ex = np.asarray(ds["elpd_loo"].values)
    mc = np.asarray(ds["elpd_loo_mcse"].values)
    d = np.abs(el[idx] - ex)
    rec.update(max_abs=float(np.max(d)), median_abs=float(np.median(d)),
               spearman=float(spearmanr(el[idx], ex).statistic),
               max_mcse=float(np.max(mc)), all_converged=bool(np.all(ds["converged"].values)),
               mean_abs_elpd=float(np.mean(np.abs(ex))))
    return rec


def phase_mlp(a) -> dict:
    x64 = a.dtype == "float64"
    jax = setup_jax(x64)
    import numpyro_mpe as mpe
    from numpyro_mpe.engine.site import predictor_pass

    X, y = make_mlp_data(a.n, a.seed, np.float64 if x64 else np.float32)
    clock = CompileClock()
    prof = Profiler(clock)
    prof.install()
    rec = {"phase": "mlp", "n": a.n, "dtype": a.dtype, "structure": a.structure, "chunk": a.chunk,
           "rss_baseline_mb": max_rss_mb()}
    opts = {"rank": 10} if a.structure == "lowrank" else {}
    c0, t0 = clock.total, time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = mpe.Laplace(mlp_model, curvature="ggn", posterior=a.structure, chunk_size=a.chunk,
                          progress=False, **opts).run(jax.random.PRNGKey(a.seed), X, y=y)
        jax.block_until_ready(fit.posterior)
    rec["fit_s"], rec["fit_compile_s"] = time.perf_counter() - t0, clock.total - c0
    rec["fit_warnings"] = sorted({str(w.message)[:120] for w in caught if "Laplace" in str(w.message)})
    rec["P"] = fit.adapter.num_params
    rec["info"] = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in fit.info.items()}
    rec["rss_after_fit_mb"] = max_rss_mb()

    c0, t0 = clock.total, time.perf_counter()
    res = fit.site_mpe("y")
    jax.block_until_ready(res)
    rec["pass_s"], rec["pass_compile_s"] = time.perf_counter() - t0, clock.total - c0
    site, opts = fit.site_data("y"), fit.pass_options("y")
    t0 = time.perf_counter()
    jax.block_until_ready(predictor_pass(site, fit.posterior, opts, rng_key=jax.random.PRNGKey(0)))
    rec["pass_warm_s"] = time.perf_counter() - t0
    rec["profile"] = prof.snapshot()
    rec["rss_peak_mb"] = max_rss_mb()
    rec.update(grad_timing(jax, fit.adapter, fit.posterior.mean))
    el, lev = np.asarray(res.elpd_loo), np.asarray(res.leverage)
    rec["elpd_loo_total"] = float(np.nansum(el))
    rec["n_invalid"] = int(np.sum(~np.asarray(res.valid)))
    rec["max_leverage"] = float(np.max(lev))
    return rec


# ----------------------------------------------------------------------------- driver
def run_phase(phase: str, args, workdir: Path, **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--workdir", str(workdir),
           "--draws", str(args.draws), "--seed", str(args.seed), "--exact-k", str(args.exact_k)]
    for k, v in extra.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not False and v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    label = " ".join(f"{k}={v}" for k, v in extra.items() if v not in (True, False, None))
    hangs = 0
    while True:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.phase_timeout)
            break
        except subprocess.TimeoutExpired:  # seen once: an XLA CPU dispatch deadlock (see the README)
            hangs += 1
            sys.stderr.write(f"  {phase} {label}: no result after {args.phase_timeout:.0f} s, killed\n")
            if hangs > args.retries:
                return {"phase": phase, "failed": True, "timed_out": True, "hangs": hangs, **extra}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        sys.stderr.write(f"  {phase} {label}: FAILED (exit {proc.returncode}) after {wall:.0f} s\n{tail}\n")
        return {"phase": phase, "failed": True, "returncode": proc.returncode, "error_tail": tail[-800:],
                "process_wall_s": wall, **extra}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_wall_s"] = wall
    rec["hangs_before"] = hangs
    print(f"  {phase:5s} {label}: {wall:.1f} s (process wall)", file=sys.stderr, flush=True)
    return rec


def fmt(x, spec=".3g"):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    return format(x, spec)


def us(x):  # seconds per observation → µs
    return fmt(None if x is None else 1e6 * x)


def glm_table(rows: list[dict], draws: int, chunk: int, alt_chunk: int | None) -> str:
    def g(r, k):
        m = r.get("glm") or {}
        return m.get(k)

    def p(r, k):
        m = r.get("peer") or {}
        return m.get(k)

    def peer_or(r, f):
        if r.get("peer_skip"):
            return r["peer_skip"]
        if not r.get("peer") or r["peer"].get("failed"):
            return "—"
        return f(r)

    def col(f):
        return [f(r) for r in rows]

    def fastest(r, i):  # the fastest of the warm passes of posterior i (0: full, 1: diagonal)
        runs = g(r, "pass_warm_all_s")
        return min(runs[i]) if runs and len(runs) > i else None

    def with_fastest(r, key, i):  # "median (fastest)" of the warm passes of posterior i
        best = fastest(r, i)
        return fmt(g(r, key)) + ("" if best is None else f" ({fmt(best)})")

    def ratio(r, key, i):
        if r.get(key) is None:
            return "—"
        best = fastest(r, i)
        return fmt(r[key]) + ("" if best is None else f" ({fmt(best / g(r, 'grad_s'))})")

    lines = [
        ("**MPE** fit, `Laplace(...).run` (s)", col(lambda r: fmt(g(r, "fit_s")))),
        ("  of which JIT compile (s)", col(lambda r: fmt(g(r, "fit_compile_s")))),
        ("  Newton steps / streamed", col(lambda r: f"{g(r, 'info')['steps']} / {g(r, 'info')['streamed']}"
                                          if g(r, "info") else "—")),
        ("per-observation pass `fit.site_mpe` (s)", col(lambda r: fmt(g(r, "pass_s")))),
        ("  of which JIT compile (s)", col(lambda r: fmt(g(r, "pass_compile_s")))),
        ("  same, warm (compiled): median of 3 (fastest) (s)",
         col(lambda r: with_fastest(r, "pass_warm_s", 0))),
        ("  same, warm, pool emptied before each call: median of 3 (fastest) (s)",
         col(lambda r: with_fastest(r, "pass_warm_fresh_s", 2))),
        ("`fit.loo()` (default, method=\"auto\") after the pass (s)", col(lambda r: fmt(g(r, "loo_s")))),
        ("**MPE end to end** (fit + pass) (s)", col(lambda r: fmt(r.get("e2e_s")))),
        ("  per observation (µs)", col(lambda r: us(r.get("e2e_per_obs_s")))),
        ("  warm pass per observation (µs)", col(lambda r: us(r.get("pass_warm_per_obs_s")))),
        ("MPE peak RSS, fit + pass + loo (MiB)", col(lambda r: fmt(g(r, "rss_peak_mb"), ".0f"))),
        ("  after fit / after pass (MiB)", col(lambda r: f"{g(r, 'rss_after_fit_mb'):.0f} / "
                                               f"{g(r, 'rss_after_pass_mb'):.0f}" if r.get("glm") else "—")),
        ("full-batch gradient of U, jitted, warm (s)", col(lambda r: fmt(g(r, "grad_s")))),
        ("  same through `adapter.jit` (NumPy data passed per call) (s)",
         col(lambda r: fmt(g(r, "grad_adapter_jit_s")))),
        ("**ratio** warm pass / gradient, median (fastest) (target ≤ 3)",
         col(lambda r: ratio(r, "ratio_pass_grad", 0))),
        ("  same, diagonal posterior (the fit's precision diagonal)",
         col(lambda r: ratio(r, "ratio_pass_diag_grad", 1))),
        ("  same, pool emptied before each call", col(lambda r: ratio(r, "ratio_pass_fresh_grad", 2))),
        ("  first-call pass / gradient", col(lambda r: fmt(r.get("ratio_pass_first_grad")))),
    ]
    if alt_chunk:
        lines.append((f"chunk {alt_chunk}: fit / pass / warm pass (s)",
                      col(lambda r: (f"{r['alt']['fit_s']:.3g} / {r['alt']['pass_s']:.3g} / "
                                     f"{r['alt']['pass_warm_s']:.3g}")
                          if r.get("alt") and not r["alt"].get("failed") else "—")))
    lines += [
        (f"**Peer** S×N log-lik matrix, S = {draws}, JAX (s)",
         col(lambda r: peer_or(r, lambda r: fmt(p(r, "loglik_s"))))),
        ("az.loo(pointwise=True) alone (s)", col(lambda r: peer_or(r, lambda r: fmt(p(r, "loo_s"))))),
        ("peer peak RSS (MiB)", col(lambda r: peer_or(r, lambda r: fmt(p(r, "rss_peak_mb"), ".0f")))),
        ("**ratio** az.loo / MPE pass, first call",
         col(lambda r: peer_or(r, lambda r: fmt(r["ratio_loo_pass"])))),
        ("  az.loo / MPE pass, warm (target ≥ 100 at 1e5)",
         col(lambda r: peer_or(r, lambda r: fmt(r["ratio_loo_pass_warm"])))),
        ("  (log-lik + az.loo) / MPE end to end",
         col(lambda r: peer_or(r, lambda r: fmt(r["ratio_e2e"])))),
        ("**agreement** corr(MPE elpd_i, PSIS loo_i)",
         col(lambda r: peer_or(r, lambda r: fmt(r["corr_psis"], ".6f")))),
        ("  Σ elpd_loo `fit.loo()` (default, method=\"auto\") / PSIS", col(lambda r: peer_or(
            r, lambda r: f"{g(r, 'elpd_loo_total'):.1f} / {p(r, 'elpd_loo_total'):.1f}"))),
        ("Σ elpd_loo closed-form MPE (`site_mpe`) / max leverage / invalid cavities",
         col(lambda r: f"{fmt(g(r, 'elpd_loo_mpe_total'), '.1f')} / {fmt(g(r, 'max_leverage'), '.3g')} / "
                       f"{g(r, 'n_invalid')}" if g(r, 'max_leverage') is not None else "—")),
        ("MPE vs exact refits (k obs): max / median abs Δ elpd_i",
         col(lambda r: f"{r['exact']['max_abs']:.2g} / {r['exact']['median_abs']:.2g}"
             if r.get("exact") and not r["exact"].get("failed") else "—")),
        ("  Spearman(MPE, exact)", col(lambda r: fmt(r["exact"]["spearman"], ".6f")
                                       if r.get("exact") and not r["exact"].get("failed") else "—")),
    ]
    head = "| metric | " + " | ".join(f"N = {r['n']:,}" for r in rows) + " |"
    sep = "|---|" + "---:|" * len(rows)
    body = [f"| {name} | " + " | ".join(vals) + " |" for name, vals in lines]
    return "\n".join([head, sep, *body])


def mlp_table(rows: list[dict]) -> str:
    def col(f):
        out = []
        for r in rows:
            try:
                out.append("FAILED" if r.get("failed") else f(r))
            except (KeyError, TypeError):
                out.append("—")
        return out

    lines = [
        ("P / N / chunk", col(lambda r: f"{r['P']:,} / {r['n']:,} / {r['chunk']}")),
        ("fit, `Laplace(...).run` (s)", col(lambda r: fmt(r["fit_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(r["fit_compile_s"]))),
        ("  L-BFGS steps / max abs ∇U at the end / package says converged",
         col(lambda r: f"{r['info']['steps']} / {r['info']['grad_norm']:.2g} / "
                       f"{'no' if r['fit_warnings'] else 'yes'}")),
        ("per-observation pass `fit.site_mpe` (s)", col(lambda r: fmt(r["pass_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(r["pass_compile_s"]))),
        ("  same, warm (s)", col(lambda r: fmt(r["pass_warm_s"]))),
        ("  warm pass per observation (µs)", col(lambda r: us(r["pass_warm_s"] / r["n"]))),
        ("full-batch gradient, warm (s)", col(lambda r: fmt(r["grad_s"]))),
        ("**ratio** warm pass / gradient (target ≤ 3)", col(lambda r: fmt(r["pass_warm_s"] / r["grad_s"]))),
        ("peak RSS (MiB)", col(lambda r: fmt(r["rss_peak_mb"], ".0f"))),
        ("Σ elpd_loo / max leverage / invalid", col(lambda r: f"{r['elpd_loo_total']:.1f} / "
                                                      f"{r['max_leverage']:.3g} / {r['n_invalid']}")),
    ]
    head = "| metric | " + " | ".join(f"{r['dtype']}, {r['structure']}" for r in rows) + " |"
    sep = "|---|" + "---:|" * len(rows)
    body = [f"| {name} | " + " | ".join(vals) + " |" for name, vals in lines]
    return "\n".join([head, sep, *body])


def profile_table(rec: dict) -> str:
    prof = rec["profile"]
    lines = ["| phase (at N = {:,}, chunk {}) | calls | wall (s) | of which JIT compile (s) |".format(
        rec["n"], rec["chunk"]), "|---|---:|---:|---:|"]
    for name, v in prof.items():
        lines.append(f"| {name} | {v['calls']} | {v['s']:.3g} | {v['compile_s']:.3g} |")
    lines.append(f"| full-batch gradient: compile + first call / warm | | {rec['grad_first_s']:.3g} / "
                 f"{rec['grad_s']:.3g} | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6, 1e7])
    ap.add_argument("--chunk", type=int, default=0,
                    help="chunk_size of the GLM runs (0: the package's default, 65536 here)")
    ap.add_argument("--alt-chunk", type=int, default=262144, help="second chunk_size tried (0: none)")
    ap.add_argument("--alt-chunk-sizes", type=float, nargs="*", default=[1e6, 1e7],
                    help="N at which --alt-chunk is also run")
    ap.add_argument("--draws", type=int, default=2000, help="posterior draws S for arviz.loo")
    ap.add_argument("--peer-mem-gib", type=float, default=20.0,
                    help="skip az.loo where S·N·8 bytes·3 exceeds this")
    ap.add_argument("--exact-sizes", type=float, nargs="*", default=[1e3, 1e4])
    ap.add_argument("--exact-k", type=int, default=20)
    ap.add_argument("--mlp-n", type=int, default=10_000)
    ap.add_argument("--mlp-chunk", type=int, default=1024)
    ap.add_argument("--mlp-runs", nargs="*", default=["float32:diag", "float32:lowrank", "float64:diag"],
                    help="dtype:posterior pairs of the wide model (none: skip it)")
    ap.add_argument("--phase-timeout", type=float, default=900.0,
                    help="kill a phase subprocess after this many seconds (then retry it)")
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--render", type=Path, help="re-render the tables of a saved .json (no runs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device-label", default=None, help="writes bench_scale_<label>.md/.json")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for .md and .json")
    ap.add_argument("--phase", choices=["glm", "peer", "exact", "mlp"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--structure", help=argparse.SUPPRESS)
    ap.add_argument("--save-draws", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase is not None:  # child: one phase, JSON on the last stdout line
        rec = {"glm": phase_glm, "peer": phase_peer, "exact": phase_exact, "mlp": phase_mlp}[args.phase](args)
        print(json.dumps(rec))
        return

    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(render(saved["meta"], saved["glm"], saved["mlp"]))
        return

    sizes = [int(s) for s in args.sizes]
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    rows, mlp_rows = [], []
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        workdir = Path(tmp)
        for n in sizes:
            r = {"n": n}
            peer_bytes = args.draws * n * 8 * 3
            fits = peer_bytes <= args.peer_mem_gib * 2**30
            r["glm"] = run_phase("glm", args, workdir, n=n, chunk=args.chunk, save_draws=fits)
            m = r["glm"]
            if m.get("failed"):
                r["glm"] = None
                rows.append(r)
                continue
            r["e2e_s"] = m["fit_s"] + m["pass_s"]
            r["e2e_per_obs_s"] = r["e2e_s"] / n
            r["pass_warm_per_obs_s"] = m["pass_warm_s"] / n
            r["ratio_pass_grad"] = m["pass_warm_s"] / m["grad_s"]
            if "pass_warm_diag_s" in m:
                r["ratio_pass_diag_grad"] = m["pass_warm_diag_s"] / m["grad_s"]
            if "pass_warm_fresh_s" in m:
                r["ratio_pass_fresh_grad"] = m["pass_warm_fresh_s"] / m["grad_s"]
            r["ratio_pass_first_grad"] = m["pass_s"] / m["grad_s"]
            if args.alt_chunk and n in {int(s) for s in args.alt_chunk_sizes}:
                r["alt"] = run_phase("glm", args, workdir, n=n, chunk=args.alt_chunk)
            if fits:
                p = run_phase("peer", args, workdir, n=n)
                r["peer"] = p
                if not p.get("failed"):
                    with np.load(workdir / f"mpe_{n}.npz") as f:
                        el, ok = f["elpd_loo"], f["valid"]
                    loo_i = np.load(workdir / f"peer_{n}.npy")
                    r["corr_psis"] = float(np.corrcoef(el[ok], loo_i[ok])[0, 1])
                    r["max_abs_diff_psis"] = float(np.max(np.abs(el[ok] - loo_i[ok])))
                    r["ratio_loo_pass"] = p["loo_s"] / m["pass_s"]
                    r["ratio_loo_pass_warm"] = p["loo_s"] / m["pass_warm_s"]
                    r["ratio_e2e"] = (p["loo_s"] + p["loglik_s"]) / r["e2e_s"]
            else:
                r["peer_skip"] = f"does not fit ({peer_bytes / 2**30:.0f} GiB)"
                print(f"  peer  n={n}: skipped, S·N·8·3 = {peer_bytes / 2**30:.0f} GiB", file=sys.stderr)
            if n in {int(s) for s in args.exact_sizes}:
                r["exact"] = run_phase("exact", args, workdir, n=n, chunk=args.chunk)
            rows.append(r)
        for spec in args.mlp_runs:
            dtype, structure = spec.split(":")
            mlp_rows.append(run_phase("mlp", args, workdir, n=args.mlp_n, chunk=args.mlp_chunk,
                                      dtype=dtype, structure=structure))
    total = time.perf_counter() - t_start

    import arviz
    import jax

    dev = jax.devices()[0]
    env = (f"Python {platform.python_version()}, jax {jax.__version__}, arviz {arviz.__version__}, "
           f"{platform.machine()}, {os.cpu_count()} CPU cores, device {dev.platform}:{dev.device_kind}; "
           f"1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    sources = [r["glm"]["source"] for r in rows if r.get("glm")]
    hashes = {src.split("sha256 ")[-1] for src in sources}  # HEAD may move (commits) with the same sources
    code = (f"numpyro_mpe {sources[-1]}" if len(hashes) == 1 else
            f"WARNING: the package changed during the run: {sorted(set(sources))}" if sources
            else "no GLM phase ran")
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k not in ("phase", "n", "dtype", "structure", "workdir", "save_draws", "render")}
    meta.update(environment=env, code=code, total_wall_s=total)
    md = render(meta, rows, mlp_rows)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_scale" + (f"_{args.device_label}" if args.device_label else "")
    (args.out / f"{stem}.md").write_text(md + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "glm": rows, "mlp": mlp_rows},
                                                      indent=2) + "\n")


def render(meta: dict, rows: list[dict], mlp_rows: list[dict]) -> str:
    """The markdown of one run (tables and notes) from its records."""
    alt = meta["alt_chunk"] if any(r.get("alt") for r in rows) else None
    parts = [
        f"### GLM: logistic regression, P = {P_FEATURES + 1}, float64, chunk_size "
        f"{meta['chunk'] or 'default (auto_chunk_size: 65536)'}",
        "",
        glm_table(rows, meta["draws"], meta["chunk"], alt),
        "",
        "Times are wall seconds of first calls as a user meets them (JIT compilation included, its share "
        "given); *warm* = the compiled per-chunk function run again, each call after the previous result is "
        "released (the engine then writes into that result's memory, see "
        "`numpyro_mpe.engine.assembly.HostPool`; "
        "*pool emptied*: each call writes into memory the allocator hands out anew, much of it just freed). "
        "The first warm pass, into memory the process has not used before, is the first of the three in the "
        "JSON (`pass_warm_all_s`). The peer's draws are S draws from "
        "the Laplace q (not charged). Exact refits: `mpe.exact_loo` on "
        f"{meta['exact_k']} random observations (Monte Carlo elpd in θ-space, 4000 draws).",
    ]
    big = [r for r in rows if r.get("glm")]
    if big:
        parts += ["", f"### Where the time goes at N = {big[-1]['n']:,}", "", profile_table(big[-1]["glm"])]
    if mlp_rows:
        parts += ["", f"### Wide model: MLP {MLP_IN} → {MLP_HIDDEN} tanh → 1, curvature='ggn', L-BFGS",
                  "", mlp_table(mlp_rows)]
        used = sorted({w for r in mlp_rows for w in r.get("workarounds", [])})
        if used:
            parts += ["", "Benchmark-side workaround used (package bug, see the README): "
                      + "; ".join(used) + "."]
    hung = [f"{r.get('phase', '?')} N={r.get('n')}" for r in _records(rows, mlp_rows)
            if r.get("hangs_before") or r.get("timed_out")]
    if hung:
        parts += ["", "Phases killed after --phase-timeout without a result (then retried): "
                  + ", ".join(hung) + "."]
    parts += ["", f"{meta['environment']}. Total benchmark wall time {meta['total_wall_s']:.0f} s.",
              f"Code: {meta['code']}."]
    return "\n".join(parts)


def _records(rows, mlp_rows):
    for r in rows:
        for k in ("glm", "alt", "peer", "exact"):
            if r.get(k):
                yield r[k]
    yield from mlp_rows

if __name__ == "__main__":
    main()
