"""Rows laid out in chunks over devices, and THE chunk loop.

Every per-observation computation of the package runs a compiled function of one chunk of rows, chunk after
chunk: :func:`run_chunks`.  :class:`Layout` cuts ``num`` rows into balanced chunks of at most ``chunk_size``
rows (the last padded), sharded along the rows over ``devices``, so that the same code runs on a laptop,
streams 10⁷ observations and shards over devices; :func:`map_rows` applies a function to the rows of arrays
held in memory (draws, shifts, memories) through the same loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS
from tqdm.auto import tqdm

from numpyro_mpe.engine.assembly import Assembly, HostPool
from numpyro_mpe.errors import MPEError
from numpyro_mpe.options import check_chunk_size


def auto_chunk_size(num_params: int, num_eta: int, itemsize: int = 8) -> int:
    """Rows per chunk when none is given: the largest power of two in [256, 65536] whose chunk·K·P
    Jacobian takes at most 16 MiB.

    Larger per-chunk arrays are mapped fresh from the OS at every call (glibc's mmap threshold is at most
    32 MiB) and their page faults then cost more than the chunk's maths: at N = 10⁶, P = 20 the pass took
    0.38 s with chunks of 4096 rows, 0.20 s with 65536 and 0.26 s with 262144, and a Newton pass 0.19,
    0.11 and 0.28 s.

    Examples
    --------
    >>> auto_chunk_size(20, 1), auto_chunk_size(100_001, 1)
    (65536, 256)
    """
    rows = (16 << 20) // max(1, num_params * num_eta * itemsize)
    return int(min(65536, max(256, 1 << max(0, rows.bit_length() - 1))))


class Layout(NamedTuple):
    """``num`` rows padded to ``num_chunks × chunk`` and sharded along each chunk's rows over ``mesh``; the
    chunks are balanced (at most ``chunk_size`` rows each, as many as that needs, as even as the devices
    allow), so that the last chunk wastes little work on padding."""

    num: int
    chunk: int
    num_chunks: int
    mesh: Mesh

    @classmethod
    def build(cls, num: int, chunk_size: int, devices=None) -> Layout:
        chunk_size = check_chunk_size(chunk_size)
        if chunk_size is None:
            raise MPEError("chunk_size must be a positive integer, got None")
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise MPEError("devices= is empty")
        nd = len(devices)
        num = max(int(num), 1)
        chunk = min(int(chunk_size), num)
        chunk = math.ceil(num / math.ceil(num / chunk))  # balanced: the padding is less than one row a chunk
        chunk = nd * math.ceil(chunk / nd)  # every device gets the same number of rows
        return cls(num, chunk, math.ceil(num / chunk), Mesh(np.array(devices), ("obs",)))

    @property
    def padded(self) -> int:
        return self.chunk * self.num_chunks

    @property
    def sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, PS("obs"))

    def place(self, x, pad_value=None) -> list:
        """``(num, ...)`` → ``num_chunks`` arrays ``(chunk, ...)``, each sharded along its rows; the last is
        padded with its last row (or ``pad_value``).  One array per chunk: a chunk sliced out of a stacked
        array inside a program is copied first, which costs more than the chunk's maths.  The slicing is done
        on the host (NumPy), so placing compiles nothing."""
        x = np.asarray(x)
        out = []
        for j in range(self.num_chunks):
            lo, hi = j * self.chunk, min((j + 1) * self.chunk, self.num)
            part = x[lo:hi]
            if hi - lo < self.chunk:
                shape = (self.chunk - (hi - lo),) + part.shape[1:]
                fill = (part[-1:] if pad_value is None
                        else np.full((1,) + part.shape[1:], pad_value, part.dtype))
                part = np.concatenate([part, np.broadcast_to(fill, shape)])
            out.append(jax.device_put(part, self.sharding))
        return out

    def unpad(self, parts: list):
        """Per-chunk outputs (pytrees of ``(chunk, ...)`` arrays, one per chunk) → one pytree of
        ``(num, ...)`` arrays."""
        into = self.assembly()
        for j, part in enumerate(parts):
            into.add(j, part)
        return into.result()

    def assembly(self, pool: HostPool | None = None) -> Assembly:
        """An :class:`~numpyro_mpe.engine.assembly.Assembly` of per-chunk outputs into ``(num, ...)``
        arrays (on CPU in host buffers from ``pool``)."""
        return Assembly(self, pool)


def run_chunks(fn: Callable[[int], Any], num_chunks: int, *, desc: str | None = None, progress: bool = False,
               into: Any = None):
    """THE chunk loop: ``[fn(j) for j in range(num_chunks)]``, waiting for each chunk's result (and, with
    ``into``, handing it to ``into.add(j, out)``) before the next is dispatched; with ``into``,
    ``into.result()`` is returned.  A progress bar (``desc``) when there are several chunks.

    Asynchronous dispatch of many large programs at once can leave the XLA CPU runtime stuck
    (jax-ml/jax#25861; seen three times on a 2-core machine, in benchmark and test runs), and so did copying
    one chunk's result to the host while the next chunk ran (once, in the test suite); one chunk in flight and
    nothing else costs nothing measurable at these chunk sizes.  A chunk program that never finished even
    alone was a different cause, inside the program: two batched LAPACK calls waiting for each other on XLA's
    CPU pool (:mod:`numpyro_mpe.engine.rowlinalg`); the per-row algebra no longer forms them.
    """
    idx = tqdm(range(num_chunks), desc=desc, disable=not progress or num_chunks < 2 or desc is None,
               leave=False)
    outs = []
    for j in idx:
        out = jax.block_until_ready(fn(j))
        if into is None:
            outs.append(out)
        else:
            into.add(j, out)
    return outs if into is None else into.result()


def map_rows(fn: Callable, arrays, num: int, chunk_size: int, *, desc: str | None = None,
             progress: bool = False, devices=None):
    """``fn`` (jitted, rows → rows) applied to the leading axis of the pytree ``arrays`` chunk by chunk
    through :func:`run_chunks`, the results assembled into ``(num, ...)`` arrays.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> out = map_rows(jax.jit(lambda a: a["x"] * 2.0), {"x": jnp.arange(5.0)}, 5, 2)
    >>> out.tolist()
    [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    layout = Layout.build(num, chunk_size, devices if devices is not None else jax.devices()[:1])
    placed = jax.tree_util.tree_map(layout.place, arrays)
    chunks = [jax.tree_util.tree_map(lambda parts, j=j: parts[j], placed,
                                     is_leaf=lambda v: isinstance(v, list))
              for j in range(layout.num_chunks)]
    return run_chunks(lambda j: fn(chunks[j]), layout.num_chunks, desc=desc, progress=progress,
                      into=layout.assembly())
