"""The cavity of one observation: the MPE leave-one-out Gaussian from its memory.

With q = N(m, S⁻¹), S = L Lᵀ, and the memory (ĝ_i, Ĥ_i) of observation i (ℓ_i = −log p(y_i | θ)):

* whitened memory g̃_i = L⁻¹ĝ_i, Ã_i = L⁻¹ Ĥ_i L⁻ᵀ = Q diag(λ) Qᵀ;
* ``leverage`` = max λ (the cavity S₋i = S − Ĥ_i = L (I − Ã_i) Lᵀ is positive definite iff it is < 1);
* shift m₋i − m = S₋i⁻¹ ĝ_i = L⁻ᵀ u_i, u_i = (I − Ã_i)⁻¹ g̃_i; ``sensitivity`` = ‖u_i‖ = √(Δmᵀ S Δm);
* with a predictor η_i (Jacobian J_i, B_i = J_i L⁻ᵀ): V_i = B_i B_iᵀ, V₋i = B_i (I − Ã_i)⁻¹ B_iᵀ,
  ``prediction_shift`` Δη_i = B_i u_i.

:func:`cavity_one` does this in the P dimensions of θ (dense memories); :func:`cavity_k` in the K dimensions
of the predictor when Ĥ_i = J_iᵀΛ_iJ_i (Woodbury), with no P×P work; :func:`cavity_support` in the r ≪ P
coordinates a dense memory touches (:func:`row_support`).  They are written for one observation
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
    valid, inv = _inverse_spectrum(lam, leverage)
    u = q @ (inv * (q.T @ g_w))
    bq = b_w @ q
    return _theta_outputs(leverage, valid, lam, u, b_w, (bq * inv) @ bq.T)


def _inverse_spectrum(eigenvalues, leverage):
    """``valid`` (leverage < 1) and 1 / (1 − λ) for the eigenvalues λ of Ã (NaN where not valid)."""
    valid = leverage < 1.0
    return valid, jnp.where(valid, 1.0 / jnp.where(valid, 1.0 - eigenvalues, 1.0), jnp.nan)


def _theta_outputs(leverage, valid, eigenvalues, u, b_w, v_cav):
    """The outputs of a cavity solved in θ's coordinates from its shift ``u`` = (I − Ã)⁻¹g̃ and the nonzero
    eigenvalues of Ã (log det(I − Ã) = Σ log(1 − λ))."""
    return {
        "leverage": leverage,
        "valid": valid,
        "u": u,
        "sensitivity": jnp.linalg.norm(u),
        "dEta": b_w @ u,
        "v": b_w @ b_w.T,
        "v_cav": v_cav,
        "logdet": jnp.where(valid, jnp.sum(jnp.log1p(-jnp.where(valid, eigenvalues, 0.0))), jnp.nan),
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


def cavity_support(g_s, h_s, b_s, b_w):
    """:func:`cavity_one` for a memory that lives on r of the P coordinates of θ (``g_s``, ``h_s``: its
    gradient and Hessian there), in r dimensions.

    With E the P×r selection of those coordinates, ĝ = E g_s and Ĥ = E H_s Eᵀ, so g̃ = Bᵀg_s and
    Ã = BᵀH_sB with B = (L⁻¹E)ᵀ (``b_s``, r×P).  With V = B Bᵀ = R Rᵀ (Cholesky) and RᵀH_sR = Q diag(τ) Qᵀ:
    the nonzero eigenvalues of Ã are τ (the other P − r are zero, so ``leverage`` = max(τ, 0)),
    log det(I − Ã) = Σ log(1 − τ), (I − H_sV)⁻¹ = I + H_sRM⁻¹Rᵀ (M = I − RᵀH_sR), u = Bᵀ(I − H_sV)⁻¹g_s and
    B_w(I − Ã)⁻¹B_wᵀ = B_wB_wᵀ + C(H_s + H_sRM⁻¹RᵀH_s)Cᵀ with C = B_wBᵀ (the predictor's ``b_w``, K×P).
    Coordinates the memory does not touch may be among the r (zero rows of ``h_s`` and ``g_s``).

    Returns the outputs of :func:`cavity_one`.
    """
    r = rowlinalg.cholesky(b_s @ b_s.T)
    m = r.T @ h_s @ r
    tau, q = rowlinalg.eigh(0.5 * (m + m.T))
    leverage = jnp.maximum(tau[-1], 0.0)
    valid, inv = _inverse_spectrum(tau, leverage)
    rq = r @ q
    hrq = h_s @ rq
    w = g_s + hrq @ (inv * (rq.T @ g_s))  # (I − H_sV)⁻¹ g_s
    c = b_w @ b_s.T
    v_cav = b_w @ b_w.T + c @ (h_s + (hrq * inv) @ hrq.T) @ c.T
    return _theta_outputs(leverage, valid, tau, b_s.T @ w, b_w, 0.5 * (v_cav + v_cav.T))


def row_support(grad, hess, *, block: int = 4096):
    """The coordinates each row's memory touches, as ``(N, r)`` indices (those it touches first, then
    untouched ones to fill r = the most any row touches), or ``None`` where r > P / 2 (then
    :func:`cavity_one`'s P-dimensional work is no dearer).  Host work, over blocks of rows.

    Examples
    --------
    >>> import numpy as np
    >>> h = np.zeros((2, 4, 4)); h[0, 1, 1] = h[1, 3, 0] = h[1, 0, 3] = 1.0
    >>> row_support(np.zeros((2, 4)), h).tolist()
    [[1, 0], [0, 3]]
    """
    import numpy as np

    grad, hess = np.asarray(grad), np.asarray(hess)
    n, p = grad.shape
    touched = np.empty((n, p), bool)
    for start in range(0, n, block):
        part = hess[start:start + block] != 0
        touched[start:start + block] = part.any(axis=2) | part.any(axis=1) | (grad[start:start + block] != 0)
    r = int(touched.sum(axis=1).max(initial=0))
    if 2 * max(r, 1) > p:
        return None
    return np.argsort(~touched, axis=1, kind="stable")[:, :max(r, 1)].astype(np.int32)

