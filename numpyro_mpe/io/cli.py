"""The ``numpyro-mpe`` command.

``numpyro-mpe demo`` fits Brownlee's stack loss data with a Laplace approximation, computes the MPE
leave-one-out sensitivities, runs NUTS for the PSIS-LOO reference, and writes a small report (netCDF,
CSV, figures and a self-contained ``report.html``).  ``numpyro-mpe run FILE.py:NAME --data CSV`` does the
same for a user's model file, which also defines ``data(df) -> (args, kwargs)`` building the model's
arguments from the table; ``numpyro-mpe report`` writes only the HTML report (the demo's model by
default).  Subcommands live in :data:`COMMANDS`; add one by writing ``_add_<name>(subparsers)``
that registers its parser with ``set_defaults(func=...)``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from numpyro_mpe import __version__

PROG = "numpyro-mpe"


# ---------------------------------------------------------------- small utilities
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


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


class _Steps:
    """Prints ``[i/n] what ... done in 1.2 s`` around each long step (nothing when quiet)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet, self.i = total, quiet, 0

    @contextlib.contextmanager
    def __call__(self, what: str, inline: bool = True) -> Iterator[None]:
        self.i += 1
        head = f"[{self.i}/{self.total}] {what} ..."
        if not self.quiet:
            # a step with its own progress bar gets its own line, so that the bar does not break it
            print(head, end=" " if inline else "\n", flush=True)
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        if not self.quiet:
            print(f"done in {dt:.1f} s" if inline else f"{head} done in {dt:.1f} s", flush=True)


def _table(rows: list[list[str]], header: list[str], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one ``<`` or ``>`` per column (default: first left)."""
    align = align or "<" + ">" * (len(header) - 1)
    widths = [max(len(str(r[j])) for r in [header, *rows]) for j in range(len(header))]
    def line(r):
        return "  ".join(f"{str(c):{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------- demo
def _add_sampling_options(p, *, draws_use: str) -> None:
    """``--draws``, ``--chains``, ``--warmup`` and ``--seed``, shared by the subcommands that run NUTS."""
    p.add_argument("--draws", metavar="N", type=_positive_int, default=1000,
                   help="NUTS draws per chain kept after warmup; draws x chains is also the number of draws "
                        f"from the Laplace posterior {draws_use} (default: %(default)s)")
    p.add_argument("--chains", metavar="N", type=_positive_int, default=2,
                   help="NUTS chains, run one after the other (default: %(default)s)")
    p.add_argument("--warmup", metavar="N", type=_positive_int, default=1000,
                   help="NUTS warmup (adaptation) steps per chain (default: %(default)s)")
    p.add_argument("--seed", metavar="INT", type=_non_negative_int, default=0,
                   help="random seed (jax.random.PRNGKey) of the fit, the draws and NUTS "
                        "(default: %(default)s)")


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fit the stack loss data, compare MPE with PSIS-LOO and write a report",
        description=(
            "Fit Brownlee's stack loss data (21 observations, bundled) with a Gaussian linear regression "
            "(numpyro_mpe.io.datasets.stackloss_model): a Laplace approximation gives the MPE leave-one-out "
            "sensitivities, leverages and elpd_loo in closed form; NUTS gives the reference PSIS-LOO "
            "(arviz.loo). Prints the fit, the most influential observations and the elpd_loo totals, and "
            "writes inference_data.nc, nuts.nc, comparison.csv and three figures to --out."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} demo                          full run (about a minute)\n"
            f"  {PROG} demo --out /tmp/r --no-nuts   Laplace only: PSIS-LOO on draws from q (seconds)\n"
            f"  {PROG} demo --draws 300 --warmup 300 --chains 1 --quiet"
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", default="mpe-report",
                   help="directory for the report files, created if missing (default: %(default)s)")
    _add_sampling_options(p, draws_use="exported")
    p.add_argument("--no-nuts", action="store_true",
                   help="skip NUTS: PSIS-LOO then uses draws from the Laplace posterior instead")
    p.add_argument("--top", metavar="N", type=_non_negative_int, default=5,
                   help="number of most influential observations (by MPE sensitivity) to list; 0 lists none "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines or bars; the results and file paths are still printed")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe demo`` with parsed ``args``; returns the exit status."""
    _setup()
    from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS, load_stackloss, stackloss_model

    df = load_stackloss()
    model_args, model_kwargs = _stackloss_inputs(df)
    if not args.quiet:
        print(f"{PROG} {__version__} demo: stack loss data (N = {len(df)}), model "
              f"stack.loss ~ Normal(alpha + z(X) beta, sigma), z = standardized "
              f"{', '.join(STACKLOSS_PREDICTORS)}", flush=True)
    return _run_folder(stackloss_model, model_args, model_kwargs, args, nuts=not args.no_nuts,
                       title="MPE sensitivity report: stack loss (demo)",
                       meta={"command": f"{PROG} demo", "data": "stack loss (bundled, N = 21)"})


def _stackloss_inputs(df) -> tuple[tuple, dict]:
    from numpyro_mpe.io.datasets import STACKLOSS_PREDICTORS, STACKLOSS_RESPONSE

    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df[STACKLOSS_RESPONSE].to_numpy(float)
    return (X,), {"y": y}


def _setup() -> None:
    """Headless figures and float64 (the accuracy the MPE closed forms are checked to)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpyro

    numpyro.enable_x64()


class _Analysis:
    """Laplace fit, MPE sensitivities, optionally NUTS, and the PSIS-LOO comparison of one model."""

    def __init__(self, model, model_args: tuple, model_kwargs: dict, args: argparse.Namespace, *,
                 nuts: bool, steps_after: int = 1) -> None:
        import jax

        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.args, self.nuts = args, nuts
        self.num_draws = args.draws * args.chains
        self.steps = _Steps((5 if nuts else 4) + steps_after - 1, args.quiet)
        keys = jax.random.split(jax.random.PRNGKey(args.seed), 5)
        self.k_fit, self.k_nuts, self.k_psis, self.k_export, self.k_summary = keys
        self.mcmc_idata = None

    def run(self, var_name: str | None = None) -> _Analysis:
        from numpyro_mpe.inference import Laplace
        from numpyro_mpe.loo.compare import compare_psis

        args, steps = self.args, self.steps
        with steps("Laplace fit"):
            self.fit = Laplace(self.model, progress=not args.quiet).run(self.k_fit, *self.model_args,
                                                                        **self.model_kwargs)
        self.site = self.fit.adapter.observed_site(var_name)
        with steps("MPE sensitivities"):
            self.ds = self.fit.sensitivities(self.site.name)
        if self.nuts:
            import arviz as az
            from numpyro.infer import MCMC, NUTS

            what = f"NUTS ({args.chains} chain(s) x {args.warmup} warmup + {args.draws} draws)"
            with steps(what, inline=args.quiet):
                mcmc = MCMC(NUTS(self.model), num_warmup=args.warmup, num_samples=args.draws,
                            num_chains=args.chains, chain_method="sequential", progress_bar=not args.quiet)
                mcmc.run(self.k_nuts, *self.model_args, **self.model_kwargs)
                self.mcmc_idata = az.from_numpyro(mcmc, log_likelihood=True)
        suffix = "" if self.nuts else " (draws from the Laplace q)"
        with steps("PSIS-LOO comparison" + suffix):
            self.table = compare_psis(self.fit, self.mcmc_idata, var_name=self.site.name,
                                      num_samples=self.num_draws, rng_key=self.k_psis)
        return self

    def write_html(self, path: Path, labels=None, title: str | None = None,
                   meta: dict | None = None) -> Path:
        from numpyro_mpe.io.report import write_report

        return write_report(self.fit, path, idata=self.mcmc_idata, var_name=self.site.name, title=title,
                            top=max(10, self.args.top), comparison=self.table, labels=labels, meta=meta,
                            rng_key=self.k_summary)

    def write_folder(self, out: Path, labels=None, title: str | None = None,
                     meta: dict | None = None) -> list[Path]:
        """inference_data.nc, nuts.nc, comparison.csv, three PNGs and report.html in ``out``."""
        from numpyro_mpe.io.plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity

        paths = []
        idata = self.fit.to_inference_data(num_samples=self.num_draws, rng_key=self.k_export)
        path = out / "inference_data.nc"
        _remove(path)
        idata.to_netcdf(str(path))
        paths.append(path)
        if self.mcmc_idata is not None:
            path = out / "nuts.nc"
            _remove(path)
            self.mcmc_idata.to_netcdf(str(path))
            paths.append(path)
        path = out / "comparison.csv"
        table = self.table
        if labels is not None:
            table = table.copy()
            name = str(getattr(labels, "name", None) or "label")
            table.insert(len(self.site.dims), "label" if name in table.columns else name, list(labels))
        table.to_csv(path, index=True)  # the flat observation index, then the coordinates
        paths.append(path)
        axes = plot_sensitivity(self.table)
        paths.append(_save(axes[0].figure, out / "sensitivity.png"))
        ax = plot_elpd_comparison(self.table)
        paths.append(_save(ax.figure, out / "elpd_mpe_vs_psis.png"))
        ax = plot_leverage_vs_k(self.table)
        paths.append(_save(ax.figure, out / "leverage_vs_k.png"))
        paths.append(self.write_html(out / "report.html", labels=labels, title=title, meta=meta))
        return paths

    def summary(self, labels=None) -> str:
        return _report(self.fit, self.site, self.table, self.mcmc_idata, self.args.top, self.k_summary,
                       labels)


def _run_folder(model, model_args: tuple, model_kwargs: dict, args: argparse.Namespace, *, nuts: bool,
                var_name: str | None = None, labels_from=None, title: str | None = None,
                meta: dict | None = None) -> int:
    """The demo and ``run``: fit, compare, write the report folder, print the summary."""
    t_start = time.perf_counter()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    an = _Analysis(model, model_args, model_kwargs, args, nuts=nuts).run(var_name)
    labels = None if labels_from is None else labels_from(an.site)
    with an.steps("writing the report"):
        paths = an.write_folder(out, labels=labels, title=title, meta=meta)
    print()
    print(an.summary(labels))
    print()
    print(f"Files written to {out}/ ({time.perf_counter() - t_start:.1f} s in all):")
    for path in paths:
        print(f"  {path}")
    return 0


def _remove(path: Path) -> None:
    # netCDF writers append to or refuse an existing file on some backends: start afresh
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _report(fit, site, table, mcmc_idata, top: int, rng_key, labels=None) -> str:
    """The printed summary: the fit, the most influential observations, and the elpd_loo totals."""
    from numpyro_mpe.io.format import format_number, value_formatter
    from numpyro_mpe.io.tables import posterior_summary

    lines = []
    post = posterior_summary(fit, mcmc_idata, rng_key=rng_key)
    header = ["parameter", "Laplace mean", "sd"]
    has_ref = "ref_mean" in post.columns
    if has_ref:
        header += ["NUTS mean", "sd"]
    rows = []
    for label, r in post.iterrows():
        row = [label, format_number(r["mean"]), format_number(r["sd"])]
        if has_ref:
            row += [format_number(r["ref_mean"]), format_number(r["ref_sd"])]
        rows.append(row)
    info = fit.info
    lines.append(f"Posterior (constrained space; Laplace: {info.get('steps', '?')} Newton steps, "
                 f"max |grad U| = {info.get('grad_norm', float('nan')):.1e})")
    lines.append(_table(rows, header))

    if top > 0:
        y = np.asarray(site.flat_value)
        fmt_y = value_formatter(y)
        order = np.argsort(-np.nan_to_num(table["sensitivity"].to_numpy(float), nan=np.inf),
                           kind="stable")[:top]
        multi = len(site.dims) > 1
        head = ["index"] + (list(site.dims) if multi else [])
        if labels is not None:
            head.append(str(getattr(labels, "name", None) or "label"))
        head += [site.name, "sensitivity", "leverage", "k̂", "elpd_loo MPE", "elpd_loo PSIS"]
        rows = []
        for i in order:
            r = table.iloc[i]
            row = [str(int(i))] + ([str(r[d]) for d in site.dims] if multi else [])
            if labels is not None:
                row.append(str(list(labels)[i]))
            row += [fmt_y(y[i]), format_number(r["sensitivity"]), format_number(r["leverage"]),
                    format_number(r["pareto_k"], ".2f"), format_number(r["elpd_loo_mpe"], ".2f"),
                    format_number(r["elpd_loo_psis"], ".2f")]
            rows.append(row)
        n_text = len(head) - 6
        lines.append("")
        lines.append(f"Most influential observations (top {len(order)} by MPE sensitivity; "
                     "leverage and k̂ flag at 0.7)")
        lines.append(_table(rows, head, "<" * n_text + ">" * 6))

    from numpyro_mpe.loo.compare import format_summary

    lines.append("")
    lines.append(format_summary(table))
    return "\n".join(lines)


# ---------------------------------------------------------------- user models: run and report
class CLIError(Exception):
    """A user error the command reports in one line (exit status 1), without a traceback."""


#: Name of the function in a model file that builds the model's arguments from the data table.
DATA_FN = "data"


def _defined_names(module) -> list[str]:
    """Public callables defined in ``module`` itself (not imported), else all its public names."""
    own = [n for n, v in vars(module).items()
           if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__]
    return sorted(own) or sorted(n for n in vars(module) if not n.startswith("_"))


def _split_spec(spec: str) -> tuple[str, str]:
    """``path/to/file.py:name`` -> (path, name); ``name`` defaults to ``model``."""
    path_text, sep, attr = spec.rpartition(":")
    if not sep or not path_text or not attr.isidentifier():  # no ':name' (or a Windows drive letter)
        return spec, "model"
    return path_text, attr


def _import_file(path: Path):
    """Import the Python file ``path`` as a fresh module (its folder importable while it runs)."""
    import importlib.util
    import re
    import traceback

    name = "numpyro_mpe_user_" + re.sub(r"\W", "_", path.stem)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"'{path}' cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.modules[name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
        if line is None:
            frames = [f for f in traceback.extract_tb(exc.__traceback__)
                      if Path(f.filename).resolve() == path.resolve()]
            line = frames[-1].lineno if frames else None
        where = f" (line {line})" if line else ""
        raise CLIError(f"importing '{path}' failed{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(folder)
    return module


def load_user_model(spec: str, data_fn: str = DATA_FN):
    """The model and data function of a model file, from ``path/to/model.py:name``.

    Parameters
    ----------
    spec : str
        ``FILE.py:NAME``: the file and the model's name in it (``model`` when ``:NAME`` is omitted).
    data_fn : str, default "data"
        Name of the function ``data(df) -> (args, kwargs)`` in the same file.

    Returns
    -------
    tuple
        ``(model, data_function, path, name)``.

    Raises
    ------
    CLIError
        The file does not exist or fails to import, ``NAME`` or ``data_fn`` is not defined there (the
        message lists what is), or either is not callable.

    Examples
    --------
    >>> from numpyro_mpe.io.cli import load_user_model
    >>> model, data, path, name = load_user_model("examples/user_model.py:model")  # doctest: +SKIP
    """
    path_text, attr = _split_spec(spec)
    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"model file '{path_text}' not found")
    if not path.is_file():
        raise CLIError(f"model file '{path_text}' is not a file")
    module = _import_file(path)
    names = _defined_names(module)
    if not hasattr(module, attr):
        raise CLIError(f"'{path_text}' has no attribute '{attr}' (the model); it defines: "
                       f"{', '.join(names) or 'nothing'}. Name the model as {path_text}:NAME")
    model = getattr(module, attr)
    if not callable(model):
        raise CLIError(f"'{path_text}:{attr}' is a {type(model).__name__}, not a model function")
    fn = getattr(module, data_fn, None)
    if fn is None:
        raise CLIError(
            f"'{path_text}' has no function '{data_fn}' to build the model's arguments from the data table; "
            f"define `def {data_fn}(df): return args, kwargs` there (args a tuple, kwargs a dict, e.g. "
            f"((X,), {{'y': y}})), or name yours with --data-fn. It defines: {', '.join(names) or 'nothing'}")
    if not callable(fn):
        raise CLIError(f"'{path_text}:{data_fn}' is a {type(fn).__name__}, not a function")
    return model, fn, path, attr


def _read_csv(path_text: str):
    import pandas as pd

    path = Path(path_text)
    if not path.exists():
        raise CLIError(f"data file '{path_text}' not found")
    if not path.is_file():
        raise CLIError(f"data file '{path_text}' is not a file")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CLIError(f"cannot read '{path_text}' as CSV: {exc}") from exc


def _model_inputs(fn, df, where: str) -> tuple[tuple, dict]:
    from collections.abc import Mapping

    name = getattr(fn, "__name__", DATA_FN)
    try:
        out = fn(df)
    except Exception as exc:
        raise CLIError(f"{name}(df) in '{where}' raised {type(exc).__name__}: {exc} "
                       f"(the table's columns: {list(df.columns)})") from exc
    if (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list))
            and isinstance(out[1], Mapping)):
        return tuple(out[0]), dict(out[1])
    raise CLIError(f"{name}(df) in '{where}' must return (args, kwargs), a tuple of the model's positional "
                   f"arguments and a dict of its keyword arguments, e.g. ((X,), {{'y': y}}); got "
                   f"{type(out).__name__}")


def _labels_from(df, column: str | None):
    """A function of the observed site giving one label per observation from ``column``, or ``None``."""
    if column is None:
        return None
    if column not in df.columns:
        raise CLIError(f"--id-column '{column}' is not a column of the data; columns: {list(df.columns)}")
    values = df[column].astype(str).reset_index(drop=True)

    def labels(site):
        if len(values) != site.num_obs:
            raise CLIError(f"--id-column '{column}' has {len(values)} rows, the observed site '{site.name}' "
                           f"has {site.num_obs} observations")
        return values

    return labels


def _user_inputs(args: argparse.Namespace):
    """Model, its arguments and the labels from ``args.model`` and ``args.data``."""
    model, fn, path, name = load_user_model(args.model, args.data_fn)
    df = _read_csv(args.data)
    model_args, model_kwargs = _model_inputs(fn, df, str(path))
    return model, model_args, model_kwargs, _labels_from(df, args.id_column), df, f"{path}:{name}"


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
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines or bars; the results and file paths are still printed")


MODEL_FILE_HELP = (
    "A model file is a Python file defining the NumPyro model and a function that builds the model's "
    "arguments from the data table:\n"
    "\n"
    "    def model(X, y=None): ...                 # any NumPyro model\n"
    "    def data(df):                             # df: pandas.DataFrame read from --data\n"
    "        X = df[['x1', 'x2']].to_numpy(float)\n"
    "        return (X,), {'y': df['y'].to_numpy(float)}   # (args, kwargs) for model(*args, **kwargs)\n"
)


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="fit your own model (FILE.py:NAME) to a CSV table and write the report folder",
        description=(
            "Fit a NumPyro model from a Python file to a data table: a Laplace approximation gives the MPE "
            "leave-one-out sensitivities, leverages and elpd_loo in closed form; NUTS gives the reference "
            "PSIS-LOO (unless --no-nuts). Prints the fit, the most influential observations and the elpd_loo "
            "totals, and writes inference_data.nc, nuts.nc, comparison.csv, three figures and report.html "
            "to --out, as the demo does.\n\n" + MODEL_FILE_HELP
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} run examples/user_model.py:model --data examples/user_data.csv --id-column state\n"
            f"  {PROG} run my_model.py:model --data table.csv --out results --no-nuts --quiet"
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="FILE.py[:NAME]",
                   help="the model file and the model's name in it (default name: model)")
    _add_model_options(p, out_help="directory for the report files, created if missing "
                                   "(default: %(default)s)",
                       out_default="mpe-report", top_default=5, model_required=True)
    p.set_defaults(func=run_user)


def run_user(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe run`` with parsed ``args``; returns the exit status."""
    _setup()
    model, model_args, model_kwargs, labels, df, where = _user_inputs(args)
    if not args.quiet:
        print(f"{PROG} {__version__} run: {where} on {args.data} ({len(df)} rows, {df.shape[1]} columns)",
              flush=True)
    meta = {"model": where, "data": f"{args.data} ({len(df)} rows)"}
    title = args.title or f"MPE sensitivity report: {Path(where).name}"
    return _run_folder(model, model_args, model_kwargs, args, nuts=args.nuts, var_name=args.var_name,
                       labels_from=labels, title=title, meta=meta)


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report (the demo data, or your model with --data)",
        description=(
            "Write one self-contained HTML file (figures embedded, no external files or network): the MPE "
            "totals, the most influential observations, sensitivity and leverage figures, the comparison "
            "with PSIS-LOO, the posterior, and how to read them. Without FILE.py it reports on the demo's "
            "stack loss model; with FILE.py:NAME and --data on your model (see 'numpyro-mpe run').\n\n"
            + MODEL_FILE_HELP
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} report --out report.html --no-nuts       the demo data, in seconds\n"
            f"  {PROG} report examples/user_model.py:model --data examples/user_data.csv "
            "--id-column state --out crime.html"
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", metavar="FILE.py[:NAME]", nargs="?", default=None,
                   help="the model file and the model's name in it; omitted: the demo's stack loss model")
    _add_model_options(p, out_help="the HTML file to write; a directory gets report.html inside "
                                   "(default: %(default)s)",
                       out_default="report.html", top_default=10, model_required=False)
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    """Run ``numpyro-mpe report`` with parsed ``args``; returns the exit status."""
    _setup()
    t_start = time.perf_counter()
    if args.model is None:
        if args.data is not None or args.id_column is not None:
            raise CLIError(f"{'--data' if args.data is not None else '--id-column'} needs a model and its "
                           "data: numpyro-mpe report FILE.py:NAME --data CSV")
        from numpyro_mpe.io.datasets import load_stackloss, stackloss_model

        df = load_stackloss()
        model = stackloss_model
        model_args, model_kwargs = _stackloss_inputs(df)
        labels_from, where = None, "numpyro_mpe.io.datasets.stackloss_model"
        meta = {"model": where, "data": "stack loss (bundled, N = 21)"}
        title = args.title or "MPE sensitivity report: stack loss (demo)"
    else:
        if args.data is None:
            raise CLIError(f"a model needs its data: numpyro-mpe report {args.model} --data CSV")
        model, model_args, model_kwargs, labels_from, df, where = _user_inputs(args)
        meta = {"model": where, "data": f"{args.data} ({len(df)} rows)"}
        title = args.title or f"MPE sensitivity report: {Path(where).name}"
    out = Path(args.out)
    if out.is_dir():
        out = out / "report.html"
    if not args.quiet:
        print(f"{PROG} {__version__} report: {where} ({len(df)} rows)", flush=True)
    an = _Analysis(model, model_args, model_kwargs, args, nuts=args.nuts).run(args.var_name)
    labels = None if labels_from is None else labels_from(an.site)
    with an.steps("writing the report"):
        path = an.write_html(out, labels=labels, title=title, meta=meta)
    s = an.table.attrs["summary"]
    print()
    print(f"elpd_loo: MPE {s['elpd_loo_mpe']:.2f} (SE {s['se_elpd_loo_mpe']:.2f}), "
          f"PSIS {s['elpd_loo_psis']:.2f} (SE {s['se_elpd_loo_psis']:.2f}); above 0.7: "
          f"leverage {s['n_high_leverage']}, "
          f"k-hat {s['n_high_khat']}")
    print(f"Report written to {path} ({time.perf_counter() - t_start:.1f} s in all)")
    return 0


# ---------------------------------------------------------------- entry point
#: Subcommand registrars, in the order ``--help`` lists them.
COMMANDS: dict[str, Callable] = {"demo": _add_demo, "run": _add_run, "report": _add_report}


def build_parser() -> argparse.ArgumentParser:
    """The ``numpyro-mpe`` argument parser with every subcommand of :data:`COMMANDS`.

    Returns
    -------
    argparse.ArgumentParser

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
    for add in COMMANDS.values():
        add(sub)
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

    try:
        return int(args.func(args) or 0)
    except (CLIError, MPEError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
