"""Running the model on a subset of the rows of one observed site, and the prior part of the potential.

The streamed engine runs the model on one chunk of rows at a time: the arguments that carry one row per
observation along their first axis are sliced (:class:`RowPlan`), the others passed whole.
:func:`row_plan` checks on a few rows that this reproduces the full model's rows.

The prior part of the potential, R(θ) = U(θ) + Σ_sites Σ_i log p(y_i | θ), is the potential of the model with
its observed sites blocked (:func:`prior_potential`); with a row plan it runs on one row only.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import potential_energy

from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit


class RowPlan(NamedTuple):
    """Which of the adapter's array arguments (positions in ``adapter.data``) carry one row per observation
    of the site along their first axis (they are sliced), and whether the prior part of the potential can be
    computed on one row (``prior_ok``, so that the MAP can stream).  Static: hashable."""

    batched: tuple
    prior_ok: bool

    def rows_of(self, adapter: ModelAdapter) -> list:
        """The batched arguments of ``adapter`` (each ``(N, ...)``)."""
        return [adapter.data[k] for k in self.batched]

    def with_rows(self, adapter: ModelAdapter, rows: list) -> ModelAdapter:
        """``adapter`` with its batched arguments replaced by ``rows`` (a subset of the observations)."""
        data = list(adapter.data)
        for k, r in zip(self.batched, rows):
            data[k] = r
        return adapter.replace(data=tuple(data))


def rows_site(adapter: ModelAdapter, plan: RowPlan, var_name: str, theta, rows: list) -> dict:
    """The site's trace entry when the model runs at ``theta`` on the given rows."""
    sub = plan.with_rows(adapter, rows)
    return sub.trace_with(theta, sub.args, sub.kwargs)[var_name]


def prior_potential(adapter: ModelAdapter, theta, plan: RowPlan | None = None):
    """R(θ): the potential with every observed site blocked; on the plan's first row when ``plan`` is given
    (the prior does not depend on the rows), else on the whole data."""
    if plan is not None:
        adapter = plan.with_rows(adapter, [x[:1] for x in plan.rows_of(adapter)])
    blocked = handlers.block(adapter.model, hide=list(adapter.observed))
    return potential_energy(blocked, adapter.args, adapter.kwargs, adapter.unravel(theta))


@partial(jit, static_argnames=("plan", "var_name", "idx"))
def _row_check(adapter: ModelAdapter, theta, plan: RowPlan, var_name: str, idx: tuple):
    """The site's η and log-likelihood at rows ``idx`` from the full model, from the model on those rows,
    and η from the model on one row at a time (as the engine runs it)."""
    site = adapter.observed[var_name]
    sel = np.asarray(idx)
    full_eta = adapter.eta(theta, var_name)[sel]
    full_ll = adapter.log_lik(theta, var_name)[sel]
    rows = [x[sel] for x in plan.rows_of(adapter)]
    tr = rows_site(adapter, plan, var_name, theta, rows)
    eta = site.predictor.params(tr["fn"], (len(idx),))[0]
    ll = ModelAdapter.site_log_lik(tr, len(idx))

    def single(row):
        tr1 = rows_site(adapter, plan, var_name, theta, [x[None] for x in row])
        return site.predictor.params(tr1["fn"], (1,))[0][0]

    return full_eta, eta, full_ll, ll, jax.vmap(single)(rows)


@partial(jit, static_argnames=("plan", "var_name"))
def _prior_check(adapter: ModelAdapter, theta, plan: RowPlan, var_name: str):
    """R(θ) on one row, and U(θ) + Σ_i log p(y_i | θ) on all rows."""
    return prior_potential(adapter, theta, plan), adapter.potential(theta) + jnp.sum(adapter.log_lik(theta,
                                                                                                      var_name))


def row_plan(adapter: ModelAdapter, var_name: str) -> tuple[RowPlan | None, str | None]:
    """A :class:`RowPlan` for ``var_name`` if running the model on sliced arguments reproduces its rows
    (checked at two θ on four rows together and one at a time), else ``(None, reason)``.  Only models with one
    observed site stream."""
    site = adapter.observed[var_name]
    if len(adapter.observed) != 1:
        return None, f"the model has {len(adapter.observed)} observed sites (streaming handles one)"
    if len(site.obs_shape) != 1:
        return None, f"the site's observations have shape {site.obs_shape}; row slicing needs one plate dim"
    n = site.obs_shape[0]
    if n < 2:
        return None, "the site has a single observation"
    batched = tuple(k for k, x in enumerate(adapter.data) if np.ndim(x) >= 1 and np.shape(x)[0] == n)
    if not batched:
        return None, f"no model argument has the site's {n} observations along its first axis"
    plan = RowPlan(batched, False)
    idx = tuple(int(i) for i in np.unique(np.array([0, 1, n // 2, n - 1])))
    theta0 = adapter.init_theta
    step = np.random.default_rng(3).standard_normal(theta0.shape).astype(theta0.dtype)  # host: no program
    thetas = [theta0, theta0 + 0.1 * jnp.asarray(step)]
    tol = 1e-8 if theta0.dtype == jnp.float64 else 1e-4
    try:
        for th in thetas:
            fe, e, fl, ll, e1 = _row_check(adapter, th, plan, var_name, idx)
            same = [a.shape == b.shape and bool(jnp.allclose(a, b, rtol=tol, atol=tol))
                    for a, b in ((fe, e), (fe, e1), (fl, ll))]
            if not all(same):
                return None, ("running the model on a subset of rows (its arguments with "
                              f"{n} rows sliced) does not reproduce those rows' predictor and log-likelihood")
    except Exception as err:  # noqa: BLE001 - any failure means the model cannot run on row subsets
        return None, f"running the model on a subset of rows failed ({type(err).__name__}: {err})"
    try:  # R(θ) = U(θ) + Σ_i log p(y_i|θ), from the model with the site blocked, run on one row
        ok = True
        for th in thetas:
            prior, ref = _prior_check(adapter, th, plan, var_name)
            ok = ok and bool(jnp.abs(prior - ref) <= tol * (1.0 + jnp.abs(ref)))
    except Exception:  # noqa: BLE001
        ok = False
    return plan._replace(prior_ok=ok), None
