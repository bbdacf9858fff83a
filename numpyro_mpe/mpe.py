"""The Memory-Perturbation Equation for a Gaussian posterior, one observation at a time.

With q = N(m, S⁻¹), S = L Lᵀ, and the memory (ĝ_i, Ĥ_i) of observation i (ℓ_i = −log p(y_i | θ)):

* whitened memory  g̃_i = L⁻¹ĝ_i,  Ã_i = L⁻¹ Ĥ_i L⁻ᵀ = Q diag(λ) Qᵀ;
* ``leverage`` = max λ (the cavity S₋i = S − Ĥ_i = L (I − Ã_i) Lᵀ is positive definite iff it is < 1);
* shift  m₋i − m = S₋i⁻¹ ĝ_i = L⁻ᵀ u_i,  u_i = (I − Ã_i)⁻¹ g̃_i;  ``sensitivity`` = ‖u_i‖ = √(Δmᵀ S Δm);
* with a predictor η_i (Jacobian J_i, B_i = J_i L⁻ᵀ): V_i = B_i B_iᵀ, V₋i = B_i (I − Ã_i)⁻¹ B_iᵀ,
  ``prediction_shift`` Δη_i = B_i u_i;
* ``lpd`` = log E_{N(η_i, V_i)} p(y_i | η), ``elpd_loo`` = log E_{N(η_i + Δη_i, V₋i)} p(y_i | η)
  (quadrature in η), ``p_loo`` = lpd − elpd_loo.

The per-observation function :func:`cavity_one` is written for one observation and mapped over chunks.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

from .errors import MPEError
from .model import ModelAdapter
from .posterior import GaussianPosterior
from .quadrature import Rule, default_rule, psd_sqrt


class Memories(NamedTuple):
    """Per-observation memories: ĝ_i ``(N, P)`` and Ĥ_i ``(N, P, P)`` of ℓ_i = −log p(y_i | θ)."""

    grad: jax.Array
    hess: jax.Array


class PredictorState(NamedTuple):
    """Predictor of a site at the posterior mean: η_i(m) ``(N, K_all)``, J_i ``(N, K, P)`` on the
    active components ``active`` (those that depend on θ), the fixed ``aux`` parameters and weights."""

    eta: jax.Array
    jac: jax.Array
    active: np.ndarray
    aux: dict
    weights: jax.Array | None


class SiteMPE(NamedTuple):
    """MPE outputs of every observation of one observed site (flattened to ``N``)."""

    lpd: jax.Array
    elpd_loo: jax.Array
    p_loo: jax.Array
    sensitivity: jax.Array
    leverage: jax.Array
    valid: jax.Array
    shift: jax.Array  # m₋i − m, (N, P)
    prediction_shift: jax.Array | None  # (N, K)
    prediction_var: jax.Array | None  # (N, K, K): V_i
    prediction_labels: tuple
    method: str  # how elpd_loo was integrated


# ---------------------------------------------------------------- memories
def exact_memories(adapter: ModelAdapter, theta, var_name: str) -> Memories:
    """ĝ_i = ∇ℓ_i(θ) and the exact Ĥ_i = ∇²ℓ_i(θ) (delta method at ``theta``).

    Gradients by forward mode (P model passes); Hessians forward-over-forward, one parameter
    direction at a time, so that intermediates never hold P² tangents.
    """

    def neg_ll(t):
        return -adapter.log_lik(t, var_name)

    grad_fn = jax.jacfwd(neg_ll)  # (N, P)
    eye = jnp.eye(theta.shape[0], dtype=theta.dtype)

    @jax.jit
    def compute(t):
        grad = grad_fn(t)
        def column(e):
            return jax.jvp(grad_fn, (t,), (e,))[1]  # (N, P): ∂/∂θ_a of every gradient
        hess = jax.lax.map(column, eye)  # (P, N, P)
        return grad, jnp.transpose(hess, (1, 0, 2))

    grad, hess = compute(theta)
    return Memories(grad, 0.5 * (hess + jnp.swapaxes(hess, -1, -2)))


def predictor_state(adapter: ModelAdapter, theta, var_name: str) -> PredictorState:
    """η_i(θ), its Jacobian on the components that depend on θ, and the fixed parameters."""
    eta_fn = jax.jit(lambda t: adapter.eta(t, var_name))
    eta = eta_fn(theta)
    jac = jax.jit(jax.jacfwd(lambda t: adapter.eta(t, var_name)))(theta)  # (N, K_all, P)
    active = np.flatnonzero(np.asarray(jnp.any(jac != 0, axis=(0, 2))))
    aux = adapter.predictor_aux(theta, var_name)
    return PredictorState(eta, jac[:, active, :], active, aux, adapter.predictor_mask(var_name))


# ---------------------------------------------------------------- one observation
def cavity_one(g_w, a_w, b_w):
    """Cavity of one observation in whitened coordinates.

    Parameters
    ----------
    g_w : (P,) whitened gradient L⁻¹ĝ_i.
    a_w : (P, P) whitened Hessian L⁻¹Ĥ_iL⁻ᵀ.
    b_w : (K, P) whitened predictor Jacobian J_iL⁻ᵀ (K may be 0).

    Returns
    -------
    dict with ``leverage`` (max eigenvalue of ``a_w``), ``valid`` (leverage < 1), ``u`` = (I − Ã)⁻¹g̃,
    ``sensitivity`` = ‖u‖, ``dEta`` = B u, ``v`` = B Bᵀ, ``v_cav`` = B (I − Ã)⁻¹ Bᵀ and
    ``logdet`` = log det(I − Ã).
    """
    lam, q = jnp.linalg.eigh(a_w)
    leverage = lam[-1]
    valid = leverage < 1.0
    inv = jnp.where(valid, 1.0 / jnp.where(valid, 1.0 - lam, 1.0), jnp.nan)
    u = q @ (inv * (q.T @ g_w))
    bq = b_w @ q
    return {
        "leverage": leverage,
        "valid": valid,
        "u": u,
        "sensitivity": jnp.linalg.norm(u),
        "dEta": b_w @ u,
        "v": b_w @ b_w.T,
        "v_cav": (bq * inv) @ bq.T,
        "logdet": jnp.where(valid, jnp.sum(jnp.log1p(-jnp.where(valid, lam, 0.0))), jnp.nan),
    }


def expected_log_lik_one(log_lik_fn, rule: Rule, mean, cov, eta_all, active, y, aux, weight):
    """log E_{η ~ N(mean, cov)} p(y | η) for one observation, by ``rule`` in the active components."""
    c = psd_sqrt(cov)
    pts = mean + rule.nodes @ c.T  # (Q, K)
    q = pts.shape[0]
    eta_q = jnp.broadcast_to(eta_all, (q,) + eta_all.shape).at[:, active].set(pts)
    y_q = jnp.broadcast_to(y, (q,) + y.shape)
    aux_q = {k: jnp.broadcast_to(v, (q,) + v.shape) for k, v in aux.items()}
    ll = log_lik_fn(eta_q, y_q, aux_q) * weight
    return logsumexp(rule.log_weights + ll)


# ---------------------------------------------------------------- chunked driver
def map_chunks(fn, arrays: dict, num: int, chunk_size: int, desc: str, progress: bool):
    """Apply the jitted ``fn`` to consecutive chunks of the leading axis of ``arrays`` (padding the
    last chunk with its last row) and concatenate the results, with a progress bar."""
    if chunk_size < 1:
        raise MPEError(f"chunk_size must be a positive integer, got {chunk_size}")
    chunk_size = min(chunk_size, num)
    n_chunks = math.ceil(num / chunk_size)
    outs = []
    bar = tqdm(total=num, desc=desc, disable=not progress or n_chunks < 2, leave=False)
    for c in range(n_chunks):
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, num)
        idx = jnp.minimum(jnp.arange(lo, lo + chunk_size), num - 1)
        chunk = jax.tree_util.tree_map(lambda a, idx=idx: a[idx], arrays)
        out = fn(chunk)
        outs.append(jax.tree_util.tree_map(lambda a, k=hi - lo: a[:k], out))
        bar.update(hi - lo)
    bar.close()
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)


def site_mpe(adapter: ModelAdapter, post: GaussianPosterior, var_name: str, memories: Memories,
             *, chunk_size: int = 1024, rng_key=None, num_samples: int = 2000,
             progress: bool = True) -> SiteMPE:
    """All per-observation MPE outputs of the observed site ``var_name``.

    ``elpd_loo`` and ``lpd`` are integrated in predictor space where the site has a predictor
    (Gauss–Hermite for K ≤ 3 active components, else Monte Carlo with ``num_samples`` common draws), and
    otherwise by Monte Carlo in θ-space (:func:`theta_space_elpd`).
    """
    site = adapter.observed[var_name]
    n, p = memories.grad.shape
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    linv = jax.scipy.linalg.solve_triangular(post.chol, jnp.eye(p, dtype=post.mean.dtype), lower=True)
    pred = predictor_state(adapter, post.mean, var_name) if site.predictor is not None else None
    arrays = {"g": memories.grad, "h": memories.hess}
    if pred is not None:
        k = len(pred.active)
        rule = default_rule(k, rng_key, post.mean.dtype, num_samples)
        arrays.update(jac=pred.jac, eta=pred.eta, y=site.flat_value, aux=pred.aux,
                      w=jnp.ones(n, post.mean.dtype) if pred.weights is None else pred.weights)
        active = jnp.asarray(pred.active)
        log_lik_fn = site.predictor.log_lik
        method = f"{rule.kind} in predictor space (K={k}, {rule.nodes.shape[0]} nodes)"
    else:
        method = f"Monte Carlo in θ-space ({num_samples} draws from q)"

    def one(a):
        g_w = linv @ a["g"]
        a_w = linv @ a["h"] @ linv.T
        b_w = a["jac"] @ linv.T if pred is not None else jnp.zeros((0, p), g_w.dtype)
        out = cavity_one(g_w, a_w, b_w)
        res = {"leverage": out["leverage"], "valid": out["valid"], "sensitivity": out["sensitivity"],
               "u": out["u"], "logdet": out["logdet"]}
        if pred is not None:
            eta_a = a["eta"][active]
            args = (a["eta"], active, a["y"], a["aux"], a["w"])
            res["lpd"] = expected_log_lik_one(log_lik_fn, rule, eta_a, out["v"], *args)
            res["elpd_loo"] = expected_log_lik_one(log_lik_fn, rule, eta_a + out["dEta"],
                                                   out["v_cav"], *args)
            res["dEta"] = out["dEta"]
            res["v"] = out["v"]
        return res

    chunk_fn = jax.jit(jax.vmap(one))
    res = map_chunks(chunk_fn, arrays, n, chunk_size, f"MPE {var_name}", progress)
    shift = post.unwhiten(res["u"].T).T
    if pred is None:
        lpd, elpd = theta_space_elpd(adapter, post, var_name, memories, res["u"], res["logdet"],
                                     rng_key=rng_key, num_samples=num_samples, chunk_size=chunk_size)
        dEta = v = None
        labels = ()
    else:
        lpd, elpd, dEta, v = res["lpd"], res["elpd_loo"], res["dEta"], res["v"]
        labels = tuple(site.predictor.labels[i] for i in pred.active)
    valid = res["valid"]
    elpd = jnp.where(valid, elpd, jnp.nan)
    n_bad = int(n - jnp.sum(valid))
    if n_bad:
        bad = np.flatnonzero(~np.asarray(valid))
        warnings.warn(
            f"{n_bad} of {n} observations of '{var_name}' have leverage >= 1: removing them leaves a "
            f"cavity precision S - H_i that is not positive definite, so their leave-one-out Gaussian "
            f"does not exist (flat indices {bad[:10].tolist()}{' ...' if n_bad > 10 else ''}); their "
            "elpd_loo, p_loo, sensitivity and shifts are NaN and `valid` is False",
            stacklevel=3,
        )
    return SiteMPE(lpd, elpd, lpd - elpd, jnp.where(valid, res["sensitivity"], jnp.nan), res["leverage"],
                   valid, shift, dEta, v, labels, method)


def theta_space_elpd(adapter, post, var_name, memories, u, logdet, *, rng_key, num_samples,
                     chunk_size):
    """``lpd`` and ``elpd_loo`` by Monte Carlo in θ-space, for sites without a predictor.

    Draws θ_s = m + L⁻ᵀ z_s from q (common to all observations, ``num_samples`` model passes) and uses
    E_{q₋i}[p(y_i|θ)] = E_q[p(y_i|θ) q₋i(θ)/q(θ)], streaming over draws (no S×N matrix is kept).  The
    ratio is exactly constant when ℓ_i is quadratic, so the estimate is exact in the Gaussian case; its
    variance is finite for leverage < 0.5.
    """
    n, p = memories.grad.shape
    linv = jax.scipy.linalg.solve_triangular(post.chol, jnp.eye(p, dtype=post.mean.dtype), lower=True)
    a_w = jnp.einsum("ab,nbc,dc->nad", linv, memories.hess, linv)  # (N, P, P)
    batch = max(1, min(num_samples, 64))
    z_all = jax.random.normal(rng_key, (num_samples, p), post.mean.dtype)

    @jax.jit
    def step(z):
        theta = post.mean + post.unwhiten(z.T).T  # (b, P)
        ll = jax.vmap(lambda t: adapter.log_lik(t, var_name))(theta)  # (b, N)
        d = z[:, None, :] - u[None]  # (b, N, P)
        quad = jnp.sum(d * d, -1) - jnp.einsum("bnp,npq,bnq->bn", d, a_w, d)
        log_ratio = -0.5 * quad + 0.5 * jnp.sum(z * z, -1)[:, None] + 0.5 * logdet[None]
        return logsumexp(ll, 0), logsumexp(ll + log_ratio, 0)

    acc_lpd = jnp.full((n,), -jnp.inf, post.mean.dtype)
    acc_elpd = jnp.full((n,), -jnp.inf, post.mean.dtype)
    for s in range(0, num_samples - num_samples % batch, batch):
        a, b = step(z_all[s : s + batch])
        acc_lpd, acc_elpd = jnp.logaddexp(acc_lpd, a), jnp.logaddexp(acc_elpd, b)
    used = num_samples - num_samples % batch
    return acc_lpd - jnp.log(used), acc_elpd - jnp.log(used)
