"""``numpyro-mpe demo`` end to end, in fresh processes: the command's wall time with its NUTS reference in a
second process (the default) and in the same process (``--nuts-in-process``, the order before), each with an
empty persistent compilation cache (*cold*) and with the cache a previous run filled (*warm*).

    python benchmarks/bench_demo.py [--repeats 3] [--out benchmarks/results]

Each repeat of a variant starts a new cache folder for its cold run and reuses it for its warm run; the
variants alternate within a repeat, so that a change in the machine's load hits them alike.  Printed and
written to ``bench_demo.md`` / ``bench_demo.json``: medians (min–max) of the wall time of the command (process
start to exit) and of each printed step.  Target of issue #16: ≤ 15 s end to end, NUTS included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import source_state

HERE = Path(__file__).resolve().parent
VARIANTS = {"NUTS in a second process (default)": [], "NUTS in the same process (--nuts-in-process)":
            ["--nuts-in-process"]}
STEP = re.compile(r"^\[(\d)/\d\] (.+?) \.\.\. .*done in ([0-9.]+) s", re.M)
COMMAND = "from numpyro_mpe.io.cli import main; raise SystemExit(main())"


def run_demo(flags: list[str], cache: Path, out: Path) -> dict:
    """One ``numpyro-mpe demo`` process: wall time and the seconds of each printed step."""
    env = dict(os.environ, NUMPYRO_MPE_CACHE_DIR=str(cache))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COMMAND, "demo", "--out", str(out), *flags], env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"demo failed: {proc.stderr[-2000:]}")
    steps = {f"{i} {name.split(' (')[0]}": float(s) for i, name, s in STEP.findall(proc.stdout)}
    return {"wall_s": wall, "steps": steps}


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def table(results: dict) -> str:
    lines = ["| variant | cache | end to end (s) | " + " | ".join(
        name for name in next(iter(next(iter(results.values())).values()))[0]["steps"]) + " |"]
    lines.append("|---|---|---:|" + "---:|" * (lines[0].count("|") - 4))
    for variant, by_cache in results.items():
        for cache, runs in by_cache.items():
            steps = runs[0]["steps"]
            cells = [_median([r["steps"].get(k, float("nan")) for r in runs]) for k in steps]
            lines.append(f"| {variant} | {cache} | **{_median([r['wall_s'] for r in runs])}** | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="cold + warm runs of each variant (default 3)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for .md and .json")
    args = ap.parse_args(argv)
    results: dict = {v: {"cold": [], "warm": []} for v in VARIANTS}
    load0 = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        for rep in range(args.repeats):
            for i, (variant, flags) in enumerate(VARIANTS.items()):
                cache = Path(tmp) / f"cache_{rep}_{i}"
                for kind in ("cold", "warm"):
                    rec = run_demo(flags, cache, Path(tmp) / "report")
                    results[variant][kind].append(rec)
                    print(f"[{rep + 1}/{args.repeats}] {variant}, {kind}: {rec['wall_s']:.1f} s", flush=True)
    text = table(results)
    import jax
    import numpyro

    meta = (f"Medians (min–max) of {args.repeats} run(s); `python benchmarks/bench_demo.py --repeats "
            f"{args.repeats}`; Python {platform.python_version()}, jax {jax.__version__}, numpyro "
            f"{numpyro.__version__}, {os.cpu_count()} CPU cores; 1-min load average {load0:.1f} at start, "
            f"{os.getloadavg()[0]:.1f} at end; {time.perf_counter() - t_start:.0f} s in all; code "
            f"{source_state()}.")
    head = "### `numpyro-mpe demo` end to end (issue #16 target: ≤ 15 s, NUTS included)"
    md = f"{head}\n\n{text}\n\n{meta}"
    print("\n" + md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_demo.md").write_text(md + "\n")
    (args.out / "bench_demo.json").write_text(json.dumps({"results": results, "meta": meta}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
