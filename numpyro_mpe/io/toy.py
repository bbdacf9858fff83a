"""A one-parameter regression for examples: y_i ~ Normal(b x_i, σ) with b ~ Normal(0, 10).

Small enough that every output has a closed form (the Laplace fit is exact for known σ), used by the
docstring examples of the package so that each shows its own function, not the model again.

Examples
--------
>>> import jax, numpyro_mpe as mpe
>>> from numpyro_mpe.io.toy import line_data, line_model
>>> x, y = line_data()
>>> fit = mpe.Laplace(line_model, progress=False).run(jax.random.PRNGKey(0), x, y=y)
>>> fit.adapter.num_params
1
"""

from __future__ import annotations

import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def line_model(x, y=None, sigma=None):
    """y_i ~ Normal(b x_i, σ), b ~ Normal(0, 10); σ = 1 when ``sigma`` is None, else
    σ ~ HalfNormal(``sigma``) (a latent scale)."""
    b = numpyro.sample("b", dist.Normal(0, 10))
    s = 1.0 if sigma is None else numpyro.sample("s", dist.HalfNormal(sigma))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(b * x, s), obs=y)


def line_data(n: int = 20, kind: str = "wiggle"):
    """``x`` evenly spaced on [−1, 1] and ``y = 2x + sin(7x)`` (``kind="wiggle"``), ``y = 2x``
    (``"exact"``), or ``y = 1[x > 0]`` (``"binary"``)."""
    x = jnp.linspace(-1.0, 1.0, n)
    if kind == "exact":
        return x, 2.0 * x
    if kind == "binary":
        return x, (x > 0).astype(x.dtype)
    return x, 2.0 * x + jnp.sin(7.0 * x)


def logistic_line_model(x, y=None):
    """y_i ~ Bernoulli(logit⁻¹(b x_i)), b ~ Normal(0, 1)."""
    b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=b * x), obs=y)


#: Families of :func:`glm_model`.
GLM_FAMILIES = ("poisson", "bernoulli", "normal")


def glm_model(X, y=None, family: str = "poisson"):
    """A GLM with an intercept: ``y_i`` ~ Poisson(exp(η_i)), Bernoulli(logit⁻¹(η_i)) or Normal(η_i, σ) with
    η_i = a + x_iᵀb, a, b ~ Normal(0, 2) (Normal(0, 5) for ``"normal"``) and σ ~ HalfNormal(2)."""
    scale = 5.0 if family == "normal" else 2.0
    a = numpyro.sample("a", dist.Normal(0, scale))
    b = numpyro.sample("b", dist.Normal(0, scale).expand([X.shape[1]]).to_event(1))
    eta = a + X @ b
    s = numpyro.sample("sigma", dist.HalfNormal(2.0)) if family == "normal" else None
    with numpyro.plate("obs", X.shape[0]):
        if family == "poisson":
            numpyro.sample("y", dist.Poisson(jnp.exp(eta)), obs=y)
        elif family == "bernoulli":
            numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)
        else:
            numpyro.sample("y", dist.Normal(eta, s), obs=y)


def glm_data(family: str = "poisson", n: int = 100, seed: int = 0, overdispersion: float | None = None):
    """``(X, y)`` for :func:`glm_model`: X (n, 2) standard normal, η = 0.8 + x₁ 0.5 − x₂ 0.4 (``"bernoulli"``:
    −0.3 + 1.2 x₁ − 0.8 x₂), σ = 0.7; ``overdispersion`` r: negative binomial counts of mean exp(η) and
    variance μ + μ²/r instead of Poisson ones.  NumPy arrays from ``numpy.random.default_rng(seed)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    if family == "bernoulli":
        return X, (rng.uniform(size=n) < 1 / (1 + np.exp(-(-0.3 + X @ [1.2, -0.8])))).astype(float)
    eta = 0.8 + X @ [0.5, -0.4]
    if family == "normal":
        return X, eta + 0.7 * rng.normal(size=n)
    mu = np.exp(eta)
    if overdispersion is not None:
        mu = rng.gamma(overdispersion, mu / overdispersion)
    return X, rng.poisson(mu).astype(float)


def line_fit(kind: str = "wiggle", n: int = 20):
    """``(fit, x)``: the Laplace fit of :func:`line_model` to :func:`line_data` (float64), for examples."""
    import jax
    import numpyro

    from numpyro_mpe.inference.laplace import Laplace

    numpyro.enable_x64()
    x, y = line_data(n, kind)
    return Laplace(line_model, progress=False).run(jax.random.PRNGKey(0), x, y=y), x


__all__ = ["GLM_FAMILIES", "glm_data", "glm_model", "line_data", "line_fit", "line_model",
           "logistic_line_model"]
