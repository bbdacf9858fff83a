"""Benchmark (issue "Latency"): fresh process to MPE leave-one-out, against NUTS + ``arviz.loo``.

How long a user waits for MPE leave-one-out from a fresh Python process, with a cold and a warm persistent
compilation cache, and for a second fit in the same process, against NUTS + ``arviz.loo`` started the same
way.

Problems (``--only`` picks among them by name):

* ``stackloss``: Brownlee's stack loss (N = 21), ``numpyro_mpe.io.datasets.stackloss_model`` (Gaussian
  linear regression on the standardized predictors, P = 5).
* ``logit1e3``, ``logit1e4``: Bernoulli-logit regression, N = 10³ / 10⁴, intercept + 5 standardized
  synthetic features (P = 6), seeded.
* ``hier``: hierarchical logistic regression, N = 2000 in 40 groups (50 each), non-centred random
  intercepts ``a_g = mu_a + sigma_a z_g`` + 3 standardized features (P = 45), seeded.

Every measurement below is one fresh process (``python benchmarks/bench_latency.py --child ...``), float64
(``numpyro.enable_x64()``), timed from just before the parent starts it (so interpreter start-up and the
imports of numpy / jax / numpyro / numpyro_mpe are included):

1. **MPE, cold cache**: ``NUMPYRO_MPE_CACHE_DIR`` = a new empty folder; imports, data,
   ``fit = mpe.Laplace(model, progress=False).run(PRNGKey(0), ...)``, ``fit.sensitivities()``,
   ``fit.loo(method="mpe")`` (the closed form), then the default ``fit.loo()`` (``method="auto"``,
   importance-sampling corrections).  Reported: time from process start to the end of ``sensitivities``
   and of each ``loo`` (the default's less the closed form's step, as a user calling only it waits); per
   step the programs compiled (or loaded from the persistent cache) and their seconds
   (``numpyro_mpe.programs.track``), plus persistent-cache hits / writes (``jax.monitoring`` events
   ``/jax/compilation_cache/cache_hits`` / ``cache_misses``) and trace + lowering seconds.
   After ``loo`` the same process fits data B of the same shapes (other seed; a bootstrap resample of the
   rows for stack loss) and runs ``sensitivities`` again: **second fit** = its (fit + sensitivities) wall
   time against the first's, and the programs it compiled (target ≤ 0.1 × and 0 programs).
2. **MPE, warm cache**: the same process again with the same cache folder.
3. **Peer**: NUTS (1 chain, 1000 warmup + 1000 draws; ``--quick``: 200 + 200), ``az.from_numpyro(mcmc,
   log_likelihood=True)`` and ``az.loo(idata, pointwise=True)``; time from process start to the end of
   ``az.loo``, and the ``az.loo`` call alone (its first call, as a user meets it; a second call is in the
   JSON).

``--repeats K`` runs each of these K times (a new cache folder for every cold/warm pair) and reports medians.
Ratios are computed from the medians of the same run.

Usage::

    python benchmarks/bench_latency.py                       # all four problems, NUTS 1000 + 1000
    python benchmarks/bench_latency.py --only stackloss hier --repeats 3
    python benchmarks/bench_latency.py --quick --out /tmp/bench  # smoke: stackloss, logit1e3; 200 + 200

Writes ``benchmarks/results/bench_latency.md`` and ``bench_latency.json`` (``--out`` to change the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from _common import CompileClock, max_rss_mb, source_state

HERE = Path(__file__).resolve().parent

#: name → (description, N, problem-specific settings).  The order is the table's.
PROBLEMS = {
    "stackloss": ("stack loss, Gaussian linear regression", 21, {}),
    "logit1e3": ("logistic regression, 5 features + intercept", 1_000, {"n": 1_000}),
    "logit1e4": ("logistic regression, 5 features + intercept", 10_000, {"n": 10_000}),
    "hier": ("hierarchical logistic, 40 groups, non-centred intercepts, 3 features", 2_000,
             {"n": 2_000, "groups": 40}),
}
QUICK = ("stackloss", "logit1e3")
LOGIT_FEATURES = 5
HIER_FEATURES = 3
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                "/jax/compilation_cache/cache_misses": "cache_writes"}


# ----------------------------------------------------------------------------- models and data
def logit_model(X, y=None):
    import numpyro
    import numpyro.distributions as dist

    b = numpyro.sample("b", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)


def hier_model(X, g, num_groups, y=None):
    import numpyro
    import numpyro.distributions as dist

    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 2.5))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    with numpyro.plate("groups", num_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    logits = mu_a + sigma_a * z[g] + X @ beta
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def _standardized(rng, n, k):
    Z = rng.standard_normal((n, k))
    return (Z - Z.mean(0)) / Z.std(0)


def make_problem(name: str, variant: int):
    """(model, args, kwargs) of problem ``name``; ``variant`` 0 is data A, 1 data B (same shapes, other
    values)."""
    import numpy as np

    settings = PROBLEMS[name][2]
    if name == "stackloss":
        from numpyro_mpe.io import datasets


        df = datasets.load_stackloss()
        X = df[list(datasets.STACKLOSS_PREDICTORS)].to_numpy(float)
        y = df[datasets.STACKLOSS_RESPONSE].to_numpy(float)
        if variant:  # bootstrap resample of the rows (seeded; every predictor keeps a nonzero spread)
            rng = np.random.default_rng(100 + variant)
            while True:
                idx = rng.integers(0, len(y), len(y))
                if np.all(X[idx].std(0) > 0):
                    break
            X, y = X[idx], y[idx]
        return datasets.stackloss_model, (X,), {"y": y}
    rng = np.random.default_rng(variant)
    n = settings["n"]
    if name.startswith("logit"):
        X = np.empty((n, LOGIT_FEATURES + 1))
        X[:, 0] = 1.0
        X[:, 1:] = _standardized(rng, n, LOGIT_FEATURES)
        beta = np.concatenate([[-0.3], rng.normal(scale=0.8, size=LOGIT_FEATURES)])
        logits = X @ beta
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
        return logit_model, (X,), {"y": y}
    if name == "hier":
        G = settings["groups"]
        X = _standardized(rng, n, HIER_FEATURES)
        g = rng.permutation(np.arange(n) % G).astype(np.int32)
        a = -0.5 + 0.8 * rng.standard_normal(G)
        beta = rng.normal(scale=0.8, size=HIER_FEATURES)
        logits = a[g] + X @ beta
        y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.float64)
        return hier_model, (X, g, G), {"y": y}
    raise ValueError(f"unknown problem {name!r}")


# ----------------------------------------------------------------------------- child processes
class CacheEvents:
    """Counts JAX's persistent-cache hits and writes (``jax.monitoring`` events)."""

    def __init__(self):
        import jax.monitoring

        self.counts = dict.fromkeys(CACHE_EVENTS.values(), 0)
        jax.monitoring.register_event_listener(self._listen)

    def _listen(self, event, **_):
        key = CACHE_EVENTS.get(event)
        if key is not None:
            self.counts[key] += 1

    def snapshot(self) -> dict:
        return dict(self.counts)


class Steps:
    """Wall time, programs (``numpyro_mpe.programs.track``), compile seconds and cache events of named
    steps of one process, and the time since the process was started (``t0``, the parent's clock)."""

    def __init__(self, t0: float, with_track: bool):
        self.t0 = t0
        self.clock = CompileClock()
        self.cache = CacheEvents()
        self.with_track = with_track
        self.rec: dict[str, dict] = {}

    def run(self, name: str, fn):
        import contextlib

        if self.with_track:
            from numpyro_mpe.programs import track

            ctx = track(name)
        else:
            ctx = contextlib.nullcontext(None)
        c0, h0 = self.clock.snapshot(), self.cache.snapshot()
        start = time.perf_counter()
        with ctx as stats:
            out = fn()
        wall = time.perf_counter() - start
        d = CompileClock.diff(self.clock.snapshot(), c0)
        h1 = self.cache.snapshot()
        r = {"wall_s": wall, "since_start_s": time.time() - self.t0,
             "xla_compiles": d["compiles"], "trace_s": d["trace"], "lower_s": d["lower"], "xla_s": d["xla"],
             **{k: h1[k] - h0[k] for k in h1}}
        if stats is not None:
            r["programs"] = stats.programs + stats.loaded  # built: compiled, or loaded from the cache
            r["program_s"] = stats.seconds + stats.load_seconds
            r["loaded"] = stats.loaded
            r["program_names"] = dict(Counter(stats.names).most_common())
        self.rec[name] = r
        return out


def _block(x):
    import jax

    try:
        jax.block_until_ready(x)
    except Exception:  # noqa: BLE001 - a pytree with leaves JAX cannot wait on: nothing to wait for
        pass
    return x


def child_mpe(args) -> dict:
    t_main = time.time() - args.t0
    rec: dict = {"kind": "mpe", "problem": args.problem, "main_since_start_s": t_main,
                 "cache_dir": os.environ.get("NUMPYRO_MPE_CACHE_DIR")}
    start = time.perf_counter()
    import jax
    import numpy as np
    import numpyro

    import numpyro_mpe as mpe

    Laplace = mpe.Laplace  # the lazy import a user's first ``mpe.Laplace`` triggers
    numpyro.enable_x64()
    rec["imports_s"] = time.perf_counter() - start
    steps = Steps(args.t0, with_track=True)
    model, a, kw = steps.run("data", lambda: make_problem(args.problem, 0))

    def fit_a():
        f = Laplace(model, progress=False).run(jax.random.PRNGKey(0), *a, **kw)
        _block(f.posterior)
        return f

    fit = steps.run("fit", fit_a)
    ds = steps.run("sensitivities", fit.sensitivities)
    # the closed-form per-observation LOO first (what issue "Latency" times), then the default
    # ``fit.loo()`` (method="auto": importance-sampling corrections), each timed on its own
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elpd_mpe = steps.run("loo_mpe", lambda: fit.loo(method="mpe"))
        elpd = steps.run("loo", fit.loo)
    rec["loo_warnings"] = sorted({str(w.message).split("\n")[0][:200] for w in caught})
    rec["to_sensitivities_s"] = steps.rec["sensitivities"]["since_start_s"]
    rec["to_loo_mpe_s"] = steps.rec["loo_mpe"]["since_start_s"]
    rec["to_loo_s"] = steps.rec["loo"]["since_start_s"]
    # what a user calling only the default ``fit.loo()`` after ``sensitivities`` waits
    rec["to_loo_auto_s"] = rec["to_loo_s"] - steps.rec["loo_mpe"]["wall_s"]
    rec["num_params"] = int(fit.adapter.num_params)
    rec["n_obs"] = int(ds["elpd_loo"].size)
    rec["elpd_loo"] = float(elpd.elpd_loo)
    rec["elpd_loo_mpe"] = float(elpd_mpe.elpd_loo)
    rec["loo_methods"] = (dict(Counter(str(m) for m in np.asarray(elpd.method_i).ravel()))
                          if hasattr(elpd, "method_i") else None)
    rec["package_compile_info"] = {k: v for k, v in fit.info.get("compile", {}).items()}
    rec["first_s"] = steps.rec["fit"]["wall_s"] + steps.rec["sensitivities"]["wall_s"]

    # second fit in the same process: data B, same shapes
    model_b, a_b, kw_b = make_problem(args.problem, 1)

    def fit_b():
        f = Laplace(model_b, progress=False).run(jax.random.PRNGKey(0), *a_b, **kw_b)
        _block(f.posterior)
        return f

    fit2 = steps.run("fit_B", fit_b)
    ds2 = steps.run("sensitivities_B", fit2.sensitivities)
    rec["second_s"] = steps.rec["fit_B"]["wall_s"] + steps.rec["sensitivities_B"]["wall_s"]
    rec["second_programs"] = steps.rec["fit_B"]["programs"] + steps.rec["sensitivities_B"]["programs"]
    rec["first_programs"] = steps.rec["fit"]["programs"] + steps.rec["sensitivities"]["programs"]
    rec["elpd_loo_B"] = float(np.sum(ds2["elpd_loo"].values))
    rec["steps"] = steps.rec
    rec["process_programs"] = steps.clock.count
    rec["rss_peak_mb"] = max_rss_mb()
    rec["versions"] = _versions()
    rec["device"] = f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}"
    rec["source"] = source_state()
    return rec


def child_peer(args) -> dict:
    t_main = time.time() - args.t0
    rec: dict = {"kind": "peer", "problem": args.problem, "main_since_start_s": t_main,
                 "warmup": args.warmup, "samples": args.samples}
    start = time.perf_counter()
    import arviz as az
    import jax
    import numpy as np
    import numpyro
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    rec["imports_s"] = time.perf_counter() - start
    steps = Steps(args.t0, with_track=False)
    model, a, kw = steps.run("data", lambda: make_problem(args.problem, 0))

    def nuts():
        mcmc = MCMC(NUTS(model), num_warmup=args.warmup, num_samples=args.samples, num_chains=1,
                    progress_bar=False)
        mcmc.run(jax.random.PRNGKey(0), *a, **kw)
        _block(mcmc.get_samples())
        return mcmc

    mcmc = steps.run("nuts", nuts)
    idata = steps.run("from_numpyro", lambda: az.from_numpyro(mcmc, log_likelihood=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loo = steps.run("az_loo", lambda: az.loo(idata, pointwise=True))
        rec["to_loo_s"] = steps.rec["az_loo"]["since_start_s"]
        steps.run("az_loo_again", lambda: az.loo(idata, pointwise=True))
    rec["az_loo_warnings"] = sorted({str(w.message).split("\n")[0][:200] for w in caught})
    rec["elpd_loo"] = float(loo.elpd_loo)
    rec["max_pareto_k"] = float(np.max(loo.pareto_k.values))
    rec["divergences"] = int(np.sum(mcmc.get_extra_fields()["diverging"]))
    rec["steps"] = steps.rec
    rec["process_programs"] = steps.clock.count
    rec["rss_peak_mb"] = max_rss_mb()
    return rec


def _versions() -> dict:
    import arviz
    import jax
    import jaxlib
    import numpy
    import numpyro

    import numpyro_mpe

    return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "numpyro": numpyro.__version__, "arviz": arviz.__version__, "numpy": numpy.__version__,
            "numpyro_mpe": numpyro_mpe.__version__}


# ----------------------------------------------------------------------------- driver
def child_env(cache: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
    env["NUMPYRO_MPE_CACHE_DIR"] = cache
    return env


def run_child(kind: str, problem: str, args, cache: str, label: str) -> dict:
    extra = ["--warmup", str(args.warmup), "--samples", str(args.samples)] if kind == "peer" else []
    t0 = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--problem", problem,
           "--t0", repr(t0), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=child_env(cache))
    except subprocess.TimeoutExpired:
        print(f"  {problem:9s} {label:10s}: no result after {args.timeout:.0f} s, killed", file=sys.stderr)
        return {"failed": True, "timed_out": True}
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"  {problem:9s} {label:10s}: FAILED (exit {proc.returncode}) after {wall:.0f} s\n{tail}",
              file=sys.stderr)
        return {"failed": True, "returncode": proc.returncode, "error_tail": tail[-800:]}
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    rec["process_wall_s"] = wall
    print(f"  {problem:9s} {label:10s}: {wall:6.1f} s process, {fmt(rec.get('to_loo_s'))} s to loo",
          file=sys.stderr, flush=True)
    return rec


def median_of(recs: list[dict]):
    """Field-wise median of the numbers in ``recs`` (nested dicts); other values from the first record."""
    recs = [r for r in recs if not r.get("failed")]
    if not recs:
        return None
    if len(recs) == 1:
        return recs[0]

    def merge(vals):
        first = vals[0]
        if isinstance(first, dict):
            keys = [k for k in first if all(isinstance(v, dict) and k in v for v in vals)]
            return {k: merge([v[k] for v in vals]) for k in keys}
        if isinstance(first, (int, float)) and not isinstance(first, bool) and all(
                isinstance(v, (int, float)) for v in vals):
            return statistics.median(vals)
        return first

    return merge(recs)


def measure(problem: str, args) -> dict:
    cold_runs, warm_runs, peer_runs = [], [], []
    for i in range(args.repeats):
        cache = tempfile.mkdtemp(prefix=f"bench_latency_{problem}_")
        try:
            cold_runs.append(run_child("mpe", problem, args, cache, f"cold {i + 1}"))
            warm_runs.append(run_child("mpe", problem, args, cache, f"warm {i + 1}"))
            cold_runs[-1]["cache_files"] = sum(1 for _ in Path(cache).rglob("*") if _.is_file())
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        peer_runs.append(run_child("peer", problem, args, "off", f"peer {i + 1}"))
    row = {"problem": problem, "description": PROBLEMS[problem][0], "n": PROBLEMS[problem][1],
           "cold": median_of(cold_runs), "warm": median_of(warm_runs), "peer": median_of(peer_runs),
           "runs": {"cold": cold_runs, "warm": warm_runs, "peer": peer_runs}}
    c, w, p = row["cold"], row["warm"], row["peer"]

    def ratio(a, b):
        return None if a is None or not b else a / b

    peer_total = p["to_loo_s"] if p else None
    peer_loo = p["steps"]["az_loo"]["wall_s"] if p else None
    row["ratios"] = {
        "cold_mpe_over_peer": ratio(c and c.get("to_loo_mpe_s"), peer_total),
        "warm_mpe_over_peer": ratio(w and w.get("to_loo_mpe_s"), peer_total),
        "cold_auto_over_peer": ratio(c and c.get("to_loo_auto_s"), peer_total),
        "warm_auto_over_peer": ratio(w and w.get("to_loo_auto_s"), peer_total),
        "cold_over_peer": ratio(c and c["to_loo_s"], peer_total),
        "warm_over_peer": ratio(w and w["to_loo_s"], peer_total),
        "second_over_first": ratio(c and c["second_s"], c and c["first_s"]),
        "warm_second_over_first": ratio(w and w["second_s"], w and w["first_s"]),
        "warm_over_az_loo": ratio(w and w.get("to_loo_mpe_s"), peer_loo),
    }
    return row


# ----------------------------------------------------------------------------- tables
def fmt(x, spec=".3g"):
    if x is None or (isinstance(x, float) and x != x):
        return "—"
    if spec == "d" and isinstance(x, float):  # a median of an even number of counts
        return format(int(x), "d") if x.is_integer() else format(x, ".1f")
    return format(x, spec)


def _steps3(r, key, spec=".3g"):
    if not r:
        return "—"
    return " / ".join(fmt(r["steps"][s].get(key), spec) for s in ("fit", "sensitivities", "loo_mpe", "loo"))


def main_table(rows: list[dict]) -> str:
    cols = [
        ("problem", lambda r: f"{r['problem']} (N = {r['n']:,}, P = {r['cold']['num_params']})"
         if r["cold"] else r["problem"]),
        ("MPE cold: → sens / → loo mpe / → loo auto (s)",
         lambda r: f"{fmt(r['cold']['to_sensitivities_s'])} / {fmt(r['cold']['to_loo_mpe_s'])} / "
                   f"{fmt(r['cold']['to_loo_auto_s'])}" if r["cold"] else "FAILED"),
        ("cold programs fit / sens / loo mpe / loo auto", lambda r: _steps3(r["cold"], "programs", "d")),
        ("cold compile s fit / sens / loo mpe / loo auto", lambda r: _steps3(r["cold"], "program_s")),
        ("MPE warm: → sens / → loo mpe / → loo auto (s)",
         lambda r: f"{fmt(r['warm']['to_sensitivities_s'])} / {fmt(r['warm']['to_loo_mpe_s'])} / "
                   f"{fmt(r['warm']['to_loo_auto_s'])}" if r["warm"] else "FAILED"),
        ("warm programs fit / sens / loo mpe / loo auto (of which cache hits)",
         lambda r: (_steps3(r["warm"], "programs", "d") + " ("
                    + _steps3(r["warm"], "cache_hits", "d") + ")") if r["warm"] else "—"),
        ("2nd fit + sens / 1st (s)",
         lambda r: f"{fmt(r['cold']['second_s'])} / {fmt(r['cold']['first_s'])}" if r["cold"] else "—"),
        ("2nd: new programs (target 0)", lambda r: fmt(r["cold"]["second_programs"], "d") if r["cold"]
         else "—"),
        ("peer: → az.loo (s)", lambda r: fmt(r["peer"]["to_loo_s"]) if r["peer"] else "FAILED"),
        ("NUTS (s)", lambda r: fmt(r["peer"]["steps"]["nuts"]["wall_s"]) if r["peer"] else "—"),
        ("az.loo alone (s)", lambda r: fmt(r["peer"]["steps"]["az_loo"]["wall_s"]) if r["peer"] else "—"),
        ("**cold loo mpe / peer** (target ≤ 0.25)", lambda r: fmt(r["ratios"]["cold_mpe_over_peer"])),
        ("**warm loo mpe / peer**", lambda r: fmt(r["ratios"]["warm_mpe_over_peer"])),
        ("**cold loo auto / peer**", lambda r: fmt(r["ratios"]["cold_auto_over_peer"])),
        ("**warm loo auto / peer**", lambda r: fmt(r["ratios"]["warm_auto_over_peer"])),
        ("**2nd / 1st** (target ≤ 0.1)", lambda r: fmt(r["ratios"]["second_over_first"])),
        ("**warm loo mpe / az.loo alone**", lambda r: fmt(r["ratios"]["warm_over_az_loo"])),
    ]
    head = "| " + " | ".join(c[0] for c in cols) + " |"
    sep = "|---|" + "---:|" * (len(cols) - 1)
    body = []
    for r in rows:
        cells = []
        for _, f in cols:
            try:
                cells.append(f(r))
            except (KeyError, TypeError):
                cells.append("—")
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def detail_table(rows: list[dict]) -> str:
    lines = ["| problem | process | imports (s) | step | wall (s) | programs | compile (s) "
             "| trace + lower (s) | cache hits / writes |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for label, key in (("cold", "cold"), ("warm", "warm"), ("peer", "peer")):
            m = r.get(key)
            if not m:
                continue
            imports = fmt(m["main_since_start_s"] + m["imports_s"])
            names = (("nuts", "from_numpyro", "az_loo", "az_loo_again") if key == "peer" else
                     ("fit", "sensitivities", "loo_mpe", "loo", "fit_B", "sensitivities_B"))
            for s in names:
                v = m["steps"][s]
                progs, secs = ((v["xla_compiles"], v["xla_s"]) if key == "peer" else
                               (v["programs"], v["program_s"]))
                cache = "—" if key == "peer" else f"{v['cache_hits']} / {v['cache_writes']}"
                lines.append(f"| {r['problem']} | {label} | {imports} | {s} | {fmt(v['wall_s'])} | "
                             f"{fmt(progs, 'd')} | {fmt(secs)} | {fmt(v['trace_s'] + v['lower_s'])} | "
                             f"{cache} |")
    return "\n".join(lines)


def elpd_table(rows: list[dict]) -> str:
    lines = ["| problem | elpd_loo MPE closed form | elpd_loo `fit.loo()` (auto) "
             "| auto: estimate per observation | NUTS + az.loo elpd_loo | az.loo max k̂ | NUTS divergences |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        c, p = r.get("cold") or {}, r.get("peer") or {}
        meth = c.get("loo_methods")
        meth = ", ".join(f"{k}: {v}" for k, v in meth.items()) if meth else "—"
        lines.append(f"| {r['problem']} | {fmt(c.get('elpd_loo_mpe'), '.2f')} "
                     f"| {fmt(c.get('elpd_loo'), '.2f')} | {meth} | {fmt(p.get('elpd_loo'), '.2f')} "
                     f"| {fmt(p.get('max_pareto_k'), '.2f')} "
                     f"| {fmt(p.get('divergences'), 'd')} |")
    return "\n".join(lines)


def render(meta: dict, rows: list[dict]) -> str:
    nuts = f"NUTS {meta['warmup']} + {meta['samples']} draws, 1 chain"
    parts = [
        f"### Latency: fresh process to MPE leave-one-out, against {nuts} + az.loo",
        "",
        main_table(rows),
        "",
        f"Medians of {meta['repeats']} run(s) of each process. Times from the moment the parent starts the "
        "process (interpreter start-up and imports included). *cold*: `NUMPYRO_MPE_CACHE_DIR` = a new empty "
        "folder; *warm*: a second process with the same folder. *programs*: compiled programs or programs "
        "loaded from the persistent cache (`numpyro_mpe.programs.track`, one per backend-compile event); "
        "*compile s*: their seconds; the fit's include the two of the user's `jax.random.PRNGKey(0)`. "
        "*2nd*: in the cold process, after `loo`, `Laplace(...).run` + "
        "`sensitivities()` on data of the same shapes (other seed; a bootstrap resample for stack loss) "
        "against the first fit + sensitivities. *peer: → az.loo*: process start to the end of "
        "`az.loo(az.from_numpyro(mcmc, log_likelihood=True), pointwise=True)`; *az.loo alone*: that call "
        "(first call in the process). *loo mpe*: `fit.loo(method=\"mpe\")` (closed form), run first; "
        "*loo auto*: the default `fit.loo()` (method=\"auto\"), run next, its time since start less the "
        "`loo mpe` step (what a user calling only `fit.loo()` after `sensitivities()` waits). Ratios: MPE "
        "time to each `loo` over the peer's, and (warm, closed form) over `az.loo` alone.",
        "",
        "#### elpd_loo",
        "",
        elpd_table(rows),
        "",
        "#### Per step",
        "",
        detail_table(rows),
        "",
        "*imports*: process start to the end of the imports (numpy, jax, numpyro, numpyro_mpe or arviz). "
        "*programs* of the peer: XLA backend-compile events (`jax.monitoring`); *trace + lower*: jaxpr "
        "tracing and MLIR lowering seconds (paid in a warm-cache process too); *cache hits / writes*: "
        "JAX's persistent-cache events.",
    ]
    warn = sorted({w for r in rows if r.get("peer") for w in r["peer"].get("az_loo_warnings", [])})
    if warn:
        parts += ["", "az.loo warnings: " + "; ".join(warn)]
    parts += ["", f"Machine: {meta['machine']}. Versions: {meta['versions_line']}.",
              f"Code: git {meta['git_commit']}; numpyro_mpe {meta['code']}.",
              f"Command: `{meta['command']}`. Total wall time {meta['total_wall_s']:.0f} s; 1-min load "
              f"average {meta['load_start']:.1f} at start, {meta['load_end']:.1f} at end."]
    return "\n".join(parts)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, IndexError, ValueError):
        pass
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores{mem}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(PROBLEMS), metavar="NAME",
                    help=f"problems to run, among {', '.join(PROBLEMS)} (default: all; --quick: "
                         f"{', '.join(QUICK)})")
    ap.add_argument("--repeats", type=int, default=1, help="processes of each kind; medians are reported")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: NUTS 200 + 200, only stackloss and logit1e3 (unless --only)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for .md and .json")
    ap.add_argument("--timeout", type=float, default=3600.0, help="kill a process after this many seconds")
    ap.add_argument("--render", type=Path, help="re-render the tables of a saved .json (no runs)")
    ap.add_argument("--child", choices=["mpe", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--problem", choices=list(PROBLEMS), help=argparse.SUPPRESS)
    ap.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--samples", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:  # child: one process, JSON on the last stdout line
        rec = (child_mpe if args.child == "mpe" else child_peer)(args)
        print(json.dumps(rec))
        return
    if args.render is not None:
        saved = json.loads(args.render.read_text())
        print(render(saved["meta"], saved["rows"]))
        return
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.warmup = args.warmup or (200 if args.quick else 1000)
    args.samples = args.samples or (200 if args.quick else 1000)
    names = args.only or (list(QUICK) if args.quick else list(PROBLEMS))
    names = [n for n in PROBLEMS if n in names]

    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = [measure(name, args) for name in names]
    total = time.perf_counter() - t_start

    done = [r["cold"] for r in rows if r.get("cold")]
    versions = done[0]["versions"] if done else {}
    sources = sorted({m["source"] for r in rows for m in r["runs"]["cold"] + r["runs"]["warm"]
                      if not m.get("failed")})
    hashes = {s.split("sha256 ")[-1] for s in sources}
    code = (sources[-1] if len(hashes) == 1 else
            f"WARNING: the package changed during the run: {sources}" if sources else "no MPE run")
    meta = {
        "machine": machine_description() + (f", device {done[0]['device']}" if done else ""),
        "versions": versions,
        "versions_line": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "git_commit": git_commit(), "code": code,
        "command": shlex.join(["python", *(sys.argv if argv is None else [sys.argv[0], *argv])]),
        "python_executable": sys.executable,
        "problems": names, "repeats": args.repeats, "quick": args.quick,
        "warmup": args.warmup, "samples": args.samples,
        "total_wall_s": total, "load_start": load_start,
        "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }
    md = render(meta, rows)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_latency.md").write_text(md + "\n")
    (args.out / "bench_latency.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
