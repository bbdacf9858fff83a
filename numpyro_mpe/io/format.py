"""Numbers as text, for the printed summary of the command line and for the HTML report.

Plain text (the terminal, CSV) writes a missing value as ``nan`` and the ASCII hyphen-minus; typeset text
(the HTML report) writes it as an en dash ``–`` and negative numbers with the minus sign ``−``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

#: A missing (None, NaN or infinite) value: plain text, typeset text.
_MISSING = {False: "nan", True: "–"}
#: The minus sign: plain text, typeset text.
_MINUS = {False: "-", True: "−"}


def format_number(x: Any, spec: str = ".3f", *, typeset: bool = False) -> str:
    """``x`` formatted with the format ``spec``; a missing value as ``nan`` (typeset: ``–``).

    Parameters
    ----------
    x : float, int, None or any
        The value; one that is not a number is returned as ``str(x)``.
    spec : str, default ".3f"
        A format specification, as for :func:`format`.
    typeset : bool, default False
        For HTML: an en dash for a missing value and the minus sign ``−`` instead of ``-``.

    Returns
    -------
    str
        The formatted number.

    Examples
    --------
    >>> from numpyro_mpe.io.format import format_number
    >>> format_number(-1.23456), format_number(None), format_number(float("inf"), ".2f")
    ('-1.235', 'nan', 'nan')
    >>> format_number(-1.23456, ".2f", typeset=True), format_number(float("nan"), typeset=True)
    ('−1.23', '–')
    """
    if x is None:
        return _MISSING[typeset]
    try:
        value = float(x)
    except (TypeError, ValueError):
        return str(x)
    if not np.isfinite(value):
        return _MISSING[typeset]
    return format(value, spec).replace("-", _MINUS[typeset])


def value_formatter(values: Any, *, typeset: bool = False) -> Callable[[Any], str]:
    """A formatter of the observed values of one site, chosen to suit all of ``values``.

    Integers as integers, else the fewest decimals (up to 4) that show every value exactly, else 4
    significant digits; vector values as ``[a, b, c, d, …]`` (at most four entries).

    Parameters
    ----------
    values : array_like
        All observed values of the site (their dtype and decimals choose the format).
    typeset : bool, default False
        As for :func:`format_number`.

    Returns
    -------
    callable
        ``one(value) -> str`` for one observed value (a scalar or a vector).

    Examples
    --------
    >>> from numpyro_mpe.io.format import value_formatter
    >>> fmt = value_formatter([1.5, -2.25, 3.0])
    >>> fmt(1.5), fmt(-2.25), fmt([1.0, 2.0, 3.0, 4.0, 5.0])
    ('1.50', '-2.25', '[1.00, 2.00, 3.00, 4.00, …]')
    >>> value_formatter([3, -7], typeset=True)(-7)
    '−7'
    """
    arr = np.asarray(values)
    spec = "d" if arr.dtype.kind in "iub" else _decimals_spec(arr)

    def one(v) -> str:
        a = np.asarray(v)
        if a.ndim == 0:
            x = a.item()
            if isinstance(x, (bool, np.bool_)):
                return str(x)
            if spec == "d":
                return format_number(int(x), ".0f", typeset=typeset)
            return format_number(x, spec, typeset=typeset)
        flat = a.ravel()
        body = ", ".join(one(e) for e in flat[:4])
        return f"[{body}{', …' if flat.size > 4 else ''}]"

    return one


def _decimals_spec(arr: np.ndarray) -> str:
    """The fewest decimals (up to 4) that show every finite value of ``arr`` exactly, else ``.4g``."""
    flat = arr.astype(float).ravel()
    flat = flat[np.isfinite(flat)]
    tol = 1e-9 * max(1.0, float(np.abs(flat).max(initial=0.0)))
    for d in range(5):
        if np.allclose(np.round(flat, d), flat, rtol=0, atol=tol):
            return f".{d}f"
    return ".4g"


__all__ = ["format_number", "value_formatter"]
