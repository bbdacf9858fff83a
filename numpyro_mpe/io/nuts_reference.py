"""The NUTS reference of the ``numpyro-mpe`` commands, sampled in a second process beside the MPE steps.

On an everyday model NUTS spends most of its time tracing and compiling, not sampling (stack loss: 5–9 s for
two chains of 2000 iterations, of which sampling is under a second), and so do the Laplace fit and the MPE
pass.  The two are independent, so :class:`NutsJob` starts NUTS in a second Python process before the fit
and collects its draws after the MPE steps: the commands wait for about the longer of the two instead of
their sum.  A model that cannot be sent to another process (it does not pickle), or a process that fails to
start or to sample, samples in this process instead, with the same key and the same draws.

The commands start that process (:class:`NutsProcess`) first thing, before they import JAX and NumPyro
themselves: it imports them, and ArviZ, while the command loads the data and the model, and then waits for
its job.  On a model with little data (:func:`quick_nuts`) NUTS compiles its programs with XLA's quick
settings, in either process alike.
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
#: What this process writes to the other one's standard input once the job is in its folder.
GO = b"go\n"
#: NUTS compiles quickly when its data elements × chains × iterations are at most this many times
#: :func:`numpyro_mpe.programs.quick_bound` (:func:`quick_nuts`).
QUICK_NUTS_ITERATIONS = 2000


class NutsSettings(NamedTuple):
    """Warmup and kept draws per chain, chains (run together, vectorized) and float64."""

    warmup: int
    draws: int
    chains: int
    x64: bool = True


def quick_nuts(model_args: tuple, model_kwargs: dict, settings: NutsSettings) -> bool:
    """Whether NUTS compiles its programs with XLA's quick settings
    (:func:`numpyro_mpe.programs.quick_block`).

    Yes when its data hold few elements for the iterations asked: elements × chains × (warmup + draws) ≤
    :func:`~numpyro_mpe.programs.quick_bound` × :data:`QUICK_NUTS_ITERATIONS`.  A quick compilation saves
    about a second on an everyday model, and each gradient then takes about twice as long, which matters only
    when there are many rows or many iterations.

    Examples
    --------
    >>> import numpy as np
    >>> quick_nuts((np.zeros((21, 3)),), {"y": np.zeros(21)}, NutsSettings(1000, 1000, 2))
    True
    >>> quick_nuts((np.zeros((10**5, 10)),), {}, NutsSettings(1000, 1000, 2))
    False
    """
    from numpyro_mpe.programs import array_elements, quick_bound

    elements = array_elements((model_args, model_kwargs)) or 0
    work = elements * settings.chains * (settings.warmup + settings.draws)
    return work <= quick_bound() * QUICK_NUTS_ITERATIONS


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
        ``az.from_numpyro(mcmc, log_likelihood=True)``; its programs compiled quickly where
        :func:`quick_nuts` says so.

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

    from numpyro_mpe.programs import quick_block

    mcmc = MCMC(NUTS(model), num_warmup=settings.warmup, num_samples=settings.draws,
                num_chains=settings.chains, chain_method="vectorized", progress_bar=progress)
    with quick_block(quick_nuts(model_args, model_kwargs, settings)):
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


def _child(folder: Path) -> None:
    """The second process (``python -m numpyro_mpe.io.nuts_reference FOLDER``): imports NumPyro and its NUTS
    (and ArviZ, in a thread), then waits for :data:`GO` on its standard input and samples
    (:func:`_sample_in_child`); it removes the folder and leaves when the input closes without it."""
    try:
        import numpyro  # noqa: F401 - imported while the other process sets up
        from numpyro.infer import MCMC, NUTS  # noqa: F401
    except BaseException:  # noqa: BLE001 - reported once the job arrives, by the same imports
        pass
    # ArviZ (1-2 s to import) is imported while this process waits and NUTS compiles
    threading.Thread(target=importlib.import_module, args=("arviz",), daemon=True).start()
    try:
        go = sys.stdin.buffer.readline() == GO
    except BaseException:  # noqa: BLE001 - interrupted (Ctrl-C reaches both processes): no job
        go = False
    if not go:  # the other process ended or dropped the job
        shutil.rmtree(folder, ignore_errors=True)
        return
    _sample_in_child(folder)


def _sample_in_child(folder: Path) -> None:
    """Reads ``job.pkl``, sets up the float width, the persistent cache, the parent's import path and the
    model's file, samples, and writes ``result.pkl``: ``("ok", idata, seconds)`` or ``("error", message)``."""
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
        t0 = time.perf_counter()
        idata = sample_nuts(model, model_args, model_kwargs, key, settings)
        out = ("ok", idata, time.perf_counter() - t0)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which samples itself
        out = ("error", f"{type(err).__name__}: {err}")
    if stopped():
        return
    (folder / "result.tmp").write_bytes(pickle.dumps(out))
    os.replace(folder / "result.tmp", folder / "result.pkl")


class NutsProcess:
    """A second Python process, started ahead of its NUTS job (:class:`NutsJob`).

    It imports NumPyro and ArviZ while this process sets up, then waits: :meth:`send` hands it the job;
    :meth:`drop`, or the end of this process, closes its input and it leaves.  Its messages go to
    ``stderr.txt`` in its folder (a pipe nobody reads until the end could fill and stall it).

    Raises
    ------
    OSError
        The process could not start.

    Examples
    --------
    >>> process = NutsProcess()  # doctest: +SKIP
    >>> process.drop()  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="numpyro_mpe_nuts_"))
        # on a GPU this process has taken its share of the memory already: the other one allocates as it goes
        env = dict(os.environ)
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        try:
            with open(self.folder / "stderr.txt", "wb") as err:
                self.proc = subprocess.Popen([sys.executable, "-m", __name__, str(self.folder)],
                                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
                                             env=env)
        except OSError:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def send(self, head: dict) -> None:
        """Write the job to the folder and tell the process to start."""
        (self.folder / "job.pkl").write_bytes(pickle.dumps(head))
        try:
            self.proc.stdin.write(GO)
        finally:
            self.proc.stdin.close()

    def drop(self) -> None:
        """Tell a process that has no job to leave (it removes its folder)."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()


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
    process : NutsProcess, optional
        A second process started earlier, to sample in (when ``parallel``); else one starts now.

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
                 parallel: bool = True, process: NutsProcess | None = None) -> None:
        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.rng_key, self.settings = np.asarray(rng_key), settings
        self.where = "this process"
        self.seconds: float | None = None  # sampling time where it ran
        self._proc = self._folder = None
        if parallel:
            self._start(process)
        elif process is not None:
            process.drop()

    def _start(self, process: NutsProcess | None) -> None:
        try:
            job = pickle.dumps((self.model, self.model_args, self.model_kwargs, self.rng_key))
        except Exception as err:  # noqa: BLE001 - a closure or a lambda: sample here instead
            logger.debug("NUTS runs in this process: the model does not pickle (%s)", err)
            if process is not None:
                process.drop()
            return
        head = {"module_file": _user_module_file(self.model), "settings": self.settings,
                "sys_path": [p for p in sys.path if p], "job": job}
        try:
            process = process or NutsProcess()
            process.send(head)
        except OSError as err:  # it did not start, or it has died
            logger.debug("NUTS runs in this process: %s", err)
            if process is not None:
                shutil.rmtree(process.folder, ignore_errors=True)
            return
        self._proc, self._folder = process.proc, process.folder
        self.where = "a second process"

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


__all__ = ["NutsJob", "NutsProcess", "NutsSettings", "quick_nuts", "sample_nuts"]

if __name__ == "__main__":
    _child(Path(sys.argv[1]))
