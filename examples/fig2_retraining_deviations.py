"""The paper's Fig. 2 at laptop scale: MPE-estimated vs true deviations of predicted probabilities.

For each of the 150 training examples of a Bayesian logistic regression on scikit-learn's breast-cancer data
(6 features and their pairwise products, 27 inputs; N(0, 2²) prior), the *true* deviation is what warm-started
retraining without the example does to its own predicted probability,

    Δp_i = σ(η_i(m₋i)) − σ(η_i(m)),       m₋i from NGVI continued with weight 0 on example i
                                           (numpyro_mpe.exact_loo_ngvi, paired runs cancel the MC noise),

and the *estimate* is the MPE's, from the trained optimizer's state alone: σ(η_i + Δη_i) − σ(η_i) with the
cavity prediction shift Δη_i = v_i e_i / (1 − λ_i v_i) (``prediction_shift`` of ``fit.sensitivities()``), and
its first-order form v_i e_i (prediction variance × prediction error).

Panel (a): full-precision NGVI.  Panel (b): diagonal NGVI (IVON-style), refits by diagonal NGVI.

Run: ``python examples/fig2_retraining_deviations.py`` (about a minute on 2 cores); writes
``examples/figures/fig2_retraining_deviations.png`` and prints Pearson and Spearman correlations.
"""

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.preprocessing import PolynomialFeatures  # noqa: E402

import numpyro_mpe as mpe  # noqa: E402
from numpyro_mpe.io.style import BLUE, CYAN, style_axes  # noqa: E402

numpyro.enable_x64()
PRIOR_SCALE = 2.0
OUT = Path(__file__).parent / "figures"
OUT.mkdir(exist_ok=True)


def model(X, y=None, prior_scale=PRIOR_SCALE):
    c = numpyro.sample("c", dist.Normal(0, prior_scale))
    w = numpyro.sample("w", dist.Normal(0, prior_scale).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=c + X @ w), obs=y)


def data(n: int = 150):
    d = load_breast_cancer()
    X0 = (d.data[:, :6] - d.data[:, :6].mean(0)) / d.data[:, :6].std(0)
    X = PolynomialFeatures(2, include_bias=False).fit_transform(X0)
    X = (X - X.mean(0)) / X.std(0)
    idx = np.random.default_rng(0).permutation(len(X))[:n]
    return jnp.asarray(X[idx]), jnp.asarray(d.target[idx], float)


def deviations(ngvi, X, y, refit_steps, lr):
    fit = ngvi.run(jax.random.PRNGKey(0), X, y=y)
    ds = fit.sensitivities()
    eta = np.asarray(fit.predictor_state().eta)[:, 0]
    v = ds.prediction_var.values[:, 0]
    shift = ds.prediction_shift.values[:, 0]
    e = 1 / (1 + np.exp(-eta)) - np.asarray(y)  # prediction error ∂ℓ/∂η at the mean
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    est = sig(eta + shift) - sig(eta)
    est1 = sig(eta + v * e) - sig(eta)
    ex = mpe.exact_loo_ngvi(fit, None, num_steps=refit_steps, lr=lr, num_samples=0, progress=False)
    m = np.asarray(fit.posterior.mean)
    eta_true = np.array([float(fit.adapter.eta(jnp.asarray(m + s), "y")[i, 0])
                         for i, s in enumerate(ex["shift"].values)])
    true = sig(eta_true) - sig(eta)
    return est, est1, true, int((~ds.valid.values).sum())


def main():
    t0 = time.time()
    X, y = data()
    runs = {
        "(a) NGVI, full precision": (mpe.NGVI(model, precision="full", num_steps=800, lr=0.3,
                                              antithetic=True, memories="mc", progress=False), 300, 0.3),
        "(b) NGVI, diagonal (IVON)": (mpe.NGVI(model, precision="diag", num_steps=4000, lr=0.1,
                                               antithetic=True, memories="mc", progress=False), 1000, 0.1),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    for ax, (name, (ngvi, steps, lr)) in zip(axes, runs.items()):
        est, est1, true, n_bad = deviations(ngvi, X, y, steps, lr)
        ok = np.isfinite(est)
        r, rs = pearsonr(est[ok], true[ok])[0], spearmanr(est[ok], true[ok])[0]
        r1, rs1 = pearsonr(est1, true)[0], spearmanr(est1, true)[0]
        print(f"{name}: {ok.sum()} removed examples ({n_bad} without a cavity); MPE cavity: Pearson {r:.3f}, "
              f"Spearman {rs:.3f}; first order v·e: Pearson {r1:.3f}, Spearman {rs1:.3f}; "
              f"max |true deviation| {np.abs(true).max():.3f}")
        style_axes(ax)
        lim = 1.05 * max(np.abs(true).max(), np.abs(est[ok]).max())
        ax.plot([-lim, lim], [-lim, lim], color="0.6", linewidth=0.8, linestyle="--", zorder=0)
        ax.scatter(est1, true, s=14, facecolor="none", edgecolor=CYAN, linewidth=0.8,
                   label=f"first order v·e  (r = {r1:.2f}, ρ = {rs1:.2f})")
        ax.scatter(est[ok], true[ok], s=14, color=BLUE,
                   label=f"MPE cavity  (r = {r:.2f}, ρ = {rs:.2f})")
        ax.set_xlabel("estimated deviation of the predicted probability (MPE)")
        ax.set_ylabel("true deviation (retraining without the example)")
        ax.set_title(name, fontsize=11, loc="left")
        ax.legend(fontsize=8.5, frameon=False, loc="upper left")
    path = OUT / "fig2_retraining_deviations.png"
    fig.savefig(path, dpi=90)
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
