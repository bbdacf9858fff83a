"""Checks of a Laplace optimum θ̂ with precision S = ∇²U(θ̂), each raising a :class:`PosteriorError` that names
the latent sites at fault.

* S finite and positive definite;
* U not flat along S's weakest direction v (smallest eigenvalue λ): for q = N(θ̂, S⁻¹),
  U(θ̂ ± 3 λ^{-1/2} v) − U(θ̂) ≈ 4.5.  A rise below :data:`FLAT_RISE` on either side means the posterior
  does not fall off there: the MAP is at infinity or the posterior is improper (separable data under a flat
  prior, a parameter the data and the prior leave unidentified), and the Gaussian is meaningless.

Where the sites at fault include a hierarchy's scale, the message suggests non-centring it: a centred
hierarchy ``a ~ Normal(mu, tau)`` has a funnel whose mode is at ``tau → 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.errors import PosteriorError
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.model.predictor import unwrap
from numpyro_mpe.programs import jit

#: Posterior standard deviations walked from the optimum along the weakest direction.
FLAT_SD = 3.0
#: The smallest rise of U over FLAT_SD sd (a Gaussian rises by FLAT_SD² / 2 = 4.5) that is not flat.
FLAT_RISE = 0.05


class Spectrum(NamedTuple):
    """The eigen-decomposition of a symmetric precision and the rise of U along its weakest direction."""

    values: jax.Array  # ascending
    vectors: jax.Array  # columns
    rise: jax.Array  # U(θ̂ + 3 sd v) − U(θ̂), U(θ̂ − 3 sd v) − U(θ̂)


def spectrum(adapter: ModelAdapter, theta, precision) -> Spectrum:
    """:class:`Spectrum` of ``precision`` at ``theta`` (traceable: called inside the Laplace program)."""
    vals, vecs = jnp.linalg.eigh(0.5 * (precision + precision.T))
    lam = vals[0]
    sd = FLAT_SD / jnp.sqrt(jnp.where(lam > 0, lam, jnp.inf))  # not positive definite: no walk (rise 0 − 0)
    step = sd * vecs[:, 0]
    # one trace of U for the three points (lax.map: a model need not be batchable)
    u = jax.lax.map(adapter.potential, jnp.stack([theta, theta + step, theta - step]))
    rise = u[1:] - u[0]
    return Spectrum(vals, vecs, rise)


spectrum_program = jit(spectrum)


def check_precision(adapter: ModelAdapter, precision, theta=None, spec: Spectrum | None = None) -> None:
    """Raise :class:`PosteriorError` if ``precision`` is not finite and positive definite, or (with the
    optimum ``theta``) if U is flat along its weakest direction; the message names the latent sites."""
    prec = np.asarray(precision)
    if not np.all(np.isfinite(prec)):
        rows = np.flatnonzero(~np.all(np.isfinite(prec), axis=1))
        raise PosteriorError(
            "the Hessian of the potential at the optimum is not finite in the latent site(s) "
            f"{adapter.site_names_of(rows)}" + centring_hint(adapter, theta, adapter.site_names_of(rows)))
    if spec is None:
        spec = (spectrum_program(adapter, theta, precision) if theta is not None else
                Spectrum(*np.linalg.eigh(0.5 * (prec + prec.T)), np.full(2, np.inf)))
    vals, vecs, rise = (np.asarray(x) for x in spec)
    labels = adapter.param_labels()
    tol = 1e-12 * max(1.0, float(np.max(np.abs(vals))))
    bad = vals <= tol
    if bad.any():
        weight = np.sum(vecs[:, bad] ** 2, axis=1)
        rows = np.flatnonzero(weight > 0.1)
        sites = adapter.site_names_of(rows)
        raise PosteriorError(
            f"the Hessian of the potential at the optimum is not positive definite (smallest eigenvalue "
            f"{vals.min():.3g}); the flat directions involve the latent site(s) {sites} "
            f"({[labels[r] for r in rows][:8]}): the mode is a saddle or the parameters are not identified; "
            "add prior information or reparameterize" + centring_hint(adapter, theta, sites))
    if theta is not None and np.any(np.isfinite(rise) & (rise < FLAT_RISE)):
        rows = np.flatnonzero(vecs[:, 0] ** 2 > 0.1)
        sites = adapter.site_names_of(rows)
        where = ", ".join(f"{labels[r]} = {float(np.asarray(theta)[r]):.4g}" for r in rows[:4])
        raise PosteriorError(
            f"the posterior looks improper: from the optimum ({where}, unconstrained), the potential rises "
            f"by only {float(np.nanmin(rise)):.2g} over {FLAT_SD:g} posterior sd ({FLAT_SD:g} × "
            f"{float(vals[0]) ** -0.5:.3g}) along the direction of {[labels[r] for r in rows][:8]} (a "
            f"Gaussian rises by {FLAT_SD ** 2 / 2:g}): the MAP is at infinity or the posterior is flat "
            "there, e.g. separable classes under a flat prior or a parameter neither the data nor the prior "
            "pin down; give the latent site(s) " f"{sites} a proper, weakly informative prior"
            + centring_hint(adapter, theta, sites))


def centred_scales(adapter: ModelAdapter, theta) -> dict[str, list[str]]:
    """Latent sites whose distribution's ``scale`` depends on other latent sites (a centred hierarchy):
    ``{site: [scale sites]}``, read from the Jacobian of each scale at ``theta``."""
    out: dict[str, list[str]] = {}
    tr = adapter.trace(theta)
    for site in adapter.latent:
        fn = tr[site.name]["fn"]
        try:
            base = unwrap(fn)[0]
        except NotImplementedError:
            continue
        if getattr(base, "scale", None) is None or not base.batch_shape and not fn.batch_shape:
            continue

        def scale_of(t, name=site.name):
            return jnp.ravel(unwrap(adapter.trace(t)[name]["fn"])[0].scale)

        jac = np.asarray(jax.jacfwd(scale_of)(theta))
        cols = np.flatnonzero(np.any(jac != 0, axis=0))
        parents = [n for n in adapter.site_names_of(cols) if n != site.name]
        if parents:
            out[site.name] = parents
    return out


def centring_hint(adapter: ModelAdapter, theta, sites) -> str:
    """A sentence suggesting non-centring where ``sites`` include a centred hierarchy or its scale."""
    if theta is None:
        return ""
    try:
        centred = centred_scales(adapter, jnp.asarray(theta))
    except Exception:  # noqa: BLE001 - a hint only: never hide the error it is added to
        return ""
    hits = [(s, p) for s, p in centred.items() if s in sites or set(p) & set(sites)]
    if not hits:
        return ""
    site, parents = hits[0]
    return (f". Site '{site}' is centred on the latent scale {parents} (a funnel whose mode is at scale "
            f"→ 0): non-centre it, {site} = loc + scale * z with z ~ Normal(0, 1) (e.g. "
            "numpyro.handlers.reparam with numpyro.infer.reparam.LocScaleReparam(0))")
