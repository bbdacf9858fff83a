"""How close is each leave-one-out estimate to exact Bayesian LOO?  PSIS-LOO on NUTS, the closed-form MPE and
the default ``fit.loo()`` side by side, on the ground-truth suite.

The truth (exact LOO by NUTS refits without each observation) and PSIS-LOO on the full NUTS fit are read
from ``tests/data/loo_truth/`` (made once by ``benchmarks/ground_truth.py``); this script fits Laplace, runs
``fit.loo(method="mpe")`` and ``fit.loo()`` (``method="auto"``), and prints one markdown row per data set:

* |Σ elpd − exact| for PSIS-LOO on NUTS, the closed-form MPE and the default, and the tolerance of issue #14,
  max(0.5, |PSIS − exact|);
* the default's global k̂, the estimates it used, the observations more than 0.5 nats off and how many of
  them it flagged;
* seconds: the NUTS fit + PSIS (from the truth files), the Laplace fit, the closed form, the default.

Usage::

    python benchmarks/loo_accuracy.py                 # all problems of loo_suite
    python benchmarks/loo_accuracy.py stackloss iris  # some
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import numpyro

numpyro.enable_x64()

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import loo_suite  # noqa: E402

import numpyro_mpe as mpe  # noqa: E402


def field(res, key):
    """A field of the installed ArviZ's ELPD object: a Series entry (arviz 0.x) or an attribute (>= 1)."""
    return getattr(res, key) if hasattr(res, key) and not hasattr(res, "index") else res[key]


def pointwise(res, key):
    return np.asarray(field(res, key)).ravel()


def row(name: str) -> dict:
    t = json.loads((ROOT / "tests" / "data" / "loo_truth" / f"{name}.json").read_text())
    exact, psis = np.asarray(t["exact_elpd_i"]), np.asarray(t["psis_elpd_i"])
    p = loo_suite.problem(name)
    t0 = time.perf_counter()
    fit = mpe.Laplace(p.model, progress=False).run(jax.random.PRNGKey(0), *p.args, **p.kwargs)
    t1 = time.perf_counter()
    closed = fit.loo(method="mpe")
    t2 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = fit.loo()
    t3 = time.perf_counter()
    key = "elpd_i" if not hasattr(auto, "index") else "loo_i"
    e_auto, e_mpe = pointwise(auto, key), pointwise(closed, key)
    flagged = pointwise(auto, "flagged_i").astype(bool)
    far = np.abs(e_auto - exact) > 0.5
    tol = max(0.5, abs(psis.sum() - exact.sum()))
    return {
        "name": name, "n": exact.size, "exact": exact.sum(), "tol": tol,
        "psis_err": psis.sum() - exact.sum(), "mpe_err": e_mpe.sum() - exact.sum(),
        "auto_err": e_auto.sum() - exact.sum(), "global_k": float(field(auto, "global_k")),
        "methods": sorted(set(pointwise(auto, "method_i").tolist())), "far": int(far.sum()),
        "far_unflagged": int((far & ~flagged).sum()), "flagged": int(flagged.sum()),
        "nuts_s": t["nuts_time_s"] + t["psis_time_s"], "fit_s": t1 - t0, "mpe_s": t2 - t1, "auto_s": t3 - t2,
        "warnings": [str(w.message)[:80] for w in caught],
        "ok": bool(abs(e_auto.sum() - exact.sum()) <= tol and not (far & ~flagged).any()),
    }


def main(names):
    head = ["data set", "N", "exact Σ elpd", "\\|PSIS−exact\\|", "\\|MPE−exact\\|", "\\|default−exact\\|",
            "tolerance", "global k̂", "estimates used", ">0.5 off (unflagged)", "flagged", "NUTS+PSIS s",
            "Laplace s", "MPE s", "default s", "pass"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in names:
        r = row(name)
        cells = [r["name"], r["n"], f"{r['exact']:.2f}", f"{abs(r['psis_err']):.3f}",
                 f"{abs(r['mpe_err']):.3f}", f"{abs(r['auto_err']):.3f}", f"{r['tol']:.2f}",
                 f"{r['global_k']:.2f}", ", ".join(r["methods"]), f"{r['far']} ({r['far_unflagged']})",
                 r["flagged"], f"{r['nuts_s']:.1f}", f"{r['fit_s']:.1f}", f"{r['mpe_s']:.1f}",
                 f"{r['auto_s']:.1f}", "yes" if r["ok"] else "NO"]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or loo_suite.NAMES)
