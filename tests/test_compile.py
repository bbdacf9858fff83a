"""Compiled programs (docs/architecture.md, "Compiled programs"): compiled once per (model, data shapes and
dtypes, options) and reused; sites of equal predictors share one program.

Counts come from :func:`numpyro_mpe.programs.track` (programs compiled, or loaded from JAX's persistent cache,
while the block runs).  Truths: a count of zero for a second fit of the same model on new data of the same
shapes; for a model written as a Python loop over 30 scalar sites, the same model written with one vectorized
site in a plate (the outputs must agree to round-off) and the number of sites (the programs must be far
fewer); a budget of programs for a first fit in a fresh interpreter with no cache at all; and, for the quick
programs of small arguments, the same outputs as XLA's optimised programs (to round-off).
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import numpyro_mpe as mpe
from numpyro_mpe.programs import BOUNDED_MARKER, track

KEY = jax.random.PRNGKey(0)


def built(stats) -> int:
    """Programs compiled plus programs loaded from the persistent cache (``loaded``, where ``track`` counts
    them apart): every program not found in the process's own cache."""
    return stats.programs + getattr(stats, "loaded", 0)


# ===================================================================== (i) a second fit compiles nothing
def logistic(X, y=None):
    a = numpyro.sample("a", dist.Normal(0, 2.5))
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=a + X @ b), obs=y)


def normal_scale(X, y=None):
    a = numpyro.sample("a", dist.Normal(0, 2.5))
    b = numpyro.sample("b", dist.Normal(0, 1).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(a + X @ b, sigma), obs=y)


def regression_data(kind, seed, n=50, p=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, p))
    eta = 0.3 + X @ np.array([1.0, -0.5, 0.25])
    if kind == "logistic":
        y = (rng.uniform(size=n) < 1 / (1 + np.exp(-eta))).astype(float)
    else:
        y = eta + 0.7 * rng.normal(size=n)
    return X, y


def fit_and_outputs(model, X, y):
    fit = mpe.Laplace(model, progress=False).run(KEY, X, y=y)
    return fit, fit.sensitivities(), fit.loo()


@pytest.mark.arviz  # fit.loo()
@pytest.mark.parametrize("kind,model", [("logistic", logistic), ("normal_scale", normal_scale)])
def test_second_fit_on_new_data_of_the_same_shape_compiles_nothing(kind, model):
    X1, y1 = regression_data(kind, seed=1)
    X2, y2 = regression_data(kind, seed=2)
    assert X1.shape == X2.shape and not np.array_equal(X1, X2)
    with track("first") as first:
        fit1, ds1, _ = fit_and_outputs(model, X1, y1)
    with track("second") as second:
        fit2, ds2, loo2 = fit_and_outputs(model, X2, y2)
    print(f"\n[{kind}] first fit + sensitivities + loo: {built(first)} programs; second on new data: "
          f"{built(second)} {second.names}")
    assert built(second) == 0, second.names
    # the second fit is a fit of the new data, not the first one again
    assert not np.allclose(np.asarray(fit1.posterior.mean), np.asarray(fit2.posterior.mean))
    assert not np.allclose(ds1.elpd_loo.values, ds2.elpd_loo.values)
    assert np.all(np.isfinite(ds2.elpd_loo.values))
    # the count is real: the first fit of the model in this process did compile (or load) programs
    assert built(first) > 0


# ===================================================================== (ii) a loop over sites
T = 30  # observed sites y_1 .. y_T; y_0 is given


def ar_loop(y):
    rho = numpyro.sample("rho", dist.Normal(0, 0.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    for t in range(1, T + 1):
        numpyro.sample(f"y_{t}", dist.Normal(rho * y[t - 1], sigma), obs=y[t])


def ar_plate(y):
    rho = numpyro.sample("rho", dist.Normal(0, 0.5))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("time", T):
        numpyro.sample("y", dist.Normal(rho * y[:-1], sigma), obs=y[1:])


@pytest.fixture(scope="module")
def ar_series():
    rng = np.random.default_rng(4)
    y = np.zeros(T + 1)
    for t in range(1, T + 1):
        y[t] = 0.6 * y[t - 1] + 0.8 * rng.standard_t(5)
    return jnp.asarray(y)


@pytest.mark.slow  # > 20 s: 30 sites traced one by one, 30 + 1 sensitivities
@pytest.mark.arviz  # to_inference_data
def test_loop_over_sites_equals_one_vectorized_site_and_shares_programs(ar_series):
    y = ar_series
    fit_loop = mpe.Laplace(ar_loop, progress=False).run(KEY, y)
    assert sorted(fit_loop.observed_names) == sorted(f"y_{t}" for t in range(1, T + 1))
    with track("to_inference_data") as stats:
        idata = fit_loop.to_inference_data(num_samples=100, rng_key=KEY)
    print(f"\n[AR(1), {T} scalar sites] to_inference_data: {built(stats)} programs {stats.names}")
    assert built(stats) < 15, (stats, stats.names)
    fit_plate = mpe.Laplace(ar_plate, progress=False).run(KEY, y)
    np.testing.assert_allclose(np.asarray(fit_loop.posterior.mean), np.asarray(fit_plate.posterior.mean),
                               rtol=0, atol=1e-12)
    ds = fit_plate.sensitivities("y")
    assert ds.elpd_loo.shape == (T,)
    for out in ("elpd_loo", "leverage", "sensitivity", "lpd"):
        per_site = np.array([float(fit_loop.sensitivities(f"y_{t}")[out]) for t in range(1, T + 1)])
        np.testing.assert_allclose(per_site, ds[out].values, rtol=0, atol=1e-12, err_msg=out)
    # the export holds every site's outputs, the same values
    mpe_group = idata["mpe"]
    for t in (1, 17, T):
        np.testing.assert_allclose(float(mpe_group[f"y_{t}_elpd_loo"]), float(ds.elpd_loo[t - 1]),
                                   rtol=0, atol=1e-12)


# ===================================================================== (iii) a first fit, nothing cached
FIRST_FIT_SCRIPT = textwrap.dedent("""
    import json, os
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpyro
    numpyro.enable_x64()
    numpyro.set_platform("cpu")
    import numpyro_mpe as mpe
    from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS, load_stackloss, stackloss_model
    from numpyro_mpe.programs import BOUNDED_MARKER, track
    df = load_stackloss()
    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df["stack.loss"].to_numpy(float)
    with track("fit") as fit_stats:
        fit = mpe.Laplace(stackloss_model, progress=False).run(jax.random.PRNGKey(0), X, y=y)
    with track("sensitivities") as sens_stats:
        ds = fit.sensitivities()
    assert not jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_dir  # no disk cache
    def built(stats):
        return stats.programs + getattr(stats, "loaded", 0)
    print("RESULT" + json.dumps({"fit": built(fit_stats), "sensitivities": built(sens_stats),
                                 "loaded": getattr(fit_stats, "loaded", 0) + getattr(sens_stats, "loaded", 0),
                                 "names": fit_stats.names + sens_stats.names,
                                 "finite": bool(ds.elpd_loo.notnull().all())}))
""")


@pytest.mark.slow  # a subprocess
def test_first_fit_of_a_small_model_compiles_few_programs():
    env = dict(os.environ, NUMPYRO_MPE_CACHE_DIR="off", JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", FIRST_FIT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    res = json.loads(line[len("RESULT"):])
    total = res["fit"] + res["sensitivities"]
    print(f"\n[stack loss, fresh interpreter, no cache] Laplace fit {res['fit']} + sensitivities "
          f"{res['sensitivities']} = {total} programs: {res['names']}")
    assert res["finite"] and res["loaded"] == 0
    assert 0 < total <= 15, res["names"]


# ===================================================================== (iv) the persistent cache is locked
CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from numpyro_mpe.programs import CACHE_MAX_BYTES, enable_persistent_cache
    folder = enable_persistent_cache()
    chol = jax.jit(lambda x: jnp.linalg.cholesky(x @ x.T + 3.0 * jnp.eye(40)))
    chol(jnp.ones((40, 40))).block_until_ready()
    print("RESULT" + json.dumps({"folder": str(folder), "bound": jax.config.jax_compilation_cache_max_size,
                                 "expected": CACHE_MAX_BYTES}))
""")


UNBOUNDED_SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((30, 30))).block_until_ready()
""")


@pytest.mark.slow  # subprocesses
def test_persistent_cache_is_bounded_and_locked_for_processes_that_share_it(tmp_path):
    """The cache folder gets a size bound, which makes JAX lock it (a ``.lockfile`` beside the entries) around
    every read and write (without the bound there is no lock file); two processes started together on one
    folder both finish, and write their entries without a warning although an unbounded JAX wrote entries
    there before (a bounded cache fails every write where an entry lacks its access-time file)."""
    folder = tmp_path / "cache"
    env = dict(os.environ, NUMPYRO_MPE_CACHE_DIR=str(folder), JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    subprocess.run([sys.executable, "-c", UNBOUNDED_SCRIPT, str(folder)], env=env, check=True, timeout=300)
    assert not list(folder.glob("*-atime")) and list(folder.glob("*-cache"))  # the unbounded layout
    procs = [subprocess.Popen([sys.executable, "-c", CACHE_SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "Error writing persistent compilation cache" not in err, err[-3000:]
        res = json.loads([s for s in out.splitlines() if s.startswith("RESULT")][-1][len("RESULT"):])
        assert res["folder"] == str(folder) and res["bound"] == res["expected"] > 0
    assert (folder / ".lockfile").exists(), sorted(p.name for p in folder.iterdir())
    assert (folder / BOUNDED_MARKER).exists()  # stamped once: later starts skip the scan
    assert any(p.name.endswith("-cache") for p in folder.iterdir()), sorted(p.name for p in folder.iterdir())


# ===================================================================== (v) quick programs for small arguments
def test_quick_programs_for_small_arguments_optimised_ones_otherwise(monkeypatch):
    from numpyro_mpe.errors import MPEError
    from numpyro_mpe.programs import QUICK_ENV, QUICK_MAX_ELEMENTS, jit

    double = jit(lambda x, *, scale: scale * x, static_argnames=("scale",))
    small, large = jnp.ones(3), jnp.ones(QUICK_MAX_ELEMENTS + 1)
    assert double.program(small, scale=2.0) is double.quick
    assert double.program(large, scale=2.0) is double.optimized
    # called inside another program it is part of that program (whose options apply): no options of its own
    assert float(jax.jit(lambda x: double(x, scale=2.0).sum())(small)) == 6.0
    # opted out, per program or per call
    never = jit(lambda x: x, quick=False)
    assert never.program(small) is never.optimized
    by_call = jit(lambda x, *, heavy: x, static_argnames=("heavy",), quick=lambda *a, heavy: not heavy)
    assert by_call.program(small, heavy=True) is by_call.optimized
    assert by_call.program(small, heavy=False) is by_call.quick
    monkeypatch.setenv(QUICK_ENV, "0")
    assert double.program(small, scale=2.0) is double.optimized
    for bad in ("lots", "inf"):
        monkeypatch.setenv(QUICK_ENV, bad)
        with pytest.raises(MPEError, match=f"{QUICK_ENV}='{bad}': expected a number of array elements"):
            double(small, scale=2.0)


def test_quick_and_optimised_programs_give_the_same_outputs(monkeypatch):
    # the same fit and sensitivities from the quick programs (the default at this size) and from XLA's
    # optimised ones: equal to round-off (a wrong option, a program built for the wrong inputs, would not be)
    X, y = regression_data("logistic", 3)
    quick = mpe.Laplace(logistic, progress=False).run(KEY, X, y=y)
    monkeypatch.setenv("NUMPYRO_MPE_QUICK_COMPILE", "0")
    with track("optimised") as stats:
        optimised = mpe.Laplace(logistic, progress=False).run(KEY, X, y=y)
        ds_opt = optimised.sensitivities()
    assert built(stats) >= 2  # new programs: the optimised ones were not built before
    monkeypatch.delenv("NUMPYRO_MPE_QUICK_COMPILE")
    ds_quick = quick.sensitivities()
    np.testing.assert_allclose(quick.posterior.mean, optimised.posterior.mean, rtol=1e-10, atol=1e-12)
    for name in ("elpd_loo", "leverage", "sensitivity", "lpd"):
        np.testing.assert_allclose(ds_quick[name].values, ds_opt[name].values, rtol=1e-8, atol=1e-10)


def test_quick_block_sets_the_flag_for_the_block_only():
    from numpyro_mpe.programs import quick_block

    def flag():
        return bool(jax.config._read("jax_disable_most_optimizations"))

    assert not flag()
    with quick_block():
        assert flag()
    with quick_block(False):
        assert not flag()
    with pytest.raises(RuntimeError, match="inside"), quick_block():
        raise RuntimeError("inside")
    assert not flag()  # restored after an error too


# ===================================================================== (vi) XLA's classic CPU emitters
def test_cpu_programs_take_the_classic_emitters_and_agree_with_jax_jit(monkeypatch):
    # every program of the package built for the CPU carries CPU_OPTIONS (quick ones QUICK_OPTIONS too); one
    # called inside another program carries none (JAX refuses options on a nested jit); the outputs equal
    # those of a plain jax.jit to round-off
    from numpyro_mpe import programs

    assert programs.cpu_options() == programs.CPU_OPTIONS  # jaxlib 0.10 on the CPU takes them
    made = []
    real_jit = jax.jit

    def recording_jit(fn, **kwargs):
        made.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", recording_jit)

    def f(x):
        return jax.nn.logsumexp(jnp.sin(x) * jnp.log1p(x**2)) + jnp.tanh(x).sum()

    prog = programs.jit(f)
    small, large = jnp.linspace(0.0, 3.0, 7), jnp.linspace(0.0, 3.0, programs.QUICK_MAX_ELEMENTS + 1)
    outs = {name: prog(x) for name, x in (("small", small), ("large", large))}
    monkeypatch.setattr(jax, "jit", real_jit)
    nested = real_jit(lambda x: prog(x))(small)
    assert jax.default_backend() == "cpu"
    assert made == [None, programs.CPU_OPTIONS, {**programs.QUICK_OPTIONS, **programs.CPU_OPTIONS}]
    assert programs.CPU_OPTIONS == {"xla_cpu_use_fusion_emitters": False}
    for name, x in (("small", small), ("large", large)):
        np.testing.assert_allclose(outs[name], real_jit(f)(x), rtol=1e-13, err_msg=name)
    np.testing.assert_allclose(nested, outs["small"], rtol=1e-13)


def test_an_option_xla_does_not_know_leaves_programs_with_xla_defaults(monkeypatch):
    # jaxlib 0.12 refuses xla_cpu_use_fusion_emitters ("No such compile option"): the programs must still
    # compile and run, with no option of ours
    from numpyro_mpe import programs

    monkeypatch.setattr(programs, "CPU_OPTIONS", {"xla_cpu_no_such_option_here": False})
    monkeypatch.setattr(programs, "_cpu_options", None)
    assert programs.cpu_options() == {}
    prog = programs.jit(lambda x: 2.0 * x)
    assert float(prog(jnp.ones(3)).sum()) == 6.0
    assert float(prog(jnp.ones(programs.QUICK_MAX_ELEMENTS + 1))[0]) == 2.0


XLA_FLAG_SCRIPT = textwrap.dedent("""
    import json
    from numpyro_mpe.programs import CPU_XLA_FLAG, add_cpu_xla_flag
    before, after = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, {}
    added = add_cpu_xla_flag(before)
    import jax
    jax.numpy.zeros(1).block_until_ready()  # the backend has read XLA_FLAGS: too late to add
    late = add_cpu_xla_flag(after)
    print("RESULT" + json.dumps([added, before, late, after, CPU_XLA_FLAG]))
""")


@pytest.mark.slow  # a subprocess
def test_cpu_flag_added_before_the_backend_starts_only():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", XLA_FLAG_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added, before, late, after, flag = json.loads(
        [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1][len("RESULT"):])
    assert added and before["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {flag}"
    assert not late and after == {}
