"""The analysis a ``numpyro-mpe`` command runs on one model, and the files it writes.

:class:`Analysis` checks the observed site it is asked for (``--var-name``) before any fit, then fits the
model (Laplace), computes the MPE sensitivities, optionally runs NUTS, and compares with PSIS-LOO,
printing ``[i/n] what ... done in 1.2 s`` around each step (:class:`Steps`); then writes the report folder
(netCDF, CSV, figures, ``report.html``) or the HTML report alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from numpyro_mpe.io.cli_arguments import CLIError


class Steps:
    """Prints ``[i/n] what ... done in 1.2 s`` around each long step (nothing when ``quiet``).

    Examples
    --------
    >>> from numpyro_mpe.io.cli_analysis import Steps
    >>> steps = Steps(2, quiet=False)
    >>> with steps("Laplace fit"):  # doctest: +ELLIPSIS
    ...     pass
    [1/2] Laplace fit ... done in 0.0 s
    """

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


def _remove(path: Path) -> None:
    # netCDF writers append to or refuse an existing file on some backends: start afresh
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


class Analysis:
    """Laplace fit, MPE sensitivities, optionally NUTS, and the PSIS-LOO comparison of one model.

    Parameters
    ----------
    model : callable
        The NumPyro model.
    model_args, model_kwargs : tuple, dict
        Its data: ``model(*model_args, **model_kwargs)``.
    args : argparse.Namespace
        The command's arguments: ``draws``, ``chains``, ``warmup``, ``seed``, ``top`` and ``quiet``.
    nuts : bool
        Run NUTS for the reference posterior; else PSIS-LOO runs on draws from the Laplace q.
    nuts_process : NutsProcess, optional
        A second process started earlier, for NUTS to sample in
        (:class:`~numpyro_mpe.io.nuts_reference.NutsJob`).

    Examples
    --------
    >>> from pathlib import Path
    >>> from numpyro_mpe.io.cli import build_parser
    >>> from numpyro_mpe.io.cli_analysis import Analysis
    >>> from numpyro_mpe.io.datasets import stackloss_inputs, stackloss_model
    >>> args = build_parser().parse_args(["demo", "--no-nuts", "--quiet", "--draws", "300"])
    >>> an = Analysis(stackloss_model, *stackloss_inputs(), args, nuts=False)
    >>> an.observed_site("y").num_obs  # checked before the fit  # doctest: +SKIP
    21
    >>> an.run().write_folder(Path("report"))  # doctest: +SKIP
    >>> an.write_html(Path("report.html"), title="Stack loss")  # doctest: +SKIP
    >>> print(an.summary())  # doctest: +SKIP
    """

    def __init__(self, model, model_args: tuple, model_kwargs: dict, args: argparse.Namespace, *,
                 nuts: bool, nuts_process=None) -> None:
        import jax

        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs
        self.args, self.nuts, self.nuts_process = args, nuts, nuts_process
        self.num_draws = args.draws * args.chains
        # the fit, its sensitivities, NUTS, PSIS-LOO and writing the report
        self.steps = Steps(5 if nuts else 4, args.quiet)
        keys = jax.random.split(jax.random.PRNGKey(args.seed), 5)
        self.k_fit, self.k_nuts, self.k_psis, self.k_export, self.k_summary = keys
        self.site = None
        self.mcmc_idata = None
        self.checks = None
        self.nuts_job = None
        self.idata = None  # the fit's export, made once

    def observed_site(self, var_name: str | None):
        """The observed site to analyse, checked before any fit.

        Traces the model on its data as the fit will (a model it cannot handle raises
        :class:`~numpyro_mpe.errors.ModelError` here).

        Parameters
        ----------
        var_name : str or None
            ``--var-name``; ``None`` for the model's only observed site.

        Returns
        -------
        ObservedSite

        Raises
        ------
        CLIError
            ``var_name`` is not observed by the model, or is ``None`` and the model observes several
            sites; the message names ``--var-name`` and lists the observed sites.
        """
        from numpyro_mpe.model import ModelAdapter

        adapter = ModelAdapter.build(self.model, self.k_fit, self.model_args, self.model_kwargs)
        names = list(adapter.observed)
        if var_name is None and len(names) > 1:
            raise CLIError(f"the model has several observed sites {names}; pick one with --var-name")
        if var_name is not None and var_name not in adapter.observed:
            raise CLIError(f"--var-name '{var_name}' is not an observed site of the model; observed sites: "
                           f"{names}")
        self.site = adapter.observed[names[0] if var_name is None else var_name]
        return self.site

    def start_nuts(self) -> None:
        """Start the NUTS reference (when asked, and once): in a second process where the model pickles
        (unless ``--nuts-in-process``), sampling while this one checks, fits and computes the MPE outputs;
        :meth:`run` collects it."""
        if not self.nuts or self.nuts_job is not None:
            return
        import jax

        from numpyro_mpe.io.nuts_reference import NutsJob, NutsSettings

        args = self.args
        settings = NutsSettings(args.warmup, args.draws, args.chains, bool(jax.config.jax_enable_x64))
        self.nuts_job = NutsJob(self.model, self.model_args, self.model_kwargs, self.k_nuts, settings,
                                parallel=not getattr(args, "nuts_in_process", False),
                                process=self.nuts_process)
        self.nuts_process = None  # the job's now

    def checked_labels(self, inputs, var_name: str | None):
        """Start NUTS, then check ``--var-name`` and ``--id-column`` before any fit (stopping NUTS if either
        is wrong).

        Parameters
        ----------
        inputs : ModelInputs
            The model's inputs, with the ``--id-column`` table.
        var_name : str or None
            ``--var-name``.

        Returns
        -------
        pandas.Series or None
            One label per observation of the site (:meth:`ModelInputs.labels_for`).
        """
        self.start_nuts()
        try:
            return inputs.labels_for(self.observed_site(var_name))
        except BaseException:
            if self.nuts_job is not None:
                self.nuts_job.cancel()
            raise

    def run(self, *, export: bool = False) -> Analysis:
        """Fit, sensitivities of the observed site, NUTS (when asked) and the comparison.

        The site is the one :meth:`observed_site` checked, else the model's only one.  ``export``: the
        fit's ArviZ data will be written (:meth:`write_folder`): make it while NUTS samples in the other
        process.

        Returns
        -------
        Analysis
            ``self``, with ``fit``, ``site``, ``ds`` (the sensitivities), ``checks`` (the LOO predictive
            checks, :class:`~numpyro_mpe.io.predictive_report.PredictiveChecks`), ``mcmc_idata`` (NUTS, or
            ``None``) and ``table`` (:func:`numpyro_mpe.compare_psis` output).
        """
        from numpyro_mpe.inference import Laplace
        from numpyro_mpe.io.predictive_report import PredictiveChecks
        from numpyro_mpe.loo.compare import compare_psis

        self.start_nuts()
        name = (self.site or self.observed_site(None)).name
        args, steps = self.args, self.steps
        with steps("Laplace fit"):
            self.fit = Laplace(self.model, progress=not args.quiet).run(self.k_fit, *self.model_args,
                                                                        **self.model_kwargs)
        self.site = self.fit.adapter.observed[name]
        with steps("MPE sensitivities"):
            # the checks first: their one pass (every functional, and the shifts) gives the sensitivities too
            self.checks = PredictiveChecks.compute(self.fit, self.site.name)
            self.ds = self.fit.sensitivities(self.site.name)
        if self.nuts:
            self._run_nuts(export)
        suffix = "" if self.nuts else " (draws from the Laplace q)"
        with steps("PSIS-LOO comparison" + suffix):
            self.table = compare_psis(self.fit, self.mcmc_idata, var_name=self.site.name,
                                      num_samples=self.num_draws, rng_key=self.k_psis)
        return self

    def _run_nuts(self, export: bool) -> None:
        """Collect the NUTS draws (sampled beside the previous steps in a second process where possible)."""
        args, job = self.args, self.nuts_job
        here = job.where == "this process"
        what = (f"NUTS ({args.chains} chain(s) x {args.warmup} warmup + {args.draws} draws"
                + (")" if here else ", sampling in a second process since step 1)"))
        with self.steps(what, inline=args.quiet or not here):
            if not here:  # the report's parts that need no NUTS, while it samples
                if export:
                    self._export()
                from numpyro_mpe.loo.posterior_check import affordable, posterior_check

                if affordable(self.fit):  # the report's Gaussian check card
                    posterior_check(self.fit, self.site.name, warn=False)
            self.mcmc_idata = job.result(progress=not args.quiet)

    def _export(self):
        """The fit's ArviZ data (:meth:`numpyro_mpe.Fit.to_inference_data`), computed once."""
        if self.idata is None:
            self.idata = self.fit.to_inference_data(num_samples=self.num_draws, rng_key=self.k_export)
        return self.idata

    def write_html(self, path: Path, labels=None, title: str | None = None,
                   meta: dict | None = None) -> Path:
        """Write the HTML report of the analysis (:func:`numpyro_mpe.io.report.write_report`).

        Parameters
        ----------
        path : pathlib.Path
            The file.
        labels : pandas.Series, optional
            One label per observation (``--id-column``).
        title : str, optional
            Of the report.
        meta : dict, optional
            Shown under the title: the model, the data.

        Returns
        -------
        pathlib.Path
            ``path``; the report lists at least 10 observations, ``--top`` when more.
        """
        from numpyro_mpe.io.report import write_report

        return write_report(self.fit, path, idata=self.mcmc_idata, var_name=self.site.name, title=title,
                            top=max(10, self.args.top), comparison=self.table, labels=labels, meta=meta,
                            rng_key=self.k_summary,
                            predictive=self.checks if getattr(self.args, "loo_checks", False) else False)

    def write_folder(self, out: Path, labels=None, title: str | None = None,
                     meta: dict | None = None) -> list[Path]:
        """Write the report folder: inference_data.nc, nuts.nc, comparison.csv, five PNGs, report.html.

        Parameters
        ----------
        out : pathlib.Path
            An existing folder; files there of the same names are replaced.
        labels, title, meta : optional
            As for :meth:`write_html`; ``labels`` also becomes a column of comparison.csv.

        Returns
        -------
        list of pathlib.Path
            The files written, in that order (no nuts.nc without NUTS; loo_pit.png and loo_intervals.png,
            the LOO predictive checks, where the site has them).
        """
        from numpyro_mpe.io.plots import plot_elpd_comparison, plot_leverage_vs_k, plot_sensitivity

        paths = []
        for name, data in [("inference_data.nc", self._export()), ("nuts.nc", self.mcmc_idata)]:
            if data is not None:
                path = out / name
                _remove(path)
                data.to_netcdf(str(path))
                paths.append(path)
        path = out / "comparison.csv"
        table = self.table
        if labels is not None:
            table = table.copy()
            name = str(getattr(labels, "name", None) or "label")
            table.insert(len(self.site.dims), "label" if name in table.columns else name, list(labels))
        table.to_csv(path, index=True)  # the flat observation index, then the coordinates
        paths.append(path)
        paths.append(_save(plot_sensitivity(self.table)[0].figure, out / "sensitivity.png"))
        paths.append(_save(plot_elpd_comparison(self.table).figure, out / "elpd_mpe_vs_psis.png"))
        paths.append(_save(plot_leverage_vs_k(self.table).figure, out / "leverage_vs_k.png"))
        if self.checks is not None and self.checks.error is None:
            figs = self.checks.figures(self.site.flat_value)
            paths += [_save(fig, out / name) for fig, name in zip(figs, ("loo_pit.png", "loo_intervals.png"))]
        paths.append(self.write_html(out / "report.html", labels=labels, title=title, meta=meta))
        return paths

    def summary(self, labels=None) -> str:
        """The summary a command prints (:func:`numpyro_mpe.io.text_summary.summary_text`).

        Parameters
        ----------
        labels : pandas.Series, optional
            One label per observation, a column of the listing.

        Returns
        -------
        str
        """
        from numpyro_mpe.io.text_summary import summary_text

        text = summary_text(self.fit, self.site, self.table, self.mcmc_idata, self.args.top, self.k_summary,
                            labels)
        return text if self.checks is None else f"{text}\n\n{self.checks.line()}"


__all__ = ["Analysis", "Steps"]
