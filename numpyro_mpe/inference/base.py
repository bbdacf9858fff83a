"""What every backend provides besides its fit: a refit with per-observation weights.

A :class:`Refit` is how a backend fits the same model again with observation weights w_i on one observed site
(0 removes i), warm-started from the fit: Newton for Laplace, SVI for SVI, NGVI for NGVI.  The brute-force
leave-one-out (:func:`numpyro_mpe.exact_loo`) and the prior tuning run over it, whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

import jax

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit


class RefitResult(NamedTuple):
    """One refit: the mean and the lower Cholesky factor of the precision of q_w (NaN where it has none),
    whether the refit converged and the steps it took."""

    mean: jax.Array
    chol: jax.Array
    converged: jax.Array
    steps: jax.Array


class Refit(Protocol):
    """A backend's refit with observation weights.

    ``prepare(fit, var_name, rng_key)`` returns ``run(weights (N,)) -> RefitResult``, compiled once per fit
    structure.  ``coupled``: the refits share their random numbers, and leave-one-out shifts are taken
    relative to a reference refit with all weights 1 (the noise they share cancels).  ``describe`` says in
    words what one refit is (for the outputs' attributes).
    """

    coupled: bool
    label: str  # the ``method`` attribute of brute-force LOO results ("exact_loo", "exact_loo_svi", ...)

    def prepare(self, fit: Fit, var_name: str, rng_key) -> Callable[[jax.Array], RefitResult]: ...

    def describe(self) -> str: ...
