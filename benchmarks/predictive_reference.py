#!/usr/bin/env python
"""arviz-stats 1.x LOO predictive checks on NUTS draws: the reference values of ``tests/test_predictive.py``.

For each GLM of :func:`numpyro_mpe.io.toy.glm_model` (Poisson, logistic, Normal with unknown σ; data from
:func:`numpyro_mpe.io.toy.glm_data`, 100 and 400 observations): NUTS (4 chains × 2500 draws after 500 warmup,
``numpyro.enable_x64()``), posterior predictive draws, and arviz-stats' ``loo`` (Pareto k̂), ``loo_pit``,
``loo_expectations`` (mean, var, sd, quantiles 0.05 / 0.5 / 0.95), ``loo_score`` (CRPS, SCRPS, pointwise),
``loo_r2`` and ``loo_metrics``.  For a discrete outcome also the PSIS-weighted parts of the randomized PIT,
``pit_lower`` = Σ w 1{ỹ < y} and ``pit_mass`` = Σ w 1{ỹ = y}, from the log-weights of ``loo``.

Monte Carlo error: each chain is cut in five parts (20 batches of 500 draws) and every quantity is computed
again on each batch; ``mcse`` = sd over the batches / √20 (batch means).  The JSON stores, per model
(``f"{family}_n{n}"``), the data, the values and their MCSE (7 significant digits), and the command, the seed
and the versions.  Needs Python with arviz ≥ 1 (arviz-stats);
run from the repository root::

    /root/.pyenv/versions/3.12.1/bin/python benchmarks/predictive_reference.py
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_OUT = "tests/data/predictive_reference.json"
PROBS = (0.05, 0.5, 0.95)
BATCHES_PER_CHAIN = 5


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("arviz", "arviz-stats", "arviz-base", "numpyro", "jax", "numpy", "xarray"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _run_nuts(family: str, X, y, seed: int, warmup: int, draws: int, chains: int):
    import jax
    from numpyro.infer import MCMC, NUTS, Predictive, log_likelihood

    from numpyro_mpe.io.toy import glm_model

    mcmc = MCMC(NUTS(glm_model), num_warmup=warmup, num_samples=draws, num_chains=chains,
                chain_method="sequential", progress_bar=False)
    k_run, k_pred = jax.random.split(jax.random.PRNGKey(seed))
    mcmc.run(k_run, X, y, family=family)
    samples = mcmc.get_samples(group_by_chain=True)
    pp = Predictive(glm_model, samples, batch_ndims=2)(k_pred, X, family=family)["y"]
    ll = log_likelihood(glm_model, samples, X, y, family=family, batch_ndims=2)["y"]
    extra = mcmc.get_extra_fields(group_by_chain=True)
    return samples, pp, ll, int(extra["diverging"].sum())


def _datatree(samples, pp, ll, y):
    import numpy as np
    from arviz_base import from_dict

    post = {k: np.asarray(v) for k, v in samples.items()}
    return from_dict({"posterior": post, "posterior_predictive": {"y": np.asarray(pp)},
                      "log_likelihood": {"y": np.asarray(ll)}, "observed_data": {"y": np.asarray(y)}},
                     dims={"y": ["obs"], "b": ["b_dim"]})


def _functionals(dt, discrete: bool) -> dict:
    """Every arviz-stats LOO predictive check of ``dt`` as plain lists."""
    import numpy as np
    from arviz_stats import loo, loo_expectations, loo_metrics, loo_pit, loo_r2, loo_score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = loo(dt, pointwise=True, var_name="y")
        out = {"pareto_k": res.pareto_k.values, "pit": loo_pit(dt, var_names="y")["y"].values}
        for kind in ("mean", "var", "sd"):
            out[kind] = loo_expectations(dt, var_name="y", kind=kind)[0].values
        out["quantiles"] = loo_expectations(dt, var_name="y", kind="quantile", probs=list(PROBS))[0].values
        for kind in ("crps", "scrps"):
            sc = loo_score(dt, var_name="y", kind=kind, pointwise=True)
            out[kind] = sc.pointwise.values
            out[f"{kind}_mean"] = sc.mean
        r2 = loo_r2(dt, "y", round_to="none")
        out["r2"] = [r2.mean, r2.eti_lb, r2.eti_ub]
        for kind in ("rmse", "mae") + (("acc",) if discrete and np.max(dt.observed_data["y"].values) <= 1
                                        else ()):
            out[kind] = loo_metrics(dt, kind=kind, var_name="y", round_to="none").mean
    if discrete:  # the parts of the randomized PIT, from the same PSIS weights
        lw = res.log_weights.transpose("obs", "chain", "draw").values.reshape(len(out["pit"]), -1)
        w = np.exp(lw - lw.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        ypp = dt.posterior_predictive["y"].transpose("obs", "chain", "draw").values.reshape(w.shape)
        yobs = dt.observed_data["y"].values[:, None]
        out["pit_lower"] = np.sum(w * (ypp < yobs), axis=1)
        out["pit_mass"] = np.sum(w * (ypp == yobs), axis=1)
    return {k: np.asarray(v, float) for k, v in out.items()}


def reference(family: str, seed: int, n: int, warmup: int, draws: int, chains: int) -> dict:
    import numpy as np

    from numpyro_mpe.io.toy import glm_data

    X, y = glm_data(family, n, seed)
    t0 = time.perf_counter()
    samples, pp, ll, divergences = _run_nuts(family, X, y, seed, warmup, draws, chains)
    t_nuts = time.perf_counter() - t0
    discrete = family != "normal"
    full = _functionals(_datatree(samples, pp, ll, y), discrete)
    half = draws // BATCHES_PER_CHAIN
    batches = []
    for c in range(chains):
        for b in range(BATCHES_PER_CHAIN):
            sl = (slice(c, c + 1), slice(b * half, (b + 1) * half))
            batches.append(_functionals(_datatree({k: v[sl] for k, v in samples.items()}, pp[sl], ll[sl], y),
                                        discrete))
    mcse = {k: np.std([bt[k] for bt in batches], axis=0, ddof=1) / np.sqrt(len(batches)) for k in full}
    return {"family": family, "seed": seed, "X": X.tolist(), "y": y.tolist(), "divergences": divergences,
            "nuts_seconds": round(t_nuts, 1), "max_pareto_k": float(full["pareto_k"].max()),
            "values": {k: _rounded(v) for k, v in full.items()},
            "mcse": {k: _rounded(v) for k, v in mcse.items()}}


def _rounded(v):
    import numpy as np

    return np.vectorize(lambda x: float(f"{x:.7g}"))(np.asarray(v, float)).tolist()


def main(argv=None) -> None:
    import numpyro

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=20240915)
    parser.add_argument("--n", type=int, nargs="+", default=[100, 400])
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--draws", type=int, default=2500)
    parser.add_argument("--chains", type=int, default=4)
    args = parser.parse_args(argv)
    numpyro.enable_x64()
    numpyro.set_platform("cpu")
    from numpyro_mpe.io.toy import GLM_FAMILIES

    models = {}
    for n in args.n:
        for family in GLM_FAMILIES:
            m = reference(family, args.seed, n, args.warmup, args.draws, args.chains)
            models[f"{family}_n{n}"] = m
            print(f"{family}, n = {n}: NUTS {m['nuts_seconds']} s, {m['divergences']} divergences, max k-hat "
                  f"{m['max_pareto_k']:.3f}", flush=True)
    doc = {"command": "python " + shlex.join(["benchmarks/predictive_reference.py", *sys.argv[1:]]),
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "versions": _versions(), "probs": list(PROBS),
           "nuts": {"warmup": args.warmup, "draws": args.draws, "chains": args.chains, "seed": args.seed},
           "mcse": f"batch means over {args.chains * BATCHES_PER_CHAIN} batches (each chain in "
                   f"{BATCHES_PER_CHAIN} parts): sd over the batches / sqrt(batches)",
           "models": models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
