"""The options of the per-observation MPE, validated once, and the checks every option shares.

:class:`MPEOptions` is what a :class:`~numpyro_mpe.fit.Fit` carries for its per-observation passes; the
backends (Laplace, SVI, NGVI) build it from their keyword arguments with :meth:`MPEOptions.make`, which
checks every value and names the option at fault.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from numpyro_mpe.errors import MPEError

#: Curvatures of the precision and the memories.
CURVATURES = ("exact", "ggn")
#: Structures of the Gaussian posterior's precision.
STRUCTURES = ("full", "diag", "lowrank")
#: Default Monte Carlo draws where an integral has no quadrature rule.
DEFAULT_NUM_SAMPLES = 2000


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


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an ``int`` of at least ``minimum``, else an :class:`MPEError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise MPEError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_choice(name: str, value, choices) -> Any:
    """``value`` if it is one of ``choices``, else an :class:`MPEError` listing them."""
    if value not in choices:
        raise MPEError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_options(owner: str, options: dict, allowed) -> None:
    """Refuse unknown keyword options (``TypeError``, as Python does), listing the known ones."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {unknown}; known options are {sorted(allowed)}")


def keyword_options(init):
    """Decorate a keyword-only ``__init__`` so that an unknown keyword raises the same ``TypeError`` as
    :func:`check_options`: naming it and listing the known options."""
    import functools
    import inspect

    sig = inspect.signature(init)
    known = [n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY or
             (p.kind == p.POSITIONAL_OR_KEYWORD and n not in ("self", "model"))]

    @functools.wraps(init)
    def wrapped(self, *args, **kwargs):
        check_options(type(self).__name__, {k: v for k, v in kwargs.items() if k not in sig.parameters},
                      known)
        return init(self, *args, **kwargs)

    return wrapped


class MPEOptions(NamedTuple):
    """How a Fit runs its per-observation passes.

    Attributes
    ----------
    chunk_size : int or None
        Observations per chunk; ``None``: sized by memory (:func:`numpyro_mpe.engine.layout.auto_chunk_size`).
    num_samples : int
        Monte Carlo draws where ``elpd_loo`` has no quadrature rule (more than three predictor components, or
        no predictor).
    progress : bool
        Progress bars on passes over several chunks.
    curvature : {"exact", "ggn"}
        Curvature of the precision and the memories.
    devices : sequence of jax.Device or None
        Devices the observations are sharded over (default: all of ``jax.devices()``).
    """

    chunk_size: int | None = None
    num_samples: int = DEFAULT_NUM_SAMPLES
    progress: bool = True
    curvature: str = "exact"
    devices: tuple | None = None

    @classmethod
    def make(cls, chunk_size=None, num_samples=DEFAULT_NUM_SAMPLES, progress=True, curvature="exact",
             devices=None) -> MPEOptions:
        """Validated options (each bad value raises an :class:`MPEError` naming the option).

        Examples
        --------
        >>> MPEOptions.make(chunk_size=512).chunk_size
        512
        """
        if devices is not None:
            devices = tuple(devices)
            if not devices:
                raise MPEError("devices= is empty")
        return cls(check_chunk_size(chunk_size), check_positive_int("num_samples", num_samples, 2),
                   bool(progress), check_choice("curvature", curvature, CURVATURES), devices)
