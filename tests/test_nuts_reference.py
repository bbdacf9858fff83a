"""The commands' NUTS reference in a second process (:mod:`numpyro_mpe.io.nuts_reference`): the same draws as
in this process with the same key, for the bundled model and for a model loaded from a model file; a model
that does not pickle samples here."""

from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from numpyro_mpe.io.datasets import load_stackloss, stackloss_inputs, stackloss_model
from numpyro_mpe.io.model_file import load_user_model
from numpyro_mpe.io.nuts_reference import NutsJob, NutsProcess, NutsSettings, quick_nuts, sample_nuts

pytestmark = [pytest.mark.slow, pytest.mark.arviz]  # processes that sample; ArviZ data of the installed arviz

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = NutsSettings(warmup=100, draws=50, chains=2)
KEY = jax.random.PRNGKey(7)


def _same_draws(a, b):
    assert set(a.posterior.data_vars) == set(b.posterior.data_vars)
    for name in a.posterior.data_vars:
        np.testing.assert_allclose(a.posterior[name].values, b.posterior[name].values, rtol=1e-12, atol=0)
    for name in a.log_likelihood.data_vars:
        np.testing.assert_allclose(a.log_likelihood[name].values, b.log_likelihood[name].values, rtol=1e-12)


def test_second_process_gives_the_draws_of_this_process():
    args, kwargs = stackloss_inputs(load_stackloss())
    job = NutsJob(stackloss_model, args, kwargs, KEY, SETTINGS)
    assert job.where == "a second process"
    idata = job.result()
    assert job.seconds > 0 and idata.posterior.sizes["chain"] == 2 and idata.posterior.sizes["draw"] == 50
    _same_draws(idata, sample_nuts(stackloss_model, args, kwargs, KEY, SETTINGS))


def test_model_from_a_model_file_samples_in_a_second_process():
    model, data_fn, _, _ = load_user_model(str(ROOT / "examples" / "user_model.py") + ":model")
    args, kwargs = data_fn(pd.read_csv(ROOT / "examples" / "user_data.csv"))
    job = NutsJob(model, args, kwargs, KEY, SETTINGS)
    assert job.where == "a second process"
    _same_draws(job.result(), sample_nuts(model, args, kwargs, KEY, SETTINGS))


def test_model_that_does_not_pickle_samples_here():
    args, kwargs = stackloss_inputs(load_stackloss())
    scale = 1.0

    def closure_model(X, y=None):  # a local function: pickle refuses it
        return stackloss_model(X * scale, y=y)

    job = NutsJob(closure_model, args, kwargs, KEY, SETTINGS)
    assert job.where == "this process"
    _same_draws(job.result(), sample_nuts(stackloss_model, args, kwargs, KEY, SETTINGS))


def test_a_failing_second_process_warns_and_samples_here(monkeypatch):
    """A model that pickles here but cannot be imported in the other process (its module exists only in
    this one): the other process reports the error, and NUTS samples here with the same draws."""
    import sys
    import types

    module = types.ModuleType("numpyro_mpe_test_only_here")

    def model(X, y=None):
        return stackloss_model(X, y=y)

    model.__module__ = module.__name__
    model.__qualname__ = "model"
    module.model = model
    monkeypatch.setitem(sys.modules, module.__name__, module)
    args, kwargs = stackloss_inputs(load_stackloss())
    job = NutsJob(model, args, kwargs, KEY, SETTINGS)
    assert job.where == "a second process"
    with pytest.warns(RuntimeWarning, match="NUTS in a second process failed .*ModuleNotFoundError"):
        idata = job.result()
    assert job.where == "this process"
    _same_draws(idata, sample_nuts(stackloss_model, args, kwargs, KEY, SETTINGS))


def test_a_wrong_var_name_stops_the_nuts_process(monkeypatch, capsys):
    """``run --var-name`` of a site the model does not have: NUTS had started beside the check; the command
    fails with the one-line error and tells that process to stop, which it does before sampling (it is not
    killed: a kill during a cache write would leave a truncated cache entry), removing its folder."""
    from numpyro_mpe.io.cli import main

    stopped = []
    cancel = NutsJob.cancel

    def record(job):
        if job._proc is not None:
            stopped.append((job._proc, job._folder))
        cancel(job)

    monkeypatch.setattr(NutsJob, "cancel", record)
    rc = main(["run", str(ROOT / "examples" / "user_model.py") + ":model", "--data",
               str(ROOT / "examples" / "user_data.csv"), "--var-name", "nope", "--quiet",
               "--out", "unused-folder"])
    assert rc == 1 and "--var-name 'nope'" in capsys.readouterr().err
    assert len(stopped) == 1 and not Path("unused-folder").exists()
    proc, folder = stopped[0]
    assert proc.wait(timeout=120) == 0 and not folder.exists()
    assert not (folder / "result.pkl").exists()


def test_a_started_process_without_a_job_leaves_and_removes_its_folder():
    process = NutsProcess()
    assert process.folder.is_dir()
    process.drop()
    assert process.proc.wait(timeout=120) == 0 and not process.folder.exists()


def test_a_command_that_fails_before_its_job_drops_the_started_process(monkeypatch, tmp_path, capsys):
    """The commands start the NUTS process first thing; a mistake found before the job is sent (here a
    missing data file) ends that process too, instead of leaving it waiting."""
    from numpyro_mpe.io.cli import main

    started = []
    init = NutsProcess.__init__

    def record(process):
        init(process)
        started.append(process)

    monkeypatch.setattr(NutsProcess, "__init__", record)
    rc = main(["run", str(ROOT / "examples" / "user_model.py") + ":model", "--data",
               str(tmp_path / "missing.csv"), "--quiet", "--out", str(tmp_path / "out")])
    assert rc == 1 and "missing.csv" in capsys.readouterr().err
    assert len(started) == 1
    assert started[0].proc.wait(timeout=120) == 0 and not started[0].folder.exists()


def test_nuts_compiles_quickly_on_little_data(monkeypatch):
    """NUTS on the stack loss data traces its model with JAX's quick-compilation flag on (and leaves it off
    after); with the quick bound at 0 it does not."""
    seen = []

    def model(X, y=None):
        seen.append(bool(jax.config._read("jax_disable_most_optimizations")))
        return stackloss_model(X, y=y)

    args, kwargs = stackloss_inputs(load_stackloss())
    few = NutsSettings(warmup=10, draws=5, chains=1)  # only the flag is checked
    assert quick_nuts(args, kwargs, few)
    sample_nuts(model, args, kwargs, KEY, few)
    assert seen and all(seen) and not jax.config._read("jax_disable_most_optimizations")
    monkeypatch.setenv("NUMPYRO_MPE_QUICK_COMPILE", "0")
    assert not quick_nuts(args, kwargs, few)
    seen.clear()
    sample_nuts(model, args, kwargs, KEY, few)
    assert seen and not any(seen)
