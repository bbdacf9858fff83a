"""Test configuration: float64 everywhere (accuracy is asserted), a fixed CPU backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpyro  # noqa: E402

numpyro.enable_x64()
numpyro.set_platform("cpu")
