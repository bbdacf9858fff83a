"""The leave-one-out ground-truth suite: small data sets and the NumPyro models fitted to them.

Every entry is a :class:`Problem`. ``problem.model(*problem.args, **problem.kwargs)`` is an ordinary NumPyro
model, written the way a user writes one (``def model(X, y=None): ...`` with a ``numpyro.plate`` named
``problem.obs_dim`` over the observations and the observed site ``problem.var_name``). The data are float64
NumPy arrays (integer arrays for group indices and class labels); everything that is not a per-observation
array (a number of groups, a number of classes) is a plain Python ``int`` passed as a keyword, so
:func:`drop` gives data sets of identical shapes for every held-out observation.

Only data shipped inside installed packages (``statsmodels.api.datasets``, ``sklearn.datasets``) or synthetic
data from a fixed seed are used. Importing this module loads no data; each problem is built on request.

``benchmarks/ground_truth.py`` fits every problem with NUTS, on the full data and once per held-out
observation, and stores the exact Bayesian leave-one-out predictive densities in ``tests/data/loo_truth/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

__all__ = ["Problem", "problems", "problem", "drop", "NAMES"]


class Problem(NamedTuple):
    """One data set and the model fitted to it."""

    name: str
    description: str
    model: Callable[..., None]
    args: tuple
    kwargs: dict
    var_name: str
    obs_dim: str

    @property
    def n_obs(self) -> int:
        """Number of observations (length of the observed array)."""
        return int(np.shape(self.kwargs[self.var_name])[0])


def _standardize(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(0)
    if np.any(sd == 0):
        raise ValueError("a predictor is constant: cannot standardize")
    return (X - X.mean(0)) / sd


# --------------------------------------------------------------------------------------------------- models


def linear_model(X, y=None):
    """Normal linear regression with unknown sigma (the numpyro_mpe demo model, y on its original scale)."""
    alpha = numpyro.sample("alpha", dist.Normal(20.0, 20.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def poisson_model(X, y=None):
    """Poisson regression, log link."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(alpha + X @ beta)), obs=y)


def negbin_model(X, y=None):
    """Negative-binomial (mean, concentration) regression, log link."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    phi = numpyro.sample("phi", dist.Gamma(2.0, 0.5))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.NegativeBinomial2(jnp.exp(alpha + X @ beta), phi), obs=y)


def logistic_model(X, y=None):
    """Bernoulli-logit regression."""
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=alpha + X @ beta), obs=y)


def softmax_model(X, y=None, *, n_classes):
    """Multinomial-logit regression; class 0 is the reference (its logit is 0)."""
    k = n_classes - 1
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 2.5).expand([k]).to_event(1))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1], k]).to_event(2))
    eta = alpha + X @ beta
    logits = jnp.concatenate([jnp.zeros(eta.shape[:-1] + (1,), eta.dtype), eta], axis=-1)
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Categorical(logits=logits), obs=y)


def random_intercept_model(X, group, y=None, *, n_groups):
    """Normal regression with a non-centred random intercept per group (X may have zero columns)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", n_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    intercept = mu + tau * z
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(intercept[group] + X @ beta, sigma), obs=y)


def random_intercept_centered_model(X, group, y=None, *, n_groups):
    """Normal regression with a centred random intercept per group (for data-rich groups)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0))
    with numpyro.plate("groups", n_groups):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(a[group] + X @ beta, sigma), obs=y)


def hierarchical_means_model(group, y=None, *, n_groups):
    """Normal observations around non-centred group means (no predictors)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", n_groups):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("obs", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + tau * z[group], sigma), obs=y)


# ------------------------------------------------------------------------------------------------- problems


def stackloss() -> Problem:
    import statsmodels.api as sm

    d = sm.datasets.stackloss.load_pandas().data
    X = _standardize(d[["AIRFLOW", "WATERTEMP", "ACIDCONC"]].to_numpy(np.float64))
    y = d["STACKLOSS"].to_numpy(np.float64)
    return Problem(
        "stackloss",
        "Brownlee's stack loss (statsmodels, 21 rows): Normal linear regression of STACKLOSS on the "
        "standardized AIRFLOW, WATERTEMP, ACIDCONC; alpha~N(20,20), beta~N(0,10), sigma~HalfNormal(10).",
        linear_model, (X,), {"y": y}, "y", "obs")


def cpunish() -> Problem:
    import statsmodels.api as sm

    d = sm.datasets.cpunish.load_pandas().data
    X = np.column_stack([np.log(d["INCOME"]), d["PERPOVERTY"], d["PERBLACK"], np.log(d["VC100k96"]),
                         d["SOUTH"], d["DEGREE"]])
    y = d["EXECUTIONS"].to_numpy(np.float64)
    return Problem(
        "cpunish",
        "US executions 1997 (statsmodels cpunish, 17 states; Texas, row 0, has 37): Poisson log-link "
        "regression on standardized log(INCOME), PERPOVERTY, PERBLACK, log(VC100k96), SOUTH, DEGREE; "
        "alpha~N(0,5), beta~N(0,2.5).",
        poisson_model, (_standardize(X),), {"y": y}, "y", "obs")


def randhie() -> Problem:
    import statsmodels.api as sm

    d = sm.datasets.randhie.load_pandas().data
    idx = np.sort(np.random.default_rng(0).choice(len(d), 120, replace=False))
    d = d.iloc[idx]
    cols = ["lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp"]
    X = _standardize(d[cols].to_numpy(np.float64))
    y = d["mdvis"].to_numpy(np.float64)
    return Problem(
        "randhie",
        "RAND health insurance experiment (statsmodels randhie), 120 rows drawn by "
        "numpy.random.default_rng(0).choice(20190, 120, replace=False), sorted: NegativeBinomial2 "
        "log-link regression of mdvis on the 9 standardized predictors; alpha~N(0,5), beta~N(0,2.5), "
        "concentration phi~Gamma(2, rate 0.5).",
        negbin_model, (X,), {"y": y}, "y", "obs")


BREAST_CANCER_FEATURES = ("worst radius", "worst concave points", "mean texture", "worst smoothness",
                          "mean symmetry")


def breast_cancer() -> Problem:
    from sklearn.datasets import load_breast_cancer

    b = load_breast_cancer()
    names = list(b.feature_names)
    cols = [names.index(c) for c in BREAST_CANCER_FEATURES]
    idx = np.sort(np.random.default_rng(0).choice(len(b.target), 100, replace=False))
    X = _standardize(b.data[idx][:, cols])
    y = b.target[idx].astype(np.float64)
    return Problem(
        "breast_cancer",
        "Wisconsin breast cancer (sklearn), 100 rows drawn by numpy.random.default_rng(0).choice(569, 100, "
        "replace=False), sorted; logistic regression of benign (1) on the standardized "
        + ", ".join(BREAST_CANCER_FEATURES)
        + " (nearly separable: the maximum-likelihood fit classifies 96% correctly); alpha~N(0,5), "
        "beta~N(0,2.5).",
        logistic_model, (X,), {"y": y}, "y", "obs")


def iris() -> Problem:
    from sklearn.datasets import load_iris

    b = load_iris()
    X = _standardize(b.data)
    y = b.target.astype(np.int32)
    return Problem(
        "iris",
        "Fisher's iris (sklearn, 150 rows): multinomial-logit regression of the species on the 4 "
        "standardized measurements, class 0 (setosa, linearly separable from the others) as reference; "
        "alpha~N(0,2.5) and beta~N(0,2.5) for the 2 other classes (10 coefficients).",
        softmax_model, (X,), {"y": y, "n_classes": 3}, "y", "obs")


def grunfeld() -> Problem:
    import statsmodels.api as sm

    d = sm.datasets.grunfeld.load_pandas().data
    firms = list(dict.fromkeys(d["firm"]))          # order of first appearance
    group = np.array([firms.index(f) for f in d["firm"]], dtype=np.int32)
    X = _standardize(np.column_stack([np.log(d["value"]), np.log(d["capital"])]))
    y = np.log(d["invest"].to_numpy(np.float64))
    return Problem(
        "grunfeld",
        "Grunfeld investment (statsmodels grunfeld, all 11 firms x 20 years = 220 rows): log(invest) on "
        "standardized log(value), log(capital) with a centred random intercept per firm (20 rows per firm "
        "pin each intercept down, sigma ~0.3 vs tau ~0.7: the centred form is the usual choice and NUTS "
        "needs ~2x fewer leapfrog steps than non-centred); mu~N(0,5), tau~HalfNormal(2), "
        "a_firm~N(mu,tau), beta~N(0,2.5), sigma~HalfNormal(2).",
        random_intercept_centered_model, (X, group), {"y": y, "n_groups": len(firms)}, "y", "obs")


def eight_groups() -> Problem:
    rng = np.random.default_rng(8)
    n_groups, per = 8, 5
    mu, tau, sigma = 1.0, 0.3, 1.0
    theta = mu + tau * rng.standard_normal(n_groups)
    group = np.repeat(np.arange(n_groups, dtype=np.int32), per)
    y = theta[group] + sigma * rng.standard_normal(n_groups * per)
    return Problem(
        "eight_groups",
        "Synthetic, numpy.random.default_rng(8): 8 groups x 5 observations, y = mu + tau*z_g + sigma*eps "
        "with mu=1, tau=0.3, sigma=1 (tau small next to sigma/sqrt(5): the posterior of log tau is far from "
        "Gaussian). Non-centred model: mu~N(0,5), tau~HalfNormal(1), z_g~N(0,1), sigma~HalfNormal(2).",
        hierarchical_means_model, (group,), {"y": y, "n_groups": n_groups}, "y", "obs")


def hier30() -> Problem:
    rng = np.random.default_rng(30)
    n_groups, per = 30, 3
    mu, tau, sigma, b = 0.5, 0.7, 1.0, 0.8
    theta = mu + tau * rng.standard_normal(n_groups)
    group = np.repeat(np.arange(n_groups, dtype=np.int32), per)
    x = rng.standard_normal(n_groups * per)
    y = theta[group] + b * x + sigma * rng.standard_normal(n_groups * per)
    X = x[:, None]
    return Problem(
        "hier30",
        "Synthetic, numpy.random.default_rng(30): 30 groups x 3 observations, y = mu + tau*z_g + b*x + "
        "sigma*eps with mu=0.5, tau=0.7, b=0.8, sigma=1, x~N(0,1). Non-centred random-intercept model: "
        "mu~N(0,5), tau~HalfNormal(2), z_g~N(0,1), beta~N(0,2.5), sigma~HalfNormal(2).",
        random_intercept_model, (X, group), {"y": y, "n_groups": n_groups}, "y", "obs")


_BUILDERS: dict[str, Callable[[], Problem]] = {
    "stackloss": stackloss,
    "cpunish": cpunish,
    "randhie": randhie,
    "breast_cancer": breast_cancer,
    "iris": iris,
    "grunfeld": grunfeld,
    "eight_groups": eight_groups,
    "hier30": hier30,
}
#: Names of the problems, in suite order.
NAMES: tuple[str, ...] = tuple(_BUILDERS)


def problems() -> list[Problem]:
    """All problems of the suite, in order."""
    return [build() for build in _BUILDERS.values()]


def problem(name: str) -> Problem:
    """The problem called ``name``."""
    try:
        return _BUILDERS[name]()
    except KeyError:
        raise KeyError(f"unknown problem {name!r}; known: {', '.join(NAMES)}") from None


def _is_per_obs(value: Any, n: int) -> bool:
    return isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == n


def drop(p: Problem, i: int) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of ``p`` without observation ``i``.

    Every NumPy array whose leading dimension is the number of observations is sliced; everything else (a
    number of groups or classes) is passed on unchanged, so all leave-one-out data sets of a problem have
    the same shapes and the same static values.
    """
    n = p.n_obs
    if not 0 <= i < n:
        raise IndexError(f"observation {i} out of range for {p.name} (n_obs={n})")
    keep = np.arange(n) != i

    def cut(v):
        return v[keep] if _is_per_obs(v, n) else v

    return tuple(cut(a) for a in p.args), {k: cut(v) for k, v in p.kwargs.items()}
