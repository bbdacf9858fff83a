"""MPE during training: per-observation sensitivities and the LOO estimate from an optimizer's state.

An optimizer that carries a Gaussian q = N(m, S⁻¹) — natural-gradient VI (:class:`numpyro_mpe.NGVI`), or
a Gaussian SVI guide — has at every step everything the Memory-Perturbation Equation needs (DESIGN §2:
"during training the same formulas apply to the current q").  At a checkpoint this module computes, from
(m, S) alone and with no refit:

**Cavity form (the full MPE).**  For an observed site with a predictor η_i(θ) ∈ R^K (J_i = ∂η_i/∂θ at m,
V_i = J_i S⁻¹ J_iᵀ, ℓ_i = −log p(y_i | θ)), the memories are taken through the predictor: ĝ_i = J_iᵀe_i,
Ĥ_i = J_iᵀ Λ_i J_i with e_i = E[∇_η ℓ_i] and Λ_i = E[∇²_η ℓ_i] over q's predictive η ~ N(η_i(m), V_i)
(``memories="q"``, the default: the variational memories of a linearized predictor, exact for GLMs) or at
η_i(m) (``memories="mean"``: the delta method, Gauss–Newton) — and

    Δη_i = V_i (I − Λ_i V_i)⁻¹ e_i,   V₋i = V_i (I − Λ_i V_i)⁻¹,
    elpd_loo_i = log E_{η ~ N(η_i + Δη_i, V₋i)} p(y_i | η)          (Gauss–Hermite in η, K ≤ 3),

with ``sensitivity`` and ``leverage`` as in :meth:`numpyro_mpe.Fit.sensitivities`.  With
``memories="mean"`` these are the outputs of ``fit_from_state(..., memories="ggn").site_mpe()``, computed by
one compiled function per training run.

**First-order form (the paper's "prediction error × prediction variance").**  Dropping the (I − Λ_i V_i)⁻¹
factor (first order in V_i),

    Δη_i⁽¹⁾ = V_i e_i,
    loo_nll_first_order = −(1/N) Σ_i log p(y_i | η_i(m) + Δη_i⁽¹⁾)      (plug-in, no integration over η).

For a scalar predictor this is v_i · e_i: the prediction variance times the prediction error, e.g.
v_i (σ(η_i) − y_i) for a logistic likelihood.  Without a predictor, the first-order form is the
first-order Taylor value of ℓ_i at the first-order shifted mean m + S⁻¹ĝ_i: ℓ_i(m) + ĝ_iᵀ S⁻¹ ĝ_i, with
ĝ_i = ∇ℓ_i(m).

**Training and held-out NLL.**  ``train_nll`` and ``heldout_nll`` are −(1/N) Σ_i log E_q p(y_i | θ) by
Monte Carlo from q with the same standard-normal draws at every checkpoint (common random numbers), so the
curves are smooth in the step.

The history of a run is a :class:`pandas.DataFrame` with one row per checkpoint, which
:func:`numpyro_mpe.io.plots.plot_training` draws.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.scipy.linalg import solve_triangular

from numpyro_mpe.engine.mpe import (
    cavity_k,
    expected_log_lik_one,
    factored_memories,
    predictor_derivs,
    predictor_nll,
    predictor_state,
)
from numpyro_mpe.engine.mpe import memories as delta_memories
from numpyro_mpe.engine.quadrature import default_rule, psd_sqrt
from numpyro_mpe.errors import ModelError
from numpyro_mpe.fit import Fit
from numpyro_mpe.gaussian import GaussianPosterior, from_precision
from numpyro_mpe.model.adapter import ModelAdapter

#: Columns of a training history (``fit.info["history"]``), in order.
HISTORY_COLUMNS = ("step", "elpd_loo_mpe", "elpd_loo_mpe_se", "loo_nll", "loo_nll_first_order", "train_nll",
                   "heldout_nll", "n_invalid", "lr")

MEMORY_KINDS = ("mc", "delta", "ggn")


# ------------------------------------------------------------------ posteriors and fits from states
def posterior_from_state(mean, precision) -> GaussianPosterior:
    """The Gaussian q = N(mean, S⁻¹) of an optimizer state; ``precision``: S ``(P, P)`` or its diagonal.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> q = posterior_from_state(jnp.zeros(2), jnp.array([4.0, 1.0]))
    >>> q.precision.shape
    (2, 2)
    """
    precision = jnp.asarray(precision)
    if precision.ndim == 1:
        precision = jnp.diag(precision)
    return from_precision(jnp.asarray(mean), precision)


def variational_available() -> bool:
    """Whether :func:`numpyro_mpe.inference.variational.variational_memories` (MC memories under q) is
    installed."""
    try:
        from numpyro_mpe.inference.variational import variational_memories  # noqa: F401
    except ImportError:
        return False
    return True


def memories_hook(kind: str | None, *, diagonal: bool = False, num_samples: int = 1000,
                  rng_key=None) -> tuple[Callable | None, str]:
    """A :class:`~numpyro_mpe.fit.Fit` ``memories_fn`` for a variational q, and a sentence on what it does.

    Parameters
    ----------
    kind : {"mc", "delta", "ggn"} or None
        ``"mc"``: expectations under q by Monte Carlo
        (:func:`numpyro_mpe.inference.variational.variational_memories`);
        ``"delta"``: the delta method at the mean with exact Hessians (the Laplace memories);
        ``"ggn"``: the delta method through the site's predictor, Ĥ_i = J_iᵀΛ_iJ_i (Gauss–Newton; exact where
        η is linear in θ), the paper's prediction-space form for neural networks (no P×P work per
        observation); sites without a predictor fall back to ``"delta"``.  ``None``: ``"mc"`` when
        :mod:`numpyro_mpe.inference.variational` is installed, else ``"delta"``.
    diagonal : bool, default False
        The q is diagonal (mean field): ``"mc"`` and ``"delta"`` keep only the diagonals of the Ĥ_i, so that
        they add up to a diagonal precision.  ``"ggn"`` keeps J_iᵀΛ_iJ_i whole (the paper's
        v_i = J_i diag(σ²) J_iᵀ for a diagonal q).
    num_samples : int, default 1000
        Draws from q for ``"mc"``.
    rng_key : jax.random.PRNGKey, optional
        Key of those draws.

    Returns
    -------
    (callable or None, str)
        The hook (``None`` means the Fit's own delta method) and a description for ``fit.info["memories"]``.

    Examples
    --------
    >>> fn, why = memories_hook("delta")
    >>> fn is None, why.startswith("delta")
    (True, True)
    """
    if kind is None:
        kind = "mc" if variational_available() else "delta"
    if kind not in MEMORY_KINDS:
        raise ValueError(f"memories must be one of {MEMORY_KINDS} (or None), got {kind!r}")
    if kind == "mc" and not variational_available():
        raise ModelError("memories='mc' needs numpyro_mpe.inference.variational (variational memories), "
                         "which is not installed in this version; use memories='delta' or 'ggn'")
    diag_note = ", diagonal" if diagonal else ""
    if kind in ("mc", "delta") and (kind == "mc" or diagonal):
        from numpyro_mpe.inference.variational import variational_memories

        key = jax.random.PRNGKey(0) if rng_key is None else rng_key

        def var_mem(fit: Fit, name: str):
            pred = fit.predictor_state(name) if fit.adapter.observed[name].predictor is not None else None
            return variational_memories(fit.adapter, fit.posterior, name, num_samples=num_samples,
                                        rng_key=key, method=kind, diagonal=diagonal, pred=pred)

        if kind == "mc":
            return var_mem, f"mc: expectations under q by Monte Carlo ({num_samples} draws{diag_note})"
        return var_mem, "delta: gradients and exact Hessians of each term at the mean of q (diagonal)"
    if kind == "delta":
        return None, "delta: gradients and exact Hessians of each term at the mean of q"

    def ggn(fit: Fit, name: str):
        site = fit.adapter.observed[name]
        pred = fit.predictor_state(name)
        if site.predictor is None or pred is None:
            return delta_memories(fit.adapter, fit.posterior.mean, name)
        return factored_memories(fit.adapter, fit.posterior.mean, name, pred)

    return ggn, "ggn: through the predictor at the mean of q, H_i = J_i' Lambda_i J_i (Gauss-Newton)"


def fit_from_state(adapter: ModelAdapter, mean, precision, *, method: str = "ngvi", info: dict | None = None,
                   memories: str | None = "ggn", memory_samples: int = 1000, rng_key=None, refit_fn=None,
                   diagonal: bool | None = None, **mpe_options) -> Fit:
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
        How the memories are computed; see :func:`memories_hook`.
    memory_samples : int, default 1000
        Draws from q for ``memories="mc"``.
    rng_key : jax.random.PRNGKey, optional
        Key for ``memories="mc"``.
    refit_fn : callable, optional
        Passed to the Fit (refits by the same method, for :func:`numpyro_mpe.exact_loo`).
    diagonal : bool, optional
        Whether q is diagonal (see :func:`memories_hook`); default: whether ``precision`` is a vector.
    **mpe_options
        ``chunk_size``, ``num_samples``, ``progress`` of the Fit.

    Returns
    -------
    Fit

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro_mpe.model.adapter import ModelAdapter
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 20)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": 2 * x})
    >>> fit = fit_from_state(ad, jnp.array([2.0]), jnp.array([8.0]), progress=False)
    >>> fit.sensitivities().sensitivity.shape
    (20,)
    """
    if diagonal is None:
        diagonal = jnp.ndim(precision) == 1
    fn, why = memories_hook(memories, diagonal=diagonal, num_samples=memory_samples, rng_key=rng_key)
    info = dict(info or {})
    info["memories"] = why
    return Fit(adapter, posterior_from_state(mean, precision), method, info, memories_fn=fn,
               refit_fn=refit_fn, **mpe_options)


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


def _heldout_adapter(model, heldout, rng_key, init_strategy, train: ModelAdapter, var_name: str):
    """Build the adapter of the held-out data ``heldout = (args, kwargs)`` and check it matches ``train``."""
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


def _mc_nll(adapter: ModelAdapter, name: str, draws):
    """−(1/N) Σ_i log mean_s p(y_i | θ_s), streaming over the draws (never S×N)."""
    n = adapter.observed[name].num_obs

    def body(acc, theta):
        return jnp.logaddexp(acc, adapter.log_lik(theta, name)), None

    init = jnp.full((n,), -jnp.inf, draws.dtype)
    acc, _ = jax.lax.scan(body, init, draws)
    return -jnp.mean(acc - jnp.log(draws.shape[0]))


class CheckpointMPE:
    """Compiled MPE of one observed site at training checkpoints, from an optimizer's (m, S).

    Build it once per run; calling it with the current mean and precision returns the per-observation outputs
    of both forms (see the module docstring) and a history record.  The function of (m, S) is compiled once,
    so checkpoints cost one Jacobian of the predictor (P forward passes), per-observation K×K algebra and
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
    quadrature_samples : int, default 2000
        Monte Carlo nodes in predictor space where K > 3 (Gauss–Hermite below).
    rng_key : jax.random.PRNGKey, optional
        Key of the draws and nodes.
    chunk_size, progress
        Passed to the Fits built at checkpoints (and used by the θ-space fallback without a predictor).
    memories : {"q", "mean"}, default "q"
        ``"q"``: e_i and Λ_i averaged over q's predictive N(η_i(m), V_i) with the quadrature rule — the
        variational memories through the linearized predictor (exact expectations under q for a GLM);
        ``"mean"``: their values at η_i(m) (the delta method, the Gauss–Newton memories of Laplace).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, numpyro, numpyro.distributions as dist
    >>> from numpyro_mpe.model.adapter import ModelAdapter
    >>> def model(x, y=None):
    ...     b = numpyro.sample("b", dist.Normal(0, 10))
    ...     with numpyro.plate("data", x.shape[0]):
    ...         numpyro.sample("y", dist.Normal(b * x, 1.0), obs=y)
    >>> x = jnp.linspace(-1, 1, 20)
    >>> ad = ModelAdapter.build(model, jax.random.PRNGKey(0), (x,), {"y": 2 * x})
    >>> ck = CheckpointMPE(ad, diagonal=True)
    >>> outputs, record = ck(jnp.array([2.0]), jnp.array([8.0]), step=10)
    >>> sorted(k for k in record if "nll" in k)
    ['heldout_nll', 'loo_nll', 'loo_nll_first_order', 'train_nll']
    """

    def __init__(self, adapter: ModelAdapter, var_name: str | None = None, *, diagonal: bool,
                 heldout_adapter: ModelAdapter | None = None, num_samples: int = 100,
                 quadrature_samples: int = 2000, rng_key=None, chunk_size: int = 4096,
                 progress: bool = False, memories: str = "q"):
        site = adapter.observed_site(var_name)
        self.adapter = adapter
        self.name = site.name
        self.site = site
        self.diagonal = bool(diagonal)
        self.heldout_adapter = heldout_adapter
        self.chunk_size = int(chunk_size)
        self.progress = bool(progress)
        if memories not in ("q", "mean"):
            raise ValueError(f"checkpoint memories must be 'q' or 'mean', got {memories!r}")
        self.memories = memories
        self.expect_q = memories == "q"
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        k_z, k_rule, k_probe = jax.random.split(key, 3)
        dtype = adapter.init_theta.dtype
        p = adapter.num_params
        self.num_samples = int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"checkpoint num_samples must be at least 1, got {num_samples}")
        half = (self.num_samples + 1) // 2
        z = jax.random.normal(k_z, (half, p), dtype)
        self._z = jnp.concatenate([z, -z])[: self.num_samples]
        self._fn = None
        if site.predictor is not None:
            probe = adapter.init_theta + 0.1 * jax.random.normal(k_probe, (p,), dtype)
            pred = predictor_state(adapter, probe, self.name)
            self.active = np.asarray(pred.active)
            self.rule = default_rule(len(self.active), k_rule, dtype, quadrature_samples)
            self.labels = tuple(site.predictor.labels[i] for i in self.active)
            self._fn = jax.jit(self._outputs)
        self._nll_fn = jax.jit(self._nlls)

    # ------------------------------------------------------------ compiled parts
    def _draws(self, mean, prec):
        if self.diagonal:
            return mean + self._z / jnp.sqrt(prec)
        chol = jnp.linalg.cholesky(0.5 * (prec + prec.T))
        return mean + solve_triangular(chol.T, self._z.T, lower=False).T

    def _nlls(self, mean, prec):
        draws = self._draws(mean, prec)
        train = _mc_nll(self.adapter, self.name, draws)
        if self.heldout_adapter is None:
            return train, jnp.asarray(jnp.nan, mean.dtype)
        return train, _mc_nll(self.heldout_adapter, self.name, draws)

    def _outputs(self, mean, prec):
        adapter, name, site = self.adapter, self.name, self.site
        active = jnp.asarray(self.active)
        f = site.predictor.log_lik
        n = site.num_obs
        dtype = mean.dtype
        mask = adapter.predictor_mask(name)
        w = jnp.ones(n, dtype) if mask is None else mask

        def eta_fn(t):
            return adapter.eta(t, name)

        eta = eta_fn(mean)
        jac = jax.jacfwd(lambda t: eta_fn(t)[:, active])(mean)  # (N, K, P)
        aux = adapter.predictor_aux(mean, name)
        y = site.flat_value

        nll_one = predictor_nll(f, active)
        derivs3 = predictor_derivs(f, active)

        def derivs(eta_all, yi, auxi, wi):
            return derivs3(eta_all, yi, auxi, wi)[1:]

        e, lam = jax.vmap(derivs)(eta, y, aux, w)
        if self.diagonal:
            b_w = jac / jnp.sqrt(prec)
        else:
            chol = jnp.linalg.cholesky(0.5 * (prec + prec.T))
            k, p = jac.shape[1], jac.shape[2]
            b_w = solve_triangular(chol, jac.reshape(-1, p).T, lower=True).T.reshape(n, k, p)

        rule = self.rule

        def expected_derivs(ei, lami, bi, eta_all, yi, auxi, wi):
            # E_{η ~ N(η_i, V_i)}[e(η)], E[Λ(η)]: the memories under q through the (linearized) predictor
            if not self.expect_q:
                return ei, lami
            c = psd_sqrt(bi @ bi.T)
            pts = eta_all[active] + rule.nodes @ c.T  # (Q, K)
            wq = jnp.exp(rule.log_weights)

            def at(x):
                g = jax.grad(nll_one)(x, eta_all, yi, auxi, wi)
                h = jax.hessian(nll_one)(x, eta_all, yi, auxi, wi)
                return g, 0.5 * (h + h.T)

            gq, hq = jax.vmap(at)(pts)
            return wq @ gq, jnp.einsum("q,qkl->kl", wq, hq)

        def one(ei, lami, bi, eta_all, yi, auxi, wi):
            ei, lami = expected_derivs(ei, lami, bi, eta_all, yi, auxi, wi)
            out = cavity_k(ei, lami, bi)
            args = (eta_all, active, yi, auxi, wi)
            eta_a = eta_all[active]
            lpd = expected_log_lik_one(f, self.rule, eta_a, out["v"], *args)
            elpd = expected_log_lik_one(f, self.rule, eta_a + out["dEta"], out["v_cav"], *args)
            d1 = out["v"] @ ei
            nll1 = nll_one(eta_a + d1, eta_all, yi, auxi, wi)
            return {"lpd": lpd, "elpd_loo": jnp.where(out["valid"], elpd, jnp.nan),
                    "sensitivity": out["sensitivity"], "leverage": out["leverage"], "valid": out["valid"],
                    "prediction_shift": out["dEta"], "prediction_var": jnp.diagonal(out["v"]),
                    "prediction_shift_first_order": d1, "nll_first_order": nll1}

        res = jax.vmap(one)(e, lam, b_w, eta, y, aux, w)
        res["p_loo"] = res["lpd"] - res["elpd_loo"]
        return res

    # ------------------------------------------------------------ fallback without a predictor
    def _fallback(self, mean, prec) -> dict:
        fit = self.fit(mean, prec, memories="delta")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = fit.site_mpe(self.name)
        mem = fit.memories(self.name)
        post = fit.posterior
        sol = post.solve(mem.grad.T).T  # S⁻¹ĝ_i, (N, P)
        nll0 = -self.adapter.log_lik(post.mean, self.name)
        nll1 = nll0 + jnp.sum(mem.grad * sol, -1)
        return {"lpd": res.lpd, "elpd_loo": res.elpd_loo, "p_loo": res.p_loo, "sensitivity": res.sensitivity,
                "leverage": res.leverage, "valid": res.valid, "nll_first_order": nll1}

    # ------------------------------------------------------------ public
    def fit(self, mean, precision, *, memories: str = "ggn", info: dict | None = None) -> Fit:
        """A :class:`Fit` from the state (memories through the predictor by default, as the outputs)."""
        return fit_from_state(self.adapter, mean, precision, method="checkpoint", info=info,
                              memories=memories, chunk_size=self.chunk_size, progress=self.progress)

    def __call__(self, mean, precision, step: int = 0, lr: float = float("nan")) -> tuple[dict, dict]:
        """Per-observation outputs (dict of numpy arrays) and the history record at ``step``."""
        mean = jnp.asarray(mean)
        precision = jnp.asarray(precision)
        if self._fn is not None:
            out = jax.device_get(self._fn(mean, precision))
        else:
            out = jax.device_get(self._fallback(mean, precision))
        out = {k: np.asarray(v) for k, v in out.items()}
        train_nll, heldout_nll = (float(v) for v in jax.device_get(self._nll_fn(mean, precision)))
        n = self.site.num_obs
        elpd = out["elpd_loo"]
        ok = np.isfinite(elpd)
        n_ok = int(ok.sum())
        total = float(n * elpd[ok].mean()) if n_ok else float("nan")
        se = float(np.sqrt(n) * elpd[ok].std(ddof=1)) if n_ok > 1 else float("nan")
        record = {
            "step": int(step),
            "elpd_loo_mpe": total,
            "elpd_loo_mpe_se": se,
            "loo_nll": -total / n,
            "loo_nll_first_order": float(np.mean(out["nll_first_order"])),
            "train_nll": train_nll,
            "heldout_nll": heldout_nll,
            "n_invalid": n - n_ok,
            "lr": float(lr),
        }
        return out, record

    def checkpoint(self, mean, precision, step: int = 0, lr: float = float("nan"),
                   info: dict | None = None) -> Checkpoint:
        """:meth:`__call__` wrapped in a :class:`Checkpoint` (with a lazily built Fit)."""
        out, record = self(mean, precision, step, lr)
        return Checkpoint(step, mean, precision, out, record,
                          lambda: self.fit(mean, precision, info=info))


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


__all__ = ["Checkpoint", "CheckpointMPE", "HISTORY_COLUMNS", "fit_from_state", "first_order_loo_nll",
           "history_frame", "memories_hook", "posterior_from_state", "variational_available"]

