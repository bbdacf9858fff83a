#!/usr/bin/env python
"""Exact Bayesian leave-one-out ground truth for the problems of ``benchmarks/loo_suite.py``.

For every problem:

* NUTS on the full data (``numpyro.enable_x64()``, vectorized chains), timed; then
  ``az.loo(az.from_numpyro(mcmc, log_likelihood=True), pointwise=True)`` (PSIS-LOO), timed;
* the full-data posterior mean and sd of every latent site (constrained) and of the flat unconstrained
  vector;
* for every observation i, NUTS on the data without i (the same NUTS kernel, compiled once with the data
  as arguments of one ``jax.jit``-ed function and reused for all i: :class:`RefitSampler`) and the exact
  LOO predictive density ``elpd_i = log mean_s p(y_i | theta_s)`` over the refit draws, with its Monte
  Carlo standard error (delta method, effective sample size of p(y_i | theta_s)).
  A refit with split R-hat > 1.05 or any divergence is rerun with more warmup and a higher target
  acceptance probability (and once more if that is not enough); every attempt is recorded.

One JSON file per problem is written to ``--out`` (default ``tests/data/loo_truth``), then a summary table
is printed. ``--summary-only`` prints the table of the JSON files already in ``--out``.

Run from the repository root, e.g.::

    nice python benchmarks/ground_truth.py --only stackloss cpunish
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RHAT_MAX = 1.05
DEFAULT_OUT = "tests/data/loo_truth"


# ------------------------------------------------------------------------------------------------- helpers


def _versions() -> dict:
    import arviz
    import jax
    import jaxlib
    import numpy
    import numpyro
    import sklearn
    import statsmodels

    return {"python": platform.python_version(), "numpyro": numpyro.__version__, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "arviz": arviz.__version__, "numpy": numpy.__version__,
            "statsmodels": statsmodels.__version__, "sklearn": sklearn.__version__}


def _split_static(kwargs: dict) -> tuple[dict, dict]:
    """(array kwargs, static kwargs): static values (ints) are bound into the model with functools.partial
    so that a jitted sampler traces only the arrays."""
    import numpy as np

    dyn = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    static = {k: v for k, v in kwargs.items() if k not in dyn}
    return dyn, static


def _make_mcmc(model, *, warmup, samples, chains, target_accept, jit_model_args):
    from numpyro.infer import MCMC, NUTS

    return MCMC(NUTS(model, target_accept_prob=target_accept), num_warmup=warmup, num_samples=samples,
                num_chains=chains, chain_method="vectorized", progress_bar=False,
                jit_model_args=jit_model_args)


class RefitSampler:
    """Vectorized NUTS over chains for one model, compiled once for all data sets of the same shapes.

    The same kernel as ``MCMC(NUTS(model), chain_method="vectorized")`` (numpyro's functional
    ``numpyro.infer.hmc.hmc(potential_fn_gen=..., algo="NUTS")`` with ``NUTS``'s defaults: diagonal mass
    matrix, step-size and mass-matrix adaptation, max tree depth 10; chains start at ``init_to_uniform``
    positions, uniform(-2, 2) in unconstrained space), with the data as *arguments* of one ``jax.jit``-ed
    function. ``MCMC(..., jit_model_args=True)`` recompiles its sampling loop on every ``run`` with numpyro
    0.22 / jax 0.10 (``fori_collect`` wraps a fresh ``jax.jit`` each call, so the static-argument cache
    misses: 5-18 s of XLA compilation per refit, measured), hence this wrapper.
    """

    def __init__(self, model, example_args, example_kwargs, *, warmup, samples, chains, target_accept):
        import jax
        from jax import lax
        from jax.flatten_util import ravel_pytree
        from numpyro.infer.hmc import hmc
        from numpyro.infer.util import initialize_model

        info = initialize_model(jax.random.PRNGKey(0), model, model_args=example_args,
                                model_kwargs=example_kwargs, dynamic_args=True)
        flat0, unravel = ravel_pytree(info.param_info.z)
        init_kernel, sample_kernel = hmc(potential_fn_gen=info.potential_fn, algo="NUTS")
        postprocess_gen = info.postprocess_fn
        self.chains, self.samples = chains, samples

        def chain(key, args, kwargs):
            k_init, k_run = jax.random.split(key)
            z = unravel(jax.random.uniform(k_init, flat0.shape, flat0.dtype, -2.0, 2.0))
            state = init_kernel(z, warmup, target_accept_prob=target_accept, model_args=args,
                                model_kwargs=kwargs, rng_key=k_run)
            state = lax.fori_loop(0, warmup, lambda _, st: sample_kernel(st, model_args=args,
                                                                          model_kwargs=kwargs), state)

            def body(st, _):
                st = sample_kernel(st, model_args=args, model_kwargs=kwargs)
                return st, (st.z, st.diverging, st.num_steps)

            _, (zs, div, steps) = lax.scan(body, state, None, length=samples)
            constrained = jax.vmap(postprocess_gen(*args, **kwargs))(zs)
            return constrained, div, steps

        def run(key, args, kwargs):
            keys = jax.random.split(key, chains)
            return jax.vmap(chain, in_axes=(0, None, None))(keys, args, kwargs)

        self._run = jax.jit(run)

    def run(self, key, args, kwargs):
        """Returns (samples grouped by chain, diverging (chains, draws), num_steps (chains, draws))."""
        import jax
        import numpy as np

        smp, div, steps = jax.block_until_ready(self._run(key, args, kwargs))
        return {k: np.asarray(v) for k, v in smp.items()}, np.asarray(div), np.asarray(steps)


def _diagnostics(samples_by_chain: dict, diverging) -> dict:
    """Max split R-hat, min ESS over all scalar latent components, number of divergences."""
    import numpy as np
    from numpyro.diagnostics import summary

    s = summary({k: np.asarray(v) for k, v in samples_by_chain.items()}, group_by_chain=True)
    rhat = max(float(np.max(v["r_hat"])) for v in s.values())
    ess = min(float(np.min(v["n_eff"])) for v in s.values())
    return {"max_rhat": rhat, "min_ess": ess, "divergences": int(np.asarray(diverging).sum())}


def _ok(d: dict) -> bool:
    return d["max_rhat"] <= RHAT_MAX and d["divergences"] == 0


def _exact_elpd(ll):
    """log mean_s p_s and its MCSE from per-draw log densities ``ll`` of shape (chains, draws).

    MCSE by the delta method: sd(p) / sqrt(ESS(p)) / mean(p), ESS the (non-rank-normalized) effective
    sample size of the series p_s, as for the MCSE of a mean; also the iid version (ESS = S)."""
    import numpy as np
    from numpyro.diagnostics import effective_sample_size

    ll = np.asarray(ll, dtype=np.float64)
    m = ll.max()
    w = np.exp(ll - m)
    mean = w.mean()
    sd = w.std(ddof=1)
    s = w.size
    ess = float(effective_sample_size(w)) if sd > 0 else float(s)
    ess = min(max(ess, 1.0), float(s)) if math.isfinite(ess) else float(s)
    elpd = float(m + np.log(mean))
    return elpd, float(sd / math.sqrt(ess) / mean), float(sd / math.sqrt(s) / mean), ess


def _check_finite(obj, path="$"):
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite value at {path}: {obj}")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_finite(v, f"{path}.{k}")
    elif isinstance(obj, (list, tuple)):
        for j, v in enumerate(obj):
            _check_finite(v, f"{path}[{j}]")


def _floats(x) -> list:
    import numpy as np

    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]


# ------------------------------------------------------------------------------------------------ one problem


def run_problem(p, *, chains, warmup, samples, refit_warmup, seed, command, mcse_target=0.02, max_batches=8,
                quiet=False) -> dict:
    import arviz as az
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from loo_suite import drop
    from numpyro.infer.util import log_likelihood, unconstrain_fn
    from tqdm import tqdm

    n = p.n_obs
    dyn, static = _split_static(p.kwargs)
    model = functools.partial(p.model, **static) if static else p.model
    key = jax.random.PRNGKey(seed)

    # ---- full data: NUTS, then PSIS-LOO
    full = _make_mcmc(model, warmup=warmup, samples=samples, chains=chains, target_accept=0.8,
                      jit_model_args=False)
    t0 = time.perf_counter()
    full.run(jax.random.fold_in(key, 0), *p.args, **dyn)
    jax.block_until_ready(full.get_samples())
    nuts_time = time.perf_counter() - t0
    full_diag = _diagnostics(full.get_samples(group_by_chain=True), full.get_extra_fields()["diverging"])

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = az.from_numpyro(full, log_likelihood=True)
        loo = az.loo(idata, pointwise=True, var_name=p.var_name)
    psis_time = time.perf_counter() - t0
    psis_warnings = sorted({str(w.message) for w in caught})
    psis_elpd_i = np.asarray(loo.loo_i).ravel()
    pareto_k = np.asarray(loo.pareto_k).ravel()

    samples_flat = {k: np.asarray(v) for k, v in full.get_samples().items()}
    post_mean = {k: _floats(v.mean(0)) for k, v in samples_flat.items()}
    post_sd = {k: _floats(v.std(0, ddof=1)) for k, v in samples_flat.items()}
    post_shape = {k: list(v.shape[1:]) for k, v in samples_flat.items()}

    def unconstrained(params):
        return ravel_pytree(unconstrain_fn(model, p.args, dyn, params))[0]

    U = np.asarray(jax.jit(jax.vmap(unconstrained))(samples_flat))
    # ravel_pytree flattens a dict in sorted-key order, each site row-major
    layout = [[k, post_shape[k]] for k in sorted(samples_flat)]

    # ---- refits
    ll_full = jax.jit(lambda smp: log_likelihood(model, smp, *p.args, parallel=True, **dyn)[p.var_name])
    a0, k0 = drop(p, 0)
    d0, _ = _split_static(k0)
    settings = {1: {"target_accept": 0.8, "warmup": refit_warmup},
                2: {"target_accept": 0.95, "warmup": 2 * refit_warmup},
                3: {"target_accept": 0.99, "warmup": 4 * refit_warmup}}
    samplers = {}        # built (and compiled) on first use, keyed by attempt number

    def sampler(attempt):
        if attempt not in samplers:
            st = settings[attempt]
            samplers[attempt] = RefitSampler(model, a0, d0, warmup=st["warmup"], samples=samples,
                                             chains=chains, target_accept=st["target_accept"])
        return samplers[attempt]

    exact_i, mcse_i, mcse_iid_i, ess_p_i, refit_diag, times_i = [], [], [], [], [], []
    reruns = 0
    t_refits = time.perf_counter()
    bar = tqdm(range(n), desc=f"{p.name} refits", disable=quiet, file=sys.stderr, dynamic_ncols=True,
               mininterval=5.0)
    for i in bar:
        t0 = time.perf_counter()
        a_i, k_i = drop(p, i)
        dyn_i, _ = _split_static(k_i)
        rkey = jax.random.fold_in(key, 1 + i)
        attempt = 1
        smp, div, steps = sampler(attempt).run(rkey, a_i, dyn_i)
        d = _diagnostics(smp, div)
        attempts = [dict(d, mean_leapfrog_steps=float(steps.mean()), **settings[attempt])]
        while not _ok(d) and attempt < 3:
            attempt += 1
            reruns += 1
            smp, div, steps = sampler(attempt).run(jax.random.fold_in(rkey, attempt), a_i, dyn_i)
            d = _diagnostics(smp, div)
            attempts.append(dict(d, mean_leapfrog_steps=float(steps.mean()), **settings[attempt]))
        final = attempt

        def held_out_ll(smp, i=i):
            flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in smp.items()}
            return np.asarray(ll_full(flat))[:, i].reshape(-1, samples)

        ll = held_out_ll(smp)
        e, se, se_iid, ess_p = _exact_elpd(ll)
        # too noisy: pool further independent batches of `chains` chains (same sampler and settings)
        batches = 1
        if se > mcse_target and max_batches > 1:
            want = min(max_batches, math.ceil((se / mcse_target) ** 2))
            pooled_smp, pooled_div = [smp], [div]
            for b in range(1, want):
                smp_b, div_b, _ = sampler(final).run(jax.random.fold_in(rkey, 100 + b), a_i, dyn_i)
                pooled_smp.append(smp_b)
                pooled_div.append(div_b)
                ll = np.concatenate([ll, held_out_ll(smp_b)], axis=0)
            batches = want
            smp = {k: np.concatenate([s_[k] for s_ in pooled_smp], axis=0) for k in smp}
            d = _diagnostics(smp, np.concatenate(pooled_div, axis=0))
            e, se, se_iid, ess_p = _exact_elpd(ll)
        exact_i.append(e)
        mcse_i.append(se)
        mcse_iid_i.append(se_iid)
        ess_p_i.append(ess_p)
        refit_diag.append({"max_rhat": d["max_rhat"], "min_ess": d["min_ess"],
                           "divergences": d["divergences"],
                           "mean_leapfrog_steps": attempts[-1]["mean_leapfrog_steps"],
                           "batches": batches, "draws": int(ll.size),
                           "attempts": attempts if len(attempts) > 1 else None})
        times_i.append(time.perf_counter() - t0)
        bar.set_postfix(reruns=reruns, mcse=f"{max(mcse_i):.3f}")
    bar.close()
    refits_time = time.perf_counter() - t_refits

    exact_i = np.asarray(exact_i)
    bad = [i for i, d in enumerate(refit_diag) if not _ok(d)]
    rerun_obs = [i for i, d in enumerate(refit_diag) if d["attempts"] is not None]
    pooled_obs = [i for i, d in enumerate(refit_diag) if d["batches"] > 1]
    noisy = [i for i, se in enumerate(mcse_i) if se > mcse_target]
    notes = [f"{reruns} rerun(s) of refits for observation(s) {rerun_obs}" if rerun_obs
             else "no refit needed a rerun"]
    if pooled_obs:
        extra = sum(refit_diag[i]["batches"] for i in pooled_obs) - len(pooled_obs)
        notes.append(f"observation(s) {pooled_obs} had MCSE > {mcse_target} with one batch of {chains} "
                     f"chains; {extra} further batch(es) pooled (see refit_diagnostics[i].batches)")
    if noisy:
        notes.append(f"MCSE still > {mcse_target} at observation(s) {noisy} (max {max(mcse_i):.3f}; "
                     f"batches capped at {max_batches})")
    if bad:
        notes.append(f"PATHOLOGICAL for NUTS: refits of observation(s) {bad} still have R-hat > {RHAT_MAX} "
                     "or divergences after reruns with target_accept 0.95 and 0.99; their exact_elpd_i is "
                     "from the last attempt")
    if not _ok(full_diag):
        notes.append(f"full-data fit: max R-hat {full_diag['max_rhat']:.3f}, "
                     f"{full_diag['divergences']} divergences")
    nk = int((pareto_k > 0.7).sum())
    if nk:
        notes.append(f"PSIS Pareto k > 0.7 at observation(s) {np.flatnonzero(pareto_k > 0.7).tolist()}")
    if static:
        notes.append(f"static keyword(s) {sorted(static)} bound into the model with functools.partial")

    out = {
        "name": p.name,
        "description": p.description,
        "n_obs": n,
        "var_name": p.var_name,
        "obs_dim": p.obs_dim,
        "command": command,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "seed": seed,
        "rng_keys": "full fit: fold_in(PRNGKey(seed), 0); refit i: fold_in(PRNGKey(seed), 1 + i); "
                    "rerun attempt a of refit i: fold_in(fold_in(PRNGKey(seed), 1 + i), a); extra batch b of "
                    "refit i: fold_in(fold_in(PRNGKey(seed), 1 + i), 100 + b)",
        "nuts": {"sampler": "NUTS", "chains": chains, "chain_method": "vectorized", "num_samples": samples,
                 "full_fit": {"num_warmup": warmup, "target_accept_prob": 0.8},
                 "refits": {"num_warmup": refit_warmup, "target_accept_prob": 0.8,
                            "engine": "RefitSampler: numpyro.infer.hmc.hmc(algo='NUTS') vmapped over chains, "
                                      "one jax.jit for all held-out data sets (see ground_truth.py)"},
                 "extra_batches": {"trigger": f"exact_elpd_mcse_i > {mcse_target}",
                                   "max_batches": max_batches,
                                   "what": "further independent batches of `chains` chains with the "
                                           "accepted attempt's settings, draws pooled "
                                           "(keys fold_in(refit key, 100 + b))"},
                 "reruns": {"trigger": f"max split R-hat > {RHAT_MAX} or any divergence",
                            "attempt_2": {"num_warmup": 2 * refit_warmup, "target_accept_prob": 0.95},
                            "attempt_3": {"num_warmup": 4 * refit_warmup, "target_accept_prob": 0.99}},
                 "x64": True},
        "versions": _versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "exact_elpd_i": _floats(exact_i),
        "exact_elpd_mcse_i": _floats(mcse_i),
        "exact_elpd_mcse_iid_i": _floats(mcse_iid_i),
        "exact_ess_p_i": _floats(ess_p_i),
        "exact_elpd": float(exact_i.sum()),
        "exact_elpd_mcse": float(math.sqrt(sum(s * s for s in mcse_i))),
        "exact_se": float(math.sqrt(n * exact_i.var())),
        "psis_elpd_i": _floats(psis_elpd_i),
        "psis_pareto_k": _floats(pareto_k),
        "psis_elpd": float(loo.elpd_loo),
        "psis_se": float(loo.se),
        "psis_p_loo": float(loo.p_loo),
        "psis_warnings": psis_warnings,
        "nuts_time_s": nuts_time,
        "psis_time_s": psis_time,
        "refits_time_s": refits_time,
        "refit_time_s_i": _floats(times_i),
        "full_fit_diagnostics": full_diag,
        "refit_diagnostics": refit_diag,
        "refit_reruns": reruns,
        "posterior_mean": post_mean,
        "posterior_sd": post_sd,
        "posterior_shape": post_shape,
        "unconstrained_layout": layout,
        "unconstrained_mean": _floats(U.mean(0)),
        "unconstrained_sd": _floats(U.std(0, ddof=1)),
        "notes": "; ".join(notes) + ". Times are wall seconds and include JIT compilation (the first refit "
                 "compiles the refit sampler).",
    }
    _check_finite(out)
    return out


# ---------------------------------------------------------------------------------------------------- table


def summary_table(results: list[dict]) -> str:
    head = ("| problem | N | exact Σ elpd (MCSE) | PSIS Σ elpd | abs(PSIS − exact) | #k̂>0.7 | max |Δ_i| "
            "| max MCSE_i | max refit R-hat | reruns | NUTS s | PSIS s | refits s |")
    import numpy as np

    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for r in results:
        d = np.abs(np.asarray(r["psis_elpd_i"]) - np.asarray(r["exact_elpd_i"]))
        nk = int((np.asarray(r["psis_pareto_k"]) > 0.7).sum())
        rh = max(x["max_rhat"] for x in r["refit_diagnostics"])
        lines.append(
            f"| {r['name']} | {r['n_obs']} | {r['exact_elpd']:.3f} ({r['exact_elpd_mcse']:.3f}) | "
            f"{r['psis_elpd']:.3f} | {abs(r['psis_elpd'] - r['exact_elpd']):.3f} | {nk} | {d.max():.3f} | "
            f"{max(r['exact_elpd_mcse_i']):.3f} | {rh:.3f} | {r['refit_reruns']} | {r['nuts_time_s']:.1f} | "
            f"{r['psis_time_s']:.1f} | {r['refits_time_s']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these problems")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1000, help="warmup of the full-data fit")
    ap.add_argument("--refit-warmup", type=int, default=500, help="warmup of each leave-one-out refit")
    ap.add_argument("--samples", type=int, default=1000, help="draws per chain (full fit and refits)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mcse-target", type=float, default=0.02,
                    help="pool further batches of chains for a refit whose elpd MCSE exceeds this")
    ap.add_argument("--max-batches", type=int, default=8,
                    help="at most this many batches of chains per refit")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--summary-only", action="store_true",
                    help="print the table of the JSON files already in --out and exit")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)

    import loo_suite

    names = args.only or list(loo_suite.NAMES)
    for nm in names:
        if nm not in loo_suite.NAMES:
            ap.error(f"unknown problem {nm!r}; known: {', '.join(loo_suite.NAMES)}")

    if args.summary_only:
        res = [json.loads((out_dir / f"{nm}.json").read_text()) for nm in names
               if (out_dir / f"{nm}.json").exists()]
        print(summary_table(res))
        return 0

    import numpyro

    numpyro.enable_x64()
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv])
    results = []
    t_all = time.perf_counter()
    for nm in names:
        p = loo_suite.problem(nm)
        t0 = time.perf_counter()
        r = run_problem(p, chains=args.chains, warmup=args.warmup, samples=args.samples,
                        refit_warmup=args.refit_warmup, seed=args.seed, command=command,
                        mcse_target=args.mcse_target, max_batches=args.max_batches, quiet=args.quiet)
        r["total_time_s"] = time.perf_counter() - t0
        path = out_dir / f"{nm}.json"
        path.write_text(json.dumps(r, indent=1, allow_nan=False) + "\n")
        print(f"{nm}: exact {r['exact_elpd']:.3f}  PSIS {r['psis_elpd']:.3f}  "
              f"({r['total_time_s']:.0f} s) -> {path}", flush=True)
        results.append(r)
    print()
    print(summary_table(results))
    print(f"\ntotal wall time {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
