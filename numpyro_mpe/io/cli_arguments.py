"""The arguments of the ``numpyro-mpe`` subcommands: their parsers, options and checks.

Each parser registrar of :data:`PARSERS` adds one subcommand to ``parser.add_subparsers()`` and returns
its parser; the command line (:mod:`numpyro_mpe.io.cli`) attaches the function that runs it.  A value
argparse can check (a positive integer) fails there, with exit status 2 and the usage; a mistake found
later (a missing file, a bad ``--var-name``) is a :class:`CLIError`, reported in one line with exit
status 1.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

PROG = "numpyro-mpe"
#: Default of ``--data-fn``: the function of a model file that builds the model's arguments from the table.
DATA_FN = "data"


class CLIError(Exception):
    """A user error the command reports in one line (exit status 1), without a traceback.

    Examples
    --------
    >>> from numpyro_mpe.io.cli_arguments import CLIError
    >>> raise CLIError("--id-column 'county' is not a column of the data")
    Traceback (most recent call last):
    ...
    numpyro_mpe.io.cli_arguments.CLIError: --id-column 'county' is not a column of the data
    """


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``, else the error ``expected <what>``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps descriptions and option help; keeps text with line breaks (the examples) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        # paragraphs with indented lines (examples, code) as written, the others wrapped
        out = []
        for para in text.split("\n\n"):
            if "\n" in para and any(line[:1].isspace() for line in para.splitlines()):
                out.append("".join(indent + line for line in para.splitlines(keepends=True)).rstrip("\n"))
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)


def _add_parser(subparsers, name: str, help: str, description: str, examples: str):
    """A subcommand's parser with its one-line ``help``, ``description`` and ``examples`` (one a line, each
    shown after ``PROG``)."""
    epilog = "examples:\n" + "\n".join(f"  {PROG} {line}" for line in examples.splitlines())
    return subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                 formatter_class=_HelpFormatter)


def _add_sampling_options(p, *, draws_use: str) -> None:
    """``--draws``, ``--chains``, ``--warmup``, ``--seed`` and ``--nuts-in-process``, shared by the
    subcommands that run NUTS."""
    p.add_argument("--draws", metavar="N", type=_positive_int, default=1000,
                   help="NUTS draws per chain kept after warmup; draws x chains is also the number of draws "
                        f"from the Laplace posterior {draws_use} (default: %(default)s)")
    p.add_argument("--chains", metavar="N", type=_positive_int, default=2,
                   help="NUTS chains, run together (vectorized) (default: %(default)s)")
    p.add_argument("--warmup", metavar="N", type=_positive_int, default=1000,
                   help="NUTS warmup (adaptation) steps per chain (default: %(default)s)")
    p.add_argument("--seed", metavar="INT", type=_non_negative_int, default=0,
                   help="random seed (jax.random.PRNGKey) of the fit, the draws and NUTS "
                        "(default: %(default)s)")
    p.add_argument("--nuts-in-process", action="store_true",
                   help="sample NUTS in this process after the MPE steps, not in a second process beside "
                        "them (default where the model pickles: about the longer of the two, not the sum)")


def _add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines or bars; the results and file paths are still printed")


# ---------------------------------------------------------------- demo
_DEMO_DESCRIPTION = """\
Fit Brownlee's stack loss data (21 observations, bundled) with a Gaussian linear regression
(numpyro_mpe.io.datasets.stackloss_model): a Laplace approximation gives the MPE leave-one-out
sensitivities, leverages and elpd_loo in closed form; NUTS gives the reference PSIS-LOO (arviz.loo).
Prints the fit, the most influential observations, the elpd_loo totals and the LOO predictive checks, and
writes inference_data.nc, nuts.nc, comparison.csv and five figures to --out."""

_DEMO_EXAMPLES = """\
demo                          full run (about a minute)
demo --out /tmp/r --no-nuts   Laplace only: PSIS-LOO on draws from q (seconds)
demo --draws 300 --warmup 300 --chains 1 --quiet"""


def _add_demo(subparsers) -> argparse.ArgumentParser:
    """Register ``numpyro-mpe demo``: the stack loss data, fitted, compared and reported."""
    p = _add_parser(subparsers, "demo",
                    "fit the stack loss data, compare MPE with PSIS-LOO and write a report",
                    _DEMO_DESCRIPTION, _DEMO_EXAMPLES)
    p.add_argument("--out", metavar="DIR", default="mpe-report",
                   help="directory for the report files, created if missing (default: %(default)s)")
    _add_sampling_options(p, draws_use="exported")
    p.add_argument("--no-nuts", action="store_true",
                   help="skip NUTS: PSIS-LOO then uses draws from the Laplace posterior instead")
    p.add_argument("--top", metavar="N", type=_non_negative_int, default=5,
                   help="number of most influential observations (by MPE sensitivity) to list; 0 lists none "
                        "(default: %(default)s)")
    _add_quiet(p)
    return p


# ---------------------------------------------------------------- a user's model: run and report
MODEL_FILE_HELP = """\
A model file is a Python file defining the NumPyro model and a function that builds the model's arguments
from the data table:

    def model(X, y=None): ...                 # any NumPyro model
    def data(df):                             # df: pandas.DataFrame read from --data
        X = df[['x1', 'x2']].to_numpy(float)
        return (X,), {'y': df['y'].to_numpy(float)}   # (args, kwargs) for model(*args, **kwargs)
"""

_RUN_DESCRIPTION = """\
Fit a NumPyro model from a Python file to a data table: a Laplace approximation gives the MPE
leave-one-out sensitivities, leverages and elpd_loo in closed form; NUTS gives the reference PSIS-LOO
(unless --no-nuts). Prints the fit, the most influential observations and the elpd_loo totals, and writes
inference_data.nc, nuts.nc, comparison.csv, three figures and report.html to --out, as the demo does.

""" + MODEL_FILE_HELP

_RUN_EXAMPLES = """\
run examples/user_model.py:model --data examples/user_data.csv --id-column state
run my_model.py:model --data table.csv --out results --no-nuts --quiet"""

_REPORT_DESCRIPTION = """\
Write one self-contained HTML file (figures embedded, no external files or network): the MPE totals, the
most influential observations, sensitivity and leverage figures, the comparison with PSIS-LOO, the
posterior, and how to read them. Without FILE.py it reports on the demo's stack loss model; with
FILE.py:NAME and --data on your model (see 'numpyro-mpe run').

""" + MODEL_FILE_HELP

_REPORT_EXAMPLES = """\
report --out report.html --no-nuts       the demo data, in seconds
report examples/user_model.py:model --data examples/user_data.csv --id-column state --out crime.html"""


def _add_model_options(p, *, out_help: str, out_default: str, top_default: int, model_required: bool) -> None:
    p.add_argument("--data", metavar="CSV", required=model_required,
                   help="the data table (CSV with a header row), passed to the model file's data function")
    p.add_argument("--data-fn", metavar="NAME", default=DATA_FN,
                   help="function of the model file that turns the table into the model's arguments: "
                        "NAME(df: pandas.DataFrame) -> (args: tuple, kwargs: dict) (default: %(default)s)")
    p.add_argument("--out", metavar="PATH", default=out_default, help=out_help)
    p.add_argument("--var-name", metavar="NAME", default=None,
                   help="observed site to analyse; required when the model has several")
    p.add_argument("--id-column", metavar="COL", default=None,
                   help="column of the table that names the observations in the tables and figures")
    p.add_argument("--title", metavar="TEXT", default=None, help="title of report.html")
    p.add_argument("--nuts", action=argparse.BooleanOptionalAction, default=True,
                   help="run NUTS for the reference PSIS-LOO; --no-nuts uses draws from the Laplace "
                        "posterior instead (seconds instead of a minute or more; default: --nuts)")
    _add_sampling_options(p, draws_use="used")
    p.add_argument("--top", metavar="N", type=_non_negative_int, default=top_default,
                   help="number of most influential observations (by MPE sensitivity) printed; report.html "
                        "lists at least 10 (default: %(default)s)")
    p.add_argument("--loo-checks", action="store_true",
                   help="add the LOO predictive checks (LOO-PIT calibration, LOO intervals, LOO-R2) to "
                        "report.html; their summary line is always printed and, for a folder, their two "
                        "figures always written")
    _add_quiet(p)


def _add_run(subparsers) -> argparse.ArgumentParser:
    """Register ``numpyro-mpe run FILE.py:NAME --data CSV``: a user's model, fitted and reported."""
    p = _add_parser(subparsers, "run",
                    "fit your own model (FILE.py:NAME) to a CSV table and write the report folder",
                    _RUN_DESCRIPTION, _RUN_EXAMPLES)
    p.add_argument("model", metavar="FILE.py[:NAME]",
                   help="the model file and the model's name in it (default name: model)")
    _add_model_options(p, out_help="directory for the report files, created if missing "
                                   "(default: %(default)s)",
                       out_default="mpe-report", top_default=5, model_required=True)
    return p


def _add_report(subparsers) -> argparse.ArgumentParser:
    """Register ``numpyro-mpe report``: one self-contained HTML file, for the demo's model or a user's."""
    p = _add_parser(subparsers, "report",
                    "write a self-contained HTML report (the demo data, or your model with --data)",
                    _REPORT_DESCRIPTION, _REPORT_EXAMPLES)
    p.add_argument("model", metavar="FILE.py[:NAME]", nargs="?", default=None,
                   help="the model file and the model's name in it; omitted: the demo's stack loss model")
    _add_model_options(p, out_help="the HTML file to write; a directory gets report.html inside "
                                   "(default: %(default)s)",
                       out_default="report.html", top_default=10, model_required=False)
    return p


#: Parser registrars of the subcommands, in the order ``--help`` lists them: ``add(subparsers) -> parser``.
PARSERS: dict[str, Callable[..., argparse.ArgumentParser]] = {"demo": _add_demo, "run": _add_run,
                                                              "report": _add_report}

__all__ = ["DATA_FN", "MODEL_FILE_HELP", "PARSERS", "PROG", "CLIError"]
