"""numpyro_mpe: memory-perturbation leave-one-out sensitivities for NumPyro models.

Fit a Gaussian posterior (Laplace), then get, for every observation, the closed-form leave-one-out
shift of the posterior and predictions and the LOO predictive density of the Memory-Perturbation
Equation (Nickl et al., NeurIPS 2023), exported to ArviZ and compared with PSIS-LOO.

Names are imported lazily (PEP 562), so that ``numpyro-mpe --help`` does not pay for importing JAX.
"""

from __future__ import annotations

import importlib

from numpyro_mpe.errors import ModelError, MPEError, PosteriorError

__version__ = "0.1.0"

_LAZY = {
    "Fit": ".fit",
    "GaussianPosterior": ".gaussian",
    "Laplace": ".inference",
    "NGVI": ".inference",
    "exact_loo_ngvi": ".loo.exact",
    "exact_loo_svi": ".loo.exact",
    "tune_prior": ".loo.tuning",
    "SVI": ".inference",
    "from_svi": ".inference",
    "ModelAdapter": ".model",
    "compare_psis": ".loo.compare",
    "format_summary": ".loo.compare",
    "exact_loo": ".loo.exact",
    "exact_group_loo": ".loo.exact",
    "importance_loo": ".loo.importance",
    "parameter_shift": ".loo.influence",
}

__all__ = ["MPEError", "ModelError", "PosteriorError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'numpyro_mpe' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
