"""Backends that fit a Gaussian posterior and return a :class:`~numpyro_mpe.fit.Fit`."""

from .laplace import Laplace

__all__ = ["Laplace"]
