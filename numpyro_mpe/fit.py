"""The result of fitting a Gaussian posterior to a NumPyro model, and its MPE outputs."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
import xarray as xr

from numpyro_mpe.engine.layout import Layout, auto_chunk_size
from numpyro_mpe.engine.memories import (
    Memories,
    MemorySpec,
    PredictorState,
    exact_memories,
    expected_memories,
    factored_memories,
    predictor_state,
)
from numpyro_mpe.engine.site import PassOptions, SiteMPE, memory_pass, predictor_pass
from numpyro_mpe.engine.terms import SiteData
from numpyro_mpe.gaussian import GaussianPosterior
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.rows import row_plan
from numpyro_mpe.options import MPEOptions
from numpyro_mpe.programs import track


def _split_rows(res: SiteMPE, sizes: list) -> list:
    """A :class:`SiteMPE` over stacked rows cut into consecutive parts of ``sizes`` rows."""
    if len(sizes) == 1:
        return [res]
    ends = np.cumsum(sizes)
    out = []
    for lo, hi in zip(ends - np.asarray(sizes), ends):
        def cut(x, lo=lo, hi=hi):  # on the host: slicing device arrays would compile a program per offset
            return None if x is None else np.asarray(x)[lo:hi]

        rows = ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage", "valid", "shift", "prediction_shift",
                "prediction_var")
        fields = {f: cut(getattr(res, f)) for f in rows}
        extra = None if res.extra is None else {k: cut(v) for k, v in res.extra.items()}
        out.append(res._replace(**fields, extra=extra))
    return out


#: Per-observation outputs of :meth:`Fit.sensitivities` (the public contract).
OUTPUTS = ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage")
#: Rows per chunk of the passes over held memories (dense P×P per row).
MEMORY_CHUNK = 4096


class Fit:
    """A NumPyro model, its data, and a Gaussian posterior q = N(m, S⁻¹) in unconstrained space.

    Created by :class:`numpyro_mpe.Laplace`, :class:`numpyro_mpe.SVI` and :class:`numpyro_mpe.NGVI`.
    Per-observation MPE outputs are computed on first use for each observed site and cached.

    Attributes
    ----------
    adapter : ModelAdapter
        The model as functions of the flat unconstrained θ.
    posterior : GaussianPosterior
        Mean and precision (full, diagonal or low-rank plus diagonal).
    method : str
        ``"laplace"``, ``"svi"``, ``"ngvi"`` or ``"checkpoint"``.
    info : dict
        Diagnostics of the fit (optimizer steps, gradient norm, ...), and under ``"compile"`` the programs
        compiled by each call and the seconds they took (:func:`numpyro_mpe.programs.track`).
    memories_spec : MemorySpec
        How the memories are taken (delta method at the mean, through the predictor, or expectations under q).
    refit : object, optional
        The backend's refit without observations (``refit.runner``/``refit(fit, weights)``), used by
        :func:`numpyro_mpe.exact_loo` for variational fits.
    options : MPEOptions
        Chunk size, Monte Carlo draws, progress bars, curvature and devices of the passes.
    site_data : dict, optional
        Observed sites' rows already laid out in chunks (:class:`~numpyro_mpe.engine.terms.SiteData`, by
        site name), e.g. by a streamed fit: the data are placed once.
    """

    def __init__(self, adapter: ModelAdapter, posterior: GaussianPosterior, method: str,
                 info: dict | None = None, *, memories: MemorySpec | None = None, refit=None,
                 options: MPEOptions | None = None, site_data: dict | None = None):
        self.adapter = adapter
        self.posterior = posterior
        self.method = method
        self.info = dict(info or {})
        self.info.setdefault("compile", {})
        self.memories_spec = memories or MemorySpec()
        self.refit = refit
        self.options = options or MPEOptions()
        self._cache: dict[Any, Any] = {("site_data", k): v for k, v in (site_data or {}).items()}

    def __repr__(self) -> str:
        sites = ", ".join(f"{n}{s.obs_shape}" for n, s in self.adapter.observed.items())
        check = self.info.get("posterior_check")
        khat = (f", global k̂={check.khat:.2f}{'' if check.reliable else ' (q is NOT the posterior)'}"
                if check is not None else "")
        return f"Fit(method={self.method!r}, P={self.adapter.num_params}, observed=[{sites}]{khat})"

    # ------------------------------------------------------------ options, for callers
    progress = property(lambda self: self.options.progress, doc="Progress bars on long passes.")
    refit_fn = property(lambda self: self.refit, doc="The former name of :attr:`refit`.")
    curvature = property(lambda self: self.options.curvature, doc="'exact' or 'ggn'.")
    observed_names = property(lambda self: list(self.adapter.observed), doc="The observed sites.")

    def chunk_size(self, var_name: str | None = None) -> int:
        """Rows per chunk of the passes over ``var_name``: the option, else sized by memory."""
        if self.options.chunk_size is not None:
            return self.options.chunk_size
        site = self.adapter.observed_site(var_name)
        k = site.predictor.num_eta if site.predictor is not None else 1
        return auto_chunk_size(self.adapter.num_params, k, self.adapter.structure.dtype.itemsize)

    # ------------------------------------------------------------ the site's engine
    def site_group(self, var_name: str) -> tuple:
        """The observed sites whose pass runs with ``var_name``'s in one program: sites with an equal
        predictor (class, parameters, shapes) whose rows fit in one chunk together — a model written as a
        loop over time steps or groups then compiles one program for all of them.  ``(var_name,)``
        otherwise."""
        site = self.adapter.observed[var_name]
        if site.predictor is None or (self.options.devices is not None and len(self.options.devices) > 1):
            return (var_name,)
        members = tuple(n for n, s in self.adapter.observed.items()
                        if s.predictor is not None and s.predictor == site.predictor
                        and s.event_shape == site.event_shape)
        total = sum(self.adapter.observed[n].num_obs for n in members)
        if len(members) < 2 or total > self.chunk_size(var_name):
            return (var_name,)
        return members

    def site_data(self, var_name: str | None = None, stream: bool = False) -> SiteData:
        """The rows of ``var_name`` laid out in chunks (a site with a predictor; with the other sites of its
        :meth:`site_group`); ``stream``: run the model on chunks of rows even when one chunk would hold them
        all (the streamed MAP)."""
        site = self.adapter.observed_site(var_name)
        key = ("site_data", site.name)
        cached = self._cache.get(key)
        if cached is not None and (not stream or cached.rows.source == "rows"):
            return cached
        if site.predictor is None:
            from numpyro_mpe.errors import MPEError

            raise MPEError(f"site '{site.name}' has no predictor ({site.no_predictor_reason})")
        group = () if stream else self.site_group(site.name)
        if len(group) > 1:
            total = sum(self.adapter.observed[n].num_obs for n in group)
            layout = Layout.build(total, total, jax.devices()[:1])
            data = SiteData(self.adapter, group[0], layout, curvature=self.options.curvature, group=group)
            for n in group:
                self._cache[("site_data", n)] = data
            return data
        layout = Layout.build(site.num_obs, self.chunk_size(site.name), self.options.devices)
        plan, why = None, None
        if stream or layout.num_chunks > 1 or layout.mesh.size > 1:
            plan, why = row_plan(self.adapter, site.name)
        data = SiteData(self.adapter, site.name, layout, curvature=self.options.curvature, stream=stream,
                        plan=plan, no_plan_reason=why)
        if data.rows.source == "held" and site.num_obs * self.adapter.num_params > 5e7:
            warnings.warn(
                f"site '{site.name}': {why}; the predictor Jacobian is held for all {site.num_obs} "
                f"observations ({site.num_obs}x{self.adapter.num_params}); pass the per-observation data as "
                "model arguments, observations along the first axis, to stream", stacklevel=3)
        self._cache[key] = data
        return data

    def uses_predictor(self, var_name: str) -> bool:
        """Whether the pass of ``var_name`` runs through its predictor at the mean (factored memories, no P×P
        work per observation): the site has a predictor and either the memories are taken through it
        (``"ggn"``), ``curvature="ggn"``, or the predictor is linear in θ with delta memories.
        ``curvature="ggn"`` without a predictor falls back to exact curvature with a warning."""
        key = ("uses_predictor", var_name)
        if key in self._cache:
            return self._cache[key]
        site = self.adapter.observed[var_name]
        spec = self.memories_spec
        use = False
        if site.predictor is None:
            if self.options.curvature == "ggn":
                warnings.warn(f"curvature='ggn': site '{var_name}' has no predictor "
                              f"({site.no_predictor_reason}); using exact curvature for it", stacklevel=3)
        elif spec.kind == "ggn" or (spec.kind == "delta" and not spec.diagonal
                                    and (self.options.curvature == "ggn"
                                         or self.site_data(var_name).is_linear(self.posterior.mean))):
            use = True
        self._cache[key] = use
        return use

    def predictor_state(self, var_name: str | None = None) -> PredictorState | None:
        """η_i(m), its Jacobian, fixed parameters, values and weights of ``var_name`` (``None`` without a
        predictor)."""
        site = self.adapter.observed_site(var_name)
        key = ("predictor", site.name)
        if key not in self._cache:
            if site.predictor is None:
                self._cache[key] = None
            else:
                active = self.site_data(site.name).rows.active
                self._cache[key] = predictor_state(self.adapter, self.posterior.mean, site.name, active)
        return self._cache[key]

    def memories(self, var_name: str | None = None) -> Memories:
        """Per-observation memories (ĝ_i, Ĥ_i) of ``var_name``, as :attr:`memories_spec` says."""
        site = self.adapter.observed_site(var_name)
        key = ("memories", site.name)
        if key not in self._cache:
            with track(f"memories({site.name})", self.info["compile"]):
                self._cache[key] = self._memories(site.name)
        return self._cache[key]

    def _memories(self, name: str) -> Memories:
        spec = self.memories_spec
        pred = self.predictor_state(name)
        curvature = self.options.curvature
        if spec.kind == "mc":
            linear = pred is not None and self.site_data(name).is_linear(self.posterior.mean)
            q = spec.q if spec.q is not None else self.posterior
            return expected_memories(self.adapter, q, name, num_samples=spec.num_samples,
                                     rng_key=spec.rng_key, diagonal=spec.diagonal, pred=pred, linear=linear)
        if pred is not None and (spec.kind == "ggn" or curvature == "ggn" or self.uses_predictor(name)):
            mem = factored_memories(self.adapter, name, pred, curvature)
        else:
            mem = exact_memories(self.adapter, self.posterior.mean, name)
        return mem.diagonalized() if spec.diagonal else mem

    def pass_options(self, var_name: str, *, quadrature_tol: float | None = None,
                     keep_shift: bool | None = None, first_order: bool = False,
                     expect_q: bool = False, predictive=None) -> PassOptions:
        """The :class:`~numpyro_mpe.engine.site.PassOptions` of ``var_name``'s pass."""
        site = self.adapter.observed[var_name]
        k, num = 0, site.num_obs
        if site.predictor is not None:
            data = self.site_data(var_name)
            k, num = len(data.rows.active), data.layout.num
        if not self.uses_predictor(var_name):
            quadrature_tol = 0.0  # held memories: the full rule on every row
        return PassOptions.make(k, num, self.adapter.num_params, self.adapter.structure.dtype,
                                num_samples=self.options.num_samples, tol=quadrature_tol,
                                keep_shift=keep_shift, first_order=first_order, expect_q=expect_q,
                                predictive=predictive)

    def site_mpe(self, var_name: str | None = None, *, quadrature_tol: float | None = None,
                 keep_shift: bool | None = None, first_order: bool = False,
                 expect_q: bool = False, predictive=None) -> SiteMPE:
        """All MPE outputs of ``var_name`` as arrays over the flattened observations.

        With the defaults the result is cached.  ``quadrature_tol``: accepted difference of a cheaper
        quadrature tier from the full rule (0: the full rule everywhere; default 0 up to 4096 observations,
        else 1e-11 in float64); ``keep_shift``: return the N×P shifts (default while N·P ≤ 10⁷);
        ``first_order``, ``expect_q``: the training checkpoints' options (see
        :class:`~numpyro_mpe.engine.site.PassOptions`); ``predictive``: a
        :class:`~numpyro_mpe.engine.predictive.PredictiveSpec`, the LOO predictive functionals in ``extra``
        (cached by the spec).  A cached pass whose functionals cover the request
        (:meth:`~numpyro_mpe.engine.predictive.PredictiveSpec.covers`) serves it: one pass with every
        functional a report needs also gives the sensitivities.
        """
        site = self.adapter.observed_site(var_name)
        opts = dict(quadrature_tol=quadrature_tol, keep_shift=keep_shift, first_order=first_order,
                    expect_q=expect_q, predictive=predictive)
        default = quadrature_tol is None and keep_shift is None and not first_order and not expect_q
        key = ("mpe", site.name) + (() if predictive is None else (predictive,))
        if default:
            hit = self.cached_covering(("mpe", site.name), predictive)
            if hit is not None:
                return hit
        group = self.site_group(site.name) if self.uses_predictor(site.name) else (site.name,)
        with track(f"site_mpe({site.name})", self.info["compile"]):
            res = self._site_mpe(site.name, self.pass_options(site.name, **opts))
        parts = dict(zip(group, _split_rows(res, [self.adapter.observed[n].num_obs for n in group])))
        if default:
            self._cache.update({("mpe", n) + key[2:]: r for n, r in parts.items()})
        return parts[site.name]

    def cached_covering(self, prefix: tuple, predictive):
        """A cached value under ``prefix`` whose LOO predictive functionals cover ``predictive``
        (:meth:`~numpyro_mpe.engine.predictive.PredictiveSpec.covers`), or ``None``.

        Keys are ``prefix`` (no functionals: serves ``predictive=None`` only) or ``prefix + (spec,)``.
        """
        for key, value in self._cache.items():
            if not (isinstance(key, tuple) and key[:len(prefix)] == prefix):
                continue
            rest = key[len(prefix):]
            if (rest[0].covers(predictive) if rest else predictive is None):
                return value
        return None

    def _site_mpe(self, name: str, opts: PassOptions) -> SiteMPE:
        key = jax.random.PRNGKey(0)
        if self.uses_predictor(name):
            return predictor_pass(self.site_data(name), self.posterior, opts, rng_key=key,
                                  progress=self.options.progress)
        return memory_pass(self.adapter, self.posterior, name, self.memories(name),
                           self.predictor_state(name), opts, rng_key=key,
                           chunk_size=self.options.chunk_size or MEMORY_CHUNK,
                           progress=self.options.progress, num_samples=self.options.num_samples)

    # ------------------------------------------------------------ public outputs
    def sensitivities(self, var_name: str | None = None, groups=None) -> xr.Dataset:
        """Per-observation MPE outputs of one observed site, as an ``xarray.Dataset``.

        Variables over the observation dims: ``lpd`` (log E_q p(y_i|θ)), ``elpd_loo`` (MPE estimate of
        log p(y_i | y₋i)), ``p_loo`` (lpd − elpd_loo), ``sensitivity`` (√(Δmᵀ S Δm), posterior-sd units),
        ``leverage`` (largest eigenvalue of S^{-1/2} Ĥ_i S^{-1/2}; valid cavity iff < 1), ``valid``;
        and ``prediction_shift`` (Δη_i), ``prediction_var`` (diag V_i) over a ``predictor`` dim where
        the site has a predictor.

        Parameters
        ----------
        var_name : str, optional
            Observed site; required when the model has several (as in ``arviz.loo``).
        groups : str or array, optional
            Leave-group-out instead of leave-one-out: the name of an observation dim (plate) or labels
            aligned with the observations; see :func:`numpyro_mpe.loo.groups.group_dataset`.

        Examples
        --------
        >>> ds = fit.sensitivities()  # doctest: +SKIP
        >>> ds.sensitivity.argmax()  # doctest: +SKIP
        """
        if groups is not None:
            from numpyro_mpe.loo.groups import group_dataset

            return group_dataset(self, groups, var_name)
        site = self.adapter.observed_site(var_name)
        res = self.site_mpe(site.name)
        dims, shape = list(site.dims), site.obs_shape

        def arr(x):
            return np.asarray(x).reshape(shape + np.shape(x)[1:])

        data = {name: (dims, arr(getattr(res, name))) for name in OUTPUTS}
        data["valid"] = (dims, arr(res.valid))
        coords = site.coords()
        if res.prediction_shift is not None:
            pdim = "predictor"
            data["prediction_shift"] = (dims + [pdim], arr(res.prediction_shift))
            var = np.diagonal(np.asarray(res.prediction_var), axis1=-2, axis2=-1)
            data["prediction_var"] = (dims + [pdim], arr(var))
            coords[pdim] = list(res.prediction_labels)
        ds = xr.Dataset(data, coords=coords)
        ds.attrs.update(var_name=site.name, method=self.method, elpd_integration=str(res.integration),
                        num_params=self.adapter.num_params)
        ds["sensitivity"].attrs["description"] = (
            "sqrt(dm' S dm): posterior-mean shift if i is removed, in posterior-sd units")
        ds["leverage"].attrs["description"] = (
            "max eig of S^-1/2 H_i S^-1/2; the cavity is valid iff < 1 (compare Pareto k)")
        return ds

    def loo(self, var_name: str | None = None, method: str = "auto", groups=None, **options):
        """Leave-one-out as the installed arviz's ``ELPDData`` (``az.compare`` accepts it).

        By default (``method="auto"``) each observation gets the best available estimate of the exact
        Bayesian leave-one-out, its k̂ in ``pareto_k`` and what it was in ``method_i``; flagged observations
        warn (``repair="refit"`` refits them by NUTS).  ``method="mpe"`` is the closed-form MPE, the
        leave-one-out of q (``pareto_k`` the leverage).  ``elpd_loo`` is the sum over observations, ``se``
        its standard error √N·sd, ``p_loo`` the sum of ``p_loo``.  See
        :func:`numpyro_mpe.loo.elpd.elpd_data` for ``method``, ``groups`` and the further ``options``.
        """
        from numpyro_mpe.loo.elpd import elpd_data

        return elpd_data(self, var_name, method=method, groups=groups, **options)

    def posterior_check(self, var_name: str | None = None, **options):
        """The global Pareto k̂ of q (can importance sampling correct it to the posterior?), kept in
        ``info["posterior_check"]``; see :func:`numpyro_mpe.loo.posterior_check.posterior_check`."""
        from numpyro_mpe.loo.posterior_check import posterior_check

        return posterior_check(self, var_name, **options)

    def importance_loo(self, indices=None, num_samples: int = 1000, rng_key=None,
                       var_name: str | None = None, **options) -> xr.Dataset:
        """MPE importance-sampling LOO (``elpd_loo``, ``pareto_k``, ``ess``) for ``indices``.

        See :func:`numpyro_mpe.loo.importance.importance_loo` (``options``: ``df`` for a Student-t proposal,
        ``psis`` to flag by a PSIS result, ``clip``); ``indices="flagged"`` takes the observations with
        leverage > 0.5 or an invalid cavity.
        """
        from numpyro_mpe.loo.importance import importance_loo

        return importance_loo(self, indices, num_samples=num_samples, rng_key=rng_key, var_name=var_name,
                              **options)

    def loo_pit(self, var_name: str | None = None, *, rng_key=None, prob: float = 0.95, groups=None,
                repair: str | None = "flagged"):
        """LOO-PIT values from the MPE cavities (importance sampling where the closed form is not trusted),
        with calibration tests in ``attrs``; see
        :func:`numpyro_mpe.loo.predictive.loo_pit`."""
        from numpyro_mpe.loo.predictive import loo_pit

        return loo_pit(self, var_name, rng_key=rng_key, prob=prob, groups=groups, repair=repair)

    def loo_expectations(self, var_name: str | None = None, kind: str = "mean", probs=None, *, groups=None,
                         repair: str | None = "flagged"):
        """LOO predictive mean, var, sd, median or quantiles and the leverage (as arviz-stats' k̂); see
        :func:`numpyro_mpe.loo.predictive.loo_expectations`."""
        from numpyro_mpe.loo.predictive import loo_expectations

        return loo_expectations(self, var_name, kind, probs, groups=groups, repair=repair)

    def loo_predictive_interval(self, var_name: str | None = None, prob: float = 0.9, *, groups=None,
                                repair: str | None = "flagged"):
        """Central LOO predictive intervals; see
        :func:`numpyro_mpe.loo.predictive.loo_predictive_interval`."""
        from numpyro_mpe.loo.predictive import loo_predictive_interval

        return loo_predictive_interval(self, var_name, prob, groups=groups, repair=repair)

    def loo_score(self, var_name: str | None = None, kind: str = "crps", pointwise: bool = False,
                  round_to=None, *, groups=None, repair: str | None = "flagged"):
        """LOO CRPS or SCRPS (maximization scores); see :func:`numpyro_mpe.loo.predictive.loo_score`."""
        from numpyro_mpe.loo.predictive import loo_score

        return loo_score(self, var_name, kind, pointwise, round_to, groups=groups, repair=repair)

    def loo_r2(self, var_name: str | None = None, **options):
        """LOO-adjusted R²; see :func:`numpyro_mpe.loo.predictive.loo_r2` for the ``options``."""
        from numpyro_mpe.loo.predictive import loo_r2

        return loo_r2(self, var_name, **options)

    def loo_metrics(self, kind: str = "rmse", var_name: str | None = None, round_to=None, *, groups=None,
                    repair: str | None = "flagged"):
        """LOO predictive metrics (mae, mse, rmse, acc, acc_balanced); see
        :func:`numpyro_mpe.loo.predictive.loo_metrics`."""
        from numpyro_mpe.loo.predictive import loo_metrics

        return loo_metrics(self, kind, var_name, round_to, groups=groups, repair=repair)

    def parameter_shift(self, var_names=None, var_name: str | None = None,
                        chunk_size: int | None = None) -> xr.Dataset:
        """MPE shift of each latent site's posterior mean (constrained space, in posterior sd units) for every
        observation of ``var_name``; see :func:`numpyro_mpe.loo.influence.parameter_shift`."""
        from numpyro_mpe.loo.influence import parameter_shift

        return parameter_shift(self, var_names=var_names, var_name=var_name, chunk_size=chunk_size)

    def to_inference_data(self, num_samples: int = 1000, rng_key=None):
        """Draws from q in constrained space with log-likelihoods, observed data and MPE groups.

        Returns ``arviz.InferenceData`` on arviz 0.x and ``xarray.DataTree`` on arviz ≥ 1.
        """
        from numpyro_mpe.io.export import to_inference_data

        return to_inference_data(self, num_samples=num_samples, rng_key=rng_key)
