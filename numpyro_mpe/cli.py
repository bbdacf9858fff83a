"""The ``numpyro-mpe`` command.

``numpyro-mpe demo`` fits Brownlee's stack loss data with a Laplace approximation, computes the MPE
leave-one-out sensitivities, runs NUTS for the PSIS-LOO reference, and writes a small report (netCDF,
CSV and figures).  Subcommands live in :data:`COMMANDS`; add one by writing ``_add_<name>(subparsers)``
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

from . import __version__

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
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


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


def _fmt(x: float, spec: str = ".3f") -> str:
    return "nan" if x is None or not np.isfinite(x) else format(x, spec)


def _draw_summary(draws: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and sd of every scalar component of ``draws`` (leading axis = draws)."""
    out = {}
    for name, value in draws.items():
        value = np.asarray(value)
        flat = value.reshape(value.shape[0], -1)
        for j in range(flat.shape[1]):
            index = ",".join(map(str, np.unravel_index(j, value.shape[1:])))
            label = name if value.ndim == 1 else f"{name}[{index}]"
            out[label] = (float(flat[:, j].mean()), float(flat[:, j].std(ddof=1)))
    return out


def _laplace_draws(fit, rng_key, num_samples: int = 4000) -> dict[str, np.ndarray]:
    """Draws of the latent sites in constrained space from the Laplace posterior q."""
    import jax

    theta = fit.posterior.sample(rng_key, num_samples)
    latent = [s.name for s in fit.adapter.latent]
    draws = jax.vmap(lambda t: fit.adapter.constrain(t, deterministic=False))(theta)
    return {k: np.asarray(draws[k]) for k in latent}


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# ---------------------------------------------------------------- demo
def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="fit the stack loss data, compare MPE with PSIS-LOO and write a report",
        description=(
            "Fit Brownlee's stack loss data (21 observations, bundled) with a Gaussian linear regression "
            "(numpyro_mpe.datasets.stackloss_model): a Laplace approximation gives the MPE leave-one-out "
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
    p.add_argument("--draws", metavar="N", type=_positive_int, default=1000,
                   help="NUTS draws per chain kept after warmup; draws x chains is also the number of draws "
                        "from the Laplace posterior exported (default: %(default)s)")
    p.add_argument("--chains", metavar="N", type=_positive_int, default=2,
                   help="NUTS chains, run one after the other (default: %(default)s)")
    p.add_argument("--warmup", metavar="N", type=_positive_int, default=1000,
                   help="NUTS warmup (adaptation) steps per chain (default: %(default)s)")
    p.add_argument("--seed", metavar="INT", type=_non_negative_int, default=0,
                   help="random seed (jax.random.PRNGKey) of the fit, the draws and NUTS "
                        "(default: %(default)s)")
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
    import matplotlib

    matplotlib.use("Agg")
    import jax
    import numpyro

    numpyro.enable_x64()
    from .compare import compare_psis
    from .datasets import STACKLOSS_PREDICTORS, STACKLOSS_RESPONSE, load_stackloss, stackloss_model
    from .inference import Laplace
    from .plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(4 if args.no_nuts else 5, args.quiet)
    t_start = time.perf_counter()

    df = load_stackloss()
    X = df[list(STACKLOSS_PREDICTORS)].to_numpy(float)
    y = df[STACKLOSS_RESPONSE].to_numpy(float)
    k_fit, k_nuts, k_psis, k_export, k_summary = jax.random.split(jax.random.PRNGKey(args.seed), 5)
    if not args.quiet:
        print(f"{PROG} {__version__} demo: stack loss data (N = {len(df)}), model "
              f"stack.loss ~ Normal(alpha + z(X) beta, sigma), z = standardized "
              f"{', '.join(STACKLOSS_PREDICTORS)}", flush=True)

    with steps("Laplace fit"):
        fit = Laplace(stackloss_model, progress=not args.quiet).run(k_fit, X, y=y)
    with steps("MPE sensitivities"):
        ds = fit.sensitivities()

    mcmc_idata = None
    if not args.no_nuts:
        import arviz as az
        from numpyro.infer import MCMC, NUTS

        what = f"NUTS ({args.chains} chain(s) x {args.warmup} warmup + {args.draws} draws)"
        with steps(what, inline=args.quiet):
            mcmc = MCMC(NUTS(stackloss_model), num_warmup=args.warmup, num_samples=args.draws,
                        num_chains=args.chains, chain_method="sequential", progress_bar=not args.quiet)
            mcmc.run(k_nuts, X, y=y)
            mcmc_idata = az.from_numpyro(mcmc, log_likelihood=True)

    with steps("PSIS-LOO comparison" + ("" if mcmc_idata is not None else " (draws from the Laplace q)")):
        table = compare_psis(fit, mcmc_idata, num_samples=args.draws * args.chains, rng_key=k_psis)

    with steps("writing the report"):
        paths = _write_report(out, fit, table, ds, mcmc_idata, args.draws * args.chains, k_export,
                              plot_sensitivity, plot_elpd_comparison, plot_leverage_vs_k)

    print()
    print(_report(fit, ds, table, y, mcmc_idata, args, k_summary))
    print()
    print(f"Files written to {out}/ ({time.perf_counter() - t_start:.1f} s in all):")
    for path in paths:
        print(f"  {path}")
    return 0


def _write_report(out: Path, fit, table, ds, mcmc_idata, num_samples: int, rng_key,
                  plot_sensitivity: Callable, plot_elpd_comparison: Callable,
                  plot_leverage_vs_k: Callable) -> list[Path]:
    paths = []
    idata = fit.to_inference_data(num_samples=num_samples, rng_key=rng_key)
    path = out / "inference_data.nc"
    _remove(path)
    idata.to_netcdf(str(path))
    paths.append(path)
    if mcmc_idata is not None:
        path = out / "nuts.nc"
        _remove(path)
        mcmc_idata.to_netcdf(str(path))
        paths.append(path)
    path = out / "comparison.csv"
    table.to_csv(path, index=True)  # the flat observation index, then the coordinates
    paths.append(path)
    axes = plot_sensitivity(ds)
    paths.append(_save(axes[0].figure, out / "sensitivity.png"))
    ax = plot_elpd_comparison(table)
    paths.append(_save(ax.figure, out / "elpd_mpe_vs_psis.png"))
    ax = plot_leverage_vs_k(table)
    paths.append(_save(ax.figure, out / "leverage_vs_k.png"))
    return paths


def _remove(path: Path) -> None:
    # netCDF writers append to or refuse an existing file on some backends: start afresh
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _report(fit, ds, table, y, mcmc_idata, args, rng_key) -> str:
    """The printed summary: the fit, the most influential observations, and the elpd_loo totals."""
    lines = []
    lap = _draw_summary(_laplace_draws(fit, rng_key))
    header = ["parameter", "Laplace mean", "sd"]
    nuts = {}
    if mcmc_idata is not None:
        post = mcmc_idata["posterior"]
        names = [s.name for s in fit.adapter.latent]
        nuts = _draw_summary({n: np.asarray(post[n]).reshape((-1,) + np.shape(post[n])[2:]) for n in names})
        header += ["NUTS mean", "sd"]
    rows = []
    for label, (m, s) in lap.items():
        row = [label, _fmt(m), _fmt(s)]
        if nuts:
            nm, ns = nuts.get(label, (float("nan"), float("nan")))
            row += [_fmt(nm), _fmt(ns)]
        rows.append(row)
    info = fit.info
    lines.append(f"Posterior (constrained space; Laplace: {info.get('steps', '?')} Newton steps, "
                 f"max |grad U| = {info.get('grad_norm', float('nan')):.1e})")
    lines.append(_table(rows, header))

    if args.top > 0:
        order = np.argsort(-np.nan_to_num(table["sensitivity"].to_numpy(float), nan=np.inf))[: args.top]
        rows = []
        for i in order:
            r = table.iloc[i]
            rows.append([str(int(i)), _fmt(float(y[i]), ".0f"), _fmt(r["sensitivity"]), _fmt(r["leverage"]),
                         _fmt(r["pareto_k"], ".2f"), _fmt(r["elpd_loo_mpe"], ".2f"),
                         _fmt(r["elpd_loo_psis"], ".2f")])
        lines.append("")
        lines.append(f"Most influential observations (top {len(order)} by MPE sensitivity; "
                     "leverage and k̂ flag at 0.7)")
        lines.append(_table(rows, ["index", "y", "sensitivity", "leverage", "k̂", "elpd_loo MPE",
                                   "elpd_loo PSIS"]))

    from .compare import format_summary

    lines.append("")
    lines.append(format_summary(table))
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point
#: Subcommand registrars, in the order ``--help`` lists them.
COMMANDS: dict[str, Callable] = {"demo": _add_demo}


def build_parser() -> argparse.ArgumentParser:
    """The ``numpyro-mpe`` argument parser with every subcommand of :data:`COMMANDS`.

    Returns
    -------
    argparse.ArgumentParser

    Examples
    --------
    >>> from numpyro_mpe.cli import build_parser
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
        Exit status (0 on success).  Argument errors exit with status 2 through ``argparse``.

    Examples
    --------
    >>> from numpyro_mpe.cli import main
    >>> main(["demo", "--out", "report", "--no-nuts", "--quiet"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
