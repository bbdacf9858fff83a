"""LOO predictive checks from the MPE cavities (numpyro_mpe.loo.predictive), each against an independent
truth.

* the Gaussian linear model with known σ, whose LOO predictive is exactly N(x_iᵀm₋i, σ² + x_iᵀS₋i⁻¹x_i): PIT,
  mean, sd, quantiles, intervals, CRPS and SCRPS in closed form (numpy/scipy), leave-one-out and
  leave-group-out, through the predictor pass and the pass over held memories;
* arviz-stats 1.x on NUTS draws (``tests/data/predictive_reference.json``, written by
  ``benchmarks/predictive_reference.py``);
* calibration: a Poisson model on overdispersed counts is rejected, on Poisson counts not; randomized PIT of a
  well-specified discrete model is uniform;
* the weighted-samples hook against the quadrature; bad inputs; plots, report, command line and export.
"""

import contextlib
import io
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from scipy import stats

import numpyro_mpe as mpe
from numpyro_mpe.engine.memories import MemorySpec
from numpyro_mpe.errors import MPEError
from numpyro_mpe.fit import Fit
from numpyro_mpe.io.toy import glm_data, glm_model
from numpyro_mpe.loo.importance import predictor_samples
from numpyro_mpe.loo.predictive import predictive_values

matplotlib.use("Agg")

KEY = jax.random.PRNGKey(0)
SIGMA, TAU = 0.6, 2.0
REFERENCE = Path(__file__).parent / "data" / "predictive_reference.json"
ALL = ("pit", "moments", "quantiles", "crps")
PROBS = (0.05, 0.3, 0.5, 0.9)


def gaussian_model(X, y=None):
    b = numpyro.sample("b", dist.Normal(0, TAU).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ b, SIGMA), obs=y)


def laplace(model, *args, **kwargs):
    return mpe.Laplace(model, progress=False).run(KEY, *args, **kwargs)


# ===================================================================== closed forms (numpy and scipy only)
def loo_normal(X, y, groups):
    """Mean and sd of the exact leave-group-out predictive N(x_iᵀm₋G, σ² + x_iᵀS₋G⁻¹x_i) of every row."""
    prec = X.T @ X / SIGMA**2 + np.eye(X.shape[1]) / TAU**2
    mu, sd = np.empty(len(y)), np.empty(len(y))
    for g in np.unique(groups):
        out = groups == g
        p = prec - X[out].T @ X[out] / SIGMA**2
        m = np.linalg.solve(p, X[~out].T @ y[~out] / SIGMA**2)
        mu[out] = X[out] @ m
        sd[out] = np.sqrt(SIGMA**2 + np.einsum("ij,ji->i", X[out], np.linalg.solve(p, X[out].T)))
    return mu, sd


def crps_normal(mu, sd, y):
    """CRPS, E|X − y| and E|X − X′| of N(mu, sd²) at y (Gneiting and Raftery 2007)."""
    z = (y - mu) / sd
    abs_err = sd * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z))
    mad = 2 * sd / np.sqrt(np.pi)
    return abs_err - mad / 2, abs_err, mad


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 3))
    X[0] *= 3.0  # a high-leverage row
    y = X @ [1.0, -0.5, 0.3] + SIGMA * rng.standard_t(4, size=30)
    return X, y, laplace(gaussian_model, X, y)


def _check_closed_forms(values, mu, sd, y, atol=1e-6):
    crps, abs_err, mad = crps_normal(mu, sd, y)
    np.testing.assert_allclose(values["pit_lower"], stats.norm.cdf(y, mu, sd), rtol=0, atol=atol)
    np.testing.assert_allclose(values["mean"], mu, rtol=0, atol=atol)
    np.testing.assert_allclose(np.sqrt(values["var"]), sd, rtol=0, atol=atol)
    q = stats.norm.ppf(np.asarray(PROBS)[None], mu[:, None], sd[:, None])
    np.testing.assert_allclose(values["quantiles"], q, rtol=0, atol=atol)
    np.testing.assert_allclose(values["crps"], crps, rtol=0, atol=atol)
    np.testing.assert_allclose(values["abs_error"], abs_err, rtol=0, atol=atol)
    np.testing.assert_allclose(values["mean_abs_diff"], mad, rtol=0, atol=atol)


def test_gaussian_closed_forms(gaussian):
    X, y, fit = gaussian
    mu, sd = loo_normal(X, y, np.arange(len(y)))
    pv = predictive_values(fit, functionals=ALL, probs=PROBS, repair=None)
    assert pv.valid.all() and pv.spec.normal and not pv.spec.discrete
    _check_closed_forms(pv.values, mu, sd, y)
    # by default the high-leverage row 0 (leverage > 0.5) takes importance sampling toward p(θ | y₋0), as
    # fit.loo() repairs it: the same value within its Monte Carlo error, the other rows untouched
    lev = fit.sensitivities().leverage.values
    assert lev[0] > 0.5 and (lev[1:] < 0.5).all()
    rep = predictive_values(fit, functionals=ALL, probs=PROBS)
    # within 4 Monte Carlo standard errors of the self-normalized estimate, Σ_s w_s² (h_s − ĥ)², from the
    # weighted draws of η_0 the repair used
    eta, log_w = predictor_samples(fit, "y", [0])[0]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    checks = [("mean", eta[:, 0], mu[0]),
              ("pit_lower", stats.norm.cdf(y[0], eta[:, 0], SIGMA), stats.norm.cdf(y[0], mu[0], sd[0]))]
    for name, h, exact in checks:
        mcse = np.sqrt(np.sum(w**2 * (h - w @ h) ** 2))
        err = abs(rep.values[name][0] - exact)
        print(f"\n[repaired row 0] {name}: |IS − exact| = {err:.4f}, MCSE {mcse:.4f}")
        assert err < 4 * mcse, (name, rep.values[name][0], exact, mcse)
    np.testing.assert_array_equal(rep.values["mean"][1:], pv.values["mean"][1:])
    # the public functions (closed forms: repair=None): the same numbers, arviz-stats' names and signs
    ds = fit.loo_pit(repair=None)
    np.testing.assert_allclose(ds["y"].values, stats.norm.cdf(y, mu, sd), atol=1e-6)
    assert not ds.attrs["randomized"] and "continuous" in ds.attrs["rng_key"]
    mean, khat = fit.loo_expectations(repair=None)
    np.testing.assert_allclose(mean.values, mu, atol=1e-6)
    np.testing.assert_allclose(khat.values, fit.sensitivities().leverage.values)
    np.testing.assert_allclose(fit.loo_expectations(repair=None, kind="sd")[0].values, sd, atol=1e-6)
    np.testing.assert_allclose(fit.loo_expectations(repair=None, kind="var")[0].values, sd**2, atol=1e-6)
    np.testing.assert_allclose(fit.loo_expectations(repair=None, kind="median")[0].values, mu, atol=1e-6)
    q, _ = fit.loo_expectations(repair=None, kind="quantile", probs=[0.1, 0.7])
    assert q.dims == ("quantile", "data") and q["quantile"].values.tolist() == [0.1, 0.7]
    np.testing.assert_allclose(q.values, stats.norm.ppf([[0.1], [0.7]], mu, sd), atol=1e-6)
    ci = fit.loo_predictive_interval(repair=None, prob=0.8)
    np.testing.assert_allclose(ci.sel(ci_bound="upper").values, stats.norm.ppf(0.9, mu, sd), atol=1e-6)
    lo, hi = stats.norm.ppf([[0.1], [0.9]], mu, sd)
    assert ci.attrs["coverage"] == pytest.approx(np.mean((lo <= y) & (y <= hi)))
    crps, abs_err, mad = crps_normal(mu, sd, y)
    res = fit.loo_score(repair=None, pointwise=True)
    np.testing.assert_allclose(res.pointwise.values, -crps, atol=1e-6)  # a maximization score: −CRPS
    assert res.mean == pytest.approx(-crps.mean(), abs=1e-6) and res.se == pytest.approx(crps.std() / 30**0.5)
    scrps = fit.loo_score(repair=None, kind="scrps", pointwise=True)
    np.testing.assert_allclose(scrps.pointwise.values, -abs_err / mad - 0.5 * np.log(mad), atol=1e-6)
    rmse = np.sqrt(np.mean((y - mu) ** 2))
    assert fit.loo_metrics(repair=None, kind="rmse").mean == pytest.approx(rmse, abs=1e-6)
    assert fit.loo_metrics(repair=None, kind="mae", round_to=3).mean == round(np.mean(np.abs(y - mu)), 3)
    r2 = fit.loo_r2(repair=None, summary=False)
    assert r2.shape == (4000,) and np.median(r2) == pytest.approx(1 - np.var(y - mu) / np.var(y), abs=0.03)


def test_gaussian_leave_group_out(gaussian):
    X, y, fit = gaussian
    groups = np.arange(len(y)) // 3
    mu, sd = loo_normal(X, y, groups)
    pv = predictive_values(fit, functionals=ALL, probs=PROBS, groups=groups)
    _check_closed_forms(pv.values, mu, sd, y)
    np.testing.assert_allclose(fit.loo_expectations(repair=None, groups=groups)[0].values, mu, atol=1e-6)
    crps = crps_normal(mu, sd, y)[0]
    scores = fit.loo_score(repair=None, pointwise=True, groups=groups).pointwise.values
    np.testing.assert_allclose(scores, -crps, atol=1e-6)
    # groups of one observation are leave-one-out
    one = predictive_values(fit, functionals=("moments",), groups=np.arange(len(y)))
    loo = predictive_values(fit, functionals=("moments",), repair=None)
    np.testing.assert_allclose(one.values["mean"], loo.values["mean"], atol=1e-10)


def test_gaussian_memory_pass(gaussian):
    """The pass over held memories (Monte Carlo memories under q: exact for a quadratic log-likelihood)."""
    X, y, fit = gaussian
    mc = Fit(fit.adapter, fit.posterior, "laplace", memories=MemorySpec(kind="mc", num_samples=8))
    assert not mc.uses_predictor("y")
    mu, sd = loo_normal(X, y, np.arange(len(y)))
    _check_closed_forms(predictive_values(mc, functionals=ALL, probs=PROBS, repair=None).values, mu, sd, y)


# ===================================================================== arviz-stats on NUTS draws
def _arviz_1():
    import arviz as az

    return int(az.__version__.split(".")[0]) >= 1


@pytest.mark.arviz
@pytest.mark.skipif(not _arviz_1(), reason="checks against arviz-stats 1.x (Python 3.12, arviz >= 1)")
@pytest.mark.parametrize("family", ["poisson", "bernoulli", "normal"])
def test_against_arviz_stats(family):
    """Per observation: the RMS over observations of (MPE − arviz-stats) / MCSE ≤ 2 (1 is pure Monte Carlo
    error); summaries (mean CRPS, LOO-R², RMSE) within 3 MCSE."""
    ref = json.loads(REFERENCE.read_text())
    m = ref["models"][f"{family}_n400"]
    assert m["max_pareto_k"] < 0.7 and m["divergences"] == 0
    X, y = np.array(m["X"]), np.array(m["y"])
    fit = laplace(glm_model, X, y, family=family)
    v, se = ({k: np.asarray(a) for k, a in d.items()} for d in (m["values"], m["mcse"]))
    pv = predictive_values(fit, functionals=ALL, probs=tuple(ref["probs"]))
    mad = pv.values["mean_abs_diff"]
    ours = dict(pv.values, sd=np.sqrt(pv.values["var"]), crps=-pv.values["crps"],
                quantiles=pv.values["quantiles"].T,  # (probs, N), as the reference stores them
                scrps=-pv.values["abs_error"] / mad - 0.5 * np.log(mad))
    discrete = family != "normal"
    names = ["mean", "var", "sd", "crps"] + (["pit_lower", "pit_mass"] if discrete else ["quantiles"])
    if family != "bernoulli":  # SCRPS of a binary outcome: E|Ỹ − Ỹ′| → 0 where p → 0 or 1 (unbounded MCSE)
        names.append("scrps")
    if family == "normal":
        ours["pit"] = pv.values["pit_lower"]
        names.append("pit")
    for name in names:
        z = (ours[name] - v[name]) / np.sqrt(se[name] ** 2 + 1e-12)
        assert np.sqrt(np.mean(z**2)) < 2.0, (name, np.sqrt(np.mean(z**2)))
    if family != "normal":  # the randomized PIT with arviz-stats' own uniforms (seed 214)
        u = np.random.default_rng(214).uniform(size=len(y))
        z = (pv.values["pit_lower"] + u * pv.values["pit_mass"] - v["pit"]) / np.sqrt(se["pit"] ** 2 + 1e-12)
        assert np.sqrt(np.mean(z**2)) < 2.0
        q = predictive_values(fit, functionals=("quantiles",), probs=tuple(ref["probs"])).values["quantiles"]
        assert np.mean(np.abs(q.T - v["quantiles"]) <= 1) > 0.97  # integers: a step at most, mostly none
    assert abs(fit.loo_score().mean - v["crps_mean"]) < 3 * se["crps_mean"]
    r2 = fit.loo_r2()
    assert abs(r2.mean - v["r2"][0]) < 3 * se["r2"][0]
    assert abs(fit.loo_metrics(kind="rmse").mean - v["rmse"]) < 3 * se["rmse"]


# ===================================================================== calibration
@pytest.fixture(scope="module")
def poisson_fits():
    out = {}
    for name, r in [("poisson", None), ("overdispersed", 2.0)]:
        X, y = glm_data("poisson", 200, seed=5, overdispersion=r)
        out[name] = (X, y, laplace(glm_model, X, y, family="poisson"))
    return out


def test_miscalibration_is_detected(poisson_fits):
    bad = poisson_fits["overdispersed"][2].loo_pit()
    good = poisson_fits["poisson"][2].loo_pit()
    assert bad.attrs["ecdf_reject"] and bad.attrs["ecdf_pvalue"] < 0.01 and bad.attrs["ks_pvalue"] < 0.01
    assert not good.attrs["ecdf_reject"] and good.attrs["ecdf_pvalue"] > 0.05
    assert good.attrs["ks_pvalue"] > 0.05
    pit = bad["y"].values  # ∪-shaped: too many PIT values near 0 and 1
    assert np.mean((pit < 0.1) | (pit > 0.9)) > 0.3


def test_randomized_pit_is_uniform_under_the_model():
    X, y = glm_data("bernoulli", 400, seed=2)
    fit = laplace(glm_model, X, y, family="bernoulli")
    ds = fit.loo_pit()
    assert ds.attrs["randomized"] and "PRNGKey(214) (default)" in ds.attrs["rng_key"]
    other = fit.loo_pit(rng_key=jax.random.PRNGKey(7))
    assert other.attrs["rng_key"] == "the given rng_key" and not np.allclose(other["y"], ds["y"])
    for res in (ds, other):
        assert not res.attrs["ecdf_reject"] and res.attrs["ks_pvalue"] > 0.05
    # the randomization stays between F(y − 1) and F(y)
    pv = predictive_values(fit, functionals=("pit",))
    lower, upper = pv.values["pit_lower"], pv.values["pit_lower"] + pv.values["pit_mass"]
    assert np.all((ds["y"].values >= lower - 1e-12) & (ds["y"].values <= upper + 1e-12))


# ===================================================================== the weighted-samples hook
@pytest.mark.parametrize("proposal", ["cavity", "wider"])
def test_weighted_samples_agree_with_quadrature(poisson_fits, proposal):
    """Samples of η_i from the cavity Gaussian itself (equal weights), or from a wider one with importance
    weights, give the quadrature's functionals within Monte Carlo error."""
    X, y, fit = poisson_fits["poisson"]
    res = fit.site_mpe()
    idx = [0, int(np.argmax(np.asarray(res.leverage))), 17]
    quad = predictive_values(fit, functionals=ALL, probs=PROBS)
    eta = np.asarray(fit.adapter.eta(fit.posterior.mean, "y"))
    rng = np.random.default_rng(11)
    repaired, draws = {}, {}
    for i in idx:
        mean = eta[i, 0] + float(res.prediction_shift[i, 0])
        var = float(res.prediction_var[i, 0, 0]) / (1 - float(res.leverage[i]))  # V₋i for K = 1
        scale = 1.0 if proposal == "cavity" else 1.5
        s = mean + scale * np.sqrt(var) * rng.normal(size=10_000)
        logw = stats.norm.logpdf(s, mean, np.sqrt(var)) - stats.norm.logpdf(s, mean, scale * np.sqrt(var))
        repaired[i] = (s[:, None], logw)
        draws[i] = (s, np.exp(logw - logw.max()) / np.exp(logw - logw.max()).sum())
    rep = predictive_values(fit, functionals=ALL, probs=PROBS, repaired=repaired)
    for i in idx:
        s, w = draws[i]
        ess = 1 / np.sum(w**2)
        rate = np.exp(s)
        for name, h in [("mean", rate), ("pit_lower", stats.poisson.cdf(y[i] - 1, rate)),
                        ("pit_mass", stats.poisson.pmf(y[i], rate))]:
            mcse = np.sqrt(np.sum(w * (h - np.sum(w * h)) ** 2) / ess)
            assert abs(rep.values[name][i] - quad.values[name][i]) < 4 * mcse + 1e-12, (i, name)
        for name in ("var", "crps", "mean_abs_diff"):
            assert rep.values[name][i] == pytest.approx(quad.values[name][i], rel=0.02), (i, name)
        assert np.abs(rep.values["quantiles"][i] - quad.values["quantiles"][i]).max() <= 1
    others = np.setdiff1d(np.arange(len(y)), idx)
    np.testing.assert_array_equal(rep.values["crps"][others], quad.values["crps"][others])


# ===================================================================== bad input
def test_bad_input(gaussian, poisson_fits):
    _, _, fit = gaussian
    with pytest.raises(MPEError, match="probs must be probabilities strictly between 0 and 1"):
        fit.loo_expectations(kind="quantile", probs=[0.0, 0.5])
    with pytest.raises(MPEError, match="probs"):
        fit.loo_expectations(kind="quantile", probs=[1.2])
    with pytest.raises(MPEError, match="probs must be given"):
        fit.loo_expectations(kind="quantile")
    with pytest.raises(MPEError, match="prob must be"):
        fit.loo_predictive_interval(prob=1.0)
    with pytest.raises(MPEError, match="ci_prob"):
        fit.loo_r2(ci_prob=0.0)
    with pytest.raises(MPEError, match="kind must be one of"):
        fit.loo_expectations(kind="mode")
    with pytest.raises(MPEError, match="kind must be 'crps' or 'scrps'"):
        fit.loo_score(kind="brier")
    with pytest.raises(MPEError, match="kind must be one of"):
        fit.loo_metrics(kind="r2")
    with pytest.raises(MPEError, match="unknown LOO predictive functional"):
        predictive_values(fit, functionals=("pit", "entropy"))
    with pytest.raises(MPEError, match="groups="):
        fit.loo_pit(groups=np.arange(30) // 3)
    with pytest.raises(MPEError, match=r"repair must be one of \('flagged', 'invalid', None\), got 'all'"):
        fit.loo_pit(repair="all")
    # a discrete site without rng_key: the default key, stated
    assert "PRNGKey(214)" in poisson_fits["poisson"][2].loo_pit().attrs["rng_key"]


def geometric_model(x, y=None):
    b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("counts", dist.Geometric(logits=b * x), obs=y)


def test_distribution_without_cdf():
    x = jnp.linspace(-1, 1, 12)
    fit = laplace(geometric_model, x, y=jnp.array([0.0, 1, 3, 0, 2, 1, 0, 4, 1, 0, 2, 1]))
    with pytest.raises(MPEError, match="site 'counts'.*GeometricLogits has no CDF"):
        fit.loo_pit()
    with pytest.raises(MPEError, match="GeometricLogits has no CDF"):
        fit.loo_score()
    mean, _ = fit.loo_expectations()  # the moments need no CDF
    assert np.isfinite(mean.values).all()


# ===================================================================== plots, report, command line, export
def test_plots_return_axes(poisson_fits):
    from matplotlib.axes import Axes

    from numpyro_mpe.io.plots import plot_loo_intervals, plot_loo_pit

    fit = poisson_fits["overdispersed"][2]
    y = poisson_fits["overdispersed"][1]
    ax = plot_loo_pit(fit.loo_pit())
    assert isinstance(ax, Axes) and ax.get_xlabel() == "LOO-PIT"
    assert "outside: miscalibrated" in ax.get_legend().get_texts()[1].get_text()
    ci = fit.loo_predictive_interval()
    ax2 = plot_loo_intervals(ci, y, mean=fit.loo_expectations()[0])
    assert isinstance(ax2, Axes)
    outside = [line for line in ax2.get_lines() if line.get_gid() == "outside"][0]
    lo, hi = ci.values
    assert len(outside.get_xdata()) == int(np.sum((y < lo) | (y > hi)))


def test_report_command_line_and_export(gaussian, tmp_path):
    from numpyro_mpe.io.cli import main
    from numpyro_mpe.io.export import read_loo_predictive, read_sensitivities
    from numpyro_mpe.io.report import render_report

    _, y, fit = gaussian
    text = render_report(fit, predictive=True, num_samples=300)
    section = text.split('<section id="predictive">')[1].split("</section>")[0]
    assert "LOO predictive checks" in section and section.count('src="data:image/png;base64,') == 2
    assert 'id="predictive"' not in render_report(fit, num_samples=300)
    idata = fit.to_inference_data(num_samples=50)
    back = read_loo_predictive(idata, "y")
    np.testing.assert_allclose(back["loo_pit"].values, fit.loo_pit()["y"].values)
    np.testing.assert_allclose(back["loo_sd"].values, fit.loo_expectations(kind="sd")[0].values)
    assert back["loo_pit"].attrs["ks_pvalue"] == fit.loo_pit().attrs["ks_pvalue"]
    assert set(read_sensitivities(idata, "y").data_vars) == set(fit.sensitivities("y").data_vars)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["demo", "--no-nuts", "--quiet", "--draws", "200", "--out", str(tmp_path)])
        assert main(["report", "--no-nuts", "--quiet", "--draws", "200", "--loo-checks",
                     "--out", str(tmp_path / "checks.html")]) == 0
    assert rc == 0 and "LOO predictive checks of 'y': LOO-PIT ECDF test p " in out.getvalue()
    assert (tmp_path / "loo_pit.png").is_file() and (tmp_path / "loo_intervals.png").is_file()
    assert 'id="predictive"' not in (tmp_path / "report.html").read_text(encoding="utf-8")
    assert 'id="predictive"' in (tmp_path / "checks.html").read_text(encoding="utf-8")


def test_observation_without_a_gaussian_cavity_gets_the_importance_sampling_repair():
    """Cauchy, y = (0.4, 3, −3): the outliers' negative curvature leaves observation 0 without a Gaussian
    cavity (leverage ≥ 1).  Its LOO-PIT then comes from importance sampling toward p(μ | y₋0), checked
    against quadrature of ∫ F_Cauchy(y_0; μ) p(μ | y₋0) dμ on a grid."""
    from scipy import stats

    def cauchy(y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 10))
        with numpyro.plate("obs", y.shape[0]):
            numpyro.sample("y", dist.Cauchy(mu, 1.0), obs=y)

    y = np.array([0.4, 3.0, -3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = mpe.Laplace(cauchy, progress=False).run(jax.random.PRNGKey(0), y=y)
        pit = fit.loo_pit()
    assert not bool(fit.sensitivities()["valid"][0])
    mu = np.linspace(-80, 80, 400001)
    post = stats.norm.pdf(mu, 0, 10) * stats.cauchy.pdf(3.0, mu) * stats.cauchy.pdf(-3.0, mu)
    truth = np.trapezoid(stats.cauchy.cdf(0.4, mu) * post, mu) / np.trapezoid(post, mu)
    values = np.asarray(pit["y"] if hasattr(pit, "data_vars") else pit)
    assert abs(values[0] - truth) < 0.04, (values[0], truth)  # ~3 Monte Carlo sd of 2000 weighted draws


def test_one_pass_serves_every_request_it_covers(monkeypatch):
    """After one pass with PIT, moments and the 90 % interval's quantiles (what the report asks), the PIT, the
    means, the interval, LOO-R² and the sensitivities run no other pass and no second importance sampling of
    the flagged row, and equal what each computes alone on a fresh fit; other quantiles or the CRPS do run a
    pass of their own."""
    from numpyro_mpe.loo.predictive import interval_probs

    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 3))
    X[0] *= 3.0  # a high-leverage row: repaired by importance sampling
    y = X @ [1.0, -0.5, 0.3] + SIGMA * rng.standard_t(4, size=30)
    alone = laplace(gaussian_model, X, y)
    want = (alone.loo_pit(), alone.loo_expectations()[0], alone.loo_predictive_interval(prob=0.9),
            alone.loo_r2(), alone.sensitivities())
    fit = laplace(gaussian_model, X, y)
    passes, repairs = [], []
    monkeypatch.setattr(Fit, "_site_mpe", lambda self, name, opts, f=Fit._site_mpe: passes.append(
        opts.predictive) or f(self, name, opts))
    import numpyro_mpe.loo.importance as importance

    monkeypatch.setattr(importance, "predictor_samples", lambda *a, f=importance.predictor_samples, **k:
                        repairs.append(a[2]) or f(*a, **k))
    predictive_values(fit, None, ("pit", "moments", "quantiles"), interval_probs(0.9))
    assert len(passes) == 1 and list(map(list, repairs)) == [[0]], (passes, repairs)
    got = (fit.loo_pit(), fit.loo_expectations()[0], fit.loo_predictive_interval(prob=0.9), fit.loo_r2(),
           fit.sensitivities())
    assert len(passes) == 1 and len(repairs) == 1, (passes, repairs)
    def arr(x):  # loo_pit: a Dataset on arviz 0.x
        return np.asarray(x["y"] if hasattr(x, "data_vars") else x)

    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_allclose(arr(a), arr(b), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[3]), np.asarray(want[3]), rtol=1e-12)
    for name in ("elpd_loo", "leverage", "sensitivity", "prediction_shift"):
        np.testing.assert_allclose(got[4][name].values, want[4][name].values, rtol=1e-12, atol=1e-14)
    fit.loo_expectations(kind="quantile", probs=[0.25])
    fit.loo_score()
    assert [p.functionals for p in passes[1:]] == [("quantiles",), ("crps",)], passes
