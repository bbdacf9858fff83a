"""Backends that fit a Gaussian posterior and return a :class:`~numpyro_mpe.fit.Fit`."""

from numpyro_mpe.inference.laplace import Laplace
from numpyro_mpe.inference.ngvi import NGVI, exact_loo_ngvi
from numpyro_mpe.inference.svi import SVI, exact_loo_svi, from_svi, svi_refit

__all__ = ["Laplace", "NGVI", "exact_loo_ngvi", "SVI", "exact_loo_svi", "from_svi", "svi_refit"]
