"""Bundled example data and the models the demo fits to them."""

from __future__ import annotations

from importlib import resources

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
import pandas as pd

#: Predictor columns of :func:`load_stackloss`, in the order ``stackloss_model`` expects them.
STACKLOSS_PREDICTORS = ("Air.Flow", "Water.Temp", "Acid.Conc.")
#: Response column of :func:`load_stackloss`.
STACKLOSS_RESPONSE = "stack.loss"


def load_stackloss() -> pd.DataFrame:
    """Brownlee's stack loss plant data (21 observations), bundled with the package.

    Columns ``Air.Flow``, ``Water.Temp``, ``Acid.Conc.`` (predictors) and ``stack.loss`` (response), as in
    R's ``datasets::stackloss``; rows in the original order.  Public domain; see ``data/README.md``.

    Returns
    -------
    pandas.DataFrame
        21 rows, 4 integer columns, a ``RangeIndex`` (row 20 is the classic influential observation 21).

    Examples
    --------
    >>> from numpyro_mpe.io.datasets import load_stackloss
    >>> df = load_stackloss()
    >>> df.shape
    (21, 4)
    >>> list(df.columns)
    ['Air.Flow', 'Water.Temp', 'Acid.Conc.', 'stack.loss']
    >>> int(df["stack.loss"].iloc[20])
    15
    """
    ref = resources.files("numpyro_mpe.io").joinpath("data", "stackloss.csv")
    with ref.open("r", encoding="utf-8") as fh:
        return pd.read_csv(fh)


def stackloss_inputs(df: pd.DataFrame | None = None) -> tuple[tuple, dict]:
    """The arguments of :func:`stackloss_model` for the stack loss table: ``((X,), {"y": y})``.

    Parameters
    ----------
    df : pandas.DataFrame, optional
        A table with the columns :data:`STACKLOSS_PREDICTORS` and :data:`STACKLOSS_RESPONSE`;
        :func:`load_stackloss` when omitted.

    Returns
    -------
    tuple
        ``(args, kwargs)``: ``X`` the predictors (float, shape ``(N, 3)``), ``y`` the response (float,
        shape ``(N,)``), for ``stackloss_model(*args, **kwargs)``.

    Examples
    --------
    >>> from numpyro_mpe.io.datasets import stackloss_inputs
    >>> (X,), kwargs = stackloss_inputs()
    >>> X.shape, kwargs["y"][:3].tolist()
    ((21, 3), [42.0, 37.0, 37.0])
    """
    df = load_stackloss() if df is None else df
    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df[STACKLOSS_RESPONSE].to_numpy(float)
    return (X,), {"y": y}


def stackloss_model(X, y=None) -> None:
    """Gaussian linear regression of stack loss on the standardized predictors (the demo's model).

    .. math::

        z_{ij} = (X_{ij} - \\bar X_j) / s_j, \\qquad
        y_i \\sim \\mathcal N(\\alpha + z_i^\\top \\beta, \\sigma),

    with weakly informative priors on the scale of the data (stack loss ranges 7–42):
    ``alpha ~ Normal(20, 20)``, ``beta_j ~ Normal(0, 10)`` (change per standard deviation of predictor
    ``j``) and ``sigma ~ HalfNormal(10)``.  The predictors are standardized inside the model with the
    column means and standard deviations of ``X``; observations live in the plate ``obs``.

    Parameters
    ----------
    X : array_like, shape (N, P)
        Predictors on their original scale (for stackloss, the columns :data:`STACKLOSS_PREDICTORS`).
    y : array_like, shape (N,), optional
        Responses; ``None`` samples from the prior predictive.

    Examples
    --------
    >>> import jax, numpyro
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_model, STACKLOSS_PREDICTORS
    >>> df = load_stackloss()
    >>> X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    >>> tr = numpyro.handlers.trace(numpyro.handlers.seed(stackloss_model, 0)).get_trace(X)
    >>> tr["y"]["value"].shape
    (21,)
    """
    X = jnp.asarray(X)
    z = (X - X.mean(axis=0)) / X.std(axis=0)
    alpha = numpyro.sample("alpha", dist.Normal(20.0, 20.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(10.0))
    with numpyro.plate("obs", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + z @ beta, sigma), obs=y)
