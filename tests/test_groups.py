"""Leave-group-out in closed form (issue 5 item 2) against independent truths.

* Gaussian linear model with known noise and a Gaussian prior: every group output in closed form (numpy), and
  removing every observation returns the prior.
* Leave-one-firm-out in a hierarchical model on statsmodels' Grunfeld panel (11 firms x 20 years) and
  leave-one-class-out in a multinomial logistic regression on scikit-learn's digits (10 classes, the paper's
  Fig. 3a), both against brute-force group refits (:func:`numpyro_mpe.exact_group_loo`); for the classes,
  also the paper's own quantity: the rise of the held-out test NLL when a class is removed.
* Bad input: labels of the wrong length, an empty group, missing labels, a group whose removal leaves no
  valid cavity.

Run with ``-s`` to see the agreement figures.
"""

from __future__ import annotations

import re

import arviz as az
import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from linear_gaussian import closed_form_group, linear_gaussian_model, log_evidence, simulate
from scipy.stats import spearmanr

import numpyro_mpe as mpe
from numpyro_mpe.loo.arviz_compat import pointwise_elpd

numpyro.enable_x64()
KEY = jax.random.PRNGKey(0)


def laplace(model, *args, **kwargs):
    return mpe.Laplace(model, progress=False, gtol=1e-12).run(KEY, *args, **kwargs)


def agreement(name, ds, ex):
    """Rank correlations and errors of the closed form ``ds`` against the refits ``ex`` (printed)."""
    fig = {
        "groups": ds.sizes[ds["elpd_loo"].dims[0]],
        "spearman_elpd": spearmanr(ds.elpd_loo, ex.elpd_loo)[0],
        "spearman_sensitivity": spearmanr(ds.sensitivity, ex.sensitivity)[0],
        "median_abs_d_elpd": float(np.median(np.abs(ds.elpd_loo.values - ex.elpd_loo.values))),
        "median_rel_err_sensitivity": float(np.median(np.abs(ds.sensitivity / ex.sensitivity - 1))),
        "max_mcse_mpe": float(ds.elpd_loo_mcse.max()),
        "max_mcse_exact": float(ex.elpd_loo_mcse.max()),
        "leverage_range": f"{float(ds.leverage.min()):.3f}-{float(ds.leverage.max()):.3f}",
    }
    print(f"\n[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in fig.items()))
    return fig


# ===================================================================== linear-Gaussian closed forms
SIGMA, TAU = 0.6, 1.5
linear_model = linear_gaussian_model(SIGMA, TAU)


@pytest.fixture(scope="module")
def linear():
    X, y, rng = simulate(7, 24, [0.8, -1.0, 0.4], SIGMA, df=5)
    labels = np.array(["a", "b", "c", "d"])[rng.permutation(np.arange(len(y)) % 4)]
    return laplace(linear_model, X, y=y), X, y, labels


def test_linear_gaussian_groups_closed_form(linear):
    fit, X, y, labels = linear
    ds = fit.sensitivities(groups=labels)
    assert ds["elpd_loo"].dims == ("group",) and ds.group.values.tolist() == ["a", "b", "c", "d"]
    assert ds["size"].values.tolist() == [6, 6, 6, 6] and bool(ds.valid.all())
    err = {"shift": 0.0, "sensitivity": 0.0, "leverage": 0.0}
    z_elpd, z_lpd = [], []
    for k, lab in enumerate(ds.group.values):
        t = closed_form_group(X, y, np.flatnonzero(labels == lab), SIGMA, TAU)
        err["shift"] = max(err["shift"], float(np.max(np.abs(ds["shift"].values[k] - t["shift"]))))
        err["sensitivity"] = max(err["sensitivity"], abs(float(ds.sensitivity[k]) - t["sensitivity"]))
        err["leverage"] = max(err["leverage"], abs(float(ds.leverage[k]) - t["leverage"]))
        # elpd_loo, lpd: Monte Carlo (defensive importance sampling); within 5 of their standard errors
        z_elpd.append(abs(float(ds.elpd_loo[k]) - t["elpd_loo"]) / float(ds.elpd_loo_mcse[k]))
        z_lpd.append(abs(float(ds.lpd[k]) - t["lpd"]))
    print(f"\n[groups, linear-Gaussian] max abs error {err}; elpd |Δ|/mcse max {max(z_elpd):.2f}, "
          f"mcse max {float(ds.elpd_loo_mcse.max()):.1e}; lpd |Δ| max {max(z_lpd):.1e}")
    assert max(err.values()) < 1e-8
    assert max(z_elpd) < 5.0 and float(ds.elpd_loo_mcse.max()) < 0.05
    assert max(z_lpd) < 0.05
    np.testing.assert_allclose(ds.p_loo, ds.lpd - ds.elpd_loo)
    assert "importance sampling" in ds.attrs["elpd_integration"]


@pytest.mark.slow  # exact_group_loo
def test_linear_gaussian_group_refits_agree(linear):
    """The brute-force refits agree (a quadratic potential: exact in one Newton step)."""
    fit, X, y, labels = linear
    ds = fit.sensitivities(groups=labels)
    ex = mpe.exact_group_loo(fit, labels, progress=False, num_samples=2000)
    np.testing.assert_allclose(ex["shift"].values, ds["shift"].values, rtol=0, atol=1e-8)
    np.testing.assert_allclose(ex.leverage.values, ds.leverage.values, rtol=0, atol=1e-10)
    assert np.all(np.abs(ex.elpd_loo.values - ds.elpd_loo.values)
                  < 5 * np.hypot(ex.elpd_loo_mcse.values, ds.elpd_loo_mcse.values))


def test_removing_every_group_returns_the_prior(linear):
    fit, X, y, _ = linear
    one = np.zeros(len(y), int)
    ds = fit.sensitivities(groups=one)
    m = np.asarray(fit.posterior.mean)
    # prior mode 0: the cavity mean is the prior's, the shift is prior mode − m
    np.testing.assert_allclose(ds["shift"].values[0], 0.0 - m, rtol=0, atol=1e-10)
    # S − Σ_i H_i is the prior precision I/τ²
    cav = np.asarray(fit.posterior.precision) - np.asarray(fit.memories().hess).sum(0)
    np.testing.assert_allclose(cav, np.eye(X.shape[1]) / TAU**2, rtol=0, atol=1e-10)
    # and the group's elpd is the log evidence, log N(y; 0, σ²I + τ² X Xᵀ)
    evidence = log_evidence(X, y, SIGMA, TAU)
    print(f"\n[groups, all removed] elpd {float(ds.elpd_loo[0]):.4f} vs log evidence {evidence:.4f} "
          f"(mcse {float(ds.elpd_loo_mcse[0]):.1e})")
    assert abs(float(ds.elpd_loo[0]) - evidence) < 5 * float(ds.elpd_loo_mcse[0]) + 1e-6


@pytest.mark.slow  # exact_group_loo
def test_refit_without_every_group_is_the_prior(linear):
    fit, X, y, _ = linear
    one = np.zeros(len(y), int)
    m = np.asarray(fit.posterior.mean)
    ex = mpe.exact_group_loo(fit, one, progress=False, num_samples=0)
    np.testing.assert_allclose(ex["shift"].values[0], -m, rtol=0, atol=1e-8)


def grid_model(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, TAU).expand([X.shape[-1]]).to_event(1))
    with numpyro.plate("site", X.shape[0], dim=-2), numpyro.plate("time", X.shape[1], dim=-1):
        numpyro.sample("y", dist.Normal(X @ b, SIGMA), obs=y)


@pytest.mark.arviz  # fit.loo(groups=...) and az.compare
def test_groups_by_plate_name_and_loo():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(4, 5, 2))
    y = X @ np.array([1.0, -1.0]) + SIGMA * rng.normal(size=(4, 5))
    fit = laplace(grid_model, X, y=y)
    by_dim = fit.sensitivities(groups="site")
    assert by_dim["elpd_loo"].dims == ("site",) and by_dim.site.values.tolist() == [0, 1, 2, 3]
    by_label = fit.sensitivities(groups=np.repeat(np.arange(4), 5))  # the same groups, flat labels
    for v in ("elpd_loo", "lpd", "sensitivity", "leverage"):
        np.testing.assert_allclose(by_dim[v].values, by_label[v].values, rtol=1e-12)
    # labels in the observation shape work too
    by_shape = fit.sensitivities(groups=np.repeat(np.arange(4), 5).reshape(4, 5))
    np.testing.assert_allclose(by_shape.elpd_loo.values, by_label.elpd_loo.values, rtol=1e-12)
    # ELPD objects over groups: one pointwise value per group; az.compare takes two of them
    loo_a = fit.loo(groups="site")
    assert np.asarray(pointwise_elpd(loo_a)).shape == (4,)
    assert pointwise_elpd(loo_a).dims == ("site",)
    np.testing.assert_allclose(np.asarray(pointwise_elpd(loo_a)), by_dim.elpd_loo.values)

    def null_model(X, y=None):
        s = numpyro.sample("s", dist.Normal(0, TAU))
        with numpyro.plate("site", X.shape[0], dim=-2), numpyro.plate("time", X.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(s * X[..., 0], SIGMA), obs=y)

    loo_b = laplace(null_model, X, y=y).loo(groups="site")
    cmp = az.compare({"full": loo_a, "null": loo_b})
    assert list(cmp.index) == ["full", "null"]


# ===================================================================== Grunfeld: leave one firm out
def grunfeld_model(lv, lc, y=None):
    """log(invest) ~ firm intercept (hierarchical, non-centred) + slopes on log(value), log(capital)."""
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(2))
    b = numpyro.sample("b", dist.Normal(0, 2).expand([2]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1))
    with numpyro.plate("firm", lv.shape[0], dim=-2):
        z = numpyro.sample("z", dist.Normal(0, 1))
        with numpyro.plate("year", lv.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(mu + tau * z + b[0] * lv + b[1] * lc, sigma), obs=y)


@pytest.mark.slow  # exact_group_loo
def test_grunfeld_leave_one_firm_out():
    import statsmodels.api as sm

    d = sm.datasets.grunfeld.load_pandas().data.sort_values(["firm", "year"])
    firms = list(dict.fromkeys(d.firm))

    def panel(col):
        return np.stack([np.log(d[d.firm == f][col].to_numpy(float)) for f in firms])  # (firm, year)

    y, lv, lc = panel("invest"), panel("value"), panel("capital")
    assert y.shape == (11, 20)
    fit = laplace(grunfeld_model, lv - lv.mean(), lc - lc.mean(), y=y)
    ds = fit.sensitivities(groups="firm")
    ex = mpe.exact_group_loo(fit, "firm", progress=False)
    assert bool(ex.converged.all()) and bool(ds.valid.all())
    fig = agreement("Grunfeld, leave one firm out", ds, ex)
    assert fig["spearman_elpd"] >= 0.9 and fig["spearman_sensitivity"] >= 0.9
    assert fig["median_abs_d_elpd"] < 0.5 and fig["median_rel_err_sensitivity"] < 0.05
    # the closed form is one Newton step of the refit, to round-off
    one = mpe.exact_group_loo(fit, "firm", progress=False, max_steps=1, num_samples=0)
    np.testing.assert_allclose(one["shift"].values, ds["shift"].values, rtol=0, atol=1e-8)


# ===================================================================== digits: leave one class out
N_PCA = 5


def softmax_model(Z, y=None, prior_sd=1.0):
    W = numpyro.sample("W", dist.Normal(0, prior_sd).expand([Z.shape[1], 10]).to_event(2))
    b = numpyro.sample("b", dist.Normal(0, prior_sd).expand([10]).to_event(1))
    with numpyro.plate("obs", Z.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=Z @ W + b), obs=y)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA

    X, y = load_digits(return_X_y=True)  # 1797 images, 10 classes
    Z = PCA(N_PCA, random_state=0).fit_transform(X)
    Z = Z / Z.std(0)
    fit = mpe.Laplace(softmax_model, progress=False).run(KEY, Z, y=y)
    return fit, y, fit.sensitivities(groups=y), mpe.exact_group_loo(fit, y, progress=False)


@pytest.mark.slow  # exact_group_loo
def test_digits_leave_one_class_out(digits):
    fit, y, ds, ex = digits
    assert ds.group.values.tolist() == list(range(10)) and bool(ds.valid.all())
    assert bool(ex.converged.all())
    fig = agreement("digits, leave one class out", ds, ex)
    L = np.asarray(fit.posterior.chol)
    mw, ew = ds["shift"].values @ L, ex["shift"].values @ L  # whitened: posterior-sd units
    cos = np.sum(mw * ew, 1) / np.linalg.norm(mw, axis=1) / np.linalg.norm(ew, axis=1)
    corr = np.corrcoef(mw.ravel(), ew.ravel())[0, 1]
    print(f"  shift direction cosine (MPE vs refit) per class {np.round(cos, 2).tolist()}; Pearson over all "
          f"whitened shift components {corr:.3f}; sensitivity ratio MPE/refit "
          f"{np.round(ds.sensitivity.values / ex.sensitivity.values, 2).tolist()}")
    # the group elpd ranks the classes as the refits do
    assert fig["spearman_elpd"] >= 0.9
    # the shift points the right way, but one Newton step falls short of the converged refit (see below)
    assert cos.min() > 0.75 and corr > 0.9
    one = mpe.exact_group_loo(fit, y, progress=False, max_steps=1, num_samples=0)
    np.testing.assert_allclose(one["shift"].values, ds["shift"].values, rtol=0, atol=1e-8)


@pytest.mark.slow  # exact_group_loo
@pytest.mark.xfail(strict=True, reason=(
    "known limitation: removing a whole class is far outside the MPE's one-Newton-step regime; the MPE shift "
    "is 35-50% of the converged refit's and the ratio varies across classes by more than the sensitivities "
    "themselves (18-32 posterior sds), so their ranks disagree (Spearman 0.75 here; 0.36-0.92 over "
    "prior scales 0.3-3 and 2-8 PCA features).  On half the data they are 0.29 at prior sd 0.2 and agree "
    "(0.98) at the paper's prior precision 100 (sd 0.1), as do the test-NLL rises the paper plots: see "
    "test_digits_class_removal_predicts_test_nll"))
def test_digits_class_removal_sensitivity_ranks(digits):
    _, _, ds, ex = digits
    assert spearmanr(ds.sensitivity, ex.sensitivity)[0] >= 0.9


def class_removal_nll(fit, Z, y, shifts):
    """Mean NLL of labels ``y`` at inputs ``Z``, plug-in softmax at m + each shift, minus that at m."""
    m = np.asarray(fit.posterior.mean)

    def nll(theta):
        par = fit.adapter.constrain(jax.numpy.asarray(theta), deterministic=False)
        logp = jax.nn.log_softmax(Z @ par["W"] + par["b"], -1)
        return -float(np.mean(np.asarray(logp)[np.arange(len(y)), y]))

    base = nll(m)
    return np.array([nll(m + s) - base for s in shifts])


@pytest.fixture(scope="module")
def digits_heldout():
    """The paper's Fig. 3a set-up: train / test split, prior precision δ = 100, one fit, refits per class."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.5, random_state=0, stratify=y)
    pca = PCA(N_PCA, random_state=0).fit(Xtr)
    sd = pca.transform(Xtr).std(0)
    Ztr, Zte = pca.transform(Xtr) / sd, pca.transform(Xte) / sd
    # The official code (team-approx-bayes/memory-perturbation, examples/5_loco.py, README "Fig. 3 (a)")
    # trains with `--delta 100`: mean cross-entropy + δ/(2N)·‖θ‖², i.e. a Gaussian prior of precision
    # δ = 100 on every weight, sd 0.1.  (Relative to the data it is stronger here, N = 898 against their
    # 60000.)  At this prior the class leverages are about 0.1-0.5 (printed): the regime in which one Newton
    # step is a fair approximation of the refit; with sd 1 (the `digits` fixture) they are about 0.5-0.8.
    # Exploration with this split: the Spearman asserted below is 0.99-1.0 at sd 0.1 over 2-10 PCA features
    # and 3 split seeds, 0.99 at sd 0.2, 0.87 at sd 0.3 and 0.53 at sd 1: it degrades as the prior weakens.
    fit = mpe.Laplace(softmax_model, progress=False).run(KEY, Ztr, y=ytr, prior_sd=0.1)
    ds = fit.sensitivities(groups=ytr)
    ex = mpe.exact_group_loo(fit, ytr, progress=False, num_samples=0)
    return fit, (Ztr, ytr), (Zte, yte), ds, ex


@pytest.mark.slow  # exact_group_loo
def test_digits_class_removal_predicts_test_nll(digits_heldout, digits):
    """Fig. 3a: how much the held-out test NLL rises when a whole class is removed from training.

    The paper's truth (examples/5_loco.py) is the test-set NLL of the network retrained without the class,
    on the whole test set (all classes), plotted against an MPE estimate.  Here the truth is the same
    quantity for the brute-force Laplace refit without the class (``exact_group_loo``: Newton to convergence,
    independent of the memories) and the estimate is the same plug-in prediction at the closed-form MPE
    mean m₋G = m + ``ds["shift"]``: the test NLL is a function of the shift only through the logits, so this
    checks the MPE's shifts in prediction space, where the paper evaluates them.
    """
    fit, (Ztr, ytr), (Zte, yte), ds, ex = digits_heldout
    assert bool(ds.valid.all()) and bool(ex.converged.all())
    true = class_removal_nll(fit, Zte, yte, ex["shift"].values)
    est = class_removal_nll(fit, Zte, yte, ds["shift"].values)
    rho = spearmanr(est, true)[0]
    # the same estimate with the shifts of the wrong classes: the rank agreement must be lost
    rho_wrong = [spearmanr(class_removal_nll(fit, Zte, yte, np.roll(ds["shift"].values, k, 0)), true)[0]
                 for k in range(1, 10)]
    rel = est / true - 1
    # the paper's own y-axis: the mean over the class's training members of the per-example MPE LOO NLL
    # (−elpd_loo here; the paper's plug-in softmax(η_i + Δη_i) ranks the classes the same way).  It is a
    # proxy, not an estimate of the same quantity, and it does not carry over to this linear model: the
    # classes whose members are hard (8, 9) are the ones whose removal costs least (printed, not asserted)
    loo_nll = -fit.sensitivities().elpd_loo.values
    proxy = np.array([loo_nll[ytr == c].mean() for c in range(10)])
    rho_sens = spearmanr(ds.sensitivity, ex.sensitivity)[0]
    # the module's prior sd 1 (no split: the class's own rows are held out from its refit, the rest in-sample)
    fit1, y1, ds1, ex1 = digits
    Z1 = np.asarray(fit1.adapter.args[0])
    rho1 = spearmanr(class_removal_nll(fit1, Z1, y1, ds1["shift"].values),
                     class_removal_nll(fit1, Z1, y1, ex1["shift"].values))[0]
    print(f"\n[digits, leave one class out, test NLL (Fig. 3a), prior precision 100] refit rise per class "
          f"{np.round(true, 3).tolist()}, MPE {np.round(est, 3).tolist()}; Spearman {rho:.3f} (shifts of the "
          f"wrong classes: {np.round(rho_wrong, 3).tolist()}); relative error median "
          f"{np.median(np.abs(rel)):.3f}, range {rel.min():.3f} to {rel.max():.3f}; sensitivity Spearman "
          f"{rho_sens:.3f}; paper's proxy (mean per-example LOO NLL) vs truth Spearman "
          f"{spearmanr(proxy, true)[0]:.3f}; prior precision 1 (module fixture, all data) Spearman "
          f"{rho1:.3f}; leverage {float(ds.leverage.min()):.2f}-{float(ds.leverage.max()):.2f} "
          f"(prior precision 1: {float(ds1.leverage.min()):.2f}-{float(ds1.leverage.max()):.2f})")
    assert rho >= 0.9
    assert max(rho_wrong) < 0.9 and np.mean(rho_wrong) < 0.3
    assert np.all(rel < 0) and np.median(np.abs(rel)) < 0.2  # one Newton step falls short, by < 20%
    assert rho_sens >= 0.9  # at this prior the θ-space ranks hold as well (compare the xfail above)


# ===================================================================== bad input
@pytest.mark.arviz  # fit.loo(groups=...)
def test_group_labels_wrong_length(linear):
    fit, *_ = linear
    with pytest.raises(mpe.MPEError, match=r"group labels of shape \(23,\) \(23 labels\) do not match the 24 "
                                           r"observations of 'y'"):
        fit.sensitivities(groups=np.zeros(23, int))
    with pytest.raises(mpe.MPEError, match=r"shape \(4, 6\)"):
        fit.loo(groups=np.zeros((4, 6), int))
    with pytest.raises(mpe.MPEError, match="groups='firm' is not an observation dim of 'y'.*\\['data'\\]"):
        fit.sensitivities(groups="firm")


def test_empty_and_missing_groups(linear):
    fit, _, _, labels = linear
    cat = pd.Categorical(labels, categories=["a", "b", "c", "d", "e"])
    with pytest.raises(mpe.MPEError, match=r"empty group\(s\) \['e'\]"):
        fit.sensitivities(groups=cat)
    with pytest.raises(mpe.MPEError, match="empty group"):
        fit.sensitivities(groups=pd.Series(cat))
    # the same categories all used: category order is kept
    ds = fit.sensitivities(groups=pd.Categorical(labels, categories=["d", "c", "b", "a"]))
    assert ds.group.values.tolist() == ["d", "c", "b", "a"]
    missing = labels.astype(object)
    missing[[2, 5]] = None
    with pytest.raises(mpe.MPEError, match=r"2 group label\(s\) of 'y' are missing.*\[2, 5\]"):
        fit.sensitivities(groups=missing)


def cauchy_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Cauchy(mu, 1.0), obs=y)


@pytest.mark.arviz  # fit.loo(groups=...)
def test_group_without_valid_cavity():
    # Three points at 0 hold the Cauchy location; the two at ±2.5 pull on it with negative curvature there.
    # Removing the centre group leaves U₋G non-convex at the mode: S − Σ H_i is not positive definite.
    y = np.array([0.0, 0.1, -0.1, 2.5, -2.5])
    labels = np.array(["centre", "centre", "centre", "tails", "tails"])
    fit = laplace(cauchy_model, y=y)
    with pytest.warns(UserWarning, match=r"1 of 2 groups of 'y' have leverage >= 1 \(labels \['centre'\]"):
        ds = fit.sensitivities(groups=labels)
    assert ds.valid.values.tolist() == [False, True]
    assert float(ds.leverage.sel(group="centre")) >= 1.0
    bad = ds.sel(group="centre")
    for v in ("elpd_loo", "p_loo", "sensitivity", "elpd_loo_mcse"):  # NaN exactly where documented
        assert np.isnan(float(bad[v]))
    assert np.all(np.isnan(bad["shift"].values))
    good = ds.sel(group="tails")
    for v in ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage"):
        assert np.isfinite(float(good[v]))
    assert np.isfinite(float(bad["lpd"])) and np.isfinite(float(bad["leverage"]))
    # the ELPD object stays finite: the invalid group gets MPE importance sampling, with a warning
    with pytest.warns(UserWarning) as record:
        res = fit.loo(groups=labels)
    messages = [str(w.message) for w in record]
    assert any("have leverage >= 1 (labels ['centre']" in m for m in messages)
    pattern = r"invalid MPE cavity .*groups \['centre'\].*importance sampling"
    assert any(re.search(pattern, m) for m in messages)
    assert np.all(np.isfinite(np.asarray(pointwise_elpd(res)))) and bool(res["warning"])
