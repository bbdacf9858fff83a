"""Exceptions raised by numpyro_mpe, each naming the site, shape or option at fault."""

from __future__ import annotations

import numbers


class MPEError(ValueError):
    """Base class of the package's input and numerical errors."""


class ModelError(MPEError):
    """The model cannot be handled (no observed site, discrete latent, NaN data, ...)."""


class PosteriorError(MPEError):
    """The Gaussian posterior is unusable (non-finite potential, indefinite Hessian)."""


def check_chunk_size(value) -> int | None:
    """``value`` as a positive ``int``; ``None`` (the default size) passes through.

    Examples
    --------
    >>> check_chunk_size(4096), check_chunk_size(None)
    (4096, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise MPEError(f"chunk_size must be a positive integer, got {value!r}")
    return int(value)


def check_options(owner: str, options: dict, allowed: set[str]) -> None:
    """Refuse unknown keyword options with a message listing the known ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; known options are {sorted(allowed)}"
        )
