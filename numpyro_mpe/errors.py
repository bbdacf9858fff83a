"""Exceptions raised by numpyro_mpe, each naming the site, shape or option at fault."""

from __future__ import annotations


class MPEError(ValueError):
    """Base class of the package's input and numerical errors."""


class ModelError(MPEError):
    """The model cannot be handled (no observed site, discrete latent, NaN data, ...)."""


class PosteriorError(MPEError):
    """The Gaussian posterior is unusable (non-finite potential, indefinite Hessian)."""
