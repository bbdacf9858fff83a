"""Model inputs in the forms users hold them: pandas Series and DataFrames (also a filtered Series with a
non-contiguous index) and Python lists give the fit of the same values as NumPy arrays; a non-numeric pandas
column is refused with an error naming the argument.

Truth: the same fit on NumPy arrays, and for the Laplace mean the closed-form posterior mean of the
linear-Gaussian model (conftest's ``linear_gaussian``).
"""

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from linear_gaussian import posterior

import numpyro_mpe as mpe

KEY = jax.random.PRNGKey(0)
OUTPUTS = ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage", "shift", "prediction_shift")
TOL = 1e-10


def laplace(model, *args, **kwargs):
    return mpe.Laplace(model, progress=False).run(KEY, *args, **kwargs)


def assert_same_fit(fit, ref):
    mean, mean_ref = np.asarray(fit.posterior.mean), np.asarray(ref.posterior.mean)
    np.testing.assert_allclose(mean, mean_ref, rtol=0, atol=TOL)
    ds, ds_ref = fit.sensitivities(), ref.sensitivities()
    assert ds.sizes == ds_ref.sizes
    for out in OUTPUTS:
        if out in ds_ref:
            np.testing.assert_allclose(ds[out].values, ds_ref[out].values, rtol=0, atol=TOL, err_msg=out)
    assert ds.valid.values.tolist() == ds_ref.valid.values.tolist()


@pytest.fixture(scope="module")
def reference(linear_gaussian):
    lg = linear_gaussian
    ref = laplace(lg.model, lg.X, y=lg.y)
    # the reference itself is the exact posterior (Laplace is exact for this model)
    np.testing.assert_allclose(np.asarray(ref.posterior.mean), lg.truth["m"], rtol=0, atol=1e-8)
    np.testing.assert_allclose(ref.sensitivities().elpd_loo.values, lg.truth["elpd_loo"], rtol=0, atol=1e-6)
    return ref


def test_y_as_series(linear_gaussian, reference):
    lg = linear_gaussian
    assert_same_fit(laplace(lg.model, lg.X, y=pd.Series(lg.y, name="response")), reference)


def test_y_as_list_of_floats(linear_gaussian, reference):
    lg = linear_gaussian
    y = [float(v) for v in lg.y]
    assert isinstance(y, list) and isinstance(y[0], float)
    assert_same_fit(laplace(lg.model, lg.X, y=y), reference)


def test_X_as_dataframe(linear_gaussian, reference):
    lg = linear_gaussian
    X = pd.DataFrame(lg.X, columns=["a", "b", "c"])
    assert_same_fit(laplace(lg.model, X, y=lg.y), reference)
    # both at once, with a non-default (string) index
    idx = [f"row{i}" for i in range(len(lg.y))]
    assert_same_fit(laplace(lg.model, X.set_axis(idx), y=pd.Series(lg.y, index=idx)), reference)


def test_filtered_series_with_non_contiguous_index(linear_gaussian):
    """``s[s.index % 2 == 0]`` keeps index labels 0, 2, 4, …: the fit must use its values in order, not look
    them up by position or by label."""
    lg = linear_gaussian
    s = pd.Series(lg.y)
    keep = s.index % 2 == 0
    s_even = s[keep]
    assert s_even.index.tolist() == list(range(0, len(lg.y), 2))
    ref = laplace(lg.model, lg.X[keep], y=lg.y[keep])
    # the reference against the closed form of the same rows
    m, _ = posterior(lg.X[keep], lg.y[keep], lg.sigma, lg.tau)
    np.testing.assert_allclose(np.asarray(ref.posterior.mean), m, rtol=0, atol=1e-8)
    assert_same_fit(laplace(lg.model, lg.X[keep], y=s_even), ref)
    # X as the matching filtered DataFrame rows too
    X_even = pd.DataFrame(lg.X)[keep]
    assert X_even.index.tolist() == s_even.index.tolist()
    assert_same_fit(laplace(lg.model, X_even, y=s_even), ref)


# ------------------------------------------------------------------ non-numeric columns
def group_model(X, g, y=None):
    a = numpyro.sample("a", dist.Normal(0, 1).expand([3]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(a[g] + X @ b, 0.5), obs=y)


def test_non_numeric_pandas_columns_are_refused_by_name(linear_gaussian):
    lg = linear_gaussian
    n = len(lg.y)
    labels = np.array(["low", "mid", "high"])[np.arange(n) % 3]
    # strings: dtype object, or pandas >= 3's string dtype ("str")
    with pytest.raises(mpe.ModelError, match=r"argument 'y' is a pandas Series of dtype (object|str|string)"):
        laplace(lg.model, lg.X, y=pd.Series(labels))
    with pytest.raises(mpe.ModelError, match=r"argument 'g' is a pandas Series of dtype category"):
        laplace(group_model, lg.X, g=pd.Series(labels, dtype="category"), y=lg.y)
    with pytest.raises(mpe.ModelError, match=r"argument 'X' is a pandas DataFrame of dtype object"):
        laplace(group_model, X=pd.DataFrame({"x0": lg.X[:, 0], "colour": labels}), g=np.arange(n) % 3, y=lg.y)
    # the error tells what to pass instead; and the codes of the categories work
    with pytest.raises(mpe.ModelError, match=r"cat\.codes"):
        laplace(group_model, lg.X, g=pd.Series(labels, dtype="category"), y=lg.y)
    codes = pd.Series(labels, dtype="category").cat.codes
    fit = laplace(group_model, lg.X, g=codes, y=lg.y)
    ref = laplace(group_model, lg.X, g=codes.to_numpy(), y=lg.y)
    assert_same_fit(fit, ref)
