"""The tables the report and the command line show: the posterior summary and the per-observation table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
import pandas as pd

from numpyro_mpe.gaussian import draws as posterior_draws
from numpyro_mpe.io.format import value_formatter
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


@jit
def _constrained(adapter, theta):
    """The latent sites in constrained space at each draw θ (S, P): one compiled program."""
    return jax.vmap(lambda t: adapter.constrain(t, deterministic=False))(theta)


def posterior_summary(fit: Fit, idata=None, num_samples: int = 4000, rng_key=None) -> pd.DataFrame:
    """Mean and sd of every scalar component of the latent sites, in constrained space.

    Parameters
    ----------
    fit : Fit
        A fitted model; its Gaussian q is sampled (``num_samples`` draws) and mapped to constrained space.
    idata : arviz.InferenceData or xarray.DataTree, optional
        A reference posterior (e.g. NUTS) with a ``posterior`` group: adds its mean and sd.
    num_samples : int, default 4000
        Draws from q.
    rng_key : jax.random.PRNGKey, optional
        Key for the draws; ``PRNGKey(0)`` when omitted.

    Returns
    -------
    pandas.DataFrame
        Index ``parameter`` (``beta[1]``...), columns ``mean``, ``sd`` and, with ``idata``, ``ref_mean``,
        ``ref_sd`` (NaN for a parameter the reference lacks).

    Examples
    --------
    >>> from numpyro_mpe.io.tables import posterior_summary
    >>> posterior_summary(fit).loc["sigma"]  # doctest: +SKIP
    mean    3.38
    sd      0.57
    """
    import jax

    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    theta = posterior_draws(fit.posterior, int(num_samples), rng_key, antithetic=False)
    names = [s.name for s in fit.adapter.latent]
    draws = _constrained(fit.adapter, theta)
    rows = _draw_summary({k: np.asarray(draws[k]) for k in names})
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "sd"])
    frame.index.name = "parameter"
    post = _reference_posterior(idata)
    if post is not None:
        ref = _draw_summary({n: np.asarray(post[n]).reshape((-1,) + np.shape(post[n])[2:])
                             for n in names if n in post})
        frame["ref_mean"] = [ref.get(p, (np.nan, np.nan))[0] for p in frame.index]
        frame["ref_sd"] = [ref.get(p, (np.nan, np.nan))[1] for p in frame.index]
    return frame


def _reference_posterior(idata):
    """The ``posterior`` group of ``idata``, or ``None`` (no ``idata``, or one without that group)."""
    if idata is None:
        return None
    from numpyro_mpe.loo.arviz_compat import group

    try:
        return group(idata, "posterior")
    except (KeyError, TypeError):
        return None


def _draw_summary(draws: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and sd of every scalar component of ``draws`` (leading axis = draws), labelled ``name[i,j]``."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        flat = value.reshape(value.shape[0], -1)
        for j in range(flat.shape[1]):
            index = ",".join(map(str, np.unravel_index(j, value.shape[1:])))
            label = name if value.ndim == 1 else f"{name}[{index}]"
            out[label] = (float(flat[:, j].mean()), float(flat[:, j].std(ddof=1)))
    return out


def observation_table(fit: Fit, table: pd.DataFrame, labels: Sequence | None = None) -> pd.DataFrame:
    """The per-observation table of the report: coordinates, label, observed value and the comparison.

    Parameters
    ----------
    fit : Fit
        The fitted model (for the observed values).
    table : pandas.DataFrame
        :func:`numpyro_mpe.compare_psis` output for one observed site.
    labels : sequence, optional
        One label per observation (e.g. a name column of the data), flattened in C order.

    Returns
    -------
    pandas.DataFrame
        ``table`` with ``_label`` (when given) and ``observed`` (typeset text, as the report shows it)
        inserted after the coordinate columns.

    Examples
    --------
    >>> from numpyro_mpe.io.tables import observation_table
    >>> obs = observation_table(fit, mpe.compare_psis(fit), labels=df["state"])  # doctest: +SKIP
    >>> list(obs.columns[:3])  # doctest: +SKIP
    ['state', '_label', 'observed']
    """
    site = fit.adapter.observed_site(table.attrs.get("var_name"))
    out = table.copy()
    n_coords = len(site.dims)
    values = np.asarray(site.flat_value)
    fmt = value_formatter(values, typeset=True)
    out.insert(n_coords, "observed", [fmt(v) for v in values])
    if labels is not None:
        labels = [str(v) for v in np.asarray(labels, dtype=object).reshape(-1)]
        if len(labels) != site.num_obs:
            raise ValueError(f"labels has {len(labels)} entries, the site '{site.name}' has {site.num_obs} "
                             "observations")
        out.insert(n_coords, "_label", labels)
    out.attrs = dict(table.attrs)
    return out


__all__ = ["observation_table", "posterior_summary"]
