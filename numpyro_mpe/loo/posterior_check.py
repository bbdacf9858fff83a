"""Is the Gaussian any good?  The global Pareto k̂ of p(θ, y)/g(θ) over draws from a version g of q.

Yao, Vehtari, Simpson & Gelman (2018, "Yes, but did it work?") fit a generalized Pareto tail to the
importance ratios r_s = p(θ_s, y)/q(θ_s), θ_s ~ q: k̂ ≤ 0.7 says q can be corrected to the posterior by
importance sampling, k̂ > 0.7 that it cannot — a Laplace or variational q is then not the posterior and its
leave-one-out is not the Bayesian leave-one-out.  Two versions are computed from the same base numbers:

* ``khat``: g = t_df(m, S⁻¹), q with Student-t tails (``df = 5``).  This is the diagnostic the package acts
  on: it asks whether the draws that ``fit.loo(method="auto")`` reweights cover the posterior.  q's own
  Gaussian tails are lighter than most posteriors' even where q is a fine approximation (a Normal model with
  unknown σ), and the t version separates "q is good" (k̂ well below 0.7) from "q is wrong" (a hierarchical
  model whose Laplace τ is several times NUTS's: k̂ > 1) more sharply.
* ``khat_gaussian``: g = q itself, exactly Yao et al.'s k̂ (reported beside it).

The draws, their potential U(θ_s) = −log p(θ_s, y) and the log-likelihoods of the observed site ℓ(θ_s)
(S × N) are kept on the fit for :func:`numpyro_mpe.loo.auto.auto_loo`, which reweights them to every
observation's leave-one-out posterior (PSIS-LOO with an approximate posterior, as R loo's
``loo_approximate_posterior``).
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np

from numpyro_mpe.errors import user_stacklevel
from numpyro_mpe.gaussian import base_draws, base_logpdf
from numpyro_mpe.loo.arviz_compat import draw_chunk
from numpyro_mpe.loo.common import GOOD_K, smooth_log_weights
from numpyro_mpe.programs import jit

if TYPE_CHECKING:
    from numpyro_mpe.fit import Fit

#: Draws of the check, and the Student-t degrees of freedom of its proposal.
NUM_SAMPLES, DF = 4000, 5.0
#: ``fit.loo()`` and the report run the check (and reweight its draws) when draws × observations stay
#: below this.
MAX_ELEMENTS = 2.5e7


class DrawTerms(NamedTuple):
    """Draws θ_s from g (S, P), log g(θ_s) up to a constant, U(θ_s) and the site's ℓ(θ_s) (S, N)."""

    theta: np.ndarray
    log_g: np.ndarray
    potential: np.ndarray
    log_lik: np.ndarray


class PosteriorCheck(NamedTuple):
    """The global check of a fit's Gaussian (see the module docstring)."""

    khat: float
    khat_gaussian: float
    num_samples: int
    df: float

    @property
    def reliable(self) -> bool:
        """k̂ ≤ 0.7: importance sampling from q's t version corrects it to the posterior."""
        return bool(self.khat <= GOOD_K)

    def describe(self) -> str:
        verdict = "q covers the posterior" if self.reliable else "q is NOT the posterior"
        return (f"global k̂ {self.khat:.2f} ({verdict}; Student-t({self.df:g}) proposal, {self.num_samples} "
                f"draws; Gaussian q's own k̂ {self.khat_gaussian:.2f})")


@partial(jit, static_argnames=("df", "name", "batch"))
def _draw_terms(adapter, post, z, *, df, name, batch):
    """Draws θ = m + L⁻ᵀz from t_df(m, S⁻¹) (Gaussian for ``df=None``) at the base draws z, log g up to a
    constant, U and — with a site ``name`` — its ℓ at each draw: one compiled program."""
    theta = post.mean + post.unwhiten(z.T).T
    log_g = base_logpdf(z, df)  # the Jacobian of θ(z) is constant: cancels in normalized weights
    if name is None:  # the potential alone (Yao et al.'s check needs no log-likelihoods)
        return theta, log_g, jax.lax.map(adapter.potential, theta, batch_size=batch), None
    pot, ll = _terms(adapter, theta, name=name, batch=batch)
    return theta, log_g, pot, ll


def _terms(adapter, theta, *, name, batch):
    """U(θ_s) and ℓ(θ_s) of the site ``name`` at every draw, in batches of draws."""
    def one(t):
        return adapter.potential(t), adapter.log_lik(t, name)

    return jax.lax.map(one, theta, batch_size=batch)


def draw_terms(fit: Fit, var_name: str | None, num_samples: int, rng_key, df: float | None = DF) -> DrawTerms:
    """``num_samples`` draws from t_df(m, S⁻¹) (Gaussian for ``df=None``) with their log density, potential
    and log-likelihoods of ``var_name`` (``None``: no log-likelihoods)."""
    n = sum(site.num_obs for site in fit.adapter.observed.values())  # rows the potential runs over
    post = fit.posterior
    z = base_draws(rng_key, int(num_samples), post.mean.shape[0], df, post.mean.dtype)
    out = _draw_terms(fit.adapter, post, z, df=df, name=var_name, batch=draw_chunk(n, num_samples))
    return DrawTerms(*(None if x is None else np.asarray(x) for x in out))


def affordable(fit: Fit, num_samples: int = NUM_SAMPLES) -> bool:
    """Whether draws × observations (all observed sites) stay under :data:`MAX_ELEMENTS`."""
    n = sum(s.num_obs for s in fit.adapter.observed.values())
    return num_samples * n <= MAX_ELEMENTS


def global_khat(terms: DrawTerms) -> float:
    """k̂ of the ratios p(θ_s, y)/g(θ_s) (−inf where they are constant: g is the posterior)."""
    _, k = smooth_log_weights((-terms.potential - terms.log_g)[None])
    return float(k[0])


def _cache_key(name: str, num_samples: int, df: float, key) -> tuple:
    return ("posterior_check", name, int(num_samples), float(df), tuple(np.asarray(key).ravel().tolist()))


def posterior_check(fit: Fit, var_name: str | None = None, *, num_samples: int = NUM_SAMPLES,
                    df: float = DF, rng_key=None, warn: bool = True) -> PosteriorCheck:
    """The global Pareto k̂ of the fit's Gaussian: can importance sampling correct q to the posterior?

    Stored in ``fit.info["posterior_check"]`` (and shown by ``repr(fit)``, ``fit.loo()`` and the report);
    the draws are kept for ``fit.loo(method="auto")``.  A warning says what k̂ > 0.7 means.

    Parameters
    ----------
    fit : Fit
        A fitted model.
    var_name : str, optional
        The observed site whose log-likelihoods are kept with the draws (default: the only one, else the
        first).
    num_samples : int, default 4000
        Draws from q's Student-t version (and as many from q).
    df : float, default 5
        Degrees of freedom of the Student-t version of q.
    rng_key : jax.random.PRNGKey, optional
        Default ``PRNGKey(0)``.
    warn : bool, default True
        Warn when k̂ > 0.7.

    Returns
    -------
    PosteriorCheck
        ``khat`` (t proposal), ``khat_gaussian`` (q itself), ``num_samples``, ``df``, ``reliable``.

    Examples
    --------
    >>> from numpyro_mpe.io.toy import line_fit
    >>> fit, _ = line_fit()
    >>> check = fit.posterior_check()
    >>> check.khat_gaussian == float("-inf")  # linear-Gaussian: q is the posterior, the ratios constant
    True
    >>> check.reliable
    True
    """
    name = var_name if var_name is not None else next(iter(fit.adapter.observed))
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    cache_key = _cache_key(name, num_samples, df, key)
    if cache_key in fit._cache:
        return fit._cache[cache_key][0]
    terms = draw_terms(fit, name, int(num_samples), key, df)
    gauss = draw_terms(fit, None, int(num_samples), key, None)
    check = PosteriorCheck(global_khat(terms), global_khat(gauss), int(num_samples), float(df))
    fit._cache[cache_key] = (check, terms)
    fit.info["posterior_check"] = check
    if warn and not check.reliable:
        warnings.warn(
            f"The Gaussian posterior q of this fit is not the posterior: {check.describe()}. Its "
            "leave-one-out (and its parameter shifts) describe q, not the Bayesian model; fit.loo() corrects "
            "the elpd by sampling from the posterior (method='auto'); for parameters, reparametrize (e.g. "
            "non-centre a hierarchy), or run NUTS.", stacklevel=user_stacklevel())
    return check


def cached_terms(fit: Fit, var_name: str, num_samples: int, df: float, rng_key) -> DrawTerms:
    """The draws of :func:`posterior_check` for ``var_name`` (computed now if they are not kept)."""
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    cache_key = _cache_key(var_name, num_samples, df, key)
    if cache_key not in fit._cache:
        posterior_check(fit, var_name, num_samples=num_samples, df=df, rng_key=key, warn=False)
    return fit._cache[cache_key][1]


__all__ = ["DrawTerms", "PosteriorCheck", "affordable", "draw_terms", "posterior_check"]
