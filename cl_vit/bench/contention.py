"""contention: the default run alone, and two identical default runs side by side on the same cores.

Each run is ``python -m cl_vit.run`` (split-digits, every default) in a fresh process whose environment lacks
``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and ``OMP_WAIT_POLICY``, so that the suite's own thread choice is what is
measured (cl_vit.hardware: threads from the process's cores, OpenMP threads that sleep instead of spinning). The
lone run and the pair alternate; each row is one of the pair's wall time as a ratio of the lone run's (medians).
Two runs that share the cores fairly take about 2x as long as one alone; the aim allows 2.2x. Before the suite chose
its threads, each run spun OpenMP threads on every core and the pair took 27x (issue 26): ``spinning=True``
(``python -m cl_vit.bench.contention --spinning``) measures that setting again (OMP_WAIT_POLICY=ACTIVE).

Other work on the machine slows the lone run and the pair alike only if it is steady: the notes give the load
average before and after.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cl_vit.bench import row, scratch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
AIM = 2.2
#: variables that would override the suite's own choice of threads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


def run_environment(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**env, **(extra or {})}


def timed_runs(n: int, overrides: list[str], root: Path, env: dict) -> list[float]:
    """Start ``n`` identical runs at once; the wall time (s) of each, from its start to its exit."""
    procs, starts, ends = [], [], [None] * n
    for i in range(n):
        run_dir = root / f"run_{len(list(root.iterdir()))}_{i}"
        cmd = [sys.executable, "-m", "cl_vit.run", *overrides, f"hydra.run.dir={run_dir}"]
        starts.append(time.perf_counter())
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=str(PACKAGE_ROOT)))
    while any(e is None for e in ends):
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.perf_counter()
        time.sleep(0.05)
    for p in procs:
        err = p.stderr.read()
        p.stderr.close()
        if p.returncode != 0:
            raise RuntimeError(f"python -m cl_vit.run {' '.join(overrides)} failed (exit {p.returncode}): "
                               f"{err[-2000:]}")
    return [e - s for s, e in zip(starts, ends)]


def measure(overrides: list[str], repeats: int, extra_env: dict | None = None) -> tuple[float, list[float]]:
    """Median wall time of the lone run and of each run of the pair, alternating lone and pair ``repeats`` times."""
    with scratch("cl_vit_bench_contention_") as root:
        env = run_environment(extra_env)
        lone, pair = [], []
        for _ in range(repeats):
            lone += timed_runs(1, overrides, root, env)
            pair.append(timed_runs(2, overrides, root, env))
        return statistics.median(lone), [statistics.median(p[i] for p in pair) for i in range(2)]


def run(quick: bool = False, spinning: bool = False) -> dict:
    overrides = ["trainer.max_epochs=1"] if quick else []
    repeats = 1 if quick else 2
    extra = {"OMP_WAIT_POLICY": "ACTIVE"} if spinning else None
    load_before = os.getloadavg()
    lone, pair = measure(overrides, repeats, extra)
    load_after = os.getloadavg()
    case = ("default run" + (" (1 epoch)" if quick else "") + (", spinning OpenMP" if spinning else ""))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [row(f"{case}, run {i + 1} of 2", "wall s: pair / alone", t, lone, aim=f"<= {AIM}x", target=AIM)
            for i, t in enumerate(pair)]
    return {
        "name": "contention",
        "device": "cpu",
        "rows": rows,
        "notes": [f"python -m cl_vit.run {' '.join(overrides)} alone and two at once on {cores} core(s), "
                  f"{'OMP_WAIT_POLICY=ACTIVE (the setting before issue 26), ' if spinning else ''}"
                  f"median of {repeats} alternations; the suite chooses its threads (no OMP_NUM_THREADS)",
                  "load average (1, 5, 15 min) before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
                      *load_before, *load_after)],
    }


if __name__ == "__main__":
    import argparse
    import json

    from cl_vit.bench.__main__ import format_table

    p = argparse.ArgumentParser(prog="python -m cl_vit.bench.contention", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--spinning", action="store_true", help="OMP_WAIT_POLICY=ACTIVE: the setting before issue 26")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    res = run(quick=a.quick, spinning=a.spinning)
    print(format_table([res]))
    if a.out:
        from cl_vit.rundir import atomic_write_text

        atomic_write_text(a.out, json.dumps({"results": [res]}, indent=1))
