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


def line_fit(kind: str = "wiggle", n: int = 20):
    """``(fit, x)``: the Laplace fit of :func:`line_model` to :func:`line_data` (float64), for examples."""
    import jax
    import numpyro

    from numpyro_mpe.inference.laplace import Laplace

    numpyro.enable_x64()
    x, y = line_data(n, kind)
    return Laplace(line_model, progress=False).run(jax.random.PRNGKey(0), x, y=y), x


__all__ = ["line_data", "line_fit", "line_model", "logistic_line_model"]
