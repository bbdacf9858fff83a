"""The building blocks of the HTML report: style sheet, tables, cards, figures and fixed text.

Everything here is plain HTML and CSS (no script, no external resource): figures become base64 PNG
``data:`` URIs, numbers are typeset (:func:`numpyro_mpe.io.format.format_number` with ``typeset=True``),
and table cells are given by formatters ``(value, row) -> (text, css class)``.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from numpyro_mpe.io.format import format_number
from numpyro_mpe.io.style import BLUE, FLAG

#: A table cell: ``(value, row) -> (html text, css class)``, or ``str`` for a left-aligned text column.
CellFormatter = Callable[[Any, pd.Series], tuple[str, str]]
#: A table column: ``(column of the frame, header html, formatter)``.
Column = tuple[str, str, Any]

#: The report's style sheet (inline; the system's fonts, the figures' palette).
CSS = (
    "\n:root { --ink: #1f2328; --muted: #57606a; --line: #d8dee4; --bg: #ffffff; --panel: #f6f8fa;\n"
    f"        --blue: {BLUE}; --flag: {FLAG}; --ok: #2a7f3a; }}\n"
    """* { box-sizing: border-box; }
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
)

#: The section "How to read this report"; ``{t}`` is the flag threshold.
HOW_TO_READ = """
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


def png_data_uri(fig, dpi: int = 110) -> str:
    """The figure as a ``data:image/png;base64`` URI; the figure is closed.

    Parameters
    ----------
    fig : matplotlib.figure.Figure
        The figure (closed afterwards).
    dpi : int, default 110
        Resolution of the PNG.

    Returns
    -------
    str
        ``"data:image/png;base64,..."``, for an ``<img src=...>``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> from numpyro_mpe.io.report_html import png_data_uri
    >>> png_data_uri(plt.figure(figsize=(1, 1)))[:22]
    'data:image/png;base64,'
    """
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_html(uri: str, alt: str, caption: str, css: str = "") -> str:
    """A ``<figure>``: the image at ``uri`` with its ``alt`` text and a caption.

    Parameters
    ----------
    uri : str
        The image, e.g. from :func:`png_data_uri`.
    alt : str
        Text for the image (escaped).
    caption : str
        The caption, HTML kept as given.
    css : str, optional
        Class of the ``<figure>``.

    Returns
    -------
    str
        One ``<figure>`` element.

    Examples
    --------
    >>> from numpyro_mpe.io.report_html import figure_html
    >>> figure_html("data:,", "a & b", "<b>Caption.</b>")
    '<figure class=""><img src="data:," alt="a &amp; b"><figcaption><b>Caption.</b></figcaption></figure>'
    """
    return (f'<figure class="{css}"><img src="{uri}" alt="{html.escape(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


def card_html(label: str, value: str, note: str = "", alert: bool = False) -> str:
    """A summary card of the totals: a small label over a large value, and a note.

    Parameters
    ----------
    label, value, note : str
        HTML of the three lines (kept as given); ``value`` may hold ``<small>`` units.
    alert : bool, default False
        Draw the card magenta (something is flagged).

    Returns
    -------
    str
        A ``<div class="card">``.

    Examples
    --------
    >>> from numpyro_mpe.io.report_html import card_html
    >>> card_html("Flagged", "2 <small>leverage</small>", "above 0.7", alert=True).startswith(
    ...     '<div class="card alert"><div class="label">Flagged</div>')
    True
    """
    return (f'<div class="card{" alert" if alert else ""}"><div class="label">{label}</div>'
            f'<div class="value">{value}</div><div class="note">{note}</div></div>')


def gaussian_check_card(fit: Any, name: str) -> str:
    """Card: the global k̂ of the fit's q (:func:`numpyro_mpe.loo.posterior_check.posterior_check`), computed
    here where draws × rows are affordable."""
    from numpyro_mpe.loo.posterior_check import affordable, posterior_check

    if fit.info.get("posterior_check") is None and not affordable(fit):
        return card_html("Gaussian check", "–", "global k̂ not computed (too many rows × draws)")
    c = fit.info.get("posterior_check") or posterior_check(fit, name, warn=False)
    note = ("q covers the posterior: fit.loo() reweights it" if c.reliable
            else "q is NOT the posterior: its closed-form MPE describes q")
    return card_html("Gaussian check · global k̂", format_number(c.khat, ".2f"), note, alert=not c.reliable)


def table_html(frame: pd.DataFrame, columns: Sequence[Column], css: str = "") -> str:
    """An HTML table of ``frame``, one row per row of it.

    Parameters
    ----------
    frame : pandas.DataFrame
        The rows; a column named in ``columns`` but missing from ``frame`` reads the row's index label.
    columns : sequence of (str, str, formatter)
        ``(column, header html, formatter)``; the formatter is ``str`` for a text column (escaped, left
        aligned) or a :data:`CellFormatter` such as :func:`number_cell`.
    css : str, optional
        Extra class of the wrapping ``<div class="tablewrap">`` (``"tall"``: scrolls, with a border).

    Returns
    -------
    str

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.report_html import number_cell, table_html
    >>> frame = pd.DataFrame({"what": ["elpd_loo"], "MPE": [-60.917]})
    >>> text = table_html(frame, [("what", "", str), ("MPE", "MPE", number_cell(".2f"))])
    >>> text[text.index("<tbody>"):]
    '<tbody><tr><td class="text">elpd_loo</td><td class="">−60.92</td></tr></tbody></table></div>'
    """
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


def number_cell(spec: str, flag_above: float | None = None, invalid_text: str | None = None) -> CellFormatter:
    """A cell formatter of numbers: typeset with ``spec``, flagged above a threshold, or marked invalid.

    Parameters
    ----------
    spec : str
        Format specification, e.g. ``".3f"``.
    flag_above : float, optional
        Values above it get the css class ``flag`` (magenta, bold).
    invalid_text : str, optional
        Shown instead of the value, with the class ``invalid``, in a row whose ``valid`` is False.

    Returns
    -------
    callable
        ``(value, row) -> (text, css class)``; a value that is not a number is shown as escaped text.

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.report_html import number_cell
    >>> number_cell(".2f", flag_above=0.7)(0.912, pd.Series({"valid": True}))
    ('0.91', 'flag')
    >>> number_cell(".3f", invalid_text="no cavity")(float("nan"), pd.Series({"valid": False}))
    ('no cavity', 'invalid')
    """
    def fmt(value, row):
        if invalid_text is not None and not bool(row.get("valid", True)):
            return invalid_text, "invalid"
        try:
            v = float(value)
        except (TypeError, ValueError):
            return html.escape(str(value)), ""
        flagged = flag_above is not None and np.isfinite(v) and v > flag_above
        return format_number(v, spec, typeset=True), "flag" if flagged else ""
    return fmt


def integer_cell(value: Any, row: pd.Series) -> tuple[str, str]:
    """The cell formatter of whole numbers (ranks, indices, group sizes).

    Parameters
    ----------
    value : int or float
        The number.
    row : pandas.Series
        Its row (unused: every :data:`CellFormatter` takes it).

    Returns
    -------
    (str, str)
        The digits and no css class.

    Examples
    --------
    >>> from numpyro_mpe.io.report_html import integer_cell
    >>> integer_cell(20.0, None)
    ('20', '')
    """
    return str(int(value)), ""


def text_cell(value: Any, row: pd.Series) -> tuple[str, str]:
    """The cell formatter of values already formatted as text (e.g. the observed values), right aligned.

    Parameters
    ----------
    value : object
        Shown as ``str(value)``, escaped.
    row : pandas.Series
        Ignored, as by :func:`integer_cell`.

    Returns
    -------
    tuple of str
        ``(escaped text, "")``.

    Examples
    --------
    >>> from numpyro_mpe.io.report_html import text_cell
    >>> text_cell("[1.0, 2.0, …]", None)
    ('[1.0, 2.0, …]', '')
    """
    return html.escape(str(value)), ""


def observation_name(row: pd.Series, coord_cols: Sequence[str]) -> str:
    """``observation 20``, ``observation 3 (g=1, m=2)``, with ``· label`` when the row has a ``_label``.

    Parameters
    ----------
    row : pandas.Series
        A row of :func:`numpyro_mpe.io.tables.observation_table`; its name is the flat observation index.
    coord_cols : sequence of str
        The observation dims (named in the text when there are several).

    Returns
    -------
    str
        Escaped HTML text.

    Examples
    --------
    >>> import pandas as pd
    >>> from numpyro_mpe.io.report_html import observation_name
    >>> observation_name(pd.Series({"g": 1, "m": 2}, name=5), ["g", "m"])
    'observation 5 (g=1, m=2)'
    """
    text = f"observation {int(row.name)}"
    if len(coord_cols) > 1:
        text += " (" + ", ".join(f"{c}={row[c]}" for c in coord_cols) + ")"
    if "_label" in row.index:
        text += f" · {row['_label']}"
    return html.escape(text)


def observation_columns(coord_cols: Sequence[str], label_header: str | None, observed_name: str,
                        threshold: float, rank: bool = False) -> list[Column]:
    """The columns of the report's per-observation tables, for :func:`table_html`.

    Parameters
    ----------
    coord_cols : sequence of str
        The observation dims; shown as columns when there are several.
    label_header : str, optional
        Header of the ``_label`` column; ``None``: no label column.
    observed_name : str
        The observed site (header of the observed values).
    threshold : float
        Leverage and k̂ above it are flagged.
    rank : bool, default False
        Start with the rank ``#`` (column ``_rank``).

    Returns
    -------
    list of (str, str, formatter)

    Examples
    --------
    >>> from numpyro_mpe.io.report_html import observation_columns
    >>> [header for _, header, _ in observation_columns(["obs"], None, "y", 0.7)][:4]
    ['observation', 'y', 'sensitivity', 'leverage']
    """
    cols: list[Column] = []
    if rank:
        cols.append(("_rank", "#", integer_cell))
    cols.append(("_index", "observation", integer_cell))
    if len(coord_cols) > 1:
        cols += [(c, html.escape(c), str) for c in coord_cols]
    if label_header is not None:
        cols.append(("_label", html.escape(label_header), str))
    cols += [
        ("observed", html.escape(observed_name), text_cell),
        ("sensitivity", "sensitivity", number_cell(".3f", invalid_text="no cavity")),
        ("leverage", "leverage", number_cell(".3f", flag_above=threshold)),
        ("pareto_k", "PSIS k̂", number_cell(".2f", flag_above=threshold)),
        ("elpd_loo_mpe", "elpd_loo MPE", number_cell(".2f", invalid_text="–")),
        ("elpd_loo_psis", "elpd_loo PSIS", number_cell(".2f")),
        ("p_loo_mpe", "p_loo MPE", number_cell(".3f", invalid_text="–")),
    ]
    return cols


__all__ = ["CSS", "HOW_TO_READ", "card_html", "figure_html", "integer_cell", "number_cell",
           "observation_columns", "observation_name", "png_data_uri", "table_html", "text_cell"]
