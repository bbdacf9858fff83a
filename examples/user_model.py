"""A model file for ``numpyro-mpe run``: US state murder rates (2009) regressed on poverty, single-parent
households and urbanization.

A model file defines two things:

* the NumPyro model (here ``model``), named on the command line as ``FILE.py:NAME``;
* ``data(df) -> (args, kwargs)``, which builds the model's arguments from the data table (a
  ``pandas.DataFrame`` read from ``--data``); the command calls ``model(*args, **kwargs)``.  Another name
  can be given with ``--data-fn NAME``.

Run it on the bundled table (51 rows: the 50 states and the District of Columbia)::

    numpyro-mpe run examples/user_model.py:model --data examples/user_data.csv --id-column state
    numpyro-mpe run examples/user_model.py:model --data examples/user_data.csv --id-column state \\
        --no-nuts --out /tmp/crime            # Laplace only, in seconds

The District of Columbia (murder rate 24.2 per 100,000, the next highest state 12.3) dominates the fit:
its sensitivity is about 7 posterior standard deviations, its leverage about 0.7 and PSIS's Pareto k̂ well
above 0.7.

Data: ``statsmodels.datasets.statecrime`` (public domain; American Statistical Abstracts and the 2009
American Community Survey), columns ``state``, ``murder`` (murders per 100,000), ``poverty`` (% below the
poverty line), ``single`` (% of family households with a single parent), ``urban`` (% in urbanized areas),
``hs_grad``, ``white`` (%), ``violent`` (violent crimes per 100,000).
"""

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

PREDICTORS = ["poverty", "single", "urban"]


def model(X, y=None):
    """Murder rate ~ Normal(alpha + z beta, sigma), z the standardized predictors, one row per state."""
    X = jnp.asarray(X)
    z = (X - X.mean(axis=0)) / X.std(axis=0)
    alpha = numpyro.sample("alpha", dist.Normal(5.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(5.0))
    with numpyro.plate("state", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + z @ beta, sigma), obs=y)


def data(df):
    """The model's arguments from the table: ``((X,), {"y": y})``."""
    X = df[PREDICTORS].to_numpy(float)
    y = df["murder"].to_numpy(float)
    return (X,), {"y": y}
