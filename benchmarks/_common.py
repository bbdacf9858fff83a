"""Helpers shared by the benchmark scripts (run as ``python benchmarks/bench_*.py``, so this folder is on
``sys.path``): peak memory, the code state a run measured, and compile time counted by ``jax.monitoring``."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path


def max_rss_mb() -> float:
    """Resident-set high-water mark of this process in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def source_state() -> str:
    """git HEAD of the repository and a hash of the numpyro_mpe sources as imported now (the package
    may have uncommitted edits; the hash tells runs on different code apart)."""
    import hashlib

    import numpyro_mpe

    pkg = Path(numpyro_mpe.__file__).resolve().parent
    digest = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        digest.update(f.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(pkg.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(pkg.parent), "status", "--porcelain", "--", "numpyro_mpe"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head, dirty = "unknown", ""
    return f"{head}{'+uncommitted' if dirty else ''} (sources sha256 {digest.hexdigest()[:12]})"


class CompileClock:
    """Sums JAX's tracing / lowering / XLA-compile durations (``jax.monitoring`` events)."""

    EVENTS = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "xla",
    }

    def __init__(self):
        import jax.monitoring

        self.totals = dict.fromkeys(self.EVENTS.values(), 0.0)
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        key = self.EVENTS.get(event)
        if key is not None:
            self.totals[key] += duration
            if key == "xla":
                self.count += 1

    @property
    def total(self) -> float:
        """Seconds of tracing, lowering and XLA compilation so far."""
        return sum(self.totals.values())

    def snapshot(self) -> dict:
        return dict(self.totals, compiles=self.count)

    @staticmethod
    def diff(after: dict, before: dict) -> dict:
        d = {k: after[k] - before[k] for k in after}
        d["total"] = d["trace"] + d["lower"] + d["xla"]
        return d
