"""Sums over the observations of one site, for the MAP and the precision: Σ w_i ℓ_i, Σ J_iᵀe_i and the
curvature Σ J_iᵀΛ_iJ_i (full, its diagonal, or times a probe), chunk by chunk.

No pass holds more than one chunk's Jacobian (``chunk·K·P``) besides the P×P (or P) sums.  Each chunk's
program sums per device (no collective inside it); the devices and the chunks are summed on the host.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from numpyro_mpe.engine.layout import run_chunks
from numpyro_mpe.engine.terms import SiteData, SiteRows, chunk_terms, eta_rows
from numpyro_mpe.errors import MPEError
from numpyro_mpe.model import rankone
from numpyro_mpe.model.adapter import ModelAdapter
from numpyro_mpe.programs import jit


def _per_device(x, mesh):
    """Rows ``(c, ...)`` → ``(devices, c / devices, ...)``, each device's rows on its own device."""
    nd = mesh.size
    x = jnp.reshape(x, (nd, -1) + x.shape[1:])
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PS("obs")))


@partial(jit, static_argnames=("rows", "kind", "structure", "mesh"))
def chunk_sums(adapter: ModelAdapter, rows: SiteRows, data: dict, theta, probe, *, kind: str,
               structure: str, mesh):
    """Per-device sums over one chunk at ``theta``: the value Σ w ℓ, and unless ``kind == "value"`` the
    gradient Σ Jᵀe and the curvature Σ JᵀΛJ — ``"full"`` (P×P), ``"diag"`` (P) or ``"matvec"`` (P×r, times
    ``probe``)."""
    tm, val = chunk_terms(adapter, rows, data, theta)
    val = jnp.sum(_per_device(val, mesh), axis=1)
    if kind == "value":
        return val
    e, lam = _per_device(tm.e, mesh), _per_device(tm.lam, mesh)
    if structure == "full":  # P×P: from the whole Jacobian
        jac = _per_device(tm.jac, mesh)
        lam_jac = jnp.sum(lam[..., None] * jac[:, :, None, :, :], axis=3)  # Λ_i J_i, (d, c, K, P)
        return val, jnp.einsum("dckp,dck->dp", jac, e), jnp.einsum("dckp,dckq->dpq", jac, lam_jac)
    # per block of columns (per latent site where J was formed so): no (c, K, P) array
    blocks = [b.map_rows(lambda x: _per_device(x, mesh)) if isinstance(b, rankone.RankOneBlock)
              else _per_device(b, mesh) for b in tm.blocks]
    sizes = [rankone.block_size(b) for b in blocks]
    ends = np.cumsum(sizes)
    starts = ends - sizes

    def sums(blocks, e, lam):  # one device's rows
        grad = jnp.concatenate([rankone.block_gradient(b, e) for b in blocks])
        if structure == "diag":  # Σ_i diag(J_iᵀ Λ_i J_i)
            return grad, jnp.concatenate([rankone.block_curvature_diag(b, lam) for b in blocks])
        # Σ_i J_iᵀ Λ_i J_i M for M = probe (P, r): a projection, then a transposed product
        jac_probe = sum(rankone.block_project(b, probe[lo:hi]) for b, lo, hi in zip(blocks, starts, ends))
        lam_probe = jnp.einsum("ckl,clr->ckr", lam, jac_probe)
        return grad, jnp.concatenate([rankone.block_gradient(b, lam_probe) for b in blocks])

    grad, curv = jax.vmap(sums)(blocks, e, lam)
    return val, grad, curv


def site_sums(site: SiteData, theta, kind: str = "all", structure: str = "full", probe=None,
              progress: bool = False):
    """Σ over every observation of ``site`` at ``theta`` (see :func:`chunk_sums`): the value only for
    ``kind="value"``, else ``(value, gradient, curvature)``; per-chunk and per-device partial sums added on
    the host."""
    lay = site.layout
    outs = run_chunks(lambda j: chunk_sums(site.adapter, site.rows, site.chunk(j, theta), theta, probe,
                                           kind=kind, structure=structure, mesh=lay.mesh),
                      lay.num_chunks, desc=None, progress=progress)

    def total(*parts):
        return jnp.asarray(np.sum([np.sum(np.asarray(x), axis=0) for x in parts], axis=0))

    return jax.tree_util.tree_map(total, *outs)


def total_loss_fn(site: SiteData):
    """θ ↦ Σ_i w_i ℓ_i(θ) over every chunk inside one program (``lax.map`` over the chunk axis, each chunk
    rematerialized in the backward pass), for optimizers that need a traceable objective."""
    if site.rows.source != "rows":
        raise MPEError(f"site '{site.name}': {site.no_plan_reason or 'the model does not run on its rows'}")
    stacked = {"y": jnp.stack([c["y"] for c in site.chunks]), "w": jnp.stack([c["w"] for c in site.chunks]),
               "rows": [jnp.stack([c["row", k] for c in site.chunks]) for k in site.plan.batched]}
    adapter, rows = site.adapter, site.rows

    f = site.site.predictor.log_lik

    @jax.checkpoint
    def chunk_loss(t, data):
        eta, aux = eta_rows(adapter, rows, t, data["rows"])
        ll = f(eta, data["y"], aux)
        return -jnp.sum(jnp.where(data["w"] != 0, ll * data["w"], 0.0))

    def total(t):
        return jnp.sum(jax.lax.map(lambda d: chunk_loss(t, d), stacked))

    return total
