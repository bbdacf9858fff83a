"""The LOO predictive checks of a fit for the report, the command line and the report folder.

:class:`PredictiveChecks` computes, once per observed site, the LOO-PIT with its calibration tests, the LOO
means and the central LOO predictive intervals (:mod:`numpyro_mpe.loo.predictive`: no sampling) and LOO-R²,
and gives them as one line of text (:meth:`PredictiveChecks.line`), an HTML section
(:meth:`PredictiveChecks.section`) and two figures (:meth:`PredictiveChecks.figures`).  A site where the
checks are not defined (no predictor, vector observations, a distribution without a CDF) gets the reason
instead.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from numpyro_mpe.errors import MPEError
from numpyro_mpe.io.predictive_plots import p_value, plot_loo_intervals, plot_loo_pit
from numpyro_mpe.io.report_html import card_html, figure_html, png_data_uri

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Probability inside the LOO predictive intervals of the report.
INTERVAL_PROB = 0.9


@dataclass
class PredictiveChecks:
    """LOO predictive checks of one observed site (or the reason there are none, ``error``)."""

    var_name: str
    pit: Any = None  # loo_pit Dataset
    mean: Any = None  # LOO means (DataArray)
    interval: Any = None  # loo_predictive_interval DataArray
    r2: Any = None  # loo_R2 namedtuple
    error: str | None = None

    @classmethod
    def compute(cls, fit: Fit, var_name: str | None = None, *, rng_key=None) -> PredictiveChecks:
        """The checks of ``var_name`` (warnings of invalid cavities are left to the caller's summary).

        Parameters
        ----------
        fit : Fit
            The fitted model whose MPE cavities give the LOO predictives.
        var_name : str, optional
            The observed site to check (required when the model has several).
        rng_key : jax.random.PRNGKey, optional
            Key of the randomized PIT of a discrete outcome (:func:`numpyro_mpe.loo.predictive.loo_pit`).

        Returns
        -------
        PredictiveChecks
            The PIT with its tests, the 90% intervals, the LOO means and the LOO-R².

        Examples
        --------
        >>> from numpyro_mpe.io.toy import line_fit
        >>> from numpyro_mpe.io.predictive_report import PredictiveChecks
        >>> fit, x = line_fit()
        >>> checks = PredictiveChecks.compute(fit)
        >>> checks.line().startswith("LOO predictive checks of 'y': LOO-PIT")
        True
        """
        from numpyro_mpe.loo.predictive import (
            interval_probs,
            loo_expectations,
            loo_pit,
            loo_predictive_interval,
            loo_r2,
        )
        from numpyro_mpe.loo.predictive_values import predictive_values

        name = fit.adapter.observed_site(var_name).name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:  # one pass with every functional below: each call takes its outputs from it
                    predictive_values(fit, name, ("pit", "moments", "quantiles"),
                                      interval_probs(INTERVAL_PROB))
                except MPEError:
                    pass  # a functional is not defined here: the calls below say which
                pit = loo_pit(fit, name, rng_key=rng_key)
                mean, _ = loo_expectations(fit, name)
                interval = loo_predictive_interval(fit, name, INTERVAL_PROB)
                r2 = loo_r2(fit, name)
        except MPEError as err:
            return cls(name, error=str(err))
        return cls(name, pit, mean, interval, r2)

    def line(self) -> str:
        """One line of text: the calibration tests, the intervals' coverage and LOO-R²."""
        if self.error is not None:
            return f"LOO predictive checks of '{self.var_name}': not available ({self.error})"
        a = self.pit.attrs
        verdict = "outside the band: miscalibrated" if a["ecdf_reject"] else "inside the band"
        cover = self.interval.attrs["coverage"]
        return (f"LOO predictive checks of '{self.var_name}': LOO-PIT ECDF test "
                f"p {p_value(a['ecdf_pvalue'])} ({verdict} at {a['band_prob']:.0%}), "
                f"KS p {p_value(a['ks_pvalue'])}; "
                f"{INTERVAL_PROB:.0%} LOO intervals cover {cover:.0%} of the observations; "
                f"LOO-R2 {self.r2.mean:.3f} [{self.r2.eti_lb:.3f}, {self.r2.eti_ub:.3f}]")

    def figures(self, y) -> tuple:
        """The LOO-PIT ECDF figure and the LOO intervals figure against the observations ``y``."""
        ax1 = plot_loo_pit(self.pit, prob=float(self.pit.attrs["band_prob"]))
        ax2 = plot_loo_intervals(self.interval, y, mean=self.mean)
        return ax1.figure, ax2.figure

    def section(self, y) -> list[str]:
        """The report's section ``#predictive``: cards, the two figures and how to read them."""
        head = ['<section id="predictive"><h2>LOO predictive checks</h2>']
        if self.error is not None:
            return head + [f"<p>Not available for <code>{html.escape(self.var_name)}</code>: "
                           f"{html.escape(self.error)}</p>", "</section>"]
        a = self.pit.attrs
        cover = self.interval.attrs["coverage"]
        fig_pit, fig_int = self.figures(y)
        return head + [
            "<p>Each observation's leave-one-out predictive p(ỹ<sub>i</sub> | y<sub>−i</sub>), from its MPE "
            "cavity integrated over the likelihood's parameters (no sampling). Under a well-specified model "
            "the LOO-PIT values are uniform and about "
            f"{INTERVAL_PROB:.0%} of the observations fall inside their {INTERVAL_PROB:.0%} interval.</p>",
            '<div class="cards">',
            card_html("LOO-PIT calibration", f"p {p_value(a['ecdf_pvalue'])}",
                      f"simultaneous {a['band_prob']:.0%} ECDF band: "
                      + ("the ECDF leaves it" if a["ecdf_reject"] else "inside")
                      + f" · KS p {p_value(a['ks_pvalue'])}", alert=bool(a["ecdf_reject"])),
            card_html(f"{INTERVAL_PROB:.0%} LOO intervals", f"{cover:.0%} <small>cover y</small>",
                      f"{len(np.ravel(y))} observations"),
            card_html("LOO-R²", f"{self.r2.mean:.3f}",
                      f"89% interval [{self.r2.eti_lb:.3f}, {self.r2.eti_ub:.3f}]"),
            "</div>",
            '<div class="grid2">',
            figure_html(png_data_uri(fig_pit), "LOO-PIT ECDF difference",
                        "<b>LOO-PIT.</b> The ECDF of the PIT values minus the uniform CDF, with the "
                        "simultaneous band a well-calibrated model stays inside. A ∪-shape (up near 0, down "
                        "near 1) means predictives too narrow (overdispersion); ∩ too wide; one long "
                        "excursion a bias."
                        + (" Randomized for a discrete outcome." if a.get("randomized") else "")),
            figure_html(png_data_uri(fig_int), "LOO predictive intervals",
                        f"<b>{INTERVAL_PROB:.0%} LOO predictive intervals</b> of every observation, ordered "
                        "by the LOO mean (ticks), with the observation on top; magenta: outside."),
            "</div></section>",
        ]


__all__ = ["INTERVAL_PROB", "PredictiveChecks"]
