"""Choosing a hyperparameter by MPE leave-one-out: the paper's Fig. 4 as a function.

:func:`tune_prior` fits the model at each value of one hyperparameter (typically a prior scale passed as a
model argument), and reports for each the MPE estimate of the leave-one-out predictive density

    elpd_loo(v) = Σ_i log p(y_i | y₋i, v)     (MPE, closed form, no refits),

its standard error, the held-out negative log predictive density where a held-out set is given, and — at a
few values — brute-force leave-one-out by refitting without each observation, the ground truth the MPE
approximates.  The value with the largest MPE ``elpd_loo`` is the pick;
:func:`numpyro_mpe.io.plots.plot_tuning` draws the curves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import pandas as pd
from numpyro.infer import init_to_median

from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import antithetic_normal
from numpyro_mpe.inference.training import heldout_adapter, mc_nll_jit
from numpyro_mpe.options import check_options

#: Columns of the table returned by :func:`tune_prior`.
TUNING_COLUMNS = ("value", "elpd_loo", "se", "p_loo", "n_invalid", "loo_nll", "heldout_nll", "elpd_loo_exact",
                  "elpd_loo_exact_mcse", "elpd_loo_subset", "best")

_METHODS = ("laplace", "ngvi", "svi")


def _backend(method: str | Callable, model: Callable, options: dict):
    if callable(method) and not isinstance(method, str):
        return method(model)
    from numpyro_mpe import inference

    if method == "laplace":
        return inference.Laplace(model, **{"progress": False, **options})
    if method == "ngvi":
        return inference.NGVI(model, **{"progress": False, **options})
    if method == "svi":
        return inference.SVI(model, **{"progress": False, **options})
    raise ValueError(f"method must be one of {_METHODS} or a callable model -> backend, got {method!r}")


def _exact(fit: Fit, indices, var_name: str, options: dict):
    """Brute-force LOO by the fit's own method (:func:`~numpyro_mpe.loo.exact.exact_loo`; NGVI fits take
    ``num_steps``, ``lr`` and ``control``)."""
    from numpyro_mpe.inference.ngvi import NGVIRefit
    from numpyro_mpe.loo.exact import exact_loo, exact_loo_ngvi

    opts = {"progress": False, **options}
    if isinstance(fit.refit, NGVIRefit):
        return exact_loo_ngvi(fit, indices, var_name, **opts)
    return exact_loo(fit, indices, var_name, **opts)


def _heldout_nll(fit: Fit, model: Callable, heldout, kwargs_value: dict, var_name: str, num_samples: int,
                 rng_key) -> float:
    args, kwargs = heldout
    held = heldout_adapter(model, (tuple(args), {**dict(kwargs), **kwargs_value}), rng_key, init_to_median,
                           fit.adapter, var_name)
    z = antithetic_normal(rng_key, num_samples, fit.adapter.num_params, fit.posterior.mean.dtype)
    draws = fit.posterior.mean + fit.posterior.unwhiten(z.T).T
    return float(mc_nll_jit(held, var_name, draws))


def tune_prior(model: Callable, arg_name: str | None, values: Sequence[float], rng_key, *args,
               method: str | Callable = "laplace", heldout: tuple | None = None, exact_at=None,
               exact_indices=None, var_name: str | None = None, method_options: dict | None = None,
               exact_options: dict | None = None, heldout_samples: int = 1000, progress: bool = True,
               **kwargs) -> pd.DataFrame:
    """Scan a model hyperparameter and pick the value with the best MPE leave-one-out elpd.

    Parameters
    ----------
    model : callable
        The NumPyro model, called as ``model(*args, **kwargs, arg_name=value)``; or, with ``arg_name=None``, a
        factory ``model(value) -> NumPyro model``.
    arg_name : str or None
        The model argument that carries the hyperparameter (e.g. ``"prior_scale"``).
    values : sequence of float
        The values to scan.
    rng_key : jax.random.PRNGKey
        Key of every fit (the same at each value: common random numbers).
    *args, **kwargs
        The data, passed to the model unchanged (as in ``Laplace(model).run(key, *args, **kwargs)``).
    method : {"laplace", "ngvi", "svi"} or callable, default "laplace"
        The backend fitted at each value, configured with ``method_options``; a callable
        ``method(model) -> backend`` with a ``.run(rng_key, *args, **kwargs)`` method is also accepted.
    heldout : tuple (args, kwargs), optional
        The model's arguments on held-out data: ``heldout_nll`` = −(1/M) Σ_j log E_q p(y*_j | θ) (Monte Carlo,
        ``heldout_samples`` antithetic draws from q, the same at each value).
    exact_at : sequence of float, optional
        Values (among ``values``) at which to also run brute-force leave-one-out by the same method
        (:func:`numpyro_mpe.exact_loo` for Laplace, :func:`numpyro_mpe.exact_loo_ngvi`,
        :func:`numpyro_mpe.inference.exact_loo_svi`).  Costs one refit per observation.
    exact_indices : sequence of int, optional
        Observations for the brute-force LOO (default all).  With a subset, ``elpd_loo_exact`` is the sum over
        the subset and ``elpd_loo_subset`` the MPE sum over the same observations.
    var_name : str, optional
        Observed site; required when the model has several.
    method_options, exact_options : dict, optional
        Options of the backend and of the brute-force LOO.
    heldout_samples : int, default 1000
        Draws from q for ``heldout_nll``.
    progress : bool, default True
        A progress bar over the values.

    Returns
    -------
    pandas.DataFrame
        One row per value: ``value``, ``elpd_loo`` (MPE total; N times the mean over valid cavities),
        ``se`` (√N · sd), ``p_loo``, ``n_invalid`` (observations whose cavity does not exist), ``loo_nll``
        (−elpd_loo / N), ``heldout_nll``, ``elpd_loo_exact`` and ``elpd_loo_exact_mcse`` (NaN except at
        ``exact_at``), ``elpd_loo_subset`` (MPE over ``exact_indices``), ``best`` (the pick).  ``attrs``:
        ``best`` (the value with the largest MPE elpd_loo), ``best_heldout``, ``best_exact`` (among
        ``exact_at``), ``arg_name``, ``method``, ``num_obs``, ``var_name``.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> import numpyro_mpe as mpe
    >>> def model(x, y=None, prior_scale=1.0):
    ...     b = numpyro.sample("b", dist.Normal(0, prior_scale))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 30); y = 0.5 * x + jnp.sin(9 * x)
    >>> table = mpe.tune_prior(model, "prior_scale", [0.01, 0.3, 10.0], jax.random.PRNGKey(0), x, y=y,
    ...                        progress=False)
    >>> list(table["value"]), table.attrs["best"] in (0.3, 10.0)
    ([0.01, 0.3, 10.0], True)
    """
    values = [float(v) for v in np.atleast_1d(np.asarray(values, dtype=float))]
    if not values:
        raise ValueError("values must hold at least one hyperparameter value")
    exact_at = [] if exact_at is None else [float(v) for v in np.atleast_1d(np.asarray(exact_at, float))]
    for v in exact_at:
        if not np.any(np.isclose(values, v, rtol=1e-12, atol=0.0)):
            raise ValueError(f"exact_at value {v} is not among the scanned values {values}")
    if heldout is not None and not (isinstance(heldout, tuple) and len(heldout) == 2
                                    and isinstance(heldout[1], dict)):
        raise TypeError("heldout must be a tuple (args, kwargs) of the model's arguments on held-out data")
    if arg_name is not None and not isinstance(arg_name, str):
        raise TypeError(f"arg_name must be the name of a model argument (str) or None, got {arg_name!r}")
    method_options = dict(method_options or {})
    exact_options = dict(exact_options or {})
    check_options("tune_prior exact_options", exact_options,
                  {"num_samples", "max_steps", "gtol", "rng_key", "num_steps", "lr", "control", "coupled"})
    rows: list[dict[str, Any]] = []
    name = None
    n_obs = None
    from tqdm.auto import tqdm

    for v in tqdm(values, desc=f"tune {arg_name or 'hyperparameter'}", disable=not progress, leave=False):
        if arg_name is None:
            model_v, extra = model(v), {}
        else:
            model_v, extra = model, {arg_name: v}
        backend = _backend(method, model_v, method_options)
        fit = backend.run(rng_key, *args, **kwargs, **extra)
        site = fit.adapter.observed_site(var_name)
        name, n_obs = site.name, site.num_obs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = fit.site_mpe(name)
        elpd = np.asarray(res.elpd_loo, float)
        ok = np.isfinite(elpd)
        n_ok = int(ok.sum())
        total = float(n_obs * elpd[ok].mean()) if n_ok else float("nan")
        row: dict[str, Any] = {
            "value": v,
            "elpd_loo": total,
            "se": float(np.sqrt(n_obs) * elpd[ok].std(ddof=1)) if n_ok > 1 else float("nan"),
            "p_loo": float(n_obs * np.asarray(res.p_loo, float)[ok].mean()) if n_ok else float("nan"),
            "n_invalid": n_obs - n_ok,
            "loo_nll": -total / n_obs,
            "heldout_nll": float("nan"),
            "elpd_loo_exact": float("nan"),
            "elpd_loo_exact_mcse": float("nan"),
            "elpd_loo_subset": float("nan"),
        }
        if heldout is not None:
            row["heldout_nll"] = _heldout_nll(fit, model_v, heldout, extra, name, int(heldout_samples),
                                              jax.random.fold_in(rng_key, 7))
        if any(np.isclose(v, e, rtol=1e-12, atol=0.0) for e in exact_at):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                ex = _exact(fit, exact_indices, name, exact_options)
            row["elpd_loo_exact"] = float(np.sum(ex.elpd_loo.values))
            row["elpd_loo_exact_mcse"] = float(np.sqrt(np.sum(ex.elpd_loo_mcse.values**2)))
            row["elpd_loo_subset"] = float(np.sum(elpd[np.asarray(ex.obs.values)]))
        rows.append(row)
    table = pd.DataFrame(rows)
    best = int(np.nanargmax(table["elpd_loo"].to_numpy())) if table["elpd_loo"].notna().any() else None
    table["best"] = False
    if best is not None:
        table.loc[best, "best"] = True
    table = table[list(TUNING_COLUMNS)]

    def arg_best(col: str, sign: float):
        vals = sign * table[col].to_numpy(float)
        return float(table["value"].iloc[int(np.nanargmax(vals))]) if np.isfinite(vals).any() else None

    table.attrs.update(
        best=None if best is None else float(table["value"].iloc[best]),
        best_heldout=arg_best("heldout_nll", -1.0),
        best_exact=arg_best("elpd_loo_exact", 1.0),
        arg_name=arg_name,
        method=method if isinstance(method, str) else getattr(method, "__name__", "custom"),
        num_obs=n_obs, var_name=name,
        exact_indices=None if exact_indices is None else np.asarray(exact_indices).tolist(),
    )
    return table
