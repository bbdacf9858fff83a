"""MPE during training: per-observation sensitivities and the LOO estimate from an optimizer's state.

An optimizer that carries a Gaussian q = N(m, S⁻¹) — natural-gradient VI (:class:`numpyro_mpe.NGVI`), or a
Gaussian SVI guide — has at every step everything the Memory-Perturbation Equation needs ("during training
the same formulas apply to the current q").  At a checkpoint this module computes, from (m, S) alone and
with no refit, through THE per-observation pass (:mod:`numpyro_mpe.engine.site`):

**Cavity form (the full MPE).**  For an observed site with a predictor η_i(θ) ∈ R^K (J_i = ∂η_i/∂θ at m,
V_i = J_i S⁻¹ J_iᵀ), the memories are taken through the predictor: ĝ_i = J_iᵀe_i, Ĥ_i = J_iᵀΛ_iJ_i with
e_i = E[∇_η ℓ_i] and Λ_i = E[∇²_η ℓ_i] over q's predictive η ~ N(η_i(m), V_i) (``memories="q"``, the
default: the variational memories of a linearized predictor, exact for GLMs) or at η_i(m)
(``memories="mean"``: the delta method, Gauss–Newton); then Δη_i = V_i (I − Λ_i V_i)⁻¹ e_i,
V₋i = V_i (I − Λ_i V_i)⁻¹ and elpd_loo_i = log E_{η ~ N(η_i + Δη_i, V₋i)} p(y_i | η).

**First-order form (the paper's "prediction error × prediction variance").**  Dropping (I − Λ_i V_i)⁻¹,
Δη_i⁽¹⁾ = V_i e_i and loo_nll_first_order = −(1/N) Σ_i log p(y_i | η_i(m) + Δη_i⁽¹⁾) (plug-in).  Without a
predictor it is the first-order Taylor value of ℓ_i at m + S⁻¹ĝ_i: ℓ_i(m) + ĝ_iᵀ S⁻¹ ĝ_i.

**Training and held-out NLL.**  −(1/N) Σ_i log E_q p(y_i | θ) by Monte Carlo from q with the same
standard-normal draws at every checkpoint (common random numbers), so the curves are smooth in the step.

The history of a run is a :class:`pandas.DataFrame` with one row per checkpoint (:func:`history_frame`),
which :func:`numpyro_mpe.io.plots.plot_training` draws.  :func:`train_in_blocks` is the loop both variational
backends train in.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import cached_property, partial

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.linalg import solve_triangular
from tqdm.auto import tqdm

from numpyro_mpe.engine.memories import MEMORY_KINDS, MemorySpec
from numpyro_mpe.errors import ModelError, MPEError
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import antithetic_normal, from_state
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.options import MPEOptions, check_options
from numpyro_mpe.programs import jit

#: Columns of a training history (``fit.info["history"]``), in order.
HISTORY_COLUMNS = ("step", "elpd_loo_mpe", "elpd_loo_mpe_se", "loo_nll", "loo_nll_first_order", "train_nll",
                   "heldout_nll", "n_invalid", "lr")


# ------------------------------------------------------------------ fits from states
def memory_spec(kind: str | None, *, diagonal: bool = False, num_samples: int = 1000,
                rng_key=None) -> MemorySpec:
    """The :class:`~numpyro_mpe.engine.memories.MemorySpec` of a variational q: ``"mc"`` (expectations under
    q by Monte Carlo, the default), ``"delta"`` (gradients and exact Hessians at the mean) or ``"ggn"``
    (through the predictor at the mean, H_i = J_iᵀΛ_iJ_i, the paper's prediction-space form for neural
    networks; sites without a predictor fall back to ``"delta"``).  ``diagonal``: the q is mean-field, so
    ``"mc"`` and ``"delta"`` keep only the diagonals of the Ĥ_i (``"ggn"`` keeps J_iᵀΛ_iJ_i whole).

    Examples
    --------
    >>> memory_spec("delta").describe().startswith("delta")
    True
    """
    kind = "mc" if kind is None else kind
    if kind not in MEMORY_KINDS:
        raise MPEError(f"memories must be one of {MEMORY_KINDS} (or None), got {kind!r}")
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    return MemorySpec(kind, bool(diagonal) and kind != "ggn", int(num_samples), key)


def fit_from_state(adapter: ModelAdapter, mean, precision, *, method: str = "ngvi", info: dict | None = None,
                   memories: str | None = "ggn", memory_samples: int = 1000, rng_key=None, refit=None,
                   diagonal: bool | None = None, options: MPEOptions | None = None,
                   site_data: dict | None = None, **mpe_options) -> Fit:
    """A :class:`~numpyro_mpe.fit.Fit` whose q is an optimizer's current Gaussian N(mean, precision⁻¹).

    Parameters
    ----------
    adapter : ModelAdapter
        The model with its data.
    mean : array (P,)
        Mean of q in the flat unconstrained space.
    precision : array (P,) or (P, P)
        Precision of q (its diagonal for a diagonal q).
    method : str, default "ngvi"
        Recorded as ``fit.method``.
    info : dict, optional
        Recorded as ``fit.info`` (``"memories"`` is added).
    memories : {"ggn", "delta", "mc"} or None, default "ggn"
        How the memories are computed; see :func:`memory_spec`.
    memory_samples : int, default 1000
        Draws from q for ``memories="mc"``.
    rng_key : jax.random.PRNGKey, optional
        Key for ``memories="mc"``.
    refit : Refit, optional
        Refits by the same method (for :func:`numpyro_mpe.exact_loo`).
    diagonal : bool, optional
        Whether q is diagonal; default: whether ``precision`` is a vector.
    options : MPEOptions, optional
        Chunk size, draws, progress of the Fit's passes.
    site_data : dict, optional
        Rows already laid out (see :class:`~numpyro_mpe.fit.Fit`).
    **mpe_options
        ``chunk_size``, ``num_samples``, ``progress``, ``curvature``, ``devices``: the same as
        ``options=MPEOptions.make(...)`` (give one or the other).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> from numpyro_mpe.model import ModelAdapter
    >>> from numpyro_mpe.options import MPEOptions, check_options
    >>> from numpyro_mpe.io.toy import line_data, line_model as model
    >>> x = jnp.linspace(-1, 1, 20)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": 2 * x})
    >>> fit = fit_from_state(ad, jnp.array([2.0]), jnp.array([8.0]), options=MPEOptions(progress=False))
    >>> fit.sensitivities().sensitivity.shape
    (20,)
    """
    if mpe_options:
        if options is not None:
            raise MPEError("give options= or the options as keywords, not both")
        check_options("fit_from_state", mpe_options, MPEOptions._fields)
        options = MPEOptions.make(**mpe_options)
    if diagonal is None:
        diagonal = jnp.ndim(precision) == 1
    spec = memory_spec(memories, diagonal=diagonal, num_samples=memory_samples, rng_key=rng_key)
    info = dict(info or {})
    info["memories"] = spec.describe()
    return Fit(adapter, from_state(mean, precision), method, info, memories=spec, refit=refit,
               options=options, site_data=site_data)


def heldout_adapter(model, heldout, rng_key, init_strategy, train: ModelAdapter, var_name: str):
    """The adapter of the held-out data ``heldout = (args, kwargs)``, checked against ``train``."""
    if not (isinstance(heldout, tuple) and len(heldout) == 2 and isinstance(heldout[1], dict)):
        raise TypeError("heldout must be a tuple (args, kwargs) of the model's arguments for the held-out "
                        f"data, e.g. heldout=((X_test,), {{'y': y_test}}); got {type(heldout).__name__}")
    args, kwargs = heldout
    ad = ModelAdapter.build(model, rng_key, tuple(args), dict(kwargs), init_strategy)
    if ad.num_params != train.num_params or [s.name for s in ad.latent] != [s.name for s in train.latent]:
        raise ModelError(
            f"the held-out data give the model {ad.num_params} latent parameters "
            f"({[s.name for s in ad.latent]}), the training data {train.num_params} "
            f"({[s.name for s in train.latent]}): the latent sites must not depend on the data size")
    if var_name not in ad.observed:
        raise ModelError(f"the held-out data have no observed site '{var_name}'; observed: "
                         f"{list(ad.observed)}")
    return ad


def mc_nll(adapter: ModelAdapter, name: str, draws):
    """−(1/N) Σ_i log mean_s p(y_i | θ_s), streaming over the draws (never S×N); traceable."""
    n = adapter.observed[name].num_obs

    def body(acc, theta):
        return jnp.logaddexp(acc, adapter.log_lik(theta, name)), None

    acc, _ = jax.lax.scan(body, jnp.full((n,), -jnp.inf, draws.dtype), draws)
    return -jnp.mean(acc - jnp.log(draws.shape[0]))


mc_nll_jit = jit(mc_nll, static_argnames=("name",))


@partial(jit, static_argnames=("name", "diagonal"))
def _checkpoint_nlls(adapter: ModelAdapter, held: ModelAdapter | None, mean, prec, z, name: str,
                     diagonal: bool):
    if diagonal:
        draws = mean + z / jnp.sqrt(prec)
    else:
        chol = jnp.linalg.cholesky(0.5 * (prec + prec.T))
        draws = mean + solve_triangular(chol.T, z.T, lower=False).T
    train = mc_nll(adapter, name, draws)
    return train, (jnp.asarray(jnp.nan, mean.dtype) if held is None else mc_nll(held, name, draws))


# ------------------------------------------------------------------ checkpoints
class Checkpoint:
    """The MPE at one checkpoint of training, computed from the optimizer's state (m, S).

    Attributes
    ----------
    step : int
        Steps taken.
    mean, precision : jax.Array
        The optimizer's Gaussian: mean ``(P,)``, precision ``(P,)`` (diagonal) or ``(P, P)``.
    outputs : dict of numpy arrays, one value per observation of the site
        Cavity form: ``lpd``, ``elpd_loo``, ``p_loo``, ``sensitivity``, ``leverage``, ``valid``,
        ``prediction_shift`` (Δη_i, ``(N, K)``), ``prediction_var`` (diag V_i, ``(N, K)``); first-order form:
        ``prediction_shift_first_order`` (V_i e_i, ``(N, K)``) and ``nll_first_order``
        (−log p(y_i | η_i + V_i e_i)); without a predictor the prediction entries are absent.
    record : dict
        This checkpoint's row of the training history (:data:`HISTORY_COLUMNS`).
    fit : Fit
        A Fit built from the state (memories through the predictor, as ``outputs``), for every other MPE
        output (``fit.sensitivities()``, ``fit.loo()``, ...); built on first access.
    """

    def __init__(self, step: int, mean, precision, outputs: dict, record: dict, make_fit: Callable[[], Fit]):
        self.step = int(step)
        self.mean = mean
        self.precision = precision
        self.outputs = outputs
        self.record = record
        self._make_fit = make_fit

    @cached_property
    def fit(self) -> Fit:
        return self._make_fit()

    def __repr__(self) -> str:
        r = self.record
        return (f"Checkpoint(step={self.step}, elpd_loo_mpe={r['elpd_loo_mpe']:.4g}, "
                f"loo_nll_first_order={r['loo_nll_first_order']:.4g}, heldout_nll={r['heldout_nll']:.4g})")


class CheckpointMPE:
    """The MPE of one observed site at training checkpoints, from an optimizer's (m, S).

    Build it once per run; calling it with the current mean and precision returns the per-observation outputs
    of both forms (see the module docstring) and a history record.  The pass is compiled once (it is a
    function of (m, S)), so checkpoints cost one Jacobian of the predictor, per-observation K×K algebra and
    ``num_samples`` model passes for the NLLs.

    Parameters
    ----------
    adapter : ModelAdapter
        The model with the training data.
    var_name : str, optional
        Observed site; required when the model has several.
    diagonal : bool
        Whether the precision is passed as its diagonal ``(P,)``.
    heldout_adapter : ModelAdapter, optional
        The same model with held-out data (same latent sites), for ``heldout_nll``.
    num_samples : int, default 100
        Draws from q (common to all checkpoints) for ``train_nll`` and ``heldout_nll``.
    rng_key : jax.random.PRNGKey, optional
        Key of the draws.
    options : MPEOptions, optional
        Of the Fits built at checkpoints (``num_samples`` of Monte Carlo quadrature for K > 3, chunk size).
    memories : {"q", "mean"}, default "q"
        ``"q"``: e_i and Λ_i averaged over q's predictive N(η_i(m), V_i) with the quadrature rule — the
        variational memories through the linearized predictor (exact expectations under q for a GLM);
        ``"mean"``: their values at η_i(m) (the delta method, the Gauss–Newton memories of Laplace).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro
    >>> from numpyro_mpe.model import ModelAdapter
    >>> from numpyro_mpe.io.toy import line_data, line_model as model
    >>> x = jnp.linspace(-1, 1, 20)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": 2 * x})
    >>> ck = CheckpointMPE(ad, diagonal=True)
    >>> outputs, record = ck(jnp.array([2.0]), jnp.array([8.0]), step=10)
    >>> sorted(k for k in record if "nll" in k)
    ['heldout_nll', 'loo_nll', 'loo_nll_first_order', 'train_nll']
    """

    def __init__(self, adapter: ModelAdapter, var_name: str | None = None, *, diagonal: bool,
                 heldout_adapter: ModelAdapter | None = None, num_samples: int = 100, rng_key=None,
                 options: MPEOptions | None = None, memories: str = "q"):
        site = adapter.observed_site(var_name)
        self.adapter, self.name, self.site = adapter, site.name, site
        self.diagonal = bool(diagonal)
        self.heldout_adapter = heldout_adapter
        self.options = (options or MPEOptions())._replace(progress=False)
        if memories not in ("q", "mean"):
            raise MPEError(f"checkpoint memories must be 'q' or 'mean', got {memories!r}")
        self.memories = memories
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise MPEError(f"checkpoint num_samples must be at least 1, got {num_samples}")
        key = jax.random.split(jax.random.PRNGKey(0) if rng_key is None else rng_key, 3)[0]
        self._z = antithetic_normal(key, self.num_samples, adapter.num_params, adapter.structure.dtype)
        self._site_data = None

    def fit(self, mean, precision, *, memories: str = "ggn", info: dict | None = None) -> Fit:
        """A :class:`Fit` from the state (memories through the predictor by default, as the outputs)."""
        site_data = None if self._site_data is None else {self.name: self._site_data}  # laid out once
        return fit_from_state(self.adapter, mean, precision, method="checkpoint", info=info,
                              memories=memories, options=self.options, site_data=site_data)

    def _outputs(self, mean, precision) -> dict:
        if self.site.predictor is None:  # through dense memories at the mean
            fit = self.fit(mean, precision, memories="delta")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = fit.site_mpe(self.name)
            mem = fit.memories(self.name)
            sol = fit.posterior.solve(mem.grad.T).T  # S⁻¹ĝ_i
            nll1 = -self.adapter.log_lik(fit.posterior.mean, self.name) + jnp.sum(mem.grad * sol, -1)
            return {"lpd": res.lpd, "elpd_loo": res.elpd_loo, "p_loo": res.p_loo,
                    "sensitivity": res.sensitivity, "leverage": res.leverage, "valid": res.valid,
                    "nll_first_order": nll1}
        fit = self.fit(mean, precision)
        self._site_data = fit.site_data(self.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit.site_mpe(self.name, keep_shift=False, first_order=True, expect_q=self.memories == "q")
        return {"lpd": res.lpd, "elpd_loo": res.elpd_loo, "p_loo": res.p_loo, "sensitivity": res.sensitivity,
                "leverage": res.leverage, "valid": res.valid, "prediction_shift": res.prediction_shift,
                "prediction_var": jnp.diagonal(res.prediction_var, axis1=-2, axis2=-1), **res.extra}

    def __call__(self, mean, precision, step: int = 0, lr: float = float("nan")) -> tuple[dict, dict]:
        """Per-observation outputs (dict of numpy arrays) and the history record at ``step``."""
        mean = jnp.asarray(mean)
        precision = jnp.asarray(precision)
        out = {k: np.asarray(v) for k, v in jax.device_get(self._outputs(mean, precision)).items()}
        train_nll, heldout_nll = (float(v) for v in _checkpoint_nlls(
            self.adapter, self.heldout_adapter, mean, precision, self._z, self.name, self.diagonal))
        n = self.site.num_obs
        elpd = out["elpd_loo"]
        ok = np.isfinite(elpd)
        n_ok = int(ok.sum())
        total = float(n * elpd[ok].mean()) if n_ok else float("nan")
        se = float(np.sqrt(n) * elpd[ok].std(ddof=1)) if n_ok > 1 else float("nan")
        record = {"step": int(step), "elpd_loo_mpe": total, "elpd_loo_mpe_se": se, "loo_nll": -total / n,
                  "loo_nll_first_order": float(np.mean(out["nll_first_order"])), "train_nll": train_nll,
                  "heldout_nll": heldout_nll, "n_invalid": n - n_ok, "lr": float(lr)}
        return out, record

    def checkpoint(self, mean, precision, step: int = 0, lr: float = float("nan"),
                   info: dict | None = None) -> Checkpoint:
        """:meth:`__call__` wrapped in a :class:`Checkpoint` (with a lazily built Fit)."""
        out, record = self(mean, precision, step, lr)
        return Checkpoint(step, mean, precision, out, record, lambda: self.fit(mean, precision, info=info))


def history_frame(records: list[dict], num_obs: int) -> pd.DataFrame:
    """The training history as a DataFrame (columns :data:`HISTORY_COLUMNS`, ``attrs["num_obs"]``).

    ``elpd_loo_mpe`` is the total MPE elpd_loo over the ``num_obs`` observations (N times the mean over the
    observations with a valid cavity; ``n_invalid`` counts the others); ``loo_nll`` = −elpd_loo_mpe / N;
    ``loo_nll_first_order``, ``train_nll`` and ``heldout_nll`` are per-observation means.

    Examples
    --------
    >>> h = history_frame([{"step": 0, "elpd_loo_mpe": -10.0}], num_obs=20)
    >>> h.attrs["num_obs"], list(h.columns)[:2]
    (20, ['step', 'elpd_loo_mpe'])
    """
    frame = pd.DataFrame(records, columns=list(HISTORY_COLUMNS))
    frame.attrs["num_obs"] = int(num_obs)
    return frame


def first_order_loo_nll(checkpoint: Checkpoint | dict) -> float:
    """The first-order MPE LOO-NLL of a checkpoint: −(1/N) Σ_i log p(y_i | η_i + V_i e_i).

    Examples
    --------
    >>> first_order_loo_nll({"nll_first_order": np.array([0.5, 1.5])})
    1.0
    """
    out = checkpoint.outputs if isinstance(checkpoint, Checkpoint) else checkpoint
    return float(np.mean(out["nll_first_order"]))


# ------------------------------------------------------------------ the training loop
def train_in_blocks(advance: Callable, state, num_steps: int, *, every: int | None = None,
                    checkpoint: Callable | None = None, desc: str = "training", progress: bool = True):
    """THE training loop of the variational backends: ``state`` advanced ``num_steps`` steps in blocks.

    ``advance(state, k) -> (state, halt)`` runs k steps (one compiled program per block size); ``halt`` stops
    training (a divergence).  With ``checkpoint(state, step) -> stop`` (and ``every``), it is called at step
    0, after every ``every`` steps and at the end; returning True stops training (a user's callback).  Without
    checkpoints the blocks are a hundredth of the run (for the progress bar).  Returns the final state and the
    number of steps taken.
    """
    size = every if (every is not None and checkpoint is not None) else max(1, math.ceil(num_steps / 100))
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False)
    stop = bool(checkpoint(state, 0)) if checkpoint is not None else False
    done = 0
    while done < num_steps and not stop:
        k = min(size, num_steps - done)
        state, halt = advance(state, k)
        done += k
        bar.update(k)
        if halt:
            break
        if checkpoint is not None and (done % size == 0 or done == num_steps):
            stop = bool(checkpoint(state, done))
    bar.close()
    return state, done


def checkpoint_callback(checkpoints: CheckpointMPE, gaussian: Callable, records: list, *, lr_at: Callable,
                        callback: Callable | None, bar_postfix: Callable | None = None) -> Callable:
    """``checkpoint(state, step) -> stop`` for :func:`train_in_blocks`: the MPE of the state's Gaussian
    (``gaussian(state) -> (mean, precision)``), its record appended to ``records``, the user's ``callback``
    (returning True stops training)."""

    def checkpoint(state, step: int) -> bool:
        mean, prec = gaussian(state)
        ck = checkpoints.checkpoint(mean, prec, step, lr_at(max(step - 1, 0)))
        records.append(ck.record)
        if bar_postfix is not None:
            bar_postfix(ck.record)
        return bool(callback is not None and callback(ck) is True)

    return checkpoint


__all__ = ["Checkpoint", "CheckpointMPE", "HISTORY_COLUMNS", "checkpoint_callback", "first_order_loo_nll",
           "fit_from_state", "heldout_adapter", "history_frame", "mc_nll", "memory_spec", "train_in_blocks"]
