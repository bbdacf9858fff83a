"""The LOO predictive functionals of every observation of one site: the core of
:mod:`numpyro_mpe.loo.predictive`.

:func:`predictive_values` checks the site once on the host
(:func:`numpyro_mpe.engine.predictive.predictive_spec`), then runs the per-observation pass with the
functionals (``Fit.site_mpe(predictive=spec)``, cached by the spec), or — leave-group-out — each observation's
cavity under its group's memories (S₋G = S − Σ_{j∈G} Ĥ_j, in P dimensions) through the same per-row
functionals; rows given weighted samples of their predictor (the observations repaired by importance
sampling) are replaced by :func:`numpyro_mpe.engine.predictive.weighted_functionals`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.engine.cavity import cavity_one
from numpyro_mpe.engine.predictive import (
    PredictiveSpec,
    predictive_spec,
    rows_functionals,
    weighted_functionals,
)
from numpyro_mpe.engine.quadrature import Rule, default_rule
from numpyro_mpe.errors import MPEError
from numpyro_mpe.loo.common import MAX_LEVERAGE, site_parameters
from numpyro_mpe.options import check_choice
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


#: Which observations take importance-sampled functionals: leverage above
#: :data:`~numpyro_mpe.loo.common.MAX_LEVERAGE` or no cavity, no cavity only, none.
REPAIRS = ("flagged", "invalid", None)


class PredictiveValues(NamedTuple):
    """Per-observation functionals of one site (flat arrays over its N observations): ``values`` by output
    name (:attr:`PredictiveSpec.outputs`), the MPE ``leverage`` (or the group's) and ``valid``."""

    site: object
    spec: PredictiveSpec
    values: dict
    leverage: np.ndarray
    valid: np.ndarray


@partial(jit, static_argnames=("names",))
def _site_params(adapter, theta, names: tuple):
    """η, the fixed parameters and the observed values of the sites ``names`` at ``theta``, stacked."""
    tr = adapter.trace(theta)
    parts = [adapter.observed[n].predictor.params(tr[n]["fn"]) + (adapter.observed[n].flat_value,)
             for n in names]
    aux = {k: jnp.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    return jnp.concatenate([p[0] for p in parts]), aux, jnp.concatenate([p[2] for p in parts])


def _spec(fit: Fit, site, functionals, probs) -> PredictiveSpec:
    """The site's spec, probed at the mean over every site that shares its pass (their supports)."""
    members = fit.site_group(site.name) if fit.uses_predictor(site.name) else (site.name,)
    eta, aux, value = _site_params(fit.adapter, fit.posterior.mean, tuple(members))
    return predictive_spec(site.predictor, site.name, functionals, probs, eta=eta, aux=aux, value=value)


@partial(jit, static_argnames=("predictor", "spec", "active"))
def _group_rows(predictor, spec, active, nodes, log_weights, linv, g_sum, h_sum, codes, eta, jac, y, aux):
    """Functionals of each observation under its group's cavity (cavity in P dimensions per row)."""
    cav = jax.vmap(lambda c, j: cavity_one(linv @ g_sum[c], linv @ h_sum[c] @ linv.T, j @ linv.T))(codes, jac)
    rule = Rule(nodes, log_weights, "")
    mean = eta[:, np.asarray(active)] + cav["dEta"]
    vals = rows_functionals(predictor, spec, rule, mean, cav["v_cav"], eta, active, y, aux)
    return vals, cav["leverage"], cav["valid"]


def _group_values(fit: Fit, site, spec: PredictiveSpec, groups):
    from numpyro_mpe.loo.groups import resolve_groups

    codes, labels, _ = resolve_groups(site, groups)
    pred, mem, post = fit.predictor_state(site.name), fit.memories(site.name), fit.posterior
    codes_j = jnp.asarray(codes)
    g_sum = jax.ops.segment_sum(mem.grad, codes_j, len(labels))
    h_sum = jax.ops.segment_sum(mem.hess, codes_j, len(labels))
    dtype = post.mean.dtype
    rule = default_rule(len(pred.active), jax.random.PRNGKey(0), dtype, fit.options.num_samples)
    linv = post.whiten(jnp.eye(post.mean.shape[0], dtype=dtype))
    vals, lev, valid = _group_rows(site.predictor, spec, tuple(pred.active), jnp.asarray(rule.nodes),
                                   jnp.asarray(rule.log_weights), linv, g_sum, h_sum, codes_j, pred.eta,
                                   pred.jac, pred.y, pred.aux)
    valid = np.asarray(valid)
    values = {k: np.where(valid.reshape((-1,) + (1,) * (np.ndim(v) - 1)), np.asarray(v), np.nan)
              for k, v in vals.items()}
    return values, np.asarray(lev), valid


_weighted = jit(weighted_functionals, static_argnums=(0, 1), quick=False)  # pairwise sums over the draws


@site_parameters
def predictive_values(fit: Fit, var_name: str | None = None, functionals=("pit", "moments"), probs=(), *,
                      groups=None, repaired: dict | None = None,
                      repair: str | None = "flagged") -> PredictiveValues:
    """The LOO predictive ``functionals`` of every observation of one site (the core of this module).

    Parameters
    ----------
    {site_parameters}
    functionals : tuple of str
        From ``"pit"``, ``"moments"``, ``"quantiles"``, ``"crps"``
        (:data:`numpyro_mpe.engine.predictive.FUNCTIONALS`).
    probs : tuple of float
        Probabilities of ``"quantiles"``, each in (0, 1).
    groups : str or array_like, optional
        Leave-group-out: each observation's predictive with its whole group left out (see
        :func:`numpyro_mpe.loo.groups.resolve_groups`).
    repaired : dict, optional
        ``{flat index: (eta_samples (S, K_all), log_weights (S,))}``: weighted samples of those observations'
        predictors (importance sampling), whose functionals replace the quadrature values.  By default
        (leave-one-out) the observations ``repair`` names get the importance sampling of ``fit.loo()``'s
        repairs (:func:`numpyro_mpe.loo.importance.predictor_samples`).
    repair : {"flagged", "invalid", None}, default "flagged"
        Without ``repaired``: which observations get that importance sampling — leverage > 0.5 or no
        Gaussian cavity, only the latter, or none (leave-one-out only).

    Returns
    -------
    PredictiveValues
        The functionals by name over the flat observations, with leverage and validity.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, x = line_fit(kind="exact")
    >>> pv = predictive_values(fit, functionals=("moments",))
    >>> sorted(pv.values), pv.values["mean"].shape
    (['mean', 'var'], (20,))
    """
    site = fit.adapter.observed_site(var_name)
    if site.predictor is None:
        raise MPEError(f"site '{site.name}' has no predictor ({site.no_predictor_reason}): the LOO "
                       "predictive checks integrate over its distribution's parameters")
    spec = _spec(fit, site, functionals, probs)
    check_choice("repair", repair, REPAIRS)
    cacheable = groups is None and repaired is None
    if cacheable:  # functionals computed before whose set covers spec
        pv = fit.cached_covering(("predictive", site.name, repair), spec)
        if pv is not None:
            return pv._replace(spec=spec, values={k: pv.values[k].copy() for k in spec.outputs},
                               valid=pv.valid.copy())
    if groups is None:
        res = fit.site_mpe(site.name, predictive=spec)
        values = {k: np.array(res.extra[k]) for k in spec.outputs}
        leverage, valid = np.asarray(res.leverage), np.array(res.valid)
    else:
        values, leverage, valid = _group_values(fit, site, spec, groups)
    untrusted = ~valid | (np.asarray(leverage) > MAX_LEVERAGE if repair == "flagged" else False)
    if repaired is None and groups is None and repair is not None and untrusted.any():
        # the closed form is not trusted there: the importance sampling of fit.loo()'s repairs instead
        from numpyro_mpe.loo.importance import predictor_samples

        repaired = predictor_samples(fit, site.name, np.flatnonzero(untrusted))
    if repaired:
        aux = _predictor_aux(fit.adapter, fit.posterior.mean, name=site.name)
        y = site.flat_value
        for i, (eta_s, log_w) in repaired.items():
            out = _weighted(site.predictor, spec, eta_s, log_w, y[i], {k: v[i] for k, v in aux.items()})
            for k in spec.outputs:
                values[k][i] = np.asarray(out[k])
            valid[i] = True
    pv = PredictiveValues(site, spec, values, leverage, valid)
    if cacheable:  # the repairs' importance sampling runs once per fit, site and set of functionals
        fit._cache[("predictive", site.name, repair, spec)] = pv
        return pv._replace(values={k: v.copy() for k, v in values.items()}, valid=valid.copy())
    return pv


@partial(jit, static_argnames=("name",))
def _predictor_aux(adapter, theta, *, name):
    """The predictor's auxiliary values at θ (one program; eagerly, the model trace is dozens)."""
    return adapter.predictor_aux(theta, name)


def moment_values(fit: Fit, var_name, groups, pit: bool = False, repair: str | None = "flagged"
                  ) -> PredictiveValues:
    """The pass of ``("pit", "moments")``, one program for ``loo_pit``, the moments of ``loo_expectations``,
    ``loo_r2`` and ``loo_metrics``; ``("moments",)`` alone with groups or where the PIT is not defined."""
    if groups is None:
        try:
            return predictive_values(fit, var_name, ("pit", "moments"), repair=repair)
        except MPEError:
            if pit:
                raise
    return predictive_values(fit, var_name, ("moments",), groups=groups, repair=repair)


__all__ = ["PredictiveValues", "moment_values", "predictive_values"]
