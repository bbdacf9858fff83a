"""The linear-Gaussian regression with known noise, and its closed forms (numpy and scipy only).

    y_i ~ Normal(x_iᵀ b, σ),   b ~ Normal(0, τ² I)

The posterior is Gaussian, N(m, S⁻¹), and every leave-one-out (or leave-group-out) quantity has a closed
form; the MPE of a Laplace fit is exact for it.  The tests import the model factory and the closed forms from
here (``from linear_gaussian import ...``: pytest puts ``tests/`` on ``sys.path``) instead of redeclaring
them; each test module keeps its own σ, τ and data and passes them as arguments.

Nothing here uses numpyro_mpe: these are the independent truths.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.stats import multivariate_normal, norm


# ===================================================================== the model
def linear_gaussian_model(sigma: float, tau: float, *, plate: str = "data", name: str = "linear_gaussian"):
    """The NumPyro model ``model(X, y=None, prior_scale=tau)``: latent ``b`` (one per column of ``X``),
    observed ``y`` in the plate ``plate``.

    ``prior_scale`` is τ as a model argument (for :func:`numpyro_mpe.tune_prior`); its default is ``tau``.
    Build the model once per test module: a compiled program is keyed on the model function.
    """

    def model(X, y=None, prior_scale=tau):
        b = numpyro.sample("b", dist.Normal(0, prior_scale).expand([X.shape[1]]).to_event(1))
        with numpyro.plate(plate, X.shape[0]):
            numpyro.sample("y", dist.Normal(X @ b, sigma), obs=y)

    model.__name__ = model.__qualname__ = name
    model.sigma, model.tau = sigma, tau
    return model


def simulate(seed: int, n: int, beta, sigma: float, *, scale_first: float | None = None,
             df: float | None = None, rng: np.random.Generator | None = None):
    """``X`` (n × len(beta), standard normal) and ``y = X β + σ ε``; ``ε`` standard normal, or Student-t with
    ``df`` degrees of freedom.  ``scale_first``: row 0 of ``X`` multiplied by it (a high-leverage row).

    Draws ``X`` then ``ε`` from ``rng`` (default ``numpy.random.default_rng(seed)``); returns ``(X, y, rng)``,
    the generator to draw anything else the test needs after them.
    """
    rng = np.random.default_rng(seed) if rng is None else rng
    beta = np.asarray(beta, float)
    X = rng.normal(size=(n, beta.size))
    if scale_first is not None:
        X[0] *= scale_first
    eps = rng.normal(size=n) if df is None else rng.standard_t(df, size=n)
    return X, X @ beta + sigma * eps, rng


# ===================================================================== closed forms
def posterior(X, y, sigma, tau, weights=None):
    """Posterior mean ``m`` and precision ``S`` with weights ``w_i`` on the likelihood terms (default 1):
    S = Σ w_i x_i x_iᵀ/σ² + I/τ²,  m = S⁻¹ Σ w_i x_i y_i/σ²."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    S = (X.T * w) @ X / sigma**2 + np.eye(X.shape[1]) / tau**2
    m = np.linalg.solve(S, (X.T * w) @ y / sigma**2)
    return m, S


def closed_form(X, y, sigma, tau, weights=None) -> dict:
    """The exact posterior and leave-one-out quantities, one entry per observation where it applies.

    ``m``, ``S`` (precision), ``C`` (covariance); per observation i: ``leverage`` x_iᵀS⁻¹x_i/σ², ``m_loo``
    (the mean without i: S₋i = S − w_i x_i x_iᵀ/σ²), ``shift`` m₋i − m, ``sensitivity`` √(Δmᵀ S Δm), ``lpd``
    log N(y_i; x_iᵀm, σ² + x_iᵀS⁻¹x_i), ``loo_mean`` x_iᵀm₋i and ``loo_var`` x_iᵀS₋i⁻¹x_i (the predictive
    mean and the variance of η_i under the leave-one-out posterior), ``elpd_loo`` log N(y_i; x_iᵀm₋i,
    σ² + x_iᵀS₋i⁻¹x_i) and ``p_loo`` = lpd − elpd_loo.  With ``weights``, the posterior is the weighted one
    and observation i's own (weighted) term is what is removed.
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, float)
    m, S = posterior(X, y, sigma, tau, w)
    C = np.linalg.inv(S)
    v = np.einsum("np,pq,nq->n", X, C, X)
    out = {"m": m, "S": S, "C": C, "leverage": v / sigma**2,
           "lpd": norm.logpdf(y, X @ m, np.sqrt(sigma**2 + v))}
    m_loo, loo_var = [], []
    for i in range(len(y)):
        x = X[i]
        s_i = S - w[i] * np.outer(x, x) / sigma**2
        # one Newton step from m on the quadratic U₋i is its minimum: m₋i = m + S₋i⁻¹ w_i ∇ℓ_i(m)
        m_loo.append(m + np.linalg.solve(s_i, w[i] * x * (x @ m - y[i]) / sigma**2))
        loo_var.append(x @ np.linalg.solve(s_i, x))
    out["m_loo"] = np.array(m_loo)
    out["shift"] = out["m_loo"] - m
    out["sensitivity"] = np.sqrt(np.einsum("np,pq,nq->n", out["shift"], S, out["shift"]))
    out["loo_mean"] = np.einsum("np,np->n", X, out["m_loo"])
    out["loo_var"] = np.array(loo_var)
    out["elpd_loo"] = norm.logpdf(y, out["loo_mean"], np.sqrt(sigma**2 + out["loo_var"]))
    out["p_loo"] = out["lpd"] - out["elpd_loo"]
    return out


def closed_form_group(X, y, rows, sigma, tau) -> dict:
    """Leave-group-out: the rows ``rows`` removed together.

    ``m``, ``S``, ``m_group`` (the mean without the rows), ``shift``, ``sensitivity``, ``leverage`` (the
    largest eigenvalue of S^{-1/2} X_Gᵀ X_G S^{-1/2}/σ²), ``lpd`` log N(y_G; X_G m, σ²I + X_G S⁻¹X_Gᵀ) and
    ``elpd_loo`` log N(y_G; X_G m₋G, σ²I + X_G S₋G⁻¹X_Gᵀ) (joint densities of the group).
    """
    X, y = np.asarray(X, float), np.asarray(y, float)
    m, S = posterior(X, y, sigma, tau)
    b = X.T @ y / sigma**2
    xg, yg = X[rows], y[rows]
    s_g = S - xg.T @ xg / sigma**2
    m_g = np.linalg.solve(s_g, b - xg.T @ yg / sigma**2)
    noise = np.eye(len(yg)) * sigma**2
    chol = np.linalg.cholesky(S)
    lev = np.linalg.eigvalsh(np.linalg.solve(chol, np.linalg.solve(chol, xg.T @ xg / sigma**2).T))[-1]
    return {
        "m": m,
        "S": S,
        "m_group": m_g,
        "shift": m_g - m,
        "sensitivity": np.sqrt((m_g - m) @ S @ (m_g - m)),
        "leverage": lev,
        "lpd": multivariate_normal.logpdf(yg, xg @ m, noise + xg @ np.linalg.solve(S, xg.T)),
        "elpd_loo": multivariate_normal.logpdf(yg, xg @ m_g, noise + xg @ np.linalg.solve(s_g, xg.T)),
    }


def elpd_loo_refit(X, y, sigma, tau) -> np.ndarray:
    """log p(y_i | y₋i) by refitting the posterior on the other rows (no rank-one downdate): a second, plainer
    route to ``closed_form(...)["elpd_loo"]``."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    out = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        m, S = posterior(X[keep], y[keep], sigma, tau)
        out.append(norm.logpdf(y[i], X[i] @ m, np.sqrt(sigma**2 + X[i] @ np.linalg.solve(S, X[i]))))
    return np.array(out)


def log_evidence(X, y, sigma, tau) -> float:
    """log p(y) = log N(y; 0, σ²I + τ² X Xᵀ)."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    cov = sigma**2 * np.eye(len(y)) + tau**2 * X @ X.T
    return float(multivariate_normal.logpdf(y, np.zeros(len(y)), cov))


def nll_grad_hess(X, y, theta, sigma):
    """Gradient (n × p) and Hessian (n × p × p) of −log p(y_i | θ) in θ = b, per observation."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    g = -X * ((y - X @ np.asarray(theta, float)) / sigma**2)[:, None]
    h = X[:, :, None] * X[:, None, :] / sigma**2
    return g, h


def mahalanobis(a, b, S) -> float:
    """√((a − b)ᵀ S (a − b)): the distance of ``a`` from ``b`` in posterior sds when S is the precision."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(np.sqrt(d @ np.asarray(S, float) @ d))


class Problem(NamedTuple):
    """A linear-Gaussian problem: the model, its data, σ, τ and the closed forms."""

    model: object
    X: np.ndarray
    y: np.ndarray
    sigma: float
    tau: float
    truth: dict
