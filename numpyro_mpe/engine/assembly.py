"""Per-chunk outputs assembled into ``(num, ...)`` arrays, and the host buffers they are written into.

On CPU devices each chunk's outputs are copied into 64-byte-aligned NumPy buffers as the chunk finishes;
the buffers become JAX arrays without another copy (``device_put(..., may_alias=True)``).  XLA's own
assembly (a concatenate, or a chain of in-place updates) copies several times slower.  On other backends
the chunks are assembled in one jitted program.

A per-observation pass writes about 57 bytes per observation (570 MB at N = 10⁷).  Memory the process has
not used before is page-faulted on first touch, which in virtual machines can cost as much as the pass's
maths (5–15 ms instead of 0.5 ms to copy one 65536-row chunk of outputs on the 2-core development VM).  A
:class:`HostPool` therefore keeps the buffers of released results and hands them to the next pass.
"""

from __future__ import annotations

import functools
import math
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from numpyro_mpe.programs import jit

#: Alignment of host buffers handed to XLA (its CPU client aliases 64-byte-aligned memory without a copy).
ALIGN = 64


class _Lease:
    """Owner of one array's memory inside a pooled arena.  Arrays made from it (NumPy views, and the JAX
    arrays that alias them) keep it alive; when the last is gone a finalizer hands the arena back."""

    def __init__(self, arena: np.ndarray, offset: int, shape: tuple, dtype: np.dtype):
        self.arena = arena
        self.__array_interface__ = {"data": (arena.ctypes.data + offset, False), "shape": shape,
                                    "typestr": dtype.str, "version": 3}


class HostPool:
    """Aligned host buffers for assembled outputs, reused once every array over them is released.

    A buffer returns to the pool when no NumPy or JAX array refers to its memory any more, so a result
    that is still held is never written over.  The pool keeps at most as many bytes as the largest set of
    buffers one assembly has taken (:meth:`reserve`), i.e. one pass's outputs, until :meth:`clear` or
    until its owner is collected.

    Examples
    --------
    >>> pool = HostPool()
    >>> pool.reserve(16_000)                      # 8000 bytes of data + ALIGN fit
    >>> a = pool.take((1000,), np.float64)
    >>> ptr = a.ctypes.data
    >>> del a                                     # the memory returns to the pool
    >>> pool.nbytes
    8064
    >>> pool.take((1000,), np.float64).ctypes.data == ptr
    True
    """

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._limit = 0
        self._lock = threading.Lock()  # between takers; the finalizers only append (atomic) and never wait

    def reserve(self, nbytes: int) -> None:
        """Raise the number of released bytes kept to at least ``nbytes``."""
        self._limit = max(self._limit, int(nbytes))

    def take(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialized, writeable, ``ALIGN``-byte-aligned array: a released arena of between 1 and 2
        times the size needed where one is free, else new memory."""
        dtype = np.dtype(dtype)
        shape = tuple(int(s) for s in shape)
        need = math.prod(shape) * dtype.itemsize + ALIGN
        with self._lock:  # the list is only shortened under the lock; finalizers only append to it
            fits = [i for i, a in enumerate(self._free) if need <= a.nbytes <= 2 * need]
            arena = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if arena is None:
            arena = np.empty(need, np.uint8)
        lease = _Lease(arena, (-arena.ctypes.data) % ALIGN, shape, dtype)
        weakref.finalize(lease, self._give, arena).atexit = False
        return np.asarray(lease)

    def _give(self, arena: np.ndarray) -> None:
        # runs wherever the last reference dies (any thread, inside GC): no lock, an atomic append
        if sum(a.nbytes for a in self._free) + arena.nbytes <= self._limit:
            self._free.append(arena)

    def clear(self) -> None:
        """Release the kept buffers to the allocator."""
        with self._lock:
            self._free.clear()

    @property
    def nbytes(self) -> int:
        """Bytes kept for reuse."""
        return sum(a.nbytes for a in self._free)


class Assembly:
    """Per-chunk outputs written into ``(num, ...)`` arrays as they arrive (``add``), padding left out.

    ``layout`` gives ``num``, ``chunk`` and the device mesh (:class:`numpyro_mpe.engine.streaming.Layout`);
    ``pool`` the host buffers (without one, a pool of this assembly's own: fresh memory, freed with the
    result).
    """

    def __init__(self, layout, pool: HostPool | None = None):
        self.layout = layout
        self.pool = HostPool() if pool is None else pool
        self.on_host = all(d.platform == "cpu" for d in layout.mesh.devices.flat)
        self.parts, self.bufs, self.treedef = [], None, None

    def add(self, j: int, out) -> None:
        if not self.on_host:
            self.parts.append(out)
            return
        leaves, self.treedef = jax.tree_util.tree_flatten(out)
        num, chunk = self.layout.num, self.layout.chunk
        if self.bufs is None:
            shapes = [((num,) + x.shape[1:], np.dtype(x.dtype)) for x in leaves]
            self.pool.reserve(sum(math.prod(s) * d.itemsize + ALIGN for s, d in shapes))
            self.bufs = [self.pool.take(s, d) for s, d in shapes]
        lo, hi = j * chunk, min((j + 1) * chunk, num)
        for buf, x in zip(self.bufs, leaves):
            buf[lo:hi] = np.asarray(x)[:hi - lo]

    def result(self):
        if not self.on_host:
            return _assemble(self.parts, self.layout.num, self.layout.chunk)
        device = self.layout.mesh.devices.flat[0]
        out = jax.tree_util.tree_unflatten(self.treedef, [_wrap(b, device) for b in self.bufs])
        self.bufs = None  # the JAX arrays own the memory now
        return out


def _wrap(buf: np.ndarray, device) -> jax.Array:
    try:
        return jax.device_put(buf, device, may_alias=True)
    except TypeError:  # jax without may_alias: one copy
        return jax.device_put(buf, device)


@functools.partial(jit, static_argnums=(1, 2))
def _assemble(parts: list, num: int, chunk: int):
    """Each leaf's chunks written in place into one ``(num, ...)`` buffer (the padding of the last chunk
    left out): XLA's concatenate of many operands copies about 3× slower on CPU."""
    def one(*leaves):
        out = jnp.zeros((num,) + leaves[0].shape[1:], leaves[0].dtype)
        for j, x in enumerate(leaves):
            out = jax.lax.dynamic_update_slice_in_dim(out, x[:min(chunk, num - j * chunk)], j * chunk, axis=0)
        return out

    return jax.tree_util.tree_map(one, *parts)
