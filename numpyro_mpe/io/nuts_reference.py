"""The NUTS reference of the ``numpyro-mpe`` commands, sampled in a second process beside the MPE steps.

On an everyday model NUTS spends most of its time tracing and compiling, not sampling (stack loss: 5–9 s for
two chains of 2000 iterations, of which sampling is under a second), and so do the Laplace fit and the MPE
pass.  The two are independent, so :class:`NutsJob` starts NUTS in a second Python process before the fit
and collects its draws after the MPE steps: the commands wait for about the longer of the two instead of
their sum.  A model that cannot be sent to another process (it does not pickle), or a process that fails to
start or to sample, samples in this process instead, with the same key and the same draws.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

logger = logging.getLogger("numpyro_mpe")


#: A file in the job's folder that tells the other process to stop.
STOP_FILE = "stop"


class NutsSettings(NamedTuple):
    """Warmup and kept draws per chain, chains (run together, vectorized) and float64."""

    warmup: int
    draws: int
    chains: int
    x64: bool = True


def sample_nuts(model, model_args: tuple, model_kwargs: dict, rng_key, settings: NutsSettings, *,
                progress: bool = False):
    """NUTS draws of ``model`` with their pointwise log-likelihoods, as ArviZ data.

    Parameters
    ----------
    model : callable
        The NumPyro model.
    model_args, model_kwargs : tuple, dict
        Its data.
    rng_key : jax.random.PRNGKey
        Key of the chains.
    settings : NutsSettings
        Warmup, draws, chains.
    progress : bool, default False
        NumPyro's progress bar.

    Returns
    -------
    arviz.InferenceData
        ``az.from_numpyro(mcmc, log_likelihood=True)``.

    Examples
    --------
    >>> import jax
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_inputs, stackloss_model
    >>> args, kwargs = stackloss_inputs(load_stackloss())
    >>> idata = sample_nuts(stackloss_model, args, kwargs, jax.random.PRNGKey(0), NutsSettings(200, 100, 2))
    >>> idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]
    (2, 100)
    """
    import jax.numpy as jnp
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(model), num_warmup=settings.warmup, num_samples=settings.draws,
                num_chains=settings.chains, chain_method="vectorized", progress_bar=progress)
    mcmc.run(jnp.asarray(rng_key), *model_args, **model_kwargs)
    import arviz as az

    return az.from_numpyro(mcmc, log_likelihood=True)


def _user_module_file(model) -> str | None:
    """The file of a model loaded from a model file (:mod:`numpyro_mpe.io.model_file`), which the other
    process imports again before it unpickles the model."""
    from numpyro_mpe.io.model_file import USER_MODULE_PREFIX

    name = getattr(model, "__module__", "") or ""
    module = sys.modules.get(name)
    return getattr(module, "__file__", None) if name.startswith(USER_MODULE_PREFIX) else None


def _sample_in_child(folder: Path) -> None:
    """The second process (``python -m numpyro_mpe.io.nuts_reference FOLDER``): reads ``job.pkl``, sets up
    the float width, the persistent cache, the parent's import path and the model's file, samples, and writes
    ``result.pkl``: ``("ok", idata, seconds)`` or ``("error", message)``."""
    def stopped() -> bool:  # the command stopped early (NutsJob.cancel): leave, and take the folder along
        if (folder / STOP_FILE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            return True
        return False

    try:
        head = pickle.loads((folder / "job.pkl").read_bytes())
        settings = head["settings"]
        sys.path[:0] = [p for p in head["sys_path"] if p not in sys.path]
        import numpyro

        if settings.x64:
            numpyro.enable_x64()
        from numpyro_mpe.programs import enable_persistent_cache

        enable_persistent_cache()
        if head["module_file"] is not None:
            from numpyro_mpe.io.model_file import import_model_file

            import_model_file(Path(head["module_file"]))
        model, model_args, model_kwargs, key = pickle.loads(head["job"])
        if stopped():
            return
        # ArviZ (1-2 s to import) is imported while NUTS compiles, which leaves the interpreter free
        threading.Thread(target=importlib.import_module, args=("arviz",), daemon=True).start()
        t0 = time.perf_counter()
        idata = sample_nuts(model, model_args, model_kwargs, key, settings)
        out = ("ok", idata, time.perf_counter() - t0)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which samples itself
        out = ("error", f"{type(err).__name__}: {err}")
    if stopped():
        return
    (folder / "result.tmp").write_bytes(pickle.dumps(out))
    os.replace(folder / "result.tmp", folder / "result.pkl")


class NutsJob:
    """NUTS started now in a second process (or, where that is not possible, run by :meth:`result`).

    The process is ``python -m numpyro_mpe.io.nuts_reference`` with the job in a temporary folder (the
    model pickled by reference, with the parent's import path; a model from a model file is imported there
    again from its file).

    Parameters
    ----------
    model, model_args, model_kwargs
        The model and its data.
    rng_key : jax.random.PRNGKey
        Key of the chains (the same draws in either process).
    settings : NutsSettings
        Warmup, draws, chains, float64.
    parallel : bool, default True
        ``False``: sample in this process, in :meth:`result`.

    Examples
    --------
    >>> import jax
    >>> from numpyro_mpe.io.datasets import load_stackloss, stackloss_inputs, stackloss_model
    >>> args, kwargs = stackloss_inputs(load_stackloss())
    >>> job = NutsJob(stackloss_model, args, kwargs, jax.random.PRNGKey(0), NutsSettings(200, 100, 1))
    >>> job.result().posterior.sizes["draw"]  # doctest: +SKIP
    100
    """

    def __init__(self, model, model_args: tuple, model_kwargs: dict, rng_key, settings: NutsSettings, *,
                 parallel: bool = True) -> None:
        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.rng_key, self.settings = np.asarray(rng_key), settings
        self.where = "this process"
        self.seconds: float | None = None  # sampling time where it ran
        self._proc = self._folder = None
        if parallel:
            self._start()

    def _start(self) -> None:
        try:
            job = pickle.dumps((self.model, self.model_args, self.model_kwargs, self.rng_key))
        except Exception as err:  # noqa: BLE001 - a closure or a lambda: sample here instead
            logger.debug("NUTS runs in this process: the model does not pickle (%s)", err)
            return
        head = {"module_file": _user_module_file(self.model), "settings": self.settings,
                "sys_path": [p for p in sys.path if p], "job": job}
        self._folder = Path(tempfile.mkdtemp(prefix="numpyro_mpe_nuts_"))
        (self._folder / "job.pkl").write_bytes(pickle.dumps(head))
        # on a GPU this process has taken its share of the memory already: the other one allocates as it goes
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:  # its messages to a file: a pipe nobody reads until the end could fill and stall it
            with open(self._folder / "stderr.txt", "wb") as err:
                self._proc = subprocess.Popen([sys.executable, "-m", __name__, str(self._folder)],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=err, env=env)
            self.where = "a second process"
        except OSError as err:
            logger.debug("NUTS runs in this process: %s", err)
            self._cleanup()

    def _cleanup(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._proc = self._folder = None

    def _collect(self):
        """The other process's draws, or ``None`` (with a warning) where it failed."""
        self._proc.wait()
        result = self._folder / "result.pkl"
        if result.exists():
            out = pickle.loads(result.read_bytes())
        else:  # it died before writing (killed, out of memory)
            err = (self._folder / "stderr.txt").read_text(errors="replace")[-2000:]
            out = ("error", err or f"exit status {self._proc.returncode}")
        if out[0] == "ok":
            self.seconds = out[2]
            return out[1]
        warnings.warn(f"NUTS in a second process failed ({out[1].strip()}); sampling in this process",
                      RuntimeWarning, stacklevel=3)
        self.where = "this process"
        return None

    def result(self, *, progress: bool = False) -> Any:
        """The NUTS draws (``arviz.InferenceData`` with the log-likelihoods), waiting for the other process;
        sampled here when it did not start or failed (an error of NUTS itself is then raised here)."""
        if self._proc is not None:
            try:
                idata = self._collect()
            finally:
                self._cleanup()
            if idata is not None:
                return idata
        t0 = time.perf_counter()
        idata = sample_nuts(self.model, self.model_args, self.model_kwargs, self.rng_key, self.settings,
                            progress=progress)
        self.seconds = time.perf_counter() - t0
        return idata

    def cancel(self) -> None:
        """Tell the other process to stop (an analysis that stops early): it leaves before sampling, or
        drops its draws, and removes its folder.  It is not killed: a process killed while it writes an entry
        of the persistent compilation cache leaves a truncated entry, which aborts the next process that
        reads it."""
        proc, folder = getattr(self, "_proc", None), getattr(self, "_folder", None)
        if folder is not None and proc is not None and proc.poll() is None:
            (folder / STOP_FILE).touch()
            self._proc = self._folder = None  # the other process removes the folder
        elif folder is not None:
            self._cleanup()

    __del__ = cancel


__all__ = ["NutsJob", "NutsSettings", "sample_nuts"]

if __name__ == "__main__":
    _sample_in_child(Path(sys.argv[1]))
