"""The cavity of one observation: the MPE leave-one-out Gaussian from its memory.

With q = N(m, S⁻¹), S = L Lᵀ, and the memory (ĝ_i, Ĥ_i) of observation i (ℓ_i = −log p(y_i | θ)):

* whitened memory g̃_i = L⁻¹ĝ_i, Ã_i = L⁻¹ Ĥ_i L⁻ᵀ = Q diag(λ) Qᵀ;
* ``leverage`` = max λ (the cavity S₋i = S − Ĥ_i = L (I − Ã_i) Lᵀ is positive definite iff it is < 1);
* shift m₋i − m = S₋i⁻¹ ĝ_i = L⁻ᵀ u_i, u_i = (I − Ã_i)⁻¹ g̃_i; ``sensitivity`` = ‖u_i‖ = √(Δmᵀ S Δm);
* with a predictor η_i (Jacobian J_i, B_i = J_i L⁻ᵀ): V_i = B_i B_iᵀ, V₋i = B_i (I − Ã_i)⁻¹ B_iᵀ,
  ``prediction_shift`` Δη_i = B_i u_i.

:func:`cavity_one` does this in the P dimensions of θ (dense memories); :func:`cavity_k` in the K dimensions
of the predictor when Ĥ_i = J_iᵀΛ_iJ_i (Woodbury), with no P×P work.  Both are written for one observation
and mapped over rows; their small eigendecompositions go through :mod:`numpyro_mpe.engine.rowlinalg`, which
forms no batched LAPACK call.
"""

from __future__ import annotations

import jax.numpy as jnp

from numpyro_mpe.engine import rowlinalg


def whitened_memory(linv, g, h):
    """L⁻¹ĝ and the eigendecomposition (λ, Q) of the whitened memory L⁻¹ĤL⁻ᵀ (symmetrized)."""
    a_w = linv @ h @ linv.T
    lam, q = rowlinalg.eigh(0.5 * (a_w + a_w.T))
    return linv @ g, lam, q


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
    lam, q = rowlinalg.eigh(a_w)
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


def cavity_k(e, lam, b_w=None, v=None):
    """Cavity of one observation through its predictor (Woodbury in K dimensions).

    With Ĥ = JᵀΛJ, B = J L⁻ᵀ and V = B Bᵀ = J S⁻¹ Jᵀ (pass ``b_w`` or ``v``): the nonzero eigenvalues of
    Ã = BᵀΛB are those of V^{1/2} Λ V^{1/2} (``leverage`` = the largest), (I − Ã)⁻¹Bᵀe = Bᵀ(I − ΛV)⁻¹e, so
    with ``w`` = (I − ΛV)⁻¹e: u = Bᵀw (when ``b_w`` is given), Δη = V w, V₋ = V(I − ΛV)⁻¹, ‖u‖² = wᵀVw,
    and the shift is Δm = S⁻¹Jᵀw.
    """
    k = e.shape[0]
    if v is None:
        v = b_w @ b_w.T
    nan = jnp.asarray(jnp.nan, e.dtype)
    if k == 1:  # scalars: λv, e / (1 − λv), v / (1 − λv) — no batched 1×1 factorizations
        leverage = lam[0, 0] * v[0, 0]
        valid = leverage < 1.0
        denom = jnp.where(valid, 1.0 - leverage, 1.0)
        w = e / denom
        v_cav = v / denom
    else:  # V = RRᵀ, M = I − RᵀΛR: (I − ΛV)⁻¹ = I + ΛRM⁻¹Rᵀ and V₋ = RM⁻¹Rᵀ, with M⁻¹ from eigh
        # (rowlinalg: mapped over rows, no batched LAPACK call, which can deadlock XLA's CPU pool)
        r = rowlinalg.psd_root(0.5 * (v + v.T))
        g = r.T @ lam @ r
        tau, q = rowlinalg.eigh(0.5 * (g + g.T))
        leverage = tau[-1]
        valid = leverage < 1.0
        rq = r @ q
        inv = 1.0 / jnp.where(valid, 1.0 - tau, 1.0)
        w = e + lam @ (rq @ (inv * (rq.T @ e)))
        v_cav = (rq * inv) @ rq.T
    out = {
        "leverage": leverage,
        "valid": valid,
        "w": jnp.where(valid, w, nan),
        "sensitivity": jnp.where(valid, jnp.sqrt(jnp.clip(w @ v @ w, 0.0, None)), nan),
        "dEta": jnp.where(valid, v @ w, nan),
        "v": v,
        "v_cav": jnp.where(valid, 0.5 * (v_cav + v_cav.T), nan),
    }
    if b_w is not None:
        out["u"] = jnp.where(valid, b_w.T @ w, nan)
    return out
