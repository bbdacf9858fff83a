"""The numpyro-mpe command: the demo's report files, its printed output, and argument handling."""

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from numpyro_mpe import __version__
from numpyro_mpe.io.cli import build_parser, main

DEMO_OPTIONS = ["--out", "--draws", "--chains", "--warmup", "--seed", "--nuts-in-process", "--no-nuts",
                "--top", "--quiet"]
PNGS = ["sensitivity.png", "elpd_mpe_vs_psis.png", "leverage_vs_k.png"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rc, stdout, _ = _run(["demo", "--out", str(out), "--draws", "300", "--warmup", "300", "--chains", "1"])
    return rc, stdout, out


@pytest.mark.slow  # NUTS (the demo fixture)
def test_demo_writes_the_report(demo):
    rc, stdout, out = demo
    assert rc == 0
    for name in ["inference_data.nc", "nuts.nc", "comparison.csv", *PNGS]:
        assert (out / name).is_file(), name
        assert str(out / name) in stdout  # every path is printed at the end
    for name in PNGS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


@pytest.mark.slow  # NUTS (the demo fixture)
def test_demo_netcdf_has_the_mpe_group(demo):
    _, _, out = demo
    path = out / "inference_data.nc"
    groups = {}
    for group in ["posterior", "log_likelihood", "observed_data", "mpe"]:
        with xr.open_dataset(path, group=group) as ds:
            groups[group] = ds.load()
    mpe = groups["mpe"]
    assert {"y_leverage", "y_sensitivity", "y_elpd_loo"} <= set(mpe.data_vars)
    assert mpe["y_leverage"].shape == (21,)
    assert groups["posterior"]["sigma"].shape[-1] == 300  # --draws x --chains draws from q
    np.testing.assert_allclose(groups["observed_data"]["y"].values[[0, 20]], [42.0, 15.0])
    with xr.open_dataset(out / "nuts.nc", group="log_likelihood") as ll:
        assert ll["y"].shape == (1, 300, 21)


@pytest.mark.slow  # NUTS (the demo fixture)
def test_demo_finds_observation_21(demo):
    # observation 21 (index 20) is the classic influential point of the stack loss data
    _, stdout, out = demo
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 21 and {"elpd_loo_mpe", "elpd_loo_psis", "pareto_k", "leverage"} <= set(table)
    top_k = set(table.nlargest(3, "pareto_k")["obs"])
    top_lev = set(table.nlargest(3, "leverage")["obs"])
    assert 20 in top_k or 20 in top_lev
    assert table["sensitivity"].idxmax() == 20
    assert np.isfinite(table["elpd_loo_psis"]).all() and table["valid"].all()


@pytest.mark.slow  # NUTS (the demo fixture)
def test_demo_prints_the_summary(demo):
    _, stdout, _ = demo
    for text in ["[1/5] Laplace fit", "[3/5] NUTS", "done in", "Laplace mean", "NUTS mean", "sigma",
                 "Most influential observations", "elpd_loo", "SE"]:
        assert text in stdout, text
    rows = stdout.split("Most influential observations")[1].splitlines()[3:8]
    assert rows[0].split()[0] == "20"  # the most sensitive observation, listed first
    assert len([r for r in rows if r.strip() and r.split()[0].isdigit()]) == 5  # --top 5


def test_demo_without_nuts(tmp_path):
    rc, stdout, _ = _run(["demo", "--out", str(tmp_path), "--no-nuts", "--quiet", "--top", "2",
                          "--draws", "200", "--chains", "2"])
    assert rc == 0
    assert not (tmp_path / "nuts.nc").exists()
    assert (tmp_path / "inference_data.nc").is_file() and (tmp_path / "comparison.csv").is_file()
    assert "[1/" not in stdout and "NUTS mean" not in stdout  # quiet: no progress lines
    assert "draws from q" in stdout  # PSIS ran on the Laplace posterior and says so
    table = pd.read_csv(tmp_path / "comparison.csv")
    assert np.isfinite(table["pareto_k"]).all()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    top = capsys.readouterr().out
    assert "--version" in top and "demo" in top
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in DEMO_OPTIONS:
        assert option in text, option
    # and nothing the parser accepts is left out of that list
    demo_parser = build_parser()._subparsers._group_actions[0].choices["demo"]
    declared = {s for a in demo_parser._actions for s in a.option_strings} - {"-h", "--help"}
    assert declared == set(DEMO_OPTIONS)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"numpyro-mpe {__version__}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--bogus"], "unrecognized arguments: --bogus"),
        (["demo", "--draws", "0"], "expected a positive integer"),
        (["demo", "--top", "many"], "expected a non-negative integer"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_arguments_exit_nonzero(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: numpyro-mpe" in err and message in err


def test_command_adds_the_cpu_xla_flag_before_it_runs(monkeypatch):
    # the command asks for XLA's classic CPU emitters (numpyro_mpe.programs.add_cpu_xla_flag) before its
    # subcommand starts anything, so that the NUTS reference's process inherits the flag
    from numpyro_mpe import programs
    from numpyro_mpe.io import cli

    calls = []
    monkeypatch.setattr(programs, "add_cpu_xla_flag", lambda: calls.append("flag") or True)
    monkeypatch.setitem(cli.COMMANDS, "demo", lambda args: calls.append("demo") or 0)
    assert main(["demo", "--no-nuts", "--quiet"]) == 0
    assert calls == ["flag", "demo"]
