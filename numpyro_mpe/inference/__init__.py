"""Backends that fit a Gaussian posterior and return a :class:`~numpyro_mpe.fit.Fit`: Laplace, SVI, NGVI."""

from numpyro_mpe.inference.laplace import Laplace
from numpyro_mpe.inference.ngvi import NGVI
from numpyro_mpe.inference.svi import SVI, from_svi, svi_refit

__all__ = ["Laplace", "NGVI", "SVI", "from_svi", "svi_refit"]
