"""Export to ArviZ (0.x InferenceData or >= 1 DataTree) and the MPE ELPD object for az.compare.

Independent truths: ``numpyro.infer.log_likelihood`` on the exported draws, ``az.from_numpyro``'s naming of
dims, the draws of ``fit.posterior.sample`` with the same key, closed forms for the PSIS fallback, and
NUTS + PSIS-LOO on a linear-Gaussian model where the Laplace posterior is exact.
"""

import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from linear_gaussian import linear_gaussian_model, simulate
from numpyro.infer import MCMC, NUTS

import numpyro_mpe as mpe
from numpyro_mpe.io.export import read_sensitivities
from numpyro_mpe.loo.arviz_compat import ARVIZ_1, pointwise_elpd
from numpyro_mpe.loo.elpd import elpd_data

numpyro.enable_x64()

pytestmark = pytest.mark.arviz

S = 400  # draws exported from q in most tests


# ------------------------------------------------------------------ models and fits
SIGMA, TAU = 0.7, 2.0
linear = linear_gaussian_model(SIGMA, TAU)


def linear_data(seed=0, n=30):
    X, y, _ = simulate(seed, n, [1.0, -2.0, 0.5], SIGMA)
    return X, y


G, M, R = 4, 6, 5


def multi_data(seed=1):
    rng = np.random.default_rng(seed)
    Y = rng.normal(size=(G, M)) + np.arange(G)[:, None]
    Z = rng.normal(size=(R, 3)) + np.array([0.5, -0.5, 1.0])
    return Y, Z


def multi(Y=None, Z=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(2))
    with numpyro.plate("group", G, dim=-2):
        th = numpyro.sample("theta", dist.Normal(mu, tau))
        with numpyro.plate("member", M, dim=-1):
            numpyro.sample("Y", dist.Normal(th, 1.0), obs=Y)
    loc = numpyro.sample("loc", dist.Normal(0, 3).expand([3]).to_event(1))
    numpyro.deterministic("loc_sum", jnp.sum(loc))
    with numpyro.plate("rows", Z.shape[0]):
        numpyro.sample("Z", dist.Normal(loc, 1.0).to_event(1), obs=Z)


@pytest.fixture(scope="module")
def lin():
    X, y = linear_data()
    fit = mpe.Laplace(linear, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    return X, y, fit


@pytest.fixture(scope="module")
def lin_nuts(lin):
    X, y, _ = lin
    mcmc = MCMC(NUTS(linear), num_warmup=500, num_samples=2000, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(1), X, y=y)
    return az.from_numpyro(mcmc, log_likelihood=True)


@pytest.fixture(scope="module")
def mult():
    Y, Z = multi_data()
    fit = mpe.Laplace(multi, progress=False).run(jax.random.PRNGKey(0), Y=Y, Z=Z)
    key = jax.random.PRNGKey(7)
    return Y, Z, fit, key, fit.to_inference_data(num_samples=S, rng_key=key)


def group(data, name) -> xr.Dataset:
    g = data[name]
    return g if isinstance(g, xr.Dataset) else g.to_dataset()


def groups_of(data) -> set:
    return set(data.children) if ARVIZ_1 else set(data.groups())


# ------------------------------------------------------------------ export structure
def test_container_type_and_groups(mult):
    *_, idata = mult
    assert isinstance(idata, xr.DataTree if ARVIZ_1 else az.InferenceData)
    assert groups_of(idata) == {"posterior", "log_likelihood", "observed_data", "sample_stats", "mpe"}
    post = group(idata, "posterior")
    assert set(post.data_vars) == {"mu", "tau", "theta", "loc", "loc_sum"}
    assert post.sizes["chain"] == 1 and post.sizes["draw"] == S
    assert post["theta"].shape == (1, S, G, 1)
    assert post["loc"].shape == (1, S, 3)
    assert post["loc_sum"].shape == (1, S)
    ll = group(idata, "log_likelihood")
    assert ll["Y"].dims == ("chain", "draw", "group", "member") and ll["Y"].shape == (1, S, G, M)
    assert ll["Z"].dims == ("chain", "draw", "rows") and ll["Z"].shape == (1, S, R)
    obs = group(idata, "observed_data")
    assert obs["Z"].dims == ("rows", "Z_dim_0" if ARVIZ_1 else "Z_dim_1")
    assert "posterior_source" in post.attrs and "draws from q" in post.attrs["posterior_source"]
    assert post.attrs["inference_library"] == "numpyro"


@pytest.mark.slow  # NUTS
def test_dims_named_as_from_numpyro(mult):
    """Every variable of posterior / log_likelihood / observed_data has the dims az.from_numpyro gives."""
    Y, Z, _, _, idata = mult
    mcmc = MCMC(NUTS(multi), num_warmup=10, num_samples=10, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(3), Y=Y, Z=Z)
    ref = az.from_numpyro(mcmc, log_likelihood=True)
    for name in ("posterior", "log_likelihood", "observed_data"):
        ours, theirs = group(idata, name), group(ref, name)
        assert set(ours.data_vars) == set(theirs.data_vars), name
        for v in theirs.data_vars:
            assert ours[v].dims == theirs[v].dims, (name, v)
            np.testing.assert_array_equal(ours[v].shape[2:], theirs[v].shape[2:])
    for v in ("Y", "Z"):
        np.testing.assert_array_equal(group(idata, "observed_data")[v].values, group(ref, "observed_data")[v])


def test_posterior_draws_are_the_draws_of_q(mult):
    *_, fit, key, idata = mult
    theta = np.asarray(fit.posterior.sample(key, S))
    post = group(idata, "posterior")
    for site in fit.adapter.latent:
        u = theta[:, site.start:site.stop]
        v = post[site.name].values[0].reshape(S, -1)
        expected = np.exp(u) if site.name == "tau" else u  # HalfNormal: exp transform; others identity
        np.testing.assert_allclose(v, expected, rtol=1e-12, atol=1e-12, err_msg=site.name)
    np.testing.assert_allclose(post["loc_sum"].values, post["loc"].values.sum(-1), rtol=1e-12)


def test_log_likelihood_equals_numpyro_log_likelihood(mult):
    Y, Z, _, _, idata = mult
    post = group(idata, "posterior")
    samples = {k: jnp.asarray(post[k].values[0]) for k in ("mu", "tau", "theta", "loc")}
    ref = numpyro.infer.log_likelihood(multi, samples, Y=Y, Z=Z)
    ll = group(idata, "log_likelihood")
    for v in ("Y", "Z"):
        np.testing.assert_allclose(ll[v].values[0], np.asarray(ref[v]), rtol=1e-10, atol=1e-10)


def test_mpe_group_holds_every_site(mult):
    *_, fit, _, idata = mult
    grp = group(idata, "mpe")
    for site in ("Y", "Z"):
        ds = fit.sensitivities(site)
        for out in ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage", "valid"):
            np.testing.assert_array_equal(grp[f"{site}_{out}"].values, ds[out].values)
            assert grp[f"{site}_{out}"].dims == ds[out].dims
        pdims = ds["prediction_shift"].dims[:-1] + (f"{site}_predictor",)
        assert grp[f"{site}_prediction_shift"].dims == pdims
        back = read_sensitivities(idata, site)
        xr.testing.assert_equal(back, ds)
    with pytest.raises(ValueError, match="var_name"):
        read_sensitivities(idata)


# ------------------------------------------------------------------ netCDF
def test_netcdf_round_trip(mult, tmp_path):
    *_, idata = mult
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    readers = [az.from_netcdf]
    if ARVIZ_1:
        readers.append(xr.open_datatree)
    for read in readers:
        back = read(str(path))
        assert groups_of(back) == groups_of(idata)
        for name in groups_of(idata):
            a, b = group(idata, name), group(back, name)
            xr.testing.assert_equal(a, b)
            for k, v in a.attrs.items():
                if isinstance(v, str | int | float):
                    assert b.attrs[k] == v, (name, k)
            for v in a.data_vars:
                assert b[v].dtype == a[v].dtype, (name, v)
        xr.testing.assert_equal(read_sensitivities(back, "Y"), read_sensitivities(idata, "Y"))
        if hasattr(back, "close"):
            back.close()


# ------------------------------------------------------------------ az.loo / az.compare
def test_az_loo_on_export_agrees_with_mpe(lin):
    """Linear-Gaussian: q is the exact posterior, so PSIS on its draws estimates the same LOO as MPE."""
    *_, fit = lin
    idata = fit.to_inference_data(num_samples=2000, rng_key=jax.random.PRNGKey(2))
    res = az.loo(idata, pointwise=True)
    mine = fit.loo(method="mpe")
    np.testing.assert_allclose(np.asarray(pointwise_elpd(res)), np.asarray(pointwise_elpd(mine)), atol=0.05)
    assert abs(res["elpd_loo" if not ARVIZ_1 else "elpd"] - mine["elpd_loo" if not ARVIZ_1 else "elpd"]) < 0.2


def test_loo_totals_are_sums_of_sensitivities(lin):
    *_, fit = lin
    ds = fit.sensitivities()
    res = fit.loo(method="mpe")
    cls = az.stats.stats_utils.ELPDData if not ARVIZ_1 else __import__("arviz_stats").ELPDDataLOO
    assert isinstance(res, cls)
    elpd_i = ds["elpd_loo"].values
    n = elpd_i.size
    ddof = 1 if ARVIZ_1 else 0
    total = res["elpd"] if ARVIZ_1 else res["elpd_loo"]
    p = res["p"] if ARVIZ_1 else res["p_loo"]
    np.testing.assert_allclose(total, elpd_i.sum(), rtol=1e-12)
    np.testing.assert_allclose(p, ds["p_loo"].values.sum(), rtol=1e-12)
    np.testing.assert_allclose(res["se"], np.sqrt(n * np.var(elpd_i, ddof=ddof)), rtol=1e-12)
    np.testing.assert_array_equal(pointwise_elpd(res).values, elpd_i)
    assert pointwise_elpd(res).dims == ("data",)
    np.testing.assert_array_equal(res["pareto_k"].values, ds["leverage"].values)
    assert res["n_data_points"] == n and res["n_samples"] == 0 and res["scale"] == "log"
    assert res["good_k"] == 0.7
    assert res["warning"] == bool((ds["leverage"].values > 0.7).any())
    str(res)  # arviz's own printout works


@pytest.mark.slow  # NUTS (lin_nuts)
def test_az_compare_accepts_mpe_beside_psis(lin, lin_nuts):
    *_, fit = lin
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psis = az.loo(lin_nuts, pointwise=True)
        kw = {"round_to": "none"} if ARVIZ_1 else {}  # arviz >= 1 rounds to 2 significant digits
        cmp = az.compare({"mpe": fit.loo(method="mpe"), "psis": psis, "auto": fit.loo()}, **kw)
    assert set(cmp.index) == {"mpe", "psis", "auto"}  # the default result, with its extra fields, compares
    col = "elpd" if ARVIZ_1 else "elpd_loo"
    mine = fit.sensitivities()["elpd_loo"].values.sum()
    np.testing.assert_allclose(cmp.loc["mpe", col], mine, rtol=1e-12)
    np.testing.assert_allclose(cmp.loc["psis", col], psis["elpd" if ARVIZ_1 else "elpd_loo"], rtol=1e-12)
    # Laplace is the exact posterior here: MPE and NUTS + PSIS estimate the same LOO.
    assert abs(cmp.loc["mpe", col] - cmp.loc["psis", col]) < 0.3
    assert abs(cmp.loc["auto", col] - cmp.loc["psis", col]) < 0.3
    plt = pytest.importorskip("matplotlib.pyplot")
    try:
        az.plot_compare(cmp)
    finally:
        plt.close("all")


def test_several_observed_sites_need_var_name(mult):
    *_, fit, _, idata = mult
    with pytest.raises(mpe.ModelError, match="var_name"):
        fit.loo()
    with pytest.raises(mpe.ModelError, match="var_name"):
        mpe.compare_psis(fit, idata)
    res = fit.loo("Z")
    assert pointwise_elpd(res).dims == ("rows",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psis = az.loo(idata, pointwise=True, var_name="Z")
    assert pointwise_elpd(psis).dims == ("rows",)


# ------------------------------------------------------------------ invalid cavities
def cauchy(y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Cauchy(mu, 1.0), obs=y)


def test_invalid_cavity_falls_back_to_psis_on_q():
    """y = (0, 3, -3), Cauchy: the outliers' negative curvature leaves S - H_0 < 0 (leverage > 1).

    PSIS on q for observation 0 estimates 1 / E_q[1 / p(y_0 | mu)] = 1 / (π (1 + (y_0 − m)² + 1/S)).
    """
    y = np.array([0.0, 3.0, -3.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = mpe.Laplace(cauchy, progress=False).run(jax.random.PRNGKey(0), y=y)
        ds = fit.sensitivities()
    assert not bool(ds["valid"][0]) and bool(ds["valid"][1:].all())
    with pytest.warns(UserWarning, match="PSIS-LOO on 2000 draws from q") as rec:
        res = elpd_data(fit, method="mpe")
    assert rec[0].filename == __file__  # the warning points at the caller's line, not into the package
    m = float(fit.posterior.mean[0])
    var = 1.0 / float(fit.posterior.precision[0, 0])
    truth = -np.log(np.pi * (1.0 + (y[0] - m) ** 2 + var))
    loo_i = pointwise_elpd(res).values
    assert np.all(np.isfinite(loo_i))
    assert abs(loo_i[0] - truth) < 0.06
    np.testing.assert_array_equal(loo_i[1:], ds["elpd_loo"].values[1:])
    total = res["elpd"] if ARVIZ_1 else res["elpd_loo"]
    p = res["p"] if ARVIZ_1 else res["p_loo"]
    np.testing.assert_allclose(total, loo_i.sum(), rtol=1e-12)
    np.testing.assert_allclose(p, (ds["lpd"].values - loo_i).sum(), rtol=1e-12)
    assert res["warning"] and res["n_samples"] == 2000
    assert res["pareto_k"].values[0] > 1.0
