"""What the ``numpyro-mpe`` subcommands do: ``demo``, ``run`` and ``report``, each from its parsed arguments.

Each ``run_<command>(args)`` returns the exit status; a user's mistake raises
:class:`~numpyro_mpe.io.cli_arguments.CLIError`, which :func:`numpyro_mpe.io.cli.main` reports in one line.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from numpyro_mpe import __version__
from numpyro_mpe.io.cli_analysis import Analysis
from numpyro_mpe.io.cli_arguments import PROG, CLIError
from numpyro_mpe.io.model_file import ModelInputs, user_inputs

#: The title of the demo's report.
DEMO_TITLE = "MPE sensitivity report: stack loss (demo)"


@contextlib.contextmanager
def _nuts_process(args: argparse.Namespace, nuts: bool) -> Iterator:
    """The NUTS reference's second process (:class:`~numpyro_mpe.io.nuts_reference.NutsProcess`), started
    before this one imports JAX and NumPyro so that it imports them meanwhile; ``None`` when NUTS is off, runs
    in this process (``--nuts-in-process``) or cannot start.  A command that fails in the block, before the
    process has its job, tells it to leave."""
    process = None
    if nuts and not getattr(args, "nuts_in_process", False):
        from numpyro_mpe.io.nuts_reference import NutsProcess

        try:
            process = NutsProcess()
        except OSError:  # NutsJob tries again, and samples here if that fails too
            pass
    try:
        yield process
    except BaseException:
        if process is not None:
            process.drop()
        raise


def _setup() -> None:
    """Headless figures and float64 (the accuracy the MPE closed forms are checked to)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpyro

    numpyro.enable_x64()


def _demo_inputs() -> ModelInputs:
    """The bundled stack loss data and the demo's model."""
    from numpyro_mpe.io.datasets import load_stackloss, stackloss_inputs, stackloss_model

    df = load_stackloss()
    return ModelInputs(stackloss_model, *stackloss_inputs(df), table=df,
                       where="numpyro_mpe.io.datasets.stackloss_model",
                       data=f"stack loss (bundled, N = {len(df)})")


def run_folder(inputs: ModelInputs, args: argparse.Namespace, *, nuts: bool, var_name: str | None = None,
               title: str | None = None, meta: dict | None = None, nuts_process=None) -> int:
    """Fit, compare, write the report folder ``args.out`` and print the summary (``demo`` and ``run``).

    Parameters
    ----------
    inputs : ModelInputs
        The model and its data.
    args : argparse.Namespace
        The command's arguments (``out``, the sampling options, ``top``, ``quiet``).
    nuts : bool
        Run NUTS for the reference PSIS-LOO.
    var_name : str, optional
        The observed site (``--var-name``).
    title, meta : optional
        Of ``report.html``.
    nuts_process : NutsProcess, optional
        The NUTS reference's second process, started earlier (:func:`_nuts_process`).

    Returns
    -------
    int
        0.  A ``--out`` that exists and is no directory, a bad ``--var-name`` and an ``--id-column`` of the
        wrong length raise :class:`CLIError` before any fit (and before ``--out`` is created).

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.cli_commands import run_folder
    >>> from numpyro_mpe.io.model_file import user_inputs
    >>> args = build_parser().parse_args(["run", "examples/user_model.py", "--data", "examples/user_data.csv",
    ...                                   "--out", "crime", "--no-nuts"])
    >>> run_folder(user_inputs(args), args, nuts=False)  # doctest: +SKIP
    0
    """
    t_start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out '{out}' exists and is not a directory")
    an = Analysis(inputs.model, inputs.args, inputs.kwargs, args, nuts=nuts, nuts_process=nuts_process)
    labels = an.checked_labels(inputs, var_name)  # NUTS starts; --var-name and --id-column before any fit
    out.mkdir(parents=True, exist_ok=True)
    an.run(export=True)
    with an.steps("writing the report"):
        paths = an.write_folder(out, labels=labels, title=title, meta=meta)
    print()
    print(an.summary(labels))
    print()
    print(f"Files written to {out}/ ({time.perf_counter() - t_start:.1f} s in all):")
    for path in paths:
        print(f"  {path}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe demo``: fit the bundled stack loss data, compare with PSIS-LOO, write the folder.

    Parameters
    ----------
    args : argparse.Namespace
        The ``demo`` options from :func:`numpyro_mpe.io.cli.build_parser`.

    Returns
    -------
    int
        The exit status, 0.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.cli_commands import run_demo
    >>> run_demo(build_parser().parse_args(["demo", "--no-nuts", "--quiet"]))  # doctest: +SKIP
    0
    """
    with _nuts_process(args, not args.no_nuts) as process:
        _setup()
        from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS

        inputs = _demo_inputs()
        if not args.quiet:
            print(f"{PROG} {__version__} demo: stack loss data (N = {len(inputs.table)}), model "
                  f"stack.loss ~ Normal(alpha + z(X) beta, sigma), z = standardized "
                  f"{', '.join(STACKLOSS_PREDICTORS)}", flush=True)
        return run_folder(inputs, args, nuts=not args.no_nuts, title=DEMO_TITLE,
                          meta={"command": f"{PROG} demo", "data": inputs.data}, nuts_process=process)


def _user_title(args: argparse.Namespace, inputs: ModelInputs) -> str:
    return args.title or f"MPE sensitivity report: {Path(inputs.where).name}"


def run_user(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe run FILE.py:NAME --data CSV``: a user's model, fitted, compared and reported.

    Parameters
    ----------
    args : argparse.Namespace
        The ``run`` options: the model file, ``--data`` and the rest (see ``numpyro-mpe run --help``).

    Returns
    -------
    int
        0 once the report folder is written; a mistake in the model file, the table or the options raises
        :class:`CLIError` first.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.cli_commands import run_user
    >>> args = build_parser().parse_args(["run", "model.py", "--data", "table.csv", "--no-nuts"])
    >>> run_user(args)  # doctest: +SKIP
    0
    """
    with _nuts_process(args, args.nuts) as process:
        _setup()
        inputs = user_inputs(args)
        df = inputs.table
        if not args.quiet:
            print(f"{PROG} {__version__} run: {inputs.where} on {args.data} ({len(df)} rows, "
                  f"{df.shape[1]} columns)", flush=True)
        return run_folder(inputs, args, nuts=args.nuts, var_name=args.var_name,
                          title=_user_title(args, inputs), meta={"model": inputs.where, "data": inputs.data},
                          nuts_process=process)


def _report_inputs(args: argparse.Namespace) -> tuple[ModelInputs, str]:
    """The model of ``numpyro-mpe report`` (the demo's without ``FILE.py``) and the report's title."""
    if args.model is not None:
        if args.data is None:
            raise CLIError(f"a model needs its data: numpyro-mpe report {args.model} --data CSV")
        inputs = user_inputs(args)
        return inputs, _user_title(args, inputs)
    if args.data is not None or args.id_column is not None:
        raise CLIError(f"{'--data' if args.data is not None else '--id-column'} needs a model and its "
                       "data: numpyro-mpe report FILE.py:NAME --data CSV")
    return _demo_inputs(), args.title or DEMO_TITLE


def run_report(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe report``: one HTML file for the demo's model, or for a user's with ``--data``.

    Parameters
    ----------
    args : argparse.Namespace
        The ``report`` options; ``args.out`` is the file to write, or a folder that gets ``report.html``.

    Returns
    -------
    int
        0, after printing the elpd_loo totals and the path written.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.cli_commands import run_report
    >>> run_report(build_parser().parse_args(["report", "--out", "demo.html", "--no-nuts"]))  # doctest: +SKIP
    0
    """
    t_start = time.perf_counter()
    with _nuts_process(args, args.nuts) as process:
        _setup()
        inputs, title = _report_inputs(args)
        out = Path(args.out)
        if out.is_dir():
            out = out / "report.html"
        if not args.quiet:
            print(f"{PROG} {__version__} report: {inputs.where} ({len(inputs.table)} rows)", flush=True)
        an = Analysis(inputs.model, inputs.args, inputs.kwargs, args, nuts=args.nuts, nuts_process=process)
        # NUTS starts; --var-name, --id-column before any fit
        labels = an.checked_labels(inputs, args.var_name)
    an.run()
    with an.steps("writing the report"):
        path = an.write_html(out, labels=labels, title=title,
                             meta={"model": inputs.where, "data": inputs.data})
    s = an.table.attrs["summary"]
    print()
    print(f"elpd_loo: MPE {s['elpd_loo_mpe']:.2f} (SE {s['se_elpd_loo_mpe']:.2f}), "
          f"PSIS {s['elpd_loo_psis']:.2f} (SE {s['se_elpd_loo_psis']:.2f}); above 0.7: "
          f"leverage {s['n_high_leverage']}, "
          f"k-hat {s['n_high_khat']}")
    print(f"Report written to {path} ({time.perf_counter() - t_start:.1f} s in all)")
    return 0


__all__ = ["DEMO_TITLE", "run_demo", "run_folder", "run_report", "run_user"]
