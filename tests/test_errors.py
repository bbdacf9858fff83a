"""Bad input: each case raises (or warns) with a message naming the site, shape or option at fault."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from linear_gaussian import linear_gaussian_model

import numpyro_mpe as mpe

KEY = jax.random.PRNGKey(0)


linreg = linear_gaussian_model(1.0, 1.0)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 2))
    return X, X @ np.array([1.0, -1.0]) + rng.normal(size=20)


def test_no_observed_site(data):
    X, _ = data
    with pytest.raises(mpe.ModelError, match="no observed sample site"):
        mpe.Laplace(linreg).run(KEY, X)  # y=None: nothing observed


def test_discrete_latent_site_named():
    def model(y=None):
        z = numpyro.sample("cluster", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)

    with pytest.raises(mpe.ModelError, match="latent site 'cluster' is discrete"):
        mpe.Laplace(model).run(KEY, y=1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_named(data, bad):
    X, y = data
    y = y.copy()
    y[[3, 7]] = bad
    with pytest.raises(mpe.ModelError, match=r"observed site 'y' has 2 non-finite value\(s\).*shape \(20,\)"):
        mpe.Laplace(linreg).run(KEY, X, y=y)


def test_non_finite_potential_named():
    # The factor is -inf for every value of 'a': no initial point has a finite potential.
    def model(y=None):
        a = numpyro.sample("a", dist.Normal(0, 1))
        numpyro.sample("y", dist.Normal(a, 1.0), obs=y)
        numpyro.factor("broken", -jnp.inf * (a * a + 1.0))

    with pytest.raises(mpe.PosteriorError, match=r"not finite.*site\(s\) \['broken'\]"):
        mpe.Laplace(model).run(KEY, y=1.0)


def test_non_convergence_warns_with_gradient_norm(data):
    X, y = data

    def logistic(X, y=None):
        b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ b), obs=y)

    with pytest.warns(UserWarning, match=r"did not converge in 1 steps \(max \|grad U\| = [0-9.e+-]+\)"):
        mpe.Laplace(logistic, max_steps=1).run(KEY, X, y=(y > 0).astype(float))


def test_indefinite_hessian_names_sites():
    # 'a' and 'b' enter only through a + b: the Hessian is singular along a - b (flat prior).
    def model(y=None):
        a = numpyro.sample("a", dist.ImproperUniform(dist.constraints.real, (), ()))
        b = numpyro.sample("b", dist.ImproperUniform(dist.constraints.real, (), ()))
        c = numpyro.sample("c", dist.Normal(0, 1))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(a + b + c, 1.0), obs=y)

    with pytest.raises(mpe.PosteriorError, match=r"not positive definite.*\['a', 'b'\]"):
        mpe.Laplace(model).run(KEY, y=jnp.array([0.5, 1.0, 1.5]))


def test_var_name_missing_and_unknown():
    def model(y1=None, y2=None):
        m = numpyro.sample("m", dist.Normal(0, 1))
        with numpyro.plate("a", 3):
            numpyro.sample("y1", dist.Normal(m, 1.0), obs=y1)
        with numpyro.plate("b", 4):
            numpyro.sample("y2", dist.Normal(m, 2.0), obs=y2)

    fit = mpe.Laplace(model, progress=False).run(KEY, y1=jnp.ones(3), y2=jnp.zeros(4))
    with pytest.raises(mpe.ModelError, match=r"several observed sites \['y1', 'y2'\].*var_name"):
        fit.sensitivities()
    with pytest.raises(mpe.ModelError, match=r"var_name='z' is not an observed site.*\['y1', 'y2'\]"):
        fit.sensitivities("z")
    assert fit.sensitivities("y2").sizes["b"] == 4


def test_unknown_option_named():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['max_iter'\].*max_steps"):
        mpe.Laplace(linreg, max_iter=10)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be a positive integer, got 0"):
        mpe.Laplace(linreg, chunk_size=0)


def test_invalid_cavity_is_reported_not_nan():
    # Cauchy location with a vague prior: the far observation's exact Hessian is negative, so removing
    # the near one leaves S - H_1 = H_2 + prior < 0: its leave-one-out Gaussian does not exist.
    def model(y=None):
        mu = numpyro.sample("mu", dist.Normal(0, 100))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Cauchy(mu, 1.0), obs=y)

    y = jnp.array([0.0, 10.0])
    init = numpyro.infer.init_to_value(values={"mu": 0.5})  # the mode near 0 (the posterior is bimodal)
    fit = mpe.Laplace(model, progress=False, init_strategy=init).run(KEY, y=y)
    with pytest.warns(UserWarning, match=r"1 of 2 observations of 'y' have leverage >= 1"):
        ds = fit.sensitivities()
    # Independent check: leverage_1 = H_1 / S with H = d²/dmu² of the Cauchy NLL at the mode.
    m = float(fit.posterior.mean[0])
    h = [(1 - (yi - m) ** 2) * 2 / (1 + (yi - m) ** 2) ** 2 for yi in np.asarray(y)]
    s = sum(h) + 1e-4
    np.testing.assert_allclose(ds.leverage.values, np.array(h) / s, rtol=1e-6)
    assert ds.valid.values.tolist() == [False, True]
    assert np.isnan(ds.elpd_loo.values[0]) and np.isfinite(ds.elpd_loo.values[1])
    assert np.all(np.isfinite(ds.lpd.values))


def test_model_using_numpy_on_its_data_still_builds():
    """A model that needs its data as concrete values while tracing (np.unique) cannot take them as jit
    arguments; the adapter falls back to closing over them, and the fit matches a model that does not."""
    import numpy as np

    def model_np(g, y=None):
        n_groups = len(np.unique(np.asarray(g)))
        a = numpyro.sample("a", dist.Normal(0, 1).expand([n_groups]).to_event(1))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)

    def model_jnp(g, y=None):
        a = numpyro.sample("a", dist.Normal(0, 1).expand([3]).to_event(1))
        with numpyro.plate("data", len(g)):
            numpyro.sample("y", dist.Normal(a[g], 1.0), obs=y)

    rng = np.random.default_rng(0)
    g = rng.integers(0, 3, 30)
    y = rng.normal(size=30) + g
    key = jax.random.PRNGKey(0)
    a = mpe.Laplace(model_np, progress=False).run(key, g, y=y).sensitivities()
    b = mpe.Laplace(model_jnp, progress=False).run(key, g, y=y).sensitivities()
    np.testing.assert_allclose(a.elpd_loo, b.elpd_loo, atol=1e-10)
