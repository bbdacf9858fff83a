"""The result of fitting a Gaussian posterior to a NumPyro model, and its MPE outputs."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np
import xarray as xr

from numpyro_mpe.engine.mpe import Memories, PredictorState, SiteMPE, predictor_state, site_mpe
from numpyro_mpe.engine.mpe import memories as mpe_memories
from numpyro_mpe.engine.streaming import CURVATURES, StreamingSite
from numpyro_mpe.errors import MPEError, check_chunk_size, check_options
from numpyro_mpe.gaussian import GaussianPosterior
from numpyro_mpe.model.adapter import ModelAdapter

#: Per-observation outputs of :meth:`Fit.sensitivities` (the public contract).
OUTPUTS = ("lpd", "elpd_loo", "p_loo", "sensitivity", "leverage")


class Fit:
    """A NumPyro model, its data, and a Gaussian posterior q = N(m, S⁻¹) in unconstrained space.

    Created by :class:`numpyro_mpe.Laplace` (and the VI backends).  Per-observation MPE outputs are
    computed on first use for each observed site and cached.

    Attributes
    ----------
    adapter : ModelAdapter
        The model as functions of the flat unconstrained θ.
    posterior : GaussianPosterior
        Mean, precision and its Cholesky factor.
    method : str
        ``"laplace"`` (or the name of the backend that produced the posterior).
    info : dict
        Optimizer diagnostics (steps, gradient norm, potential at the optimum).
    memories_fn : callable, optional
        ``memories_fn(fit, var_name) -> Memories``: how a backend computes its memories (e.g. expectations
        under a variational q).  Default: the delta method at the mean with exact curvature.
    refit_fn : callable, optional
        ``refit_fn(fit, weights) -> GaussianPosterior``: refit by the same method with per-observation
        weights on the site (0 removes), warm-started; used by :func:`numpyro_mpe.exact_loo` for
        non-Laplace fits.
    """

    MPE_OPTIONS = {"chunk_size", "num_samples", "progress", "curvature", "devices"}

    def __init__(self, adapter: ModelAdapter, posterior: GaussianPosterior, method: str,
                 info: dict | None = None, *, memories_fn=None, refit_fn=None, **mpe_options):
        check_options("Fit", mpe_options, self.MPE_OPTIONS)
        self.adapter = adapter
        self.posterior = posterior
        self.method = method
        self.info = dict(info or {})
        self.memories_fn = memories_fn
        self.refit_fn = refit_fn
        # the streaming engine sizes its chunks by memory unless told (streaming.auto_chunk_size)
        self.stream_chunk_size = check_chunk_size(mpe_options.get("chunk_size"))
        self.chunk_size = 4096 if self.stream_chunk_size is None else self.stream_chunk_size
        self.num_samples = int(mpe_options.get("num_samples", 2000))
        self.progress = bool(mpe_options.get("progress", True))
        self.curvature = mpe_options.get("curvature", "exact")
        if self.curvature not in CURVATURES:
            raise MPEError(f"curvature must be one of {CURVATURES}, got {self.curvature!r}")
        self.devices = mpe_options.get("devices")
        self._cache: dict[str, Any] = {}

    def __repr__(self) -> str:
        sites = ", ".join(f"{n}{s.obs_shape}" for n, s in self.adapter.observed.items())
        return f"Fit(method={self.method!r}, P={self.adapter.num_params}, observed=[{sites}])"

    # ------------------------------------------------------------ core quantities
    @property
    def observed_names(self) -> list[str]:
        return list(self.adapter.observed)

    def memories(self, var_name: str | None = None) -> Memories:
        """Per-observation memories (ĝ_i, Ĥ_i) of ``var_name`` (delta method at the mean)."""
        site = self.adapter.observed_site(var_name)
        key = ("memories", site.name)
        if key not in self._cache:
            eng = self.streaming_site(site.name) if self.curvature == "ggn" else None
            if eng is not None:
                self._cache[key] = eng.memories(self.posterior.mean)
            elif self.memories_fn is not None:
                self._cache[key] = self.memories_fn(self, site.name)
            else:
                self._cache[key] = mpe_memories(self.adapter, self.posterior.mean, site.name,
                                                self.predictor_state(site.name))
        return self._cache[key]

    def predictor_state(self, var_name: str | None = None) -> PredictorState | None:
        """η_i(m), its Jacobian and fixed parameters for ``var_name`` (``None`` without a predictor)."""
        site = self.adapter.observed_site(var_name)
        key = ("predictor", site.name)
        if key not in self._cache:
            self._cache[key] = (predictor_state(self.adapter, self.posterior.mean, site.name)
                                if site.predictor is not None else None)
        return self._cache[key]

    def stream(self, var_name: str | None = None) -> StreamingSite:
        """The prediction-space engine of ``var_name`` (chunks of rows, sharded over ``devices``)."""
        site = self.adapter.observed_site(var_name)
        key = ("stream", site.name)
        if key not in self._cache:
            self._cache[key] = StreamingSite(self.adapter, site.name, chunk_size=self.stream_chunk_size,
                                             curvature=self.curvature, devices=self.devices,
                                             progress=self.progress)
        return self._cache[key]

    def streaming_site(self, var_name: str) -> StreamingSite | None:
        """The engine if ``var_name``'s MPE runs in prediction space, else ``None``.

        That is where the site has a predictor and either ``curvature="ggn"`` or the predictor is linear in
        θ (the GGN is then the exact Hessian) and the memories are the delta method's.  ``curvature="ggn"``
        without a predictor falls back to exact curvature with a warning that says why.
        """
        site = self.adapter.observed[var_name]
        key = ("streaming_site", var_name)
        if key in self._cache:
            return self._cache[key]
        eng = None
        if site.predictor is None:
            if self.curvature == "ggn":
                warnings.warn(f"curvature='ggn': site '{var_name}' has no predictor "
                              f"({site.no_predictor_reason}); using exact curvature for it", stacklevel=3)
        elif self.curvature == "ggn":
            eng = self.stream(var_name)
        elif self.memories_fn is None:
            cand = self.stream(var_name)
            eng = cand if cand.is_linear(self.posterior.mean) else None
        self._cache[key] = eng
        return eng

    def site_mpe(self, var_name: str | None = None) -> SiteMPE:
        """All MPE outputs of ``var_name`` as arrays over the flattened observations."""
        site = self.adapter.observed_site(var_name)
        key = ("mpe", site.name)
        if key not in self._cache:
            eng = self.streaming_site(site.name)
            if eng is not None:
                self._cache[key] = eng.site_mpe(self.posterior, num_samples=self.num_samples,
                                                rng_key=jax.random.PRNGKey(0))
                return self._cache[key]
            self._cache[key] = site_mpe(
                self.adapter, self.posterior, site.name, self.memories(site.name),
                chunk_size=self.chunk_size, num_samples=self.num_samples, progress=self.progress,
                rng_key=jax.random.PRNGKey(0), pred=self.predictor_state(site.name),
            )
        return self._cache[key]

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
        ds.attrs.update(var_name=site.name, method=self.method, elpd_integration=res.method,
                        num_params=self.adapter.num_params)
        ds["sensitivity"].attrs["description"] = (
            "sqrt(dm' S dm): posterior-mean shift if i is removed, in posterior-sd units")
        ds["leverage"].attrs["description"] = (
            "max eig of S^-1/2 H_i S^-1/2; the cavity is valid iff < 1 (compare Pareto k)")
        return ds

    def loo(self, var_name: str | None = None, method: str = "mpe", groups=None, **options):
        """MPE leave-one-out as the installed arviz's ``ELPDData`` (``az.compare`` accepts it).

        ``elpd_loo`` is the sum of the MPE ``elpd_loo`` over observations, ``se`` its standard error
        √N·sd, ``p_loo`` the sum of ``p_loo``; ``loo_i`` the pointwise values and, where PSIS puts
        ``pareto_k``, the MPE leverage.

        ``method="mpe-is"`` replaces the flagged observations (leverage > 0.5 or invalid cavity) by MPE
        importance sampling (:meth:`importance_loo`), whose Pareto k̂ then stands in ``pareto_k``.
        ``groups`` gives leave-group-out (one pointwise value per group).  Further ``options``
        (``num_samples``, ``rng_key``, ``df`` for a Student-t MPE-IS proposal) go to
        :func:`numpyro_mpe.io.export.elpd_data`.
        """
        from numpyro_mpe.io.export import elpd_data

        return elpd_data(self, var_name, method=method, groups=groups, **options)

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

    def parameter_shift(self, var_names=None, var_name: str | None = None,
                        chunk_size: int | None = None) -> xr.Dataset:
        """MPE shift of each latent site's posterior mean (constrained space, in posterior sd units)
        for every observation of ``var_name``; see :func:`numpyro_mpe.loo.influence.parameter_shift`."""
        from numpyro_mpe.loo.influence import parameter_shift

        return parameter_shift(self, var_names=var_names, var_name=var_name, chunk_size=chunk_size)

    def to_inference_data(self, num_samples: int = 1000, rng_key=None):
        """Draws from q in constrained space with log-likelihoods, observed data and MPE groups.

        Returns ``arviz.InferenceData`` on arviz 0.x and ``xarray.DataTree`` on arviz ≥ 1.
        """
        from numpyro_mpe.io.export import to_inference_data

        return to_inference_data(self, num_samples=num_samples, rng_key=rng_key)
