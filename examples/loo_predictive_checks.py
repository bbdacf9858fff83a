"""LOO predictive checks without sampling: a Poisson regression on overdispersed counts and on Poisson
counts.

Counts from :func:`numpyro_mpe.io.toy.glm_data` (200 rows; negative binomial with dispersion r = 2, or
Poisson, with the same mean), each fitted by the Poisson GLM :func:`numpyro_mpe.io.toy.glm_model` (Laplace).
The LOO-PIT and the 90 % LOO predictive intervals come from the MPE cavities (no posterior or predictive
draws): on the overdispersed counts the PIT is ∪-shaped and its ECDF leaves the simultaneous 95 % band (the
predictives are too narrow), on the Poisson counts it stays inside.

Run: ``python examples/loo_predictive_checks.py`` (about 20 s); writes
``examples/figures/loo_predictive_checks.png`` and prints the calibration tests.
"""

from pathlib import Path

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpyro  # noqa: E402

import numpyro_mpe as mpe  # noqa: E402
from numpyro_mpe.io.plots import plot_loo_intervals, plot_loo_pit  # noqa: E402
from numpyro_mpe.io.toy import glm_data, glm_model  # noqa: E402

OUT = Path(__file__).parent / "figures" / "loo_predictive_checks.png"


def main() -> None:
    numpyro.enable_x64()
    fig, axes = plt.subplots(1, 3, figsize=(16.5, 4.4), layout="constrained")
    for ax, (label, r) in zip(axes, [("negative binomial counts (r = 2)", 2.0), ("Poisson counts", None)]):
        X, y = glm_data("poisson", 200, seed=5, overdispersion=r)
        fit = mpe.Laplace(glm_model, progress=False).run(jax.random.PRNGKey(0), X, y, family="poisson")
        pit = fit.loo_pit()
        plot_loo_pit(pit, ax=ax)
        ax.set_title(f"Poisson model, {label}", fontsize=10)
        a = pit.attrs
        print(f"{label:34s} ECDF test p = {a['ecdf_pvalue']:.4f} (reject: {a['ecdf_reject']}), "
              f"KS = {a['ks_statistic']:.3f} (p = {a['ks_pvalue']:.2g}), "
              f"90% interval coverage {fit.loo_predictive_interval().attrs['coverage']:.2f}")
        if r is not None:
            plot_loo_intervals(fit.loo_predictive_interval(), y, ax=axes[2], mean=fit.loo_expectations()[0])
            axes[2].set_title(f"90 % LOO predictive intervals, {label}", fontsize=10)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
