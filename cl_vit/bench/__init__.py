"""Performance benchmarks, measured as ratios against a baseline timed in the same process.

Each benchmark is a module ``cl_vit.bench.<name>`` with ``run(quick: bool = False) -> dict`` returning::

    {"name": str, "device": str, "rows": [{"case": str, "metric": str, "value": float, "baseline": float,
                                            "ratio": float, "aim": str | None, "meets_aim": bool | None, ...}],
     "notes": [str, ...]}

``python -m cl_vit.bench [NAME ...] [--quick] [--out FILE]`` runs them, prints a table and writes the JSON.
Timings are medians over interleaved repetitions (baseline and candidate alternate), so that a busy machine slows
both alike.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from cl_vit.loading import import_own

#: benchmark modules, in the order ``python -m cl_vit.bench`` runs them
BENCHES = ("runner", "avalanche", "refiner", "data", "memory", "contention", "gpu")


def available() -> list[str]:
    out = []
    for name in BENCHES:
        try:
            import_own(f"cl_vit.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cl_vit.bench.{name}":
                raise
            continue
        out.append(name)
    return out


def compose_config(overrides=()):
    """The run config exactly as ``python -m cl_vit.run <overrides>`` composes it."""
    import cl_vit.run  # noqa: F401  (registers the resolvers the config uses)
    from hydra import compose, initialize_config_dir

    from cl_vit.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary directory for a benchmark's own runs, removed when the benchmark ends, on an error too: each
    ``python -m cl_vit.bench`` (and each test suite, which runs it) left its run directories in the temp folder."""
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as d:
        yield Path(d)


def run_bench(name: str, quick: bool = False) -> dict:
    return import_own(f"cl_vit.bench.{name}").run(quick=quick)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each callable, alternating them ``repeats`` times after ``warmup`` untimed rounds."""
    return interleaved_clocks(fns, repeats, warmup)[0]


def interleaved_clocks(fns: dict[str, Callable[[], object]], repeats: int = 5,
                       warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall time and median CPU time of this process (all its threads) of each callable, interleaved.

    On a machine shared with other work the CPU time is the steadier measure: it leaves out the time the
    process waits for a core."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def paired_times(baseline: Callable[[], object], candidate: Callable[[], object], pairs: int = 12,
                 warmup: int = 1, clock: Callable[[], float] = time.process_time) -> list[tuple[float, float]]:
    """(baseline time, candidate time) per pair, the two run back to back in alternating order (baseline first in
    even pairs, candidate first in odd ones), so that a change of the host's speed within a run falls on both
    members of a pair alike instead of on one side's median."""
    for _ in range(warmup):
        baseline(), candidate()
    out = []
    for i in range(pairs):
        times = {}
        for name in (("b", "c") if i % 2 == 0 else ("c", "b")):
            t0 = clock()
            (baseline if name == "b" else candidate)()
            times[name] = clock() - t0
        out.append((times["b"], times["c"]))
    return out


def pair_spread(times: list[tuple[float, float]]) -> dict[str, float]:
    """Median and quartiles of the per-pair ratios baseline time / candidate time (above 1: the candidate is
    faster), and each side's median time, of ``paired_times``."""
    ratios = [b / c for b, c in times]
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {"median": med, "q1": q1, "q3": q3, "pairs": len(ratios),
            "baseline_s": statistics.median(b for b, _ in times), "candidate_s": statistics.median(c for _, c in times)}


def row(case: str, metric: str, value: float, baseline: float, aim: str | None = None,
        higher_is_better: bool = False, target: float | None = None, **extra) -> dict:
    """One result row; ``ratio = value / baseline``; ``meets_aim`` compares the ratio with ``target``."""
    ratio = value / baseline if baseline else float("nan")
    meets = None
    if target is not None:
        meets = ratio >= target if higher_is_better else ratio <= target
    return {"case": case, "metric": metric, "value": value, "baseline": baseline, "ratio": ratio, "aim": aim,
            "meets_aim": meets, **extra}
