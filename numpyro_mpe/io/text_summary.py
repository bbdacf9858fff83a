"""The summary the command line prints: the posterior, the most influential observations, elpd_loo totals."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from numpyro_mpe.io.format import format_number, value_formatter
from numpyro_mpe.io.tables import posterior_summary

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


def text_table(rows: Sequence[Sequence[Any]], header: Sequence[str], align: str | None = None) -> str:
    """A plain-text table: the header, a rule of dashes, then the rows, columns two spaces apart.

    Parameters
    ----------
    rows : sequence of sequences
        The cells (any values; shown with ``str``).
    header : sequence of str
        One title per column.
    align : str, optional
        One ``<`` (left) or ``>`` (right) per column; default: the first column left, the others right.

    Returns
    -------
    str
        Lines without trailing spaces.

    Examples
    --------
    >>> from numpyro_mpe.io.text_summary import text_table
    >>> print(text_table([["alpha", "17.5"], ["sigma", "3.03"]], ["parameter", "mean"]))
    parameter  mean
    ---------  ----
    alpha      17.5
    sigma      3.03
    """
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]

    def line(r):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _posterior_lines(fit: Fit, reference, rng_key) -> list[str]:
    post = posterior_summary(fit, reference, rng_key=rng_key)
    header = ["parameter", "Laplace mean", "sd"]
    has_ref = "ref_mean" in post.columns
    if has_ref:
        header += ["NUTS mean", "sd"]
    rows = []
    for label, r in post.iterrows():
        row = [label, format_number(r["mean"]), format_number(r["sd"])]
        if has_ref:
            row += [format_number(r["ref_mean"]), format_number(r["ref_sd"])]
        rows.append(row)
    info = fit.info
    return [f"Posterior (constrained space; Laplace: {info.get('steps', '?')} Newton steps, "
            f"max |grad U| = {info.get('grad_norm', float('nan')):.1e})",
            text_table(rows, header)]


def _influential_lines(site, table: pd.DataFrame, top: int, labels) -> list[str]:
    y = np.asarray(site.flat_value)
    fmt_y = value_formatter(y)
    order = np.argsort(-np.nan_to_num(table["sensitivity"].to_numpy(float), nan=np.inf), kind="stable")[:top]
    multi = len(site.dims) > 1
    head = ["index"] + (list(site.dims) if multi else [])
    if labels is not None:
        head.append(str(getattr(labels, "name", None) or "label"))
    head += [site.name, "sensitivity", "leverage", "k̂", "elpd_loo MPE", "elpd_loo PSIS"]
    rows = []
    for i in order:
        r = table.iloc[i]
        row = [str(int(i))] + ([str(r[d]) for d in site.dims] if multi else [])
        if labels is not None:
            row.append(str(list(labels)[i]))
        row += [fmt_y(y[i]), format_number(r["sensitivity"]), format_number(r["leverage"]),
                format_number(r["pareto_k"], ".2f"), format_number(r["elpd_loo_mpe"], ".2f"),
                format_number(r["elpd_loo_psis"], ".2f")]
        rows.append(row)
    n_text = len(head) - 6
    return ["", f"Most influential observations (top {len(order)} by MPE sensitivity; leverage and k̂ flag at "
                "0.7)",
            text_table(rows, head, "<" * n_text + ">" * 6)]


def summary_text(fit: Fit, site, table: pd.DataFrame, reference=None, top: int = 5, rng_key=None,
                 labels: Sequence | None = None) -> str:
    """The printed summary of a command: the posterior, the most influential observations, elpd_loo totals.

    Parameters
    ----------
    fit : Fit
        The Laplace fit.
    site : ObservedSite
        The observed site of ``table``.
    table : pandas.DataFrame
        :func:`numpyro_mpe.compare_psis` output for ``site``.
    reference : arviz.InferenceData, optional
        The NUTS posterior: adds its mean and sd to the posterior table.
    top : int, default 5
        Number of most influential observations (by sensitivity) listed; 0 lists none.
    rng_key : jax.random.PRNGKey, optional
        Key for the draws from q of the posterior table.
    labels : sequence or pandas.Series, optional
        One label per observation, a column of the listing (headed by the Series' name).

    Returns
    -------
    str
        Plain text for the terminal: three blocks separated by blank lines.

    Examples
    --------
    >>> from numpyro_mpe.io.text_summary import summary_text
    >>> table = mpe.compare_psis(fit)  # doctest: +SKIP
    >>> print(summary_text(fit, fit.adapter.observed_site("y"), table, top=3))  # doctest: +SKIP
    Posterior (constrained space; Laplace: 6 Newton steps, max |grad U| = 2.1e-12)
    ...
    """
    from numpyro_mpe.loo.compare import format_summary

    lines = _posterior_lines(fit, reference, rng_key)
    if top > 0:
        lines += _influential_lines(site, table, top, labels)
    return "\n".join([*lines, "", format_summary(table)])


__all__ = ["summary_text", "text_table"]
