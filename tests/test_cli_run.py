"""``numpyro-mpe run FILE.py:NAME --data CSV`` and ``numpyro-mpe report``: end to end on the example model
file, and clear one-line errors (exit status 1) for the mistakes a user makes."""

import contextlib
import io
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from numpyro_mpe.io.cli import CLIError, build_parser, load_user_model, main
from numpyro_mpe.io.cli_commands import run_folder

pytestmark = pytest.mark.arviz  # the commands run the installed arviz's PSIS-LOO and netCDF export

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples" / "user_model.py"
DATA = ROOT / "examples" / "user_data.csv"
FOLDER_FILES = ["inference_data.nc", "comparison.csv", "sensitivity.png", "elpd_mpe_vs_psis.png",
                "leverage_vs_k.png", "report.html"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("crime")
    rc, stdout, stderr = _run(["run", f"{MODEL}:model", "--data", DATA, "--out", out, "--no-nuts",
                               "--id-column", "state"])
    return rc, stdout, stderr, out


def test_run_writes_the_report_folder(run_result):
    rc, stdout, stderr, out = run_result
    assert rc == 0, stderr
    for name in FOLDER_FILES:
        assert (out / name).is_file(), name
        assert str(out / name) in stdout
    assert not (out / "nuts.nc").exists()  # --no-nuts
    table = pd.read_csv(out / "comparison.csv")
    assert len(table) == 51 and table.loc[8, "label"] == "District of Columbia"  # the plate is "state"
    assert np.isfinite(table[["elpd_loo_mpe", "elpd_loo_psis", "pareto_k", "leverage"]]).all().all()
    # the District of Columbia (murder rate 24.2, the next state 12.3) moves the fit the most
    assert table["sensitivity"].idxmax() == 8 and table.loc[8, "sensitivity"] > 3


def test_run_prints_the_summary(run_result):
    _, stdout, _, out = run_result
    for text in ["run: ", "user_model.py:model", "51 rows", "[1/4] Laplace fit", "Laplace mean", "beta[2]",
                 "Most influential observations", "elpd_loo", "draws from q"]:
        assert text in stdout, text
    rows = stdout.split("Most influential observations")[1].splitlines()
    assert rows[1].split()[:2] == ["index", "state"]
    assert rows[3].startswith("8") and "District of Columbia" in rows[3]
    assert len([r for r in rows[3:8] if r[:1].isdigit()]) == 5  # --top 5 by default


def test_run_report_html(run_result):
    _, _, _, out = run_result
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "<h1>MPE sensitivity report: user_model.py:model</h1>" in text
    assert "District of Columbia" in text and "user_data.csv (51 rows)" in text
    assert "http://" not in text and "https://" not in text
    assert text.count('src="data:image/png;base64,') == 3


def test_report_command_on_the_demo_data(tmp_path):
    target = tmp_path / "sub"  # an existing directory gets report.html inside
    target.mkdir()
    rc, stdout, stderr = _run(["report", "--out", target, "--no-nuts", "--quiet", "--draws", "300",
                               "--chains", "1", "--title", "Demo report"])
    assert rc == 0, stderr
    path = target / "report.html"
    assert path.is_file() and f"Report written to {path}" in stdout
    text = path.read_text(encoding="utf-8")
    assert "<h1>Demo report</h1>" in text and "stack loss (bundled, N = 21)" in text
    assert "[1/" not in stdout  # quiet


# ---------------------------------------------------------------- errors
def _write(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture
def no_data_fn(tmp_path):
    return _write(tmp_path, "nodata.py", """
        import numpyro, numpyro.distributions as dist

        def my_model(y=None):
            numpyro.sample("y", dist.Normal(numpyro.sample("mu", dist.Normal(0, 1)), 1), obs=y)

        def make_inputs(df):
            return (), {"y": df["y"].to_numpy(float)}
        """)


def _error(argv):
    rc, stdout, stderr = _run(argv)
    assert rc == 1, (stdout, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr  # one clear line, no traceback
    assert lines[0].startswith(f"numpyro-mpe {argv[0]}: error: ")
    return lines[0]


def test_error_model_file_not_found(tmp_path):
    msg = _error(["run", "no/such/model.py:model", "--data", DATA, "--out", tmp_path])
    assert "model file 'no/such/model.py' not found" in msg
    msg = _error(["run", f"{tmp_path}:model", "--data", DATA, "--out", tmp_path / "o"])
    assert "is not a file" in msg


def test_error_model_name_missing(tmp_path):
    msg = _error(["run", f"{MODEL}:modle", "--data", DATA, "--out", tmp_path])
    assert "has no attribute 'modle'" in msg and "it defines: data, model" in msg


def test_error_data_function_missing(tmp_path, no_data_fn):
    msg = _error(["run", f"{no_data_fn}:my_model", "--data", DATA, "--out", tmp_path / "o"])
    assert "has no function 'data'" in msg and "--data-fn" in msg and "make_inputs, my_model" in msg
    # named with --data-fn, it is found (and called)
    model, fn, path, name = load_user_model(f"{no_data_fn}:my_model", "make_inputs")
    assert name == "my_model" and fn(pd.DataFrame({"y": [1.0, 2.0]}))[1]["y"].tolist() == [1.0, 2.0]


def test_error_csv_not_found(tmp_path):
    msg = _error(["run", f"{MODEL}:model", "--data", tmp_path / "missing.csv", "--out", tmp_path / "o"])
    assert f"data file '{tmp_path / 'missing.csv'}' not found" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "cannot read" in _error(["run", str(MODEL), "--data", empty, "--out", tmp_path / "o"])


def test_error_data_function_fails(tmp_path):
    bad = tmp_path / "other.csv"
    pd.DataFrame({"a": [1, 2], "b": [3, 4]}).to_csv(bad, index=False)
    msg = _error(["run", f"{MODEL}:model", "--data", bad, "--out", tmp_path / "o"])
    assert "data(df)" in msg and "KeyError" in msg and "['a', 'b']" in msg  # names the table's columns
    wrong = _write(tmp_path, "wrong.py", """
        def model(y=None):
            pass

        def data(df):
            return df["a"].to_numpy()
        """)
    msg = _error(["run", wrong, "--data", bad, "--out", tmp_path / "o"])
    assert "must return (args, kwargs)" in msg and "ndarray" in msg


def test_error_model_file_does_not_import(tmp_path):
    broken = _write(tmp_path, "broken.py", """
        import numpyro

        def model(:
            pass
        """)
    msg = _error(["run", f"{broken}:model", "--data", DATA, "--out", tmp_path / "o"])
    assert "importing" in msg and "(line 4)" in msg and "SyntaxError" in msg
    raising = _write(tmp_path, "raising.py", """
        x = 1
        raise RuntimeError("no GPU here")
        """)
    msg = _error(["run", raising, "--data", DATA, "--out", tmp_path / "o"])
    assert "(line 3)" in msg and "RuntimeError: no GPU here" in msg


def test_error_bad_options(tmp_path):
    msg = _error(["run", f"{MODEL}:model", "--data", DATA, "--id-column", "county", "--out", tmp_path / "o"])
    assert "--id-column 'county' is not a column" in msg and "'state'" in msg
    assert "--data needs a model" in _error(["report", "--data", DATA, "--out", tmp_path / "r.html"])
    msg = _error(["report", "--id-column", "state", "--out", tmp_path / "r.html"])
    assert "--id-column needs a model" in msg
    assert "needs its data" in _error(["report", f"{MODEL}:model", "--out", tmp_path / "r.html"])
    notdir = tmp_path / "file"
    notdir.write_text("x")
    # the out folder is checked before any fitting
    with pytest.raises(CLIError, match="not a directory"):
        args = build_parser().parse_args(["run", str(MODEL), "--data", str(DATA), "--out", str(notdir)])
        run_folder(None, args, nuts=False)


@pytest.fixture
def no_fit(monkeypatch):
    """Laplace.run fails the test when called: the command must refuse before any fit runs."""
    from numpyro_mpe.inference.laplace import Laplace

    def run(*args, **kwargs):
        raise AssertionError("a fit ran before the command checked its arguments")

    monkeypatch.setattr(Laplace, "run", run)


@pytest.fixture
def two_sites(tmp_path):
    """A model file observing two sites, y and z (``first_two`` keeps the table's first two rows), and its
    table of six rows."""
    model = _write(tmp_path, "two.py", """
        import numpyro, numpyro.distributions as dist

        def model(x, y=None, z=None):
            mu = numpyro.sample("mu", dist.Normal(0, 1))
            b = numpyro.sample("b", dist.Normal(0, 1))
            with numpyro.plate("obs", len(x)):
                numpyro.sample("y", dist.Normal(mu + b * x, 1), obs=y)
                numpyro.sample("z", dist.Normal(mu - b * x, 2), obs=z)

        def data(df):
            return (df["x"].to_numpy(float),), {"y": df["y"].to_numpy(float), "z": df["z"].to_numpy(float)}

        def first_two(df):
            return data(df.head(2))
        """)
    table = tmp_path / "two.csv"
    frame = pd.DataFrame({"name": list("abcdef"), "x": [0.0, 1.0, 2.0, 3.0, 4.0, 8.0],
                          "y": [0.1, -0.3, 0.5, 1.2, -0.8, 0.0], "z": [1.0, 0.2, -0.4, 2.5, -1.1, 0.3]})
    frame.to_csv(table, index=False)
    return model, table


def test_error_var_name_before_any_fit(tmp_path, no_fit):
    out = tmp_path / "o"
    msg = _error(["run", f"{MODEL}:model", "--data", DATA, "--var-name", "murder", "--out", out])
    assert "--var-name 'murder' is not an observed site of the model; observed sites: ['y']" in msg
    assert "var_name" not in msg  # the flag, not the Python keyword
    assert not out.exists()  # refused before anything was written
    msg = _error(["report", "--var-name", "stack_loss", "--no-nuts", "--out", tmp_path / "r.html"])
    assert "--var-name 'stack_loss' is not an observed site" in msg and "observed sites: ['y']" in msg
    assert not (tmp_path / "r.html").exists()


def test_error_several_observed_sites_before_any_fit(tmp_path, no_fit, two_sites):
    model, table = two_sites
    msg = _error(["run", f"{model}:model", "--data", table, "--out", tmp_path / "o"])
    assert "several observed sites ['y', 'z']; pick one with --var-name" in msg and "var_name" not in msg
    msg = _error(["report", f"{model}:model", "--data", table, "--var-name", "w", "--out", tmp_path / "r"])
    assert "--var-name 'w' is not an observed site of the model; observed sites: ['y', 'z']" in msg
    # an --id-column whose length is not the site's is refused before the fit too
    msg = _error(["run", f"{model}:model", "--data", table, "--data-fn", "first_two", "--var-name", "y",
                  "--id-column", "name", "--out", tmp_path / "o"])
    assert "--id-column 'name' has 6 rows, the observed site 'y' has 2 observations" in msg
    assert not (tmp_path / "o").exists()


def test_var_name_picks_the_site(tmp_path, two_sites):
    model, table = two_sites
    out = tmp_path / "z.html"
    rc, stdout, stderr = _run(["report", f"{model}:model", "--data", table, "--var-name", "z", "--no-nuts",
                               "--quiet", "--draws", "200", "--id-column", "name", "--out", out])
    assert rc == 0, stderr
    text = out.read_text(encoding="utf-8")
    assert "observed site <code>z</code> with 6 observations" in text


def test_run_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", str(MODEL)])
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ["--data", "--data-fn", "--out", "--var-name", "--id-column", "--nuts", "--no-nuts",
                   "--draws", "--chains", "--warmup", "--seed", "--top", "--title", "--quiet",
                   "def data(df)"]:
        assert option in text, option
    args = build_parser().parse_args(["run", "m.py:model", "--data", "d.csv"])
    assert args.nuts is True and args.data_fn == "data" and args.out == "mpe-report"
    args = build_parser().parse_args(["report", "--no-nuts"])
    assert args.model is None and args.nuts is False and args.out == "report.html"
