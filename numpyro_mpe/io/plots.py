"""Matplotlib figures of the MPE outputs and their comparison with PSIS-LOO, in one namespace.

Every function draws on ``ax`` (created when ``None``) and returns the axes, as ArviZ's ``plot_*``
functions do.  Inputs are the outputs of the package: :meth:`numpyro_mpe.Fit.sensitivities` (an
``xarray.Dataset``, per observation or, with ``groups=``, per group),
:func:`numpyro_mpe.loo.compare.compare_psis` (a ``pandas.DataFrame``), training histories of the VI
backends (a table by step), :func:`numpyro_mpe.tune_prior` (a table by value) and the LOO predictive checks
(:mod:`numpyro_mpe.loo.predictive`).

* :mod:`~numpyro_mpe.io.observation_plots`: ``plot_sensitivity`` (sensitivity and leverage by
  observation), ``plot_elpd_comparison`` (pointwise ``elpd_loo``, MPE vs PSIS, coloured by k̂),
  ``plot_leverage_vs_k`` (leverage vs Pareto k̂);
* :mod:`~numpyro_mpe.io.group_plots`: ``plot_groups`` (leave-group-out by group);
* :mod:`~numpyro_mpe.io.curve_plots`: ``plot_training`` and ``plot_tuning`` (the MPE leave-one-out NLL
  against the held-out NLL by training step, and by hyperparameter value);
* :mod:`~numpyro_mpe.io.predictive_plots`: ``plot_loo_pit`` (the LOO-PIT ECDF difference with a simultaneous
  band, :func:`numpyro_mpe.loo.predictive.loo_pit`) and ``plot_loo_intervals`` (LOO predictive intervals
  against y).

The palette, the 0.7 flag threshold (:data:`K_THRESHOLD`) and the axes styling are in
:mod:`numpyro_mpe.io.style`.
"""

from __future__ import annotations

from numpyro_mpe.io.curve_plots import plot_training, plot_tuning
from numpyro_mpe.io.group_plots import GROUP_VARIABLES, plot_groups
from numpyro_mpe.io.observation_plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity
from numpyro_mpe.io.predictive_plots import plot_loo_intervals, plot_loo_pit
from numpyro_mpe.io.style import K_THRESHOLD

__all__ = ["GROUP_VARIABLES", "K_THRESHOLD", "plot_elpd_comparison", "plot_groups", "plot_leverage_vs_k",
           "plot_loo_intervals", "plot_loo_pit", "plot_sensitivity", "plot_training", "plot_tuning"]
