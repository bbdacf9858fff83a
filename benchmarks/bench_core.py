"""Benchmark: MPE leave-one-out (numpyro_mpe) against PSIS-LOO (arviz.loo) on logistic regression.

Model: Bernoulli-logit regression with an intercept and 19 standardized synthetic features (P = 20
unconstrained parameters), float64, at N = 10^3, 10^4, 10^5 observations.

For each N, in one invocation, side by side:

* **MPE** (``--phase mpe``): ``mpe.Laplace(model, progress=False).run(key, X, y=y)`` (the fit) and then
  ``fit.sensitivities()`` (the per-observation pass: exact per-observation Hessians, whitened cavities,
  Gauss–Hermite ``lpd`` / ``elpd_loo``, xarray output).  Timed separately, twice: the first call (includes
  JIT compilation) and a second, "warm" call that builds a new ``Laplace`` run on the same shapes.  The
  package builds its jitted functions as closures inside each call, so the second call retraces and
  recompiles too: the compile seconds of both calls are measured with ``jax.monitoring`` and reported.
* **Peer** (``--phase peer``): ``arviz.loo`` on S = ``--draws`` posterior draws.  The draws come from the
  Laplace posterior q (``fit.posterior.sample``), not NUTS (NUTS at N = 10^5 would take far longer than
  this whole benchmark); they are written by the MPE phase, so the peer is *not* charged for obtaining a
  posterior.  The S×N log-likelihood matrix is computed with JAX (``numpyro.infer.log_likelihood`` with
  ``parallel=True``, i.e. a vmap over draws of the model's log-likelihood, under ``jax.jit``; timed on
  its own), wrapped by ``az.from_dict`` and then ``az.loo(idata, pointwise=True)`` is timed alone.
* **Memory**: each phase runs in its own subprocess; ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the
  resident-set high-water mark) is read after imports, JAX start-up and data synthesis (the baseline), after
  each stage, and at the end; the table reports the peak and the peak minus the baseline.
* **Agreement**: correlation of the MPE ``elpd_loo`` with PSIS ``loo_i``, and the two totals.

Usage::

    python benchmarks/bench_core.py                        # N = 1e3, 1e4, 1e5; S = 2000
    python benchmarks/bench_core.py --sizes 1000 10000 --draws 1000

Writes ``benchmarks/results/bench_core.md`` and ``bench_core.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
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

P_FEATURES = 19  # + intercept = 20 parameters
HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- helpers
def make_data(n: int, seed: int):
    """Standardized Gaussian features (seeded) and Bernoulli-logit responses, float64."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, P_FEATURES))
    X = (X - X.mean(0)) / X.std(0)
    beta = rng.normal(scale=0.5, size=P_FEATURES)
    alpha = -0.3
    logits = alpha + X @ beta
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
    return X, y


def model(X, y=None):
    import numpyro
    import numpyro.distributions as dist

    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def setup_jax():
    """Import JAX/NumPyro in float64 and start the backend (so the baseline includes it)."""
    import jax
    import numpyro

    numpyro.enable_x64()
    jax.numpy.zeros(1).block_until_ready()
    return jax


# ----------------------------------------------------------------------------- phases
def phase_mpe(n: int, draws: int, seed: int, workdir: Path) -> dict:
    jax = setup_jax()
    import numpyro_mpe as mpe

    X, y = make_data(n, seed)
    clock = CompileClock()
    rec = {"phase": "mpe", "n": n, "rss_baseline_mb": max_rss_mb(), "source": source_state()}
    key = jax.random.PRNGKey(seed)

    def one_call(tag):
        c0 = clock.snapshot()
        t0, p0 = time.perf_counter(), time.process_time()
        fit = mpe.Laplace(model, progress=False).run(key, X, y=y)
        jax.block_until_ready(fit.posterior)
        t1, p1 = time.perf_counter(), time.process_time()
        c1 = clock.snapshot()
        rec[f"rss_after_fit_{tag}_mb"] = max_rss_mb()
        ds = fit.sensitivities()
        out = {v: np.asarray(ds[v].values) for v in ds.data_vars}  # everything to numpy
        t2, p2 = time.perf_counter(), time.process_time()
        c2 = clock.snapshot()
        rec[f"rss_after_pass_{tag}_mb"] = max_rss_mb()
        rec[f"fit_{tag}_s"] = t1 - t0
        rec[f"pass_{tag}_s"] = t2 - t1
        rec[f"fit_{tag}_cpu_s"] = p1 - p0
        rec[f"pass_{tag}_cpu_s"] = p2 - p1
        rec[f"compile_fit_{tag}"] = CompileClock.diff(c1, c0)
        rec[f"compile_pass_{tag}"] = CompileClock.diff(c2, c1)
        return fit, out

    fit, out = one_call("first")
    rec["newton_steps"] = fit.info["steps"]
    mem = fit.memories()  # cached by sensitivities(): no extra work
    rec["memories"] = "factored J'ΛJ" if getattr(mem, "factored", False) else "dense N×P×P"
    rec["elpd_integration"] = fit.sensitivities().attrs.get("elpd_integration", "")
    del mem
    # posterior draws for the peer, not timed as MPE.  All priors are on the real line, so the
    # unconstrained draws are the constrained ones (unravel only: constrain_fn would run the model).
    theta = fit.posterior.sample(jax.random.PRNGKey(seed + 1), draws)
    samples = jax.vmap(fit.adapter.unravel)(theta)
    np.savez(workdir / f"draws_{n}.npz", **{k: np.asarray(v) for k, v in samples.items()})
    del fit, theta, samples  # the warm call must not run while the first fit (and its caches) is alive

    fit2, out2 = one_call("warm")
    del fit2
    rec["warm_max_abs_diff_elpd"] = float(np.nanmax(np.abs(out["elpd_loo"] - out2["elpd_loo"])))
    rec["rss_peak_mb"] = max_rss_mb()
    np.savez(workdir / f"mpe_{n}.npz", elpd_loo=out["elpd_loo"], lpd=out["lpd"],
             leverage=out["leverage"], valid=out["valid"])
    rec["n_invalid"] = int(np.sum(~out["valid"]))
    rec["max_leverage"] = float(np.max(out["leverage"]))
    return rec


def phase_peer(n: int, draws: int, seed: int, workdir: Path) -> dict:
    jax = setup_jax()
    import arviz as az
    from numpyro.infer import log_likelihood

    X, y = make_data(n, seed)
    with np.load(workdir / f"draws_{n}.npz") as f:
        samples = {k: f[k] for k in f.files}
    clock = CompileClock()
    rec = {"phase": "peer", "n": n, "draws": draws, "rss_baseline_mb": max_rss_mb()}

    @jax.jit
    def loglik(samples, X, y):
        return log_likelihood(model, samples, X, y=y, parallel=True)["y"]  # (S, N): vmap over draws

    for tag in ("first", "warm"):
        c0 = clock.snapshot()
        t0, p0 = time.perf_counter(), time.process_time()
        ll = np.asarray(loglik(samples, X, y))
        rec[f"loglik_{tag}_s"] = time.perf_counter() - t0
        rec[f"loglik_{tag}_cpu_s"] = time.process_time() - p0
        rec[f"compile_loglik_{tag}"] = CompileClock.diff(clock.snapshot(), c0)
        if tag == "first":
            del ll
    rec["rss_after_loglik_mb"] = max_rss_mb()

    t0 = time.perf_counter()
    groups = {"posterior": {k: v[None] for k, v in samples.items()}, "log_likelihood": {"y": ll[None]}}
    if int(az.__version__.split(".")[0]) >= 1:  # arviz >= 1: from_dict takes one dict of groups
        idata = az.from_dict(groups)
    else:
        idata = az.from_dict(**groups)
    rec["from_dict_s"] = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0, p0 = time.perf_counter(), time.process_time()
        res = az.loo(idata, pointwise=True)
        rec["loo_s"] = time.perf_counter() - t0
        rec["loo_cpu_s"] = time.process_time() - p0
    rec["loo_warnings"] = sorted({str(w.message)[:80] for w in caught})
    rec["rss_peak_mb"] = max_rss_mb()
    k = np.asarray(res.pareto_k)
    rec["n_k_above_0.7"] = int(np.sum(k > 0.7))
    rec["max_k"] = float(np.max(k))
    loo_i = res.elpd_i if hasattr(res, "elpd_i") else res.loo_i  # arviz >= 1 / 0.x names
    total = res.elpd if hasattr(res, "elpd") else res.elpd_loo
    np.savez(workdir / f"peer_{n}.npz", loo_i=np.asarray(loo_i), pareto_k=k, elpd_loo=float(total))
    return rec


# ----------------------------------------------------------------------------- driver
def run_phase(phase: str, n: int, args, workdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--n", str(n),
           "--draws", str(args.draws), "--seed", str(args.seed), "--workdir", str(workdir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"phase {phase} at N={n} failed (exit {proc.returncode})")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_wall_s"] = time.perf_counter() - t0
    print(f"  {phase:4s} N={n:>8d}: done in {rec['process_wall_s']:.1f} s (process wall)", file=sys.stderr)
    return rec


def agreement(n: int, workdir: Path) -> dict:
    with np.load(workdir / f"mpe_{n}.npz") as f:
        el, lev, valid = f["elpd_loo"], f["leverage"], f["valid"]
    with np.load(workdir / f"peer_{n}.npz") as f:
        loo_i, k = f["loo_i"], f["pareto_k"]
    ok = valid & np.isfinite(el)
    return {
        "corr_elpd": float(np.corrcoef(el[ok], loo_i[ok])[0, 1]),
        "elpd_mpe": float(np.sum(el[ok])),
        "elpd_psis": float(np.sum(loo_i)),
        "max_abs_diff_pointwise": float(np.max(np.abs(el[ok] - loo_i[ok]))),
        "corr_leverage_k": float(np.corrcoef(lev, k)[0, 1]),
    }


def fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def table(rows: list[dict], draws: int) -> str:
    """One markdown table: metrics down, N across."""
    def col(f):
        return [f(r) for r in rows]

    def c(d):
        return d["total"]

    def pair(d, a, b):
        return f"{d[a]:.0f} / {d[b]:.0f}"

    lines = [
        ("**MPE** fit, first call (s)", col(lambda r: fmt(r["mpe"]["fit_first_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(c(r["mpe"]["compile_fit_first"])))),
        ("MPE per-observation pass, first call (s)", col(lambda r: fmt(r["mpe"]["pass_first_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(c(r["mpe"]["compile_pass_first"])))),
        ("MPE fit, warm call (s)", col(lambda r: fmt(r["mpe"]["fit_warm_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(c(r["mpe"]["compile_fit_warm"])))),
        ("MPE per-observation pass, warm call (s)", col(lambda r: fmt(r["mpe"]["pass_warm_s"]))),
        ("  of which JIT compile (s)", col(lambda r: fmt(c(r["mpe"]["compile_pass_warm"])))),
        ("MPE end to end, warm (fit + pass, s)", col(lambda r: fmt(r["mpe_e2e_warm_s"]))),
        ("  derived: warm pass minus its JIT compile (s)", col(lambda r: fmt(r["mpe_pass_compute_s"]))),
        (f"**Peer** S×N log-lik matrix, S={draws}, first call (s)",
         col(lambda r: fmt(r["peer"]["loglik_first_s"]))),
        ("  same, warm (compiled) call (s)", col(lambda r: fmt(r["peer"]["loglik_warm_s"]))),
        ("az.from_dict (s)", col(lambda r: fmt(r["peer"]["from_dict_s"]))),
        ("az.loo(pointwise=True) alone (s)", col(lambda r: fmt(r["peer"]["loo_s"]))),
        ("CPU seconds (all threads): MPE pass warm / az.loo",
         col(lambda r: f"{r['mpe']['pass_warm_cpu_s']:.3g} / {r['peer']['loo_cpu_s']:.3g}")),
        ("**Ratio** az.loo / MPE pass (warm)", col(lambda r: fmt(r["ratio_loo_pass_warm"]))),
        ("  az.loo / MPE pass (first call)", col(lambda r: fmt(r["ratio_loo_pass_first"]))),
        ("  az.loo / MPE pass (warm, minus compile)", col(lambda r: fmt(r["ratio_loo_pass_compute"]))),
        ("  same in CPU seconds: az.loo / MPE pass (warm)", col(lambda r: fmt(r["ratio_loo_pass_cpu"]))),
        ("(az.loo + log-lik) / MPE end to end (warm)", col(lambda r: fmt(r["ratio_e2e_warm"]))),
        ("  (az.loo + log-lik) / MPE end to end (first)", col(lambda r: fmt(r["ratio_e2e_first"]))),
        ("**Memory** baseline RSS, MPE / peer (MiB)",
         col(lambda r: f"{r['mpe']['rss_baseline_mb']:.0f} / {r['peer']['rss_baseline_mb']:.0f}")),
        ("MPE peak RSS after fit / after pass (first call; MiB)",
         col(lambda r: pair(r["mpe"], "rss_after_fit_first_mb", "rss_after_pass_first_mb"))),
        ("MPE peak RSS over both calls (MiB)", col(lambda r: fmt(r["mpe"]["rss_peak_mb"], ".0f"))),
        ("MPE peak − baseline (MiB)", col(lambda r: fmt(r["mem_mpe_mb"], ".0f"))),
        ("peer peak RSS after log-lik / after loo (MiB)",
         col(lambda r: f"{r['peer']['rss_after_loglik_mb']:.0f} / {r['peer']['rss_peak_mb']:.0f}")),
        ("peer peak − baseline (MiB)", col(lambda r: fmt(r["mem_peer_mb"], ".0f"))),
        ("memory ratio peer / MPE (increments)", col(lambda r: fmt(r["ratio_mem"]))),
        ("**Agreement** corr(MPE elpd_loo_i, PSIS loo_i)",
         col(lambda r: fmt(r["agree"]["corr_elpd"], ".6f"))),
        ("Σ elpd_loo MPE", col(lambda r: fmt(r["agree"]["elpd_mpe"], ".2f"))),
        ("Σ elpd_loo PSIS (az.loo)", col(lambda r: fmt(r["agree"]["elpd_psis"], ".2f"))),
        ("max pointwise abs. difference", col(lambda r: fmt(r["agree"]["max_abs_diff_pointwise"]))),
        ("max leverage / max Pareto k̂",
         col(lambda r: f"{r['mpe']['max_leverage']:.3f} / {r['peer']['max_k']:.3f}")),
        ("corr(leverage, k̂)", col(lambda r: fmt(r["agree"]["corr_leverage_k"], ".3f"))),
    ]
    head = "| metric | " + " | ".join(f"N = {r['n']:,}" for r in rows) + " |"
    sep = "|---|" + "---:|" * len(rows)
    body = [f"| {name} | " + " | ".join(vals) + " |" for name, vals in lines]
    return "\n".join([head, sep, *body])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--draws", type=int, default=2000, help="posterior draws S for arviz.loo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for .md and .json")
    ap.add_argument("--phase", choices=["mpe", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.phase is not None:  # child process: one phase, JSON on the last stdout line
        fn = phase_mpe if args.phase == "mpe" else phase_peer
        rec = fn(args.n, args.draws, args.seed, args.workdir)
        print(json.dumps(rec))
        return

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_core_") as tmp:
        workdir = Path(tmp)
        for n in args.sizes:
            m = run_phase("mpe", n, args, workdir)
            p = run_phase("peer", n, args, workdir)
            r = {"n": n, "mpe": m, "peer": p, "agree": agreement(n, workdir)}
            r["mpe_e2e_first_s"] = m["fit_first_s"] + m["pass_first_s"]
            r["mpe_e2e_warm_s"] = m["fit_warm_s"] + m["pass_warm_s"]
            r["ratio_loo_pass_warm"] = p["loo_s"] / m["pass_warm_s"]
            r["ratio_loo_pass_first"] = p["loo_s"] / m["pass_first_s"]
            r["mpe_pass_compute_s"] = m["pass_warm_s"] - m["compile_pass_warm"]["total"]
            r["ratio_loo_pass_compute"] = p["loo_s"] / r["mpe_pass_compute_s"]
            r["ratio_loo_pass_cpu"] = p["loo_cpu_s"] / m["pass_warm_cpu_s"]
            r["ratio_e2e_warm"] = (p["loo_s"] + p["loglik_warm_s"]) / r["mpe_e2e_warm_s"]
            r["ratio_e2e_first"] = (p["loo_s"] + p["loglik_first_s"]) / r["mpe_e2e_first_s"]
            r["mem_mpe_mb"] = m["rss_peak_mb"] - m["rss_baseline_mb"]
            r["mem_peer_mb"] = p["rss_peak_mb"] - p["rss_baseline_mb"]
            r["ratio_mem"] = r["mem_peer_mb"] / r["mem_mpe_mb"]
            rows.append(r)
    total = time.perf_counter() - t_start

    import arviz
    import jax

    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    env = (f"Python {platform.python_version()}, jax {jax.__version__}, arviz {arviz.__version__}, "
           f"{platform.machine()}, {os.cpu_count()} CPU cores, backend {jax.default_backend()}; "
           f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end")
    sources = sorted({r["mpe"]["source"] for r in rows})
    paths = sorted({f"{r['mpe']['memories']}; {r['mpe']['elpd_integration']}" for r in rows})
    code = f"numpyro_mpe {sources[0]}" if len(sources) == 1 else (
        f"WARNING: the package changed during the run, the sizes used different code: {sources}")
    md = "\n".join([
        f"Logistic regression, P = {P_FEATURES + 1}, float64, S = {args.draws} draws from the Laplace "
        f"posterior for az.loo; seed {args.seed}.",
        "",
        table(rows, args.draws),
        "",
        f"{env}. Total benchmark wall time {total:.0f} s.",
        f"Code: {code}. MPE memories / elpd integration: {' | '.join(paths)}.",
    ])
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_core.md").write_text(md + "\n")
    meta = {"sizes": args.sizes, "draws": args.draws, "seed": args.seed, "P": P_FEATURES + 1,
            "environment": env, "code": code, "total_wall_s": total}
    (args.out / "bench_core.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
