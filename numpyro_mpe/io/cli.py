"""The ``numpyro-mpe`` command.

``numpyro-mpe demo`` fits Brownlee's stack loss data with a Laplace approximation, computes the MPE
leave-one-out sensitivities, runs NUTS for the PSIS-LOO reference, and writes a small report (netCDF,
CSV, figures and a self-contained ``report.html``).  ``numpyro-mpe run FILE.py:NAME --data CSV`` does the
same for a user's model file, which also defines ``data(df) -> (args, kwargs)`` building the model's
arguments from the table; ``numpyro-mpe report`` writes only the HTML report (the demo's model by
default).

The parts: the arguments in :mod:`~numpyro_mpe.io.cli_arguments`, what each subcommand does in
:mod:`~numpyro_mpe.io.cli_commands`, the analysis they run in :mod:`~numpyro_mpe.io.cli_analysis`, a
user's model file in :mod:`~numpyro_mpe.io.model_file`.  Add a subcommand by registering its parser in
:data:`~numpyro_mpe.io.cli_arguments.PARSERS` (``add(subparsers) -> parser``) and the function that runs
it (``run_<name>(args) -> int``) in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from numpyro_mpe import __version__
from numpyro_mpe.io.cli_arguments import PARSERS, PROG, CLIError
from numpyro_mpe.io.cli_commands import run_demo, run_report, run_user
from numpyro_mpe.io.model_file import load_user_model

#: The function that runs each subcommand of :data:`numpyro_mpe.io.cli_arguments.PARSERS`.
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"demo": run_demo, "run": run_user,
                                                            "report": run_report}


def build_parser() -> argparse.ArgumentParser:
    """The ``numpyro-mpe`` argument parser with every subcommand of :data:`COMMANDS`.

    Returns
    -------
    argparse.ArgumentParser
        Parsed arguments carry ``command`` (the subcommand's name) and ``func`` (the function that runs it).

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> args = build_parser().parse_args(["demo", "--draws", "200", "--no-nuts"])
    >>> args.command, args.draws, args.no_nuts, args.chains
    ('demo', 200, True, 2)
    """
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Memory-perturbation (MPE) leave-one-out sensitivities for NumPyro models: how much the fit "
            "depends on each observation, in closed form from a Gaussian posterior, compared with "
            "PSIS-LOO. Run 'numpyro-mpe demo' for a worked example on the stack loss data."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    for name, add in PARSERS.items():
        add(sub).set_defaults(func=COMMANDS[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``numpyro-mpe`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        Exit status: 0 on success; 1 on a user error (a missing file, a model or data function the model
        file lacks, a model the package cannot handle), reported in one line on stderr; argument errors exit
        with status 2 through ``argparse``.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import main
    >>> main(["demo", "--out", "report", "--no-nuts", "--quiet"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from numpyro_mpe.errors import MPEError
    from numpyro_mpe.programs import add_cpu_xla_flag

    add_cpu_xla_flag()  # NUTS's programs compile faster too, here and in the reference's process (inherited)

    try:
        return int(args.func(args) or 0)
    except (CLIError, MPEError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


__all__ = ["COMMANDS", "CLIError", "build_parser", "load_user_model", "main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
