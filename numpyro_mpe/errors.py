"""Exceptions raised by numpyro_mpe, each naming the site, shape or option at fault."""

from __future__ import annotations


class MPEError(ValueError):
    """Base class of the package's input and numerical errors."""


class ModelError(MPEError):
    """The model cannot be handled (no observed site, discrete latent, NaN data, ...)."""


class PosteriorError(MPEError):
    """The Gaussian posterior is unusable (non-finite potential, indefinite Hessian)."""


def check_options(owner: str, options: dict, allowed: set[str]) -> None:
    """Refuse unknown keyword options with a message listing the known ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"{owner} got unknown option(s) {unknown}; known options are {sorted(allowed)}"
        )
