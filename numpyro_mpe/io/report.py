"""A self-contained HTML report of a fit: who influences the posterior, by how much, and how MPE compares with
PSIS-LOO.

:func:`write_report` writes one HTML file that opens anywhere without a network: the figures are embedded as
base64 PNG (``data:`` URIs), the tables are HTML, the style sheet is inline and uses the system's fonts; there
is no script.  Sections:

* **totals** — MPE ``elpd_loo`` ± SE and ``p_loo``, the same for PSIS-LOO, the counts of flagged observations
  and the most influential one;
* **most influential observations** — the ``top`` observations by MPE sensitivity, with leverage, Pareto k̂ and
  both pointwise ``elpd_loo``; values above the 0.7 threshold are highlighted;
* **figures** — sensitivity and leverage by observation, MPE vs PSIS pointwise ``elpd_loo``, leverage vs k̂;
  optionally leave-group-out by group and training curves;
* **LOO predictive checks** (``predictive=True``) — LOO-PIT calibration and LOO intervals
  (:mod:`numpyro_mpe.io.predictive_report`);
* **MPE vs PSIS-LOO** — totals, their difference and the correlations of :func:`numpyro_mpe.compare_psis`;
* **model** — the latent sites' posterior mean and sd under q (and under the reference posterior, when one
  is given), and the optimizer's diagnostics;
* **how to read this report** — what sensitivity, leverage, ``elpd_loo`` and ``p_loo`` mean, and the 0.7 rule;
* **all observations** — the whole per-observation table (folded).

Each section is one function of a :class:`_Report` (what the sections share) returning its lines of HTML;
the building blocks are in :mod:`numpyro_mpe.io.report_html`, the tables in :mod:`numpyro_mpe.io.tables`.
"""

from __future__ import annotations

import datetime
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from numpyro_mpe import __version__
from numpyro_mpe.io.curve_plots import plot_training
from numpyro_mpe.io.format import format_number
from numpyro_mpe.io.group_plots import plot_groups
from numpyro_mpe.io.observation_plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity
from numpyro_mpe.io.report_html import (
    CSS,
    HOW_TO_READ,
    card_html,
    figure_html,
    gaussian_check_card,
    integer_cell,
    number_cell,
    observation_columns,
    observation_name,
    png_data_uri,
    table_html,
)
from numpyro_mpe.io.style import K_THRESHOLD
from numpyro_mpe.io.tables import observation_table, posterior_summary

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Rows of the folded "all observations" table at most (the CSV export has them all).
MAX_ALL_ROWS = 2000
#: Rows of the posterior table at most (large models list their first parameters only).
MAX_PARAM_ROWS = 60
_METHOD_NAMES = {"laplace": "Laplace", "svi": "SVI", "ngvi": "NGVI"}


def _num(x: Any, spec: str = ".2f") -> str:
    return format_number(x, spec, typeset=True)


@dataclass
class _Report:
    """What the sections of one report share: the fit, its comparison with PSIS-LOO and the options."""

    fit: Fit
    site: Any  # the observed site reported on
    comparison: pd.DataFrame  # compare_psis output
    obs: pd.DataFrame  # observation_table of the comparison, with the flat index as ``_index``
    labels: Sequence | None
    title: str
    threshold: float
    idata: Any
    rng_key: Any

    @property
    def summary(self) -> dict:
        return self.comparison.attrs["summary"]

    @property
    def model_name(self) -> str:
        return getattr(self.fit.adapter.model, "__name__", "model")

    @property
    def n_obs(self) -> int:
        return int(self.site.num_obs)

    @property
    def coord_cols(self) -> list[str]:
        return list(self.site.dims)

    @property
    def label_header(self) -> str | None:
        return None if self.labels is None else str(getattr(self.labels, "name", None) or "label")

    @property
    def psis_name(self) -> str:
        return "PSIS-LOO on draws from q" if bool(self.summary["posterior_from_q"]) else "PSIS-LOO"

    def observation_columns(self, rank: bool = False) -> list:
        return observation_columns(self.coord_cols, self.label_header, self.site.name, self.threshold, rank)

    @cached_property
    def ranked(self) -> pd.DataFrame:
        """The observations, most influential first: invalid cavities (they move the fit the most), then by
        sensitivity; with their rank as ``_rank``."""
        obs = self.obs
        key = np.where(obs["valid"].to_numpy(bool),
                       np.nan_to_num(obs["sensitivity"].to_numpy(float), nan=-1.0), np.inf)
        ranked = obs.iloc[np.argsort(-key, kind="stable")].copy()
        ranked["_rank"] = np.arange(1, len(ranked) + 1)
        return ranked


def _prepare(fit: Fit, idata, var_name: str | None, title: str | None, comparison: pd.DataFrame | None,
             labels: Sequence | None, num_samples: int, rng_key, threshold: float) -> _Report:
    """The comparison with PSIS-LOO (computed unless given) and the observation table of one report."""
    from numpyro_mpe.loo.compare import compare_psis

    site = fit.adapter.observed_site(var_name)
    if comparison is None:
        comparison = compare_psis(fit, idata, var_name=site.name, num_samples=num_samples, rng_key=rng_key)
    elif comparison.attrs.get("var_name", site.name) != site.name:
        raise ValueError(f"comparison is for '{comparison.attrs.get('var_name')}', not '{site.name}'")
    obs = observation_table(fit, comparison, labels)
    obs["_index"] = obs.index
    title = title or f"MPE sensitivity report: {getattr(fit.adapter.model, '__name__', 'model')}"
    return _Report(fit, site, comparison, obs, labels, title, threshold, idata, rng_key)


# ---------------------------------------------------------------- sections
def _head(r: _Report) -> list[str]:
    return ["<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f'<meta name="generator" content="numpyro_mpe {html.escape(__version__)}">',
            f"<title>{html.escape(r.title)}</title><style>{CSS}</style></head><body><main>"]


def _header(r: _Report, meta: Mapping[str, str] | None, groups: bool, training: bool,
            predictive: bool = False) -> list[str]:
    """Title, what was fitted, ``meta`` and the links to the sections."""
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    method = html.escape(_METHOD_NAMES.get(r.fit.method, r.fit.method))
    parts = [f"<header><h1>{html.escape(r.title)}</h1>",
             f'<p class="sub">{method} fit of <code>{html.escape(r.model_name)}</code>'
             f" · observed site <code>{html.escape(r.site.name)}</code> with {r.n_obs} observations"
             f" · {int(r.fit.adapter.num_params)} parameters · numpyro_mpe {html.escape(__version__)}"
             f" · {created}</p>"]
    if meta:
        items = " · ".join(f"{html.escape(str(k))}: <code>{html.escape(str(v))}</code>"
                           for k, v in meta.items())
        parts.append(f'<p class="meta">{items}</p>')
    parts.append('<nav><a href="#influential">Influential observations</a><a href="#figures">Figures</a>'
                 + ('<a href="#predictive">Predictive checks</a>' if predictive else "")
                 + '<a href="#comparison">MPE vs PSIS</a><a href="#model">Model</a>'
                 + ('<a href="#groups">Groups</a>' if groups else "")
                 + ('<a href="#training">Training</a>' if training else "")
                 + '<a href="#how">How to read this</a><a href="#all">All observations</a></nav></header>')
    return parts


def _totals(r: _Report) -> list[str]:
    """Cards: MPE and PSIS elpd_loo, the flagged counts and the most influential observation."""
    s, t = r.summary, r.threshold
    n_lev, n_k, n_inv = s["n_high_leverage"], s["n_high_khat"], s["n_invalid"]
    n_note = "" if s["n_compared"] == r.n_obs else f" over the {s['n_compared']} with a cavity"
    first = r.ranked.iloc[0]
    big = f"{_num(first['sensitivity'])} <small>sd</small>" if bool(first["valid"]) else "no cavity"
    parts = [
        '<section id="totals" class="cards">',
        card_html("elpd_loo · MPE",
                  f"{_num(s['elpd_loo_mpe'])} <small>± {_num(s['se_elpd_loo_mpe'])}</small>",
                  f"p_loo {_num(s['p_loo_mpe'])}{n_note} · closed form, no refits"),
        card_html(f"elpd_loo · {html.escape(r.psis_name)}",
                  f"{_num(s['elpd_loo_psis'])} <small>± {_num(s['se_elpd_loo_psis'])}</small>",
                  f"p_loo {_num(s['p_loo_psis'])} · {int(s['n_draws'])} draws · "
                  f"MPE − PSIS {_num(s['elpd_diff'])} ± {_num(s['se_elpd_diff'])}"),
        card_html(f"Flagged (&gt; {t:g})", f"{n_lev} <small>leverage</small> · {n_k} <small>k̂</small>",
                  f"{n_inv} without a Gaussian cavity (leverage ≥ 1)", alert=bool(n_lev or n_k or n_inv)),
        card_html("Most influential", big, observation_name(first, r.coord_cols)
                  + (f" · leverage {_num(first['leverage'])}" if np.isfinite(first["leverage"]) else ""),
                  alert=not bool(first["valid"]) or float(first["leverage"]) > t),
        gaussian_check_card(r.fit, r.site.name), "</section>"]
    if bool(s["posterior_from_q"]):
        parts.append(
            '<p class="callout info">PSIS-LOO here ran on independent draws from q, the fit\'s own Gaussian '
            "approximation: it checks the MPE closed forms against importance sampling from the same q, not "
            "against the exact posterior. Pass a NUTS posterior (<code>idata=</code>, or the CLI's "
            "<code>--nuts</code>) for that.</p>")
    return parts


def _influential(r: _Report, top: int) -> list[str]:
    """The ``top`` most influential observations."""
    top_rows = r.ranked.head(max(0, int(top)))
    parts = ['<section id="influential"><h2>Most influential observations</h2>']
    if len(top_rows):
        parts.append(
            f"<p>The {len(top_rows)} observations whose removal would move the posterior mean the most "
            "(MPE <em>sensitivity</em>, in posterior standard deviations), with their <em>leverage</em> and "
            f"PSIS's Pareto k̂; values above {r.threshold:g} are highlighted. An observation without a "
            "Gaussian cavity (leverage ≥ 1) is listed first: the posterior hinges on it.</p>")
        parts.append(table_html(top_rows, r.observation_columns(rank=True)))
    else:
        parts.append("<p>(none requested: <code>top=0</code>)</p>")
    parts.append("</section>")
    return parts


def _plot_frame(r: _Report) -> pd.DataFrame:
    """The comparison table with the coordinate columns replaced by the labels (for the plots' labels)."""
    if r.labels is None:
        return r.comparison
    frame = r.comparison.drop(columns=[d for d in r.site.dims if d in r.comparison.columns])
    frame.insert(0, "label", [str(v) for v in np.asarray(r.labels, dtype=object).reshape(-1)])
    return frame


def _figures(r: _Report) -> list[str]:
    """Sensitivity and leverage by observation; MPE vs PSIS elpd_loo; leverage vs k̂."""
    t = r.threshold
    pframe = _plot_frame(r)
    fig = plot_sensitivity(pframe, top=3, threshold=t)[0].figure
    fig.set_size_inches(10.0, 5.2)
    parts = ['<section id="figures"><h2>Figures</h2>',
             figure_html(png_data_uri(fig), "MPE sensitivity and leverage by observation",
                         "<b>Sensitivity and leverage by observation.</b> Top: how far the posterior mean "
                         "moves, in posterior sd, if the observation is removed. Bottom: leverage, the share "
                         "of the posterior precision the observation provides in its most informed "
                         f"direction; dashed line at {t:g}, crosses mark observations without a Gaussian "
                         "cavity.")]
    ax1 = plot_elpd_comparison(pframe, threshold=t)
    ax2 = plot_leverage_vs_k(pframe, threshold=t)
    psis_name = html.escape(r.psis_name)
    parts += ['<div class="grid2">',
              figure_html(png_data_uri(ax1.figure), "Pointwise elpd_loo: MPE vs PSIS",
                          f"<b>Pointwise elpd_loo, MPE vs {psis_name}.</b> Points on the grey line agree; "
                          f"colour is PSIS's k̂, magenta edges mark k̂ &gt; {t:g} where PSIS is unreliable."),
              figure_html(png_data_uri(ax2.figure), "Leverage vs Pareto k-hat",
                          "<b>Leverage vs Pareto k̂.</b> Leverage is the closed-form twin of k̂ (equal for a "
                          "Gaussian posterior and likelihood term); expect agreement in rank more than in "
                          "value."),
              "</div></section>"]
    return parts


def _comparison(r: _Report) -> list[str]:
    """Totals of both estimates and their difference; correlations of the pointwise values."""
    s = r.summary
    tot = pd.DataFrame(
        {"quantity": ["elpd_loo", "SE", "p_loo"],
         "MPE": [s["elpd_loo_mpe"], s["se_elpd_loo_mpe"], s["p_loo_mpe"]],
         "PSIS": [s["elpd_loo_psis"], s["se_elpd_loo_psis"], s["p_loo_psis"]],
         "diff": [s["elpd_diff"], s["se_elpd_diff"], s["p_loo_mpe"] - s["p_loo_psis"]]})
    corr = pd.DataFrame(
        {"what": ["pointwise elpd_loo, MPE vs PSIS", "leverage vs Pareto k̂"],
         "pearson": [s["corr_elpd_pearson"], s["corr_k_pearson"]],
         "spearman": [s["corr_elpd_spearman"], s["corr_k_spearman"]]})
    return [
        '<section id="comparison"><h2>MPE vs PSIS-LOO</h2>',
        f"<p>PSIS posterior: {html.escape(str(s['posterior_source']))}.</p>",
        '<div class="grid2"><div>',
        table_html(tot, [("quantity", "", str), ("MPE", "MPE", number_cell(".2f")),
                         ("PSIS", html.escape(r.psis_name), number_cell(".2f")),
                         ("diff", "MPE − PSIS", number_cell(".2f"))]),
        "</div><div>",
        table_html(corr, [("what", "correlation", str), ("pearson", "Pearson", number_cell(".3f")),
                          ("spearman", "Spearman", number_cell(".3f"))]),
        "</div></div>",
        f"<p>Above {r.threshold:g}: leverage {s['n_high_leverage']}, Pareto k̂ {s['n_high_khat']}; invalid "
        f"cavities (leverage ≥ 1): {s['n_invalid']}. Totals over the {s['n_compared']} of {r.n_obs} "
        "observations where both estimates exist.</p>",
        "</section>",
    ]


def _model(r: _Report) -> list[str]:
    """The optimizer's diagnostics and the posterior mean and sd of the latent sites."""
    info = r.fit.info
    diag = []
    if "steps" in info:
        diag.append(f"{int(info['steps'])} optimizer steps")
    if "grad_norm" in info:
        diag.append(f"max |∇U| = {float(info['grad_norm']):.1e} at the mean")
    method = html.escape(_METHOD_NAMES.get(r.fit.method, r.fit.method))
    post = posterior_summary(r.fit, r.idata, rng_key=r.rng_key)
    cols = [("parameter", "parameter", str), ("mean", "mean (q)", number_cell(".3f")),
            ("sd", "sd (q)", number_cell(".3f"))]
    if "ref_mean" in post.columns:
        cols += [("ref_mean", "mean (reference)", number_cell(".3f")),
                 ("ref_sd", "sd (reference)", number_cell(".3f"))]
    parts = ['<section id="model"><h2>Model</h2>',
             f"<p>Gaussian posterior q = N(m, S⁻¹) over the {int(r.fit.adapter.num_params)} unconstrained "
             f"parameters ({method}{'; ' + ', '.join(diag) if diag else ''}). Means and sds below are in "
             "the model's constrained space, from 4000 draws of q"
             + ("; the reference columns from the posterior sample passed in" if r.idata is not None else "")
             + ".</p>",
             table_html(post.head(MAX_PARAM_ROWS).reset_index(), cols)]
    if len(post) > MAX_PARAM_ROWS:
        parts.append(f"<p>… and {len(post) - MAX_PARAM_ROWS} more parameters.</p>")
    parts.append("</section>")
    return parts


def _groups(r: _Report, groups: Any) -> list[str]:
    """Leave-group-out: the figure and the table by group."""
    t = r.threshold
    gds = groups if hasattr(groups, "data_vars") else r.fit.sensitivities(r.site.name, groups=groups)
    gax = plot_groups(gds, threshold=t, sort=True)
    gdim = next(iter(gds["leverage"].dims))
    gframe = gds[[v for v in gds.data_vars if gds[v].dims == (gdim,)]].to_dataframe().reset_index()
    gcols = [(gdim, html.escape(str(gdim)), str), ("size", "size", integer_cell),
             ("lpd", "lpd", number_cell(".2f")),
             ("elpd_loo", "elpd_loo", number_cell(".2f", invalid_text="–")),
             ("p_loo", "p_loo", number_cell(".2f", invalid_text="–")),
             ("sensitivity", "sensitivity", number_cell(".3f", invalid_text="no cavity")),
             ("leverage", "leverage", number_cell(".3f", flag_above=t))]
    return ['<section id="groups"><h2>Leaving out whole groups</h2>',
            "<p>Each group removed at once (one rank-|G| memory update): the group's joint predictive "
            "density with and without it, the shift of the posterior mean, and the group leverage.</p>",
            figure_html(png_data_uri(gax[0].figure), "Leave-group-out by group",
                        "<b>Leave-group-out.</b> Hollow: lpd with all data; filled: MPE elpd_loo with the "
                        f"group left out; the gap is p_loo. Dashed line at leverage {t:g}."),
            table_html(gframe, [c for c in gcols if c[0] in gframe.columns]),
            "</section>"]


def _needs_num_obs(history: Any) -> bool:
    cols = history.columns if isinstance(history, pd.DataFrame) else (
        history.keys() if isinstance(history, Mapping) else history[0].keys() if history else [])
    return "loo_nll" not in cols and "elpd_loo_mpe" in cols


def _training(r: _Report, history: Any) -> list[str]:
    """The training curves."""
    tax = plot_training(history, num_obs=r.n_obs if _needs_num_obs(history) else None)
    return ['<section id="training"><h2>Training</h2>',
            figure_html(png_data_uri(tax.figure), "Training curves",
                        "<b>Training curves.</b> The MPE leave-one-out NLL from the optimizer's current "
                        "Gaussian against the training and held-out NLL; stars mark each curve's minimum."),
            "</section>"]


def _all_observations(r: _Report) -> list[str]:
    """The whole per-observation table, folded (the first :data:`MAX_ALL_ROWS` rows)."""
    parts = ['<section id="all"><h2>All observations</h2>',
             f"<details><summary>Show the table of all {r.n_obs} observations</summary>",
             table_html(r.obs.head(MAX_ALL_ROWS), r.observation_columns(), css="tall")]
    if r.n_obs > MAX_ALL_ROWS:
        parts.append(f"<p>First {MAX_ALL_ROWS} of {r.n_obs} rows; comparison.csv has them all.</p>")
    parts.append("</details></section>")
    return parts


def _footer() -> list[str]:
    return ["<footer>Memory-Perturbation Equation: Nickl, Xu, Tailor, Möllenhoff and Khan, <em>The "
            "Memory-Perturbation Equation: Understanding Model's Sensitivity to Data</em>, NeurIPS 2023 "
            "(arXiv:2310.19273). PSIS-LOO: Vehtari, Gelman and Gabry (2017), via ArviZ. Written by "
            f"numpyro_mpe {html.escape(__version__)}; this file is self-contained and works offline."
            "</footer>",
            "</main></body></html>"]


# ---------------------------------------------------------------- the report
def render_report(fit: Fit, *, idata=None, var_name: str | None = None, title: str | None = None,
                  top: int = 10, comparison: pd.DataFrame | None = None, labels: Sequence | None = None,
                  groups: Any = None, history: Any = None, meta: Mapping[str, str] | None = None,
                  num_samples: int = 2000, rng_key=None, threshold: float = K_THRESHOLD,
                  predictive: Any = False) -> str:
    """The HTML text of :func:`write_report`, without writing it.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    idata, var_name, title, top, comparison, labels, groups, history, meta, num_samples, rng_key, threshold,
    predictive
        As for :func:`write_report`.

    Returns
    -------
    str
        One self-contained HTML document.

    Examples
    --------
    >>> from numpyro_mpe.io.report import render_report
    >>> text = render_report(fit, title="Stack loss", top=5)  # doctest: +SKIP
    >>> text.startswith("<!DOCTYPE html>")  # doctest: +SKIP
    True
    """
    r = _prepare(fit, idata, var_name, title, comparison, labels, num_samples, rng_key, threshold)
    sections = [_head(r), _header(r, meta, groups is not None, history is not None, bool(predictive)),
                _totals(r), _influential(r, top), _figures(r)]
    if predictive is not False:
        from numpyro_mpe.io.predictive_report import PredictiveChecks

        checks = predictive if isinstance(predictive, PredictiveChecks) else PredictiveChecks.compute(
            fit, r.site.name, rng_key=rng_key)
        sections.append(checks.section(np.asarray(r.site.flat_value)))
    sections += [_comparison(r), _model(r)]
    if groups is not None:
        sections.append(_groups(r, groups))
    if history is not None:
        sections.append(_training(r, history))
    sections += [[HOW_TO_READ.format(t=f"{threshold:g}")], _all_observations(r), _footer()]
    return "\n".join(part for section in sections for part in section)


def write_report(fit: Fit, path: str | Path, *, idata=None, var_name: str | None = None,
                 title: str | None = None, top: int = 10, comparison: pd.DataFrame | None = None,
                 labels: Sequence | None = None, groups: Any = None, history: Any = None,
                 meta: Mapping[str, str] | None = None, num_samples: int = 2000, rng_key=None,
                 threshold: float = K_THRESHOLD, predictive: Any = False) -> Path:
    """Write a self-contained HTML report of a fit's MPE sensitivities and its comparison with PSIS-LOO.

    One file, no external resources (figures are base64 PNG ``data:`` URIs, the style sheet is inline, no
    script, no web fonts): totals (MPE ``elpd_loo`` ± SE and ``p_loo``, the same for PSIS-LOO, flagged
    counts), the ``top`` most influential observations, figures (sensitivity and leverage by observation,
    MPE vs PSIS pointwise ``elpd_loo``, leverage vs k̂), the MPE vs PSIS table, the latent sites' posterior
    mean and sd, a "how to read this" section and, folded, the table of all observations.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    path : str or pathlib.Path
        File to write (parent directories are created).
    idata : arviz.InferenceData or xarray.DataTree, optional
        A reference posterior sample with a ``log_likelihood`` group (e.g. NUTS through
        ``az.from_numpyro(mcmc, log_likelihood=True)``) for PSIS-LOO and the reference posterior columns;
        without it PSIS runs on ``num_samples`` draws from q (and the report says so).
    var_name : str, optional
        Observed site; required when the model has several.
    title : str, optional
        Report title; default ``"MPE sensitivity report: <model name>"``.
    top : int, default 10
        Number of most influential observations (by MPE sensitivity) listed.
    comparison : pandas.DataFrame, optional
        A :func:`numpyro_mpe.compare_psis` result to reuse instead of computing it.
    labels : sequence or pandas.Series, optional
        One label per observation (e.g. a name column of the data, flattened in C order) shown in the
        tables and on the figures; a Series' name heads the table column.
    groups : str, array or xarray.Dataset, optional
        Adds a leave-group-out section: ``fit.sensitivities(var_name, groups=groups)``, or its result.
    history : pandas.DataFrame or dict, optional
        Adds the training curves of :func:`numpyro_mpe.io.plots.plot_training`.
    meta : mapping, optional
        ``{name: value}`` shown under the title (e.g. the command line, the data file).
    num_samples : int, default 2000
        Draws from q for PSIS-LOO when ``idata`` is omitted.
    rng_key : jax.random.PRNGKey, optional
        Key for the draws from q; ``PRNGKey(0)`` when omitted.
    threshold : float, default 0.7
        Leverage and k̂ flag.
    predictive : bool or PredictiveChecks, default False
        Adds the LOO predictive checks section (LOO-PIT calibration, LOO intervals, LOO-R²; computed, or
        the :class:`~numpyro_mpe.io.predictive_report.PredictiveChecks` given).

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import jax, numpyro
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.datasets import stackloss_inputs, stackloss_model
    >>> from numpyro_mpe.io.report import write_report
    >>> numpyro.enable_x64()
    >>> args, kwargs = stackloss_inputs()
    >>> fit = mpe.Laplace(stackloss_model, progress=False).run(jax.random.PRNGKey(0), *args, **kwargs)
    >>> write_report(fit, "report.html", title="Stack loss")  # doctest: +SKIP
    PosixPath('report.html')
    """
    text = render_report(fit, idata=idata, var_name=var_name, title=title, top=top, comparison=comparison,
                         labels=labels, groups=groups, history=history, meta=meta, num_samples=num_samples,
                         rng_key=rng_key, threshold=threshold, predictive=predictive)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["observation_table", "posterior_summary", "render_report", "write_report"]
