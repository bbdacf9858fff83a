"""Exceptions raised by numpyro_mpe, each naming the site, shape or option at fault."""

from __future__ import annotations


class MPEError(ValueError):
    """Base class of the package's input and numerical errors."""


class ModelError(MPEError):
    """The model cannot be handled (no observed site, discrete latent, NaN data, ...)."""


class PosteriorError(MPEError):
    """The Gaussian posterior is unusable (non-finite potential, indefinite Hessian)."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside the package (the user's
    line), from the function that calls ``warnings.warn``.

    Examples
    --------
    >>> user_stacklevel() >= 1  # called from outside the package: this frame
    True
    """
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level
