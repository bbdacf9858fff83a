"""Compiled programs: how many are compiled, how long it takes, and JAX's persistent compilation cache.

Every function of the model that runs under ``jax.jit`` is a module-level function taking the
:class:`~numpyro_mpe.model.ModelAdapter` (a pytree: its data are arguments, its structure the static part)
and the posterior (a NamedTuple) as arguments.  JAX keys its cache of compiled programs on that structure and
the shapes and dtypes of the arguments, so a program is compiled once per (model, data shapes and dtypes,
options) and reused by every fit, refit and checkpoint in the process.

Across processes, JAX's persistent compilation cache keeps the compiled programs on disk.  numpyro_mpe turns
it on when it binds its first model (``ModelAdapter.build``), in ``$NUMPYRO_MPE_CACHE_DIR`` (default
``~/.cache/numpyro_mpe/jax``, or
``$XDG_CACHE_HOME/numpyro_mpe/jax``); ``NUMPYRO_MPE_CACHE_DIR=off`` leaves JAX's settings alone, and so does a
cache directory the user has already set (``jax_compilation_cache_dir``: it is kept, and logged at DEBUG
level).

:func:`track` counts, during a call, the programs compiled, those loaded from the persistent cache instead,
and the seconds spent tracing, lowering and compiling them; fits record them in ``fit.info["compile"]`` and
the ``numpyro_mpe`` logger reports them at DEBUG level.

:func:`jit` is the package's ``jax.jit``: a program whose array arguments are small (at most
:data:`QUICK_MAX_ELEMENTS` elements in all, an everyday model's data) is compiled with XLA's quick settings
(:data:`QUICK_OPTIONS`: no LLVM optimisation, no expensive passes), 20–30 % less compile time; it runs
slower, which a program on so little data does not notice.  Larger arguments get XLA's optimised programs.
``NUMPYRO_MPE_QUICK_COMPILE`` moves the bound (``0``: always optimise).  On the CPU every program of the
package, quick or optimised, is also compiled with XLA's classic loop emitters instead of its MLIR fusion
emitters (:data:`CPU_OPTIONS`): a third less compile time, the same results and about the same run time.
XLA versions without those emitters' switch (jaxlib 0.12 has none) compile with their defaults
(:func:`cpu_options`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("numpyro_mpe")

#: Programs whose array arguments hold at most this many elements in all are compiled quickly (:func:`jit`).
QUICK_MAX_ELEMENTS = 1 << 16
#: Environment variable overriding :data:`QUICK_MAX_ELEMENTS` (``0``: always compile optimised programs).
QUICK_ENV = "NUMPYRO_MPE_QUICK_COMPILE"
#: XLA's settings for a quick compilation (those of ``jax_disable_most_optimizations``, for one program).
QUICK_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
#: XLA's settings for every program compiled for the CPU: the classic loop emitters instead of the MLIR fusion
#: emitters, whose compilation takes about 1.5 times as long (0.41 s against 0.25 s for the per-observation
#: pass of a logistic regression at N = 10⁵; 46 s against 30 s for a handful of tests).
CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
#: :data:`CPU_OPTIONS` as an ``XLA_FLAGS`` entry, for the programs the package does not compile itself
#: (NumPyro's NUTS for the commands' reference, JAX's single operations): :func:`add_cpu_xla_flag`.
CPU_XLA_FLAG = " ".join(f"--{name}={str(value).lower()}" for name, value in CPU_OPTIONS.items())
#: The jaxlib releases (major, minor) whose XLA is known to take :data:`CPU_XLA_FLAG`: XLA aborts the
#: process on a flag it does not know (jaxlib 0.12 no longer has it), and ``XLA_FLAGS`` must be set before
#: JAX starts its backend, so it cannot be tried first.
CPU_XLA_FLAG_JAXLIB = ((0, 10),)
#: Environment variable naming the persistent cache folder (``off`` disables it).
CACHE_ENV = "NUMPYRO_MPE_CACHE_DIR"
#: Programs that take less than this to compile are not written to the persistent cache.
MIN_COMPILE_SECONDS = 0.05
#: Size bound of the persistent cache folder (least recently used entries are evicted above it).  A bound
#: also makes JAX take a file lock around every read and write of the folder: without one, JAX writes an entry
#: in place, and another process reading it meanwhile can crash.
CACHE_MAX_BYTES = 2 << 30
#: A file in the cache folder saying its entries have the access-time files a bounded cache needs.
BOUNDED_MARKER = ".numpyro_mpe_bounded"

# JAX's monitoring events (jax._src.dispatch and jax._src.compiler): the backend event spans a compilation
# or a load from the persistent cache; a cache hit is recorded inside that span, before it ends.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclass(eq=False)
class CompileStats:
    """What building programs cost during one call.

    ``programs``: programs compiled by XLA (``names`` lists them), in ``seconds``; ``loaded``: programs read
    from the persistent cache instead, in ``load_seconds``; ``trace_seconds`` and ``lower_seconds``: Python
    tracing to a jaxpr and lowering to MLIR (paid on every program built, loaded or not).
    """

    programs: int = 0
    seconds: float = 0.0
    names: list = field(default_factory=list)
    loaded: int = 0
    load_seconds: float = 0.0
    trace_seconds: float = 0.0
    lower_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"programs": self.programs, "seconds": round(self.seconds, 3), "loaded": self.loaded,
                "load_seconds": round(self.load_seconds, 3), "trace_seconds": round(self.trace_seconds, 3),
                "lower_seconds": round(self.lower_seconds, 3)}


_local = threading.local()
_installed = False
_cache_setup = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    active = getattr(_local, "active", ())
    if event == _BACKEND_COMPILE_EVENT:
        hit, _local.cache_hit = getattr(_local, "cache_hit", False), False
        for stats in active:
            if hit:
                stats.loaded += 1
                stats.load_seconds += duration
            else:
                stats.programs += 1
                stats.seconds += duration
                stats.names.append(kwargs.get("fun_name", "?"))
    elif event == _TRACE_EVENT:
        for stats in active:
            stats.trace_seconds += duration
    elif event == _LOWER_EVENT:
        for stats in active:
            stats.lower_seconds += duration


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        _local.cache_hit = True


def _install() -> None:
    global _installed
    if not _installed:
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(_on_duration)
        monitoring.register_event_listener(_on_event)
        _installed = True


@contextlib.contextmanager
def track(what: str, into: dict | None = None) -> Iterator[CompileStats]:
    """Count the programs compiled while the block runs (nested blocks count in every enclosing one).

    ``into``: a dict (e.g. ``fit.info["compile"]``) that receives ``{what: {**stats.as_dict(), "wall":
    w}}`` (see :class:`CompileStats`).  The count is also logged at DEBUG level on the ``numpyro_mpe``
    logger.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> with track("example") as stats:
    ...     _ = jax.jit(lambda x: x * 2.0 + 1.0)(jnp.arange(3.0))
    >>> stats.programs + stats.loaded >= 1  # compiled now, or loaded from the persistent cache
    True
    """
    _install()
    stats = CompileStats()
    active = getattr(_local, "active", None)
    if active is None:
        active = _local.active = []
    active.append(stats)
    start = time.perf_counter()
    try:
        yield stats
    finally:
        active.remove(stats)
        wall = time.perf_counter() - start
        if into is not None:
            into[what] = {**stats.as_dict(), "wall": round(wall, 3)}
        logger.debug("%s: %d program(s) compiled in %.2f s, %d loaded from the persistent cache in %.2f s, "
                     "tracing %.2f s, lowering %.2f s (%.2f s wall)", what, stats.programs, stats.seconds,
                     stats.loaded, stats.load_seconds, stats.trace_seconds, stats.lower_seconds, wall)


def quick_bound() -> int:
    """The bound in force: ``$NUMPYRO_MPE_QUICK_COMPILE``, else :data:`QUICK_MAX_ELEMENTS`."""
    env = os.environ.get(QUICK_ENV, "").strip()
    if not env:
        return QUICK_MAX_ELEMENTS
    try:
        return int(float(env))
    except (ValueError, OverflowError):  # not a number, nan, inf
        from numpyro_mpe.errors import MPEError

        raise MPEError(f"{QUICK_ENV}={env!r}: expected a number of array elements (0: always optimise)")\
            from None


def small_work(rows: int, p: int) -> bool:
    """Whether a per-row P × P computation over ``rows`` rows (rows × P² elements) is within
    :func:`quick_bound`: the test of programs whose small arguments hide a large output (a Hessian per
    row)."""
    return rows * p * p <= quick_bound()


@contextlib.contextmanager
def quick_block(on: bool = True) -> Iterator[None]:
    """Compile every program of the block with XLA's quick settings when ``on``: for code whose ``jax.jit``
    takes no compiler options from us (NumPyro's NUTS).

    It sets JAX's process-wide ``jax_disable_most_optimizations`` for the block and restores it after, so
    another thread compiling meanwhile gets the quick settings too.

    Examples
    --------
    >>> import jax
    >>> from numpyro_mpe.programs import quick_block
    >>> with quick_block():
    ...     jax.config._read("jax_disable_most_optimizations")
    True
    >>> jax.config._read("jax_disable_most_optimizations")
    False
    """
    import jax

    # a flag, not a config attribute: JAX reads it when it compiles (jax._src.compiler)
    before = bool(jax.config._read("jax_disable_most_optimizations"))
    jax.config.update("jax_disable_most_optimizations", before or on)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


_cpu_options: dict | None = None


def cpu_options() -> dict:
    """:data:`CPU_OPTIONS` where JAX's default backend is the CPU and its XLA takes them, else ``{}``.

    Whether XLA takes them is tried once per process, on a program of one addition: XLA refuses an option it
    does not know (jaxlib 0.12: ``No such compile option``).

    Examples
    --------
    >>> from numpyro_mpe.programs import CPU_OPTIONS, cpu_options
    >>> cpu_options() in (CPU_OPTIONS, {})
    True
    """
    global _cpu_options
    if _cpu_options is None:
        import jax
        import numpy as np

        options = {}
        if jax.default_backend() == "cpu":
            try:
                jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)(np.float32(0)).block_until_ready()
                options = dict(CPU_OPTIONS)
            except Exception as exc:  # XLA's error for an unknown option is a runtime error of jaxlib's own
                logger.debug("XLA does not take %s (%s): compiling with its defaults", CPU_OPTIONS, exc)
        _cpu_options = options
    return _cpu_options


def add_cpu_xla_flag(environ: dict | None = None) -> bool:
    """Add :data:`CPU_XLA_FLAG` to ``XLA_FLAGS`` in ``environ`` (default ``os.environ``) unless it names the
    fusion emitters already, the installed jaxlib is not one of :data:`CPU_XLA_FLAG_JAXLIB`, or JAX has
    started its backend in this process (it reads ``XLA_FLAGS`` then, so that programs compiled before and
    after would differ).  For applications (the ``numpyro-mpe`` commands, the test suite), not for the
    library, which leaves the process's settings alone.

    Returns
    -------
    bool
        Whether ``XLA_FLAGS`` now asks for the classic emitters.

    Examples
    --------
    >>> from numpyro_mpe.programs import add_cpu_xla_flag
    >>> add_cpu_xla_flag({"XLA_FLAGS": "--xla_cpu_use_fusion_emitters=true"})
    False
    """
    import sys
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if any(name in flags for name in CPU_OPTIONS):
        return CPU_XLA_FLAG in flags.split()
    try:
        release = tuple(int(part) for part in version("jaxlib").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    if release not in CPU_XLA_FLAG_JAXLIB:
        return False
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):  # another JAX: assume started
            return False
    env["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAG}".strip()
    return True


def array_elements(tree) -> int | None:
    """Elements of the arrays among the leaves of ``tree`` (other leaves count nothing); ``None`` where one
    is a tracer: the call is part of a larger program, whose options apply."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, (jax.Array, np.ndarray)):
            total += int(leaf.size)
    return total


class SizedJit:
    """``jax.jit(fn, **jit_kwargs)`` twice, optimised and quick (:data:`QUICK_OPTIONS`); a call takes the
    quick program when its arguments hold at most :data:`QUICK_MAX_ELEMENTS` array elements in all.  Both take
    :data:`CPU_OPTIONS` where JAX's default backend is the CPU.

    The choice follows the shapes, as JAX's own cache does: a program is built once per (shapes, choice).
    The two ``jax.jit`` are made at the first call, when the backend is known (JAX starts it then, not at
    import).
    """

    def __init__(self, fn: Callable, *, quick: bool | Callable[..., bool] = True, **jit_kwargs: Any) -> None:
        import functools

        if "compiler_options" in jit_kwargs:
            raise TypeError("numpyro_mpe.programs.jit sets compiler_options itself; use jax.jit")
        self._fn, self._jit_kwargs, self._has_quick = fn, jit_kwargs, bool(quick)
        self._jitted: tuple | None = None
        self._lock = threading.Lock()
        self._allows_quick = quick if callable(quick) else (lambda *args, **kwargs: True)
        functools.update_wrapper(self, fn)

    def _programs(self) -> tuple:
        """``(plain, optimized, quick)``: ``plain`` without options, for a call inside another program
        (``jax.jit`` takes compiler options on the outermost program only; that program's apply)."""
        if self._jitted is None:
            with self._lock:
                if self._jitted is None:
                    import jax

                    plain = jax.jit(self._fn, **self._jit_kwargs)
                    cpu = cpu_options()
                    optimized = jax.jit(self._fn, compiler_options=cpu, **self._jit_kwargs) if cpu else plain
                    quick = (jax.jit(self._fn, compiler_options={**QUICK_OPTIONS, **cpu}, **self._jit_kwargs)
                             if self._has_quick else optimized)
                    self._jitted = (plain, optimized, quick)
        return self._jitted

    @property
    def optimized(self):
        """The optimised ``jax.jit``."""
        return self._programs()[1]

    @property
    def quick(self):
        """The quick ``jax.jit`` (the optimised one for a program made with ``quick=False``)."""
        return self._programs()[2]

    def program(self, *args, **kwargs):
        """The jitted function a call with these arguments runs: ``quick`` or ``optimized``, or one without
        options of its own when an argument is a tracer (the call is part of a larger program)."""
        plain, optimized, quick = self._programs()
        size = array_elements((args, kwargs))
        if size is None:
            return plain
        bound = quick_bound()
        if bound <= 0 or quick is optimized or not self._allows_quick(*args, **kwargs):
            return optimized
        return quick if size <= bound else optimized

    def __call__(self, *args, **kwargs):
        return self.program(*args, **kwargs)(*args, **kwargs)


def jit(fn: Callable | None = None, *, quick: bool | Callable[..., bool] = True,
        **jit_kwargs: Any) -> SizedJit | Callable[[Callable], SizedJit]:
    """The package's ``jax.jit``: a quick compilation for small arguments, an optimised one otherwise.

    Parameters
    ----------
    fn : callable, optional
        The function; omitted, ``jit(**jit_kwargs)`` is a decorator.
    quick : bool or callable, default True
        ``False`` for a program whose run time grows faster than its arguments (many draws per row, sums
        over a discrete support, root finding): always optimised; a callable of the call's arguments says
        so per call.
    **jit_kwargs
        Passed to ``jax.jit`` (``static_argnames``, ``static_argnums``, ...).

    Returns
    -------
    SizedJit

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from numpyro_mpe.programs import jit
    >>> double = jit(lambda x: 2.0 * x)
    >>> double.program(jnp.ones(3)) is double.quick, double.program(jnp.ones(1 << 20)) is double.optimized
    (True, True)
    >>> float(double(jnp.ones(3)).sum())
    6.0
    """
    if fn is None:
        return lambda f: SizedJit(f, quick=quick, **jit_kwargs)
    return SizedJit(fn, quick=quick, **jit_kwargs)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "numpyro_mpe" / "jax"


def _stamp_unbounded_entries(folder: Path) -> None:
    """Give the entries that an unbounded cache wrote (no access-time file) one, dated now: a bounded JAX
    cache reads the access time of every entry before each write, and fails the write where one is missing.
    Once per folder (:data:`BOUNDED_MARKER`): the scan takes ~75 ms over 7400 entries, at every start."""
    marker = folder / BOUNDED_MARKER
    if marker.exists():
        return
    try:
        from jax._src.lru_cache import _ATIME_SUFFIX, _CACHE_SUFFIX
    except ImportError:  # another JAX layout: the names of JAX 0.4.31 - 0.12
        _CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"
    now = time.time_ns().to_bytes(8, "little")
    try:
        for entry in folder.glob(f"*{_CACHE_SUFFIX}"):
            atime = entry.with_name(entry.name[: -len(_CACHE_SUFFIX)] + _ATIME_SUFFIX)
            if not atime.exists():
                atime.write_bytes(now)
        marker.touch()
    except OSError as err:  # a read-only folder: JAX reports the failed writes itself
        logger.debug("persistent compilation cache: %s", err)


def enable_persistent_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent compilation cache in ``path`` (default: ``$NUMPYRO_MPE_CACHE_DIR`` or
    :func:`default_cache_dir`), unless the user has set a cache folder already or the variable says ``off``;
    bounded to :data:`CACHE_MAX_BYTES` (unless the user has set a bound), which makes processes that share the
    folder take turns reading and writing it.

    Returns the folder in use (``None`` when the cache is left off).  Called when the first model is bound.
    """
    import jax

    global _cache_setup
    if path is None and _cache_setup:
        return Path(jax.config.jax_compilation_cache_dir) if jax.config.jax_compilation_cache_dir else None
    _cache_setup = True
    env = os.environ.get(CACHE_ENV)
    if path is None and env is not None and env.strip().lower() in ("", "0", "off", "false", "no", "none"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        logger.debug("persistent compilation cache: keeping the folder already set, %s", current)
        return Path(current)
    folder = Path(path or env or default_cache_dir())
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        logger.debug("persistent compilation cache not enabled: %s", err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default: not set by the user
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if jax.config.jax_compilation_cache_max_size == -1:  # JAX's default: unbounded, and no lock
        _stamp_unbounded_entries(folder)
        jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    try:  # the cache is set up at the first compilation of the process: start again if that has happened
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
    except Exception:  # noqa: BLE001 - an older or newer JAX without it: the setting applies from now on
        pass
    return folder
