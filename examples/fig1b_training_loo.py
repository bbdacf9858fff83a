"""The paper's Fig. 1b at laptop scale: the MPE leave-one-out estimate during NGVI training vs held-out NLL.

Bayesian logistic regression on scikit-learn's breast-cancer data (6 features and their pairwise products,
27 inputs; 150 training and 419 held-out patients; a weak N(0, 10²) prior, so the fit can over-reach).  NGVI
(natural-gradient VI) runs from the prior's median; every 50 steps the MPE outputs are computed from the
optimizer's own (m, S) — no refit, no held-out data — in the cavity form and in the first-order "prediction
error × prediction variance" form, beside the training NLL and the held-out NLL of the same q.

Panel (a): full-precision NGVI (variational online Newton).  Panel (b): the diagonal, IVON-style variant.

Run: ``python examples/fig1b_training_loo.py`` (about a minute on 2 cores); writes
``examples/figures/fig1b_training_loo.png`` and prints the rank correlations.
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
from jax.example_libraries.optimizers import exponential_decay  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.datasets import load_breast_cancer  # noqa: E402
from sklearn.preprocessing import PolynomialFeatures  # noqa: E402

import numpyro_mpe as mpe  # noqa: E402
from numpyro_mpe.io.plots import plot_training  # noqa: E402

numpyro.enable_x64()
OUT = Path(__file__).parent / "figures"
OUT.mkdir(exist_ok=True)


def model(X, y=None, prior_scale=10.0):
    c = numpyro.sample("c", dist.Normal(0, prior_scale))
    w = numpyro.sample("w", dist.Normal(0, prior_scale).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=c + X @ w), obs=y)


def data():
    d = load_breast_cancer()
    X0 = (d.data[:, :6] - d.data[:, :6].mean(0)) / d.data[:, :6].std(0)
    X = PolynomialFeatures(2, include_bias=False).fit_transform(X0)
    X = (X - X.mean(0)) / X.std(0)
    idx = np.random.default_rng(0).permutation(len(X))
    X, y = jnp.asarray(X[idx]), jnp.asarray(d.target[idx], float)
    return (X[:150], y[:150]), (X[150:], y[150:])


def summarize(name: str, h) -> dict:
    rho = spearmanr(h.loo_nll, h.heldout_nll)[0]
    rho1 = spearmanr(h.loo_nll_first_order, h.heldout_nll)[0]
    rho_train = spearmanr(h.train_nll, h.heldout_nll)[0]
    last = h.iloc[-1]
    print(f"{name}: Spearman over {len(h)} checkpoints with the held-out NLL: MPE LOO (cavity) {rho:.3f}, "
          f"first order {rho1:.3f}; training NLL {rho_train:.3f} (baseline)")
    print(f"    final step {int(last.step)}: held-out NLL {last.heldout_nll:.4f}, "
          f"MPE LOO-NLL {last.loo_nll:.4f}, first order {last.loo_nll_first_order:.4f}, "
          f"training NLL {last.train_nll:.4f}; "
          f"min held-out at step {int(h.step[h.heldout_nll.idxmin()])}, min LOO at step "
          f"{int(h.step[h.loo_nll.idxmin()])}; invalid cavities at checkpoints: {int(h.n_invalid.sum())}")
    return {"rho": rho, "rho1": rho1, "rho_train": rho_train}


def main():
    t0 = time.time()
    (X, y), (Xh, yh) = data()
    heldout = ((Xh,), {"y": yh})
    runs = {
        "(a) NGVI, full precision": dict(precision="full", num_steps=1500, every=50,
                                         lr=exponential_decay(0.05, 1500, 0.2)),
        "(b) NGVI, diagonal (IVON)": dict(precision="diag", num_steps=3000, every=100,
                                          lr=exponential_decay(0.1, 3000, 0.2)),
    }
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), layout="constrained")
    for ax, (name, opts) in zip(axes, runs.items()):
        fit = mpe.NGVI(model, heldout=heldout, progress=False, memories="delta", **opts).run(
            jax.random.PRNGKey(0), X, y=y)
        h = fit.info["history"]
        summarize(name, h)
        plot_training(h, ax=ax)
        ax.plot(h.step, h.loo_nll_first_order, color="#00c0bf", linewidth=1.2, linestyle="--",
                label="MPE LOO NLL, first order (v·e)")
        ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.92), fontsize=8.5, frameon=False)
        ax.set_ylim(0, 1.0)
        ax.set_title(name, fontsize=11, loc="left")
    lap = mpe.Laplace(model, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    print(f"reference: Laplace at the MAP, MPE LOO-NLL {-float(lap.sensitivities().elpd_loo.mean()):.4f}")
    path = OUT / "fig1b_training_loo.png"
    fig.savefig(path, dpi=90)
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
