"""numpyro_mpe: memory-perturbation leave-one-out sensitivities for NumPyro models.

Fit a Gaussian posterior (Laplace), then get, for every observation, the closed-form leave-one-out
shift of the posterior and predictions and the LOO predictive density of the Memory-Perturbation
Equation (Nickl et al., NeurIPS 2023), exported to ArviZ and compared with PSIS-LOO.
"""

from .errors import ModelError, MPEError, PosteriorError
from .fit import Fit
from .inference import Laplace
from .model import ModelAdapter
from .posterior import GaussianPosterior

__version__ = "0.1.0"

__all__ = [
    "Fit",
    "GaussianPosterior",
    "Laplace",
    "MPEError",
    "ModelAdapter",
    "ModelError",
    "PosteriorError",
    "__version__",
]
