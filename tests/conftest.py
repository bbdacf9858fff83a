"""Test configuration: float64 everywhere (accuracy is asserted), a fixed CPU backend, the ``slow`` marker and
the shared linear-Gaussian problem.

A quick local run leaves out the slow tests: ``python -m pytest -q -n 2 -m "not slow"``; CI runs everything.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache folder per xdist worker and JAX version, reused by the same worker in the
# next run: the package's bound on the folder makes JAX lock it for each read and write (before it did, a
# worker reading an entry another was still writing crashed twice here), separate folders spare the workers
# the waits, and the Python 3.11 and 3.12 runs (two JAX versions) keep apart.
if "PYTEST_XDIST_WORKER" in os.environ and "NUMPYRO_MPE_CACHE_DIR" not in os.environ:
    from importlib.metadata import version

    from numpyro_mpe.programs import default_cache_dir

    worker = os.environ["PYTEST_XDIST_WORKER"]
    os.environ["NUMPYRO_MPE_CACHE_DIR"] = str(default_cache_dir() / f"tests-jax{version('jax')}-{worker}")

# the tests' own programs (NUTS references, brute-force refits) compiled as the package's are (XLA's classic
# CPU emitters, numpyro_mpe.programs.CPU_OPTIONS): a quarter less compile time in tests that run NUTS
from numpyro_mpe.programs import add_cpu_xla_flag  # noqa: E402

add_cpu_xla_flag()

import numpyro  # noqa: E402
import pytest  # noqa: E402

numpyro.enable_x64()
numpyro.set_platform("cpu")

from linear_gaussian import Problem, closed_form, linear_gaussian_model, simulate  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: runs NUTS, brute-force refits (exact_loo, exact_group_loo, exact_loo_svi, exact_loo_ngvi, "
        "tune_prior with exact_at), a subprocess, or takes more than ~20 s; deselect with -m 'not slow'",
    )


#: σ and τ of the shared linear-Gaussian problem (40 rows, 3 features).
LG_SIGMA, LG_TAU = 0.5, 2.0
#: its model, built once: compiled programs are keyed on the model function.
lg_model = linear_gaussian_model(LG_SIGMA, LG_TAU)


@pytest.fixture(scope="session")
def linear_gaussian():
    """The shared linear-Gaussian problem: ``y_i ~ N(x_iᵀb, 0.5)``, ``b ~ N(0, 2² I)``, 40 rows × 3 features,
    one high-leverage row; a :class:`linear_gaussian.Problem` with the closed forms in ``truth``."""
    X, y, _ = simulate(11, 40, [1.0, -0.5, 0.3], LG_SIGMA, scale_first=3.0)
    return Problem(lg_model, X, y, LG_SIGMA, LG_TAU, closed_form(X, y, LG_SIGMA, LG_TAU))
