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
* **MPE vs PSIS-LOO** — totals, their difference and the correlations of :func:`numpyro_mpe.compare_psis`;
* **model** — the latent sites' posterior mean and sd under q (and under the reference posterior, when one
  is given), and the optimizer's diagnostics;
* **how to read this report** — what sensitivity, leverage, ``elpd_loo`` and ``p_loo`` mean, and the 0.7 rule;
* **all observations** — the whole per-observation table (folded).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from numpyro_mpe import __version__
from numpyro_mpe.io.plots import K_THRESHOLD

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Rows of the folded "all observations" table at most (the CSV export has them all).
MAX_ALL_ROWS = 2000
#: Rows of the posterior table at most (large models list their first parameters only).
MAX_PARAM_ROWS = 60
_METHOD_NAMES = {"laplace": "Laplace", "svi": "SVI", "ngvi": "NGVI"}


# ---------------------------------------------------------------- numbers and tables
def _fmt(x: Any, spec: str = ".3f") -> str:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return html.escape(str(x))
    return "–" if not np.isfinite(value) else format(value, spec).replace("-", "−")


def value_formatter(values) -> Any:
    """A formatter of the observed values of one site: integers as integers, else the fewest decimals (up
    to 4) that show every value exactly, else 4 significant digits; vector values as ``[a, b, …]``."""
    arr = np.asarray(values)
    if arr.dtype.kind in "iub":
        spec = "d"
    else:
        flat = arr.astype(float).ravel()
        flat = flat[np.isfinite(flat)]
        spec = ".4g"
        for d in range(5):
            if np.allclose(np.round(flat, d), flat, rtol=0, atol=1e-9 * max(1.0, float(np.abs(flat).max(
                    initial=0.0)))):
                spec = f".{d}f"
                break

    def one(v) -> str:
        a = np.asarray(v)
        if a.ndim == 0:
            x = a.item()
            if isinstance(x, (bool, np.bool_)):
                return str(x)
            return _fmt(int(x) if spec == "d" else x, spec if spec != "d" else ".0f")
        flat_v = a.ravel()
        body = ", ".join(one(e) for e in flat_v[:4])
        return f"[{body}{', …' if flat_v.size > 4 else ''}]"

    return one


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
    >>> from numpyro_mpe.io.report import posterior_summary
    >>> posterior_summary(fit).loc["sigma"]  # doctest: +SKIP
    mean    3.38
    sd      0.57
    """
    import jax

    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    theta = fit.posterior.sample(rng_key, int(num_samples))
    names = [s.name for s in fit.adapter.latent]
    draws = jax.vmap(lambda t: fit.adapter.constrain(t, deterministic=False))(theta)
    rows = _draw_summary({k: np.asarray(draws[k]) for k in names})
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "sd"])
    frame.index.name = "parameter"
    if idata is not None:
        from numpyro_mpe.loo.arviz_compat import group as _group

        try:
            post = _group(idata, "posterior")
        except (KeyError, TypeError):
            post = None
        if post is not None:
            ref = _draw_summary({n: np.asarray(post[n]).reshape((-1,) + np.shape(post[n])[2:])
                                 for n in names if n in post})
            frame["ref_mean"] = [ref.get(p, (np.nan, np.nan))[0] for p in frame.index]
            frame["ref_sd"] = [ref.get(p, (np.nan, np.nan))[1] for p in frame.index]
    return frame


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
        ``table`` with ``_label`` (when given) and ``observed`` inserted after the coordinate columns.
    """
    site = fit.adapter.observed_site(table.attrs.get("var_name"))
    out = table.copy()
    n_coords = len(site.dims)
    values = np.asarray(site.flat_value)
    fmt = value_formatter(values)
    out.insert(n_coords, "observed", [fmt(v) for v in values])
    if labels is not None:
        labels = [str(v) for v in np.asarray(labels, dtype=object).reshape(-1)]
        if len(labels) != site.num_obs:
            raise ValueError(f"labels has {len(labels)} entries, the site '{site.name}' has {site.num_obs} "
                             "observations")
        out.insert(n_coords, "_label", labels)
    out.attrs = dict(table.attrs)
    return out


# ---------------------------------------------------------------- figures
def _png(fig, dpi: int = 110) -> str:
    """The figure as a ``data:image/png;base64`` URI; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(uri: str, alt: str, caption: str, css: str = "") -> str:
    return (f'<figure class="{css}"><img src="{uri}" alt="{html.escape(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _plot_frame(table: pd.DataFrame, labels: Sequence | None, site) -> pd.DataFrame:
    """The comparison table with the coordinate columns replaced by ``labels`` (for the plots' labels)."""
    if labels is None:
        return table
    frame = table.drop(columns=[d for d in site.dims if d in table.columns])
    frame.insert(0, "label", [str(v) for v in np.asarray(labels, dtype=object).reshape(-1)])
    return frame


# ---------------------------------------------------------------- HTML pieces
_CSS = """
:root { --ink: #1f2328; --muted: #57606a; --line: #d8dee4; --bg: #ffffff; --panel: #f6f8fa;
        --blue: #107591; --flag: #cf166e; --ok: #2a7f3a; }
* { box-sizing: border-box; }
html { background: var(--bg); }
body { margin: 0; color: var(--ink); font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto,
       "Helvetica Neue", Arial, "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; }
header { border-bottom: 3px solid var(--blue); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; font-weight: 650; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 8px; }
p { margin: 6px 0 10px; }
.sub { color: var(--muted); font-size: 14px; margin: 0; }
.meta { color: var(--muted); font-size: 13px; margin-top: 6px; }
.meta code { font-size: 12.5px; }
nav { font-size: 13.5px; margin: 10px 0 4px; color: var(--muted); }
nav a { color: var(--blue); text-decoration: none; margin-right: 14px; }
nav a:hover { text-decoration: underline; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
       font-size: 13.5px; background: var(--panel); padding: 1px 4px; border-radius: 4px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 12px;
         margin: 18px 0 6px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; background: var(--panel); }
.card .label { font-size: 12.5px; color: var(--muted); }
.card .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; margin: 2px 0; }
.card .value small { font-size: 15px; font-weight: 500; color: var(--muted); }
.card .note { font-size: 13px; color: var(--muted); }
.card.alert { border-color: var(--flag); background: #fdf1f6; }
.card.alert .value { color: var(--flag); }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums;
        margin: 6px 0 10px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: var(--panel); font-weight: 600; border-bottom: 2px solid var(--line); position: sticky;
     top: 0; }
td.text, th.text { text-align: left; }
tbody tr:hover { background: #f0f6f8; }
td.flag { color: var(--flag); font-weight: 650; }
td.invalid { color: var(--flag); font-style: italic; }
.tablewrap { overflow-x: auto; max-width: 100%; }
.tablewrap.tall { max-height: 560px; overflow-y: auto; border: 1px solid var(--line); border-radius: 6px; }
.tablewrap.tall table { margin: 0; }
figure { margin: 14px 0; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line);
             border-radius: 6px; background: #fff; }
figcaption { font-size: 13.5px; color: var(--muted); margin-top: 6px; max-width: 920px; }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; align-items: start; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
.howto dt { font-weight: 650; margin-top: 10px; }
.howto dd { margin: 2px 0 6px 18px; }
details { margin: 12px 0; }
summary { cursor: pointer; color: var(--blue); font-weight: 600; }
.callout { border-left: 4px solid var(--flag); background: #fdf1f6; padding: 8px 12px; margin: 10px 0;
           border-radius: 0 6px 6px 0; font-size: 14px; }
.callout.info { border-left-color: var(--blue); background: #eef6f8; }
footer { margin-top: 40px; padding-top: 10px; border-top: 1px solid var(--line); color: var(--muted);
         font-size: 12.5px; }
"""


def _table_html(frame: pd.DataFrame, columns: Sequence[tuple[str, str, Any]], css: str = "") -> str:
    """An HTML table; ``columns`` are ``(column, header, formatter)``, formatter ``str`` for text columns or
    a callable ``(value, row) -> (text, css class)``."""
    head = "".join(
        f'<th class="{"text" if fmt is str else ""}">{header}</th>' for _, header, fmt in columns
    )
    body = []
    for _, row in frame.iterrows():
        cells = []
        for col, _, fmt in columns:
            value = row[col] if col in row.index else row.name
            if fmt is str:
                cells.append(f'<td class="text">{html.escape(str(value))}</td>')
            else:
                text, cls = fmt(value, row)
                cells.append(f'<td class="{cls}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="tablewrap {css}"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")


def _num(spec: str, flag_above: float | None = None, invalid_text: str | None = None):
    def fmt(value, row):
        cls = ""
        if invalid_text is not None and not bool(row.get("valid", True)):
            return invalid_text, "invalid"
        try:
            v = float(value)
        except (TypeError, ValueError):
            return html.escape(str(value)), ""
        if flag_above is not None and np.isfinite(v) and v > flag_above:
            cls = "flag"
        return _fmt(v, spec), cls
    return fmt


def _card(label: str, value: str, note: str = "", alert: bool = False) -> str:
    return (f'<div class="card{" alert" if alert else ""}"><div class="label">{label}</div>'
            f'<div class="value">{value}</div><div class="note">{note}</div></div>')


def _obs_name(row: pd.Series, coord_cols: Sequence[str]) -> str:
    """``observation 20`` / ``observation 3 (g=1, m=2)`` / with the label."""
    text = f"observation {int(row.name)}"
    if len(coord_cols) > 1:
        text += " (" + ", ".join(f"{c}={row[c]}" for c in coord_cols) + ")"
    if "_label" in row.index:
        text += f" · {row['_label']}"
    return html.escape(text)


def _observation_columns(coord_cols: Sequence[str], label_header: str | None, observed_name: str,
                         threshold: float, rank: bool = False) -> list[tuple[str, str, Any]]:
    cols: list[tuple[str, str, Any]] = []
    if rank:
        cols.append(("_rank", "#", lambda v, r: (str(int(v)), "")))
    cols.append(("_index", "observation", lambda v, r: (str(int(v)), "")))
    if len(coord_cols) > 1:
        cols += [(c, html.escape(c), str) for c in coord_cols]
    if label_header is not None:
        cols.append(("_label", html.escape(label_header), str))
    cols += [
        ("observed", html.escape(observed_name), lambda v, r: (v, "")),
        ("sensitivity", "sensitivity", _num(".3f", invalid_text="no cavity")),
        ("leverage", "leverage", _num(".3f", flag_above=threshold)),
        ("pareto_k", "PSIS k̂", _num(".2f", flag_above=threshold)),
        ("elpd_loo_mpe", "elpd_loo MPE", _num(".2f", invalid_text="–")),
        ("elpd_loo_psis", "elpd_loo PSIS", _num(".2f")),
        ("p_loo_mpe", "p_loo MPE", _num(".3f", invalid_text="–")),
    ]
    return cols


# ---------------------------------------------------------------- the report
def render_report(fit: Fit, *, idata=None, var_name: str | None = None, title: str | None = None,
                  top: int = 10, comparison: pd.DataFrame | None = None, labels: Sequence | None = None,
                  groups: Any = None, history: Any = None, meta: Mapping[str, str] | None = None,
                  num_samples: int = 2000, rng_key=None, threshold: float = K_THRESHOLD) -> str:
    """The HTML text of :func:`write_report` (same parameters, without ``path``)."""
    from numpyro_mpe.io.plots import (
        plot_elpd_comparison,
        plot_groups,
        plot_leverage_vs_k,
        plot_sensitivity,
        plot_training,
    )
    from numpyro_mpe.loo.compare import compare_psis

    site = fit.adapter.observed_site(var_name)
    if comparison is None:
        comparison = compare_psis(fit, idata, var_name=site.name, num_samples=num_samples, rng_key=rng_key)
    elif comparison.attrs.get("var_name", site.name) != site.name:
        raise ValueError(f"comparison is for '{comparison.attrs.get('var_name')}', not '{site.name}'")
    summary = comparison.attrs["summary"]
    obs = observation_table(fit, comparison, labels)
    obs["_index"] = obs.index
    coord_cols = list(site.dims)
    label_header = None if labels is None else str(getattr(labels, "name", None) or "label")
    model_name = getattr(fit.adapter.model, "__name__", "model")
    title = title or f"MPE sensitivity report: {model_name}"
    n_obs, n_params = int(site.num_obs), int(fit.adapter.num_params)

    # the most influential: invalid cavities first (they move the fit the most), then by sensitivity
    key = np.where(obs["valid"].to_numpy(bool), np.nan_to_num(obs["sensitivity"].to_numpy(float), nan=-1.0),
                   np.inf)
    order = np.argsort(-key, kind="stable")
    ranked = obs.iloc[order].copy()
    ranked["_rank"] = np.arange(1, len(ranked) + 1)
    top_rows = ranked.head(max(0, int(top)))
    first = ranked.iloc[0]

    from_q = bool(summary["posterior_from_q"])
    psis_name = "PSIS-LOO on draws from q" if from_q else "PSIS-LOO"
    n_lev, n_k, n_inv = summary["n_high_leverage"], summary["n_high_khat"], summary["n_invalid"]

    parts: list[str] = []
    add = parts.append
    add("<!DOCTYPE html>")
    add('<html lang="en"><head><meta charset="utf-8">')
    add('<meta name="viewport" content="width=device-width, initial-scale=1">')
    add(f'<meta name="generator" content="numpyro_mpe {html.escape(__version__)}">')
    add(f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>")

    # header
    created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    add(f"<header><h1>{html.escape(title)}</h1>")
    method = html.escape(_METHOD_NAMES.get(fit.method, fit.method))
    add(f'<p class="sub">{method} fit of <code>{html.escape(model_name)}</code>'
        f" · observed site <code>{html.escape(site.name)}</code> with {n_obs} observations"
        f" · {n_params} parameters · numpyro_mpe {html.escape(__version__)} · {created}</p>")
    if meta:
        items = " · ".join(f"{html.escape(str(k))}: <code>{html.escape(str(v))}</code>"
                           for k, v in meta.items())
        add(f'<p class="meta">{items}</p>')
    add('<nav><a href="#influential">Influential observations</a><a href="#figures">Figures</a>'
        '<a href="#comparison">MPE vs PSIS</a><a href="#model">Model</a>'
        + ('<a href="#groups">Groups</a>' if groups is not None else "")
        + ('<a href="#training">Training</a>' if history is not None else "")
        + '<a href="#how">How to read this</a><a href="#all">All observations</a></nav></header>')

    # totals
    n_note = "" if summary["n_compared"] == n_obs else f" over the {summary['n_compared']} with a cavity"
    add('<section id="totals" class="cards">')
    add(_card("elpd_loo · MPE", f"{_fmt(summary['elpd_loo_mpe'], '.2f')} <small>± "
              f"{_fmt(summary['se_elpd_loo_mpe'], '.2f')}</small>",
              f"p_loo {_fmt(summary['p_loo_mpe'], '.2f')}{n_note} · closed form, no refits"))
    add(_card(f"elpd_loo · {html.escape(psis_name)}", f"{_fmt(summary['elpd_loo_psis'], '.2f')} <small>± "
              f"{_fmt(summary['se_elpd_loo_psis'], '.2f')}</small>",
              f"p_loo {_fmt(summary['p_loo_psis'], '.2f')} · {int(summary['n_draws'])} draws · "
              f"MPE − PSIS {_fmt(summary['elpd_diff'], '.2f')} ± {_fmt(summary['se_elpd_diff'], '.2f')}"))
    add(_card(f"Flagged (&gt; {threshold:g})", f"{n_lev} <small>leverage</small> · {n_k} <small>k̂</small>",
              f"{n_inv} without a Gaussian cavity (leverage ≥ 1)", alert=bool(n_lev or n_k or n_inv)))
    if bool(first["valid"]):
        big = f"{_fmt(first['sensitivity'], '.2f')} <small>sd</small>"
    else:
        big = "no cavity"
    add(_card("Most influential", big, _obs_name(first, coord_cols)
              + (f" · leverage {_fmt(first['leverage'], '.2f')}" if np.isfinite(first["leverage"]) else ""),
              alert=not bool(first["valid"]) or float(first["leverage"]) > threshold))
    add("</section>")
    if from_q:
        add('<p class="callout info">PSIS-LOO here ran on independent draws from q, the fit\'s own Gaussian '
            "approximation: it checks the MPE closed forms against importance sampling from the same q, not "
            "against the exact posterior. Pass a NUTS posterior (<code>idata=</code>, or the CLI's "
            "<code>--nuts</code>) for that.</p>")

    # influential table
    add('<section id="influential"><h2>Most influential observations</h2>')
    if len(top_rows):
        add(f"<p>The {len(top_rows)} observations whose removal would move the posterior mean the most "
            "(MPE <em>sensitivity</em>, in posterior standard deviations), with their <em>leverage</em> and "
            f"PSIS's Pareto k̂; values above {threshold:g} are highlighted. An observation without a Gaussian "
            "cavity (leverage ≥ 1) is listed first: the posterior hinges on it.</p>")
        add(_table_html(top_rows, _observation_columns(coord_cols, label_header, site.name, threshold, True)))
    else:
        add("<p>(none requested: <code>top=0</code>)</p>")
    add("</section>")

    # figures
    pframe = _plot_frame(comparison, labels, site)
    add('<section id="figures"><h2>Figures</h2>')
    axes = plot_sensitivity(pframe, top=3, threshold=threshold)
    fig = axes[0].figure
    fig.set_size_inches(10.0, 5.2)
    add(_figure(_png(fig), "MPE sensitivity and leverage by observation",
                "<b>Sensitivity and leverage by observation.</b> Top: how far the posterior mean moves, in "
                "posterior sd, if the observation is removed. Bottom: leverage, the share of the posterior "
                "precision the observation provides in its most informed direction; dashed line at "
                f"{threshold:g}, crosses mark observations without a Gaussian cavity."))
    ax1 = plot_elpd_comparison(pframe, threshold=threshold)
    ax2 = plot_leverage_vs_k(pframe, threshold=threshold)
    add('<div class="grid2">')
    add(_figure(_png(ax1.figure), "Pointwise elpd_loo: MPE vs PSIS",
                f"<b>Pointwise elpd_loo, MPE vs {html.escape(psis_name)}.</b> Points on the grey line agree; "
                f"colour is PSIS's k̂, magenta edges mark k̂ &gt; {threshold:g} where PSIS is unreliable."))
    add(_figure(_png(ax2.figure), "Leverage vs Pareto k-hat",
                "<b>Leverage vs Pareto k̂.</b> Leverage is the closed-form twin of k̂ (equal for a Gaussian "
                "posterior and likelihood term); expect agreement in rank more than in value."))
    add("</div></section>")

    # comparison
    s = summary
    add('<section id="comparison"><h2>MPE vs PSIS-LOO</h2>')
    add(f"<p>PSIS posterior: {html.escape(str(s['posterior_source']))}.</p>")
    tot = pd.DataFrame(
        {"quantity": ["elpd_loo", "SE", "p_loo"],
         "MPE": [s["elpd_loo_mpe"], s["se_elpd_loo_mpe"], s["p_loo_mpe"]],
         "PSIS": [s["elpd_loo_psis"], s["se_elpd_loo_psis"], s["p_loo_psis"]],
         "diff": [s["elpd_diff"], s["se_elpd_diff"], s["p_loo_mpe"] - s["p_loo_psis"]]})
    add('<div class="grid2"><div>')
    add(_table_html(tot, [("quantity", "", str), ("MPE", "MPE", _num(".2f")),
                          ("PSIS", html.escape(psis_name), _num(".2f")),
                          ("diff", "MPE − PSIS", _num(".2f"))]))
    corr = pd.DataFrame(
        {"what": ["pointwise elpd_loo, MPE vs PSIS", "leverage vs Pareto k̂"],
         "pearson": [s["corr_elpd_pearson"], s["corr_k_pearson"]],
         "spearman": [s["corr_elpd_spearman"], s["corr_k_spearman"]]})
    add("</div><div>")
    add(_table_html(corr, [("what", "correlation", str), ("pearson", "Pearson", _num(".3f")),
                           ("spearman", "Spearman", _num(".3f"))]))
    add("</div></div>")
    add(f"<p>Above {threshold:g}: leverage {n_lev}, Pareto k̂ {n_k}; invalid cavities (leverage ≥ 1): "
        f"{n_inv}. Totals over the {s['n_compared']} of {n_obs} observations where both estimates exist.</p>")
    add("</section>")

    # model
    add('<section id="model"><h2>Model</h2>')
    info = fit.info
    diag = []
    if "steps" in info:
        diag.append(f"{int(info['steps'])} optimizer steps")
    if "grad_norm" in info:
        diag.append(f"max |∇U| = {float(info['grad_norm']):.1e} at the mean")
    add(f"<p>Gaussian posterior q = N(m, S⁻¹) over the {n_params} unconstrained parameters "
        f"({method}{'; ' + ', '.join(diag) if diag else ''}). Means and sds below are in "
        "the model's constrained space, from 4000 draws of q"
        + ("; the reference columns from the posterior sample passed in" if idata is not None else "")
        + ".</p>")
    post = posterior_summary(fit, idata, rng_key=rng_key)
    shown = post.head(MAX_PARAM_ROWS).reset_index()
    cols = [("parameter", "parameter", str), ("mean", "mean (q)", _num(".3f")), ("sd", "sd (q)", _num(".3f"))]
    if "ref_mean" in post.columns:
        cols += [("ref_mean", "mean (reference)", _num(".3f")), ("ref_sd", "sd (reference)", _num(".3f"))]
    add(_table_html(shown, cols))
    if len(post) > MAX_PARAM_ROWS:
        add(f"<p>… and {len(post) - MAX_PARAM_ROWS} more parameters.</p>")
    add("</section>")

    # groups
    if groups is not None:
        gds = groups if hasattr(groups, "data_vars") else fit.sensitivities(site.name, groups=groups)
        add('<section id="groups"><h2>Leaving out whole groups</h2>')
        add("<p>Each group removed at once (one rank-|G| memory update): the group's joint predictive "
            "density with and without it, the shift of the posterior mean, and the group leverage.</p>")
        gax = plot_groups(gds, threshold=threshold, sort=True)
        add(_figure(_png(gax[0].figure), "Leave-group-out by group",
                    "<b>Leave-group-out.</b> Hollow: lpd with all data; filled: MPE elpd_loo with the group "
                    f"left out; the gap is p_loo. Dashed line at leverage {threshold:g}."))
        gdim = next(iter(gds["leverage"].dims))
        gframe = gds[[v for v in gds.data_vars if gds[v].dims == (gdim,)]].to_dataframe().reset_index()
        gcols = [(gdim, html.escape(str(gdim)), str)]
        if "size" in gframe.columns:
            gcols.append(("size", "size", lambda v, r: (str(int(v)), "")))
        gcols += [("lpd", "lpd", _num(".2f")), ("elpd_loo", "elpd_loo", _num(".2f", invalid_text="–")),
                  ("p_loo", "p_loo", _num(".2f", invalid_text="–")),
                  ("sensitivity", "sensitivity", _num(".3f", invalid_text="no cavity")),
                  ("leverage", "leverage", _num(".3f", flag_above=threshold))]
        gcols = [c for c in gcols if c[0] in gframe.columns]
        add(_table_html(gframe, gcols))
        add("</section>")

    # training
    if history is not None:
        add('<section id="training"><h2>Training</h2>')
        tax = plot_training(history, num_obs=n_obs if _needs_num_obs(history) else None)
        add(_figure(_png(tax.figure), "Training curves",
                    "<b>Training curves.</b> The MPE leave-one-out NLL from the optimizer's current Gaussian "
                    "against the training and held-out NLL; stars mark each curve's minimum."))
        add("</section>")

    add(_HOWTO.format(t=f"{threshold:g}"))

    # all observations
    add('<section id="all"><h2>All observations</h2>')
    shown = obs.head(MAX_ALL_ROWS)
    add(f"<details><summary>Show the table of all {n_obs} observations</summary>")
    add(_table_html(shown, _observation_columns(coord_cols, label_header, site.name, threshold), css="tall"))
    if n_obs > MAX_ALL_ROWS:
        add(f"<p>First {MAX_ALL_ROWS} of {n_obs} rows; comparison.csv has them all.</p>")
    add("</details></section>")

    add("<footer>Memory-Perturbation Equation: Nickl, Xu, Tailor, Möllenhoff and Khan, <em>The "
        "Memory-Perturbation Equation: Understanding Model's Sensitivity to Data</em>, NeurIPS 2023 "
        "(arXiv:2310.19273). PSIS-LOO: Vehtari, Gelman and Gabry (2017), via ArviZ. Written by numpyro_mpe "
        f"{html.escape(__version__)}; this file is self-contained and works offline.</footer>")
    add("</main></body></html>")
    return "\n".join(parts)


def _needs_num_obs(history: Any) -> bool:
    cols = history.columns if isinstance(history, pd.DataFrame) else (
        history.keys() if isinstance(history, Mapping) else history[0].keys() if history else [])
    return "loo_nll" not in cols and "elpd_loo_mpe" in cols


_HOWTO = """
<section id="how" class="howto"><h2>How to read this report</h2>
<p>Everything here comes from one fit: the Memory-Perturbation Equation (MPE) removes an observation's
contribution ("memory") from the Gaussian posterior q = N(m, S⁻¹) in closed form, so every leave-one-out
posterior is available without refitting.</p>
<dl>
<dt>sensitivity</dt>
<dd>√(Δmᵀ S Δm): how far the posterior mean would move if the observation were removed, in posterior
standard deviations (a Mahalanobis distance). Around 1 or more: that single observation moves the fit by as
much as the fit's own uncertainty.</dd>
<dt>leverage</dt>
<dd>The largest eigenvalue of S<sup>−½</sup> Ĥ<sub>i</sub> S<sup>−½</sup>: the share of the posterior
precision that the observation supplies in the direction it informs most. 0 means it adds nothing; near 1
it alone pins that direction down; at 1 or above, removing it leaves no Gaussian posterior ("no cavity"),
and the observation is reported as invalid rather than given a number.</dd>
<dt>elpd_loo and p_loo</dt>
<dd>elpd_loo<sub>i</sub> = log p(y<sub>i</sub> | y<sub>−i</sub>), the log predictive density of the
observation under the posterior fitted without it; higher is better. Its sum (± its standard error)
estimates out-of-sample predictive accuracy and compares models like <code>arviz.loo</code> and
<code>az.compare</code>. p_loo<sub>i</sub> = lpd<sub>i</sub> − elpd_loo<sub>i</sub> is how much better
the fit predicts the observation for having seen it; its sum is the effective number of parameters.</dd>
<dt>MPE vs PSIS-LOO</dt>
<dd>PSIS-LOO estimates the same elpd_loo by Pareto-smoothed importance sampling of posterior draws. Points on
the line y = x agree. Where PSIS's k̂ exceeds {t}, its estimate is unreliable; the MPE's is still a closed
form, exact for a Gaussian posterior and likelihood, approximate otherwise.</dd>
<dt>Leverage and k̂: the {t} rule</dt>
<dd>For a Gaussian posterior and likelihood term the importance ratios of PSIS have a Pareto tail of shape
exactly the leverage, so the same threshold applies: above {t}, treat that observation's leave-one-out (and
the totals) with care — refit without it, or use MPE importance sampling. PSIS estimates k̂ from a finite
tail, where a large residual also pushes it up, so the two agree in rank more than in value.</dd>
</dl>
</section>
"""


def write_report(fit: Fit, path: str | Path, *, idata=None, var_name: str | None = None,
                 title: str | None = None, top: int = 10, comparison: pd.DataFrame | None = None,
                 labels: Sequence | None = None, groups: Any = None, history: Any = None,
                 meta: Mapping[str, str] | None = None, num_samples: int = 2000, rng_key=None,
                 threshold: float = K_THRESHOLD) -> Path:
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

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> import jax, numpyro
    >>> import numpyro_mpe as mpe
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_model, STACKLOSS_PREDICTORS
    >>> from numpyro_mpe.io.report import write_report
    >>> numpyro.enable_x64()
    >>> df = load_stackloss()
    >>> X, y = df[list(STACKLOSS_PREDICTORS)].to_numpy(float), df["stack.loss"].to_numpy(float)
    >>> fit = mpe.Laplace(stackloss_model, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    >>> write_report(fit, "report.html", title="Stack loss")  # doctest: +SKIP
    PosixPath('report.html')
    """
    text = render_report(fit, idata=idata, var_name=var_name, title=title, top=top, comparison=comparison,
                         labels=labels, groups=groups, history=history, meta=meta, num_samples=num_samples,
                         rng_key=rng_key, threshold=threshold)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


__all__ = ["observation_table", "posterior_summary", "render_report", "value_formatter", "write_report"]
