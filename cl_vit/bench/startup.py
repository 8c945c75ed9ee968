"""startup: where the CPU time of ``python -m cl_vit.run`` goes, phase by phase (issue 26: the default run in 20 s).

``python -m cl_vit.bench.startup [OVERRIDE ...]`` runs the command (every default unless overridden) in a fresh
process, from before its first import of the package, with a sampling thread: every 5 ms of the main thread's CPU
clock it files the main thread's stack under the first phase of ``PHASES`` that the stack passes through (imports,
forward, backward, the optimiser step, figures, ...). Each row is a phase's CPU seconds and its share of the main
thread's. The notes add the garbage collector's collections per generation and their CPU time (``gc.callbacks``,
with a last full collection as at the interpreter's exit). CPU time rather than wall time: other work on the machine
delays the command but adds little to its CPU seconds. torch's other intra-op threads count in the process total
only; ``OMP_NUM_THREADS=1`` puts all the work on the sampled thread.
"""
from __future__ import annotations

import collections
import gc
import json
import os
import runpy
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

#: (phase, a "file:function" substring of a stack frame); the first phase whose frame is on the stack takes the sample
PHASES: tuple[tuple[str, str], ...] = (
    ("imports", "<frozen importlib._bootstrap>:_find_and_load"),
    ("Hydra config composition", "hydra/_internal/hydra.py:compose_config"),
    ("figures and TensorBoard images", "cl_vit/plots.py:"),
    ("figures and TensorBoard images", "tensorboard/writer.py:add_figure"),
    ("evaluation (predict)", "trainer.py:predict"),
    ("non-finite gradient check", "cl_vit/module.py:on_before_optimizer_step"),
    ("backward", "torch/autograd/__init__.py:backward"),
    ("forward and loss", "cl_vit/module.py:training_step"),
    ("optimiser step", "torch/optim/"),
    ("data loading", "dataloader.py:__next__"),
    ("fit loop, other (hooks, logging, progress bar)", "trainer.py:fit"),
    ("checkpoints and results", "cl_vit/runner.py:_save"),
    ("build (data, model)", "cl_vit/builder.py:build"),
)
#: CPU seconds of the main thread between samples
PERIOD = 0.005


def _frames(frame) -> list[str]:
    out = []
    while frame is not None:
        out.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
        frame = frame.f_back
    return out


def phase_of(frames: Sequence[str], phases: Sequence[tuple[str, str]] = PHASES) -> str:
    for label, pattern in phases:
        if any(pattern in f for f in frames):
            return label
    return "other"


def sample_phases(fn: Callable[[], object], phases: Sequence[tuple[str, str]] = PHASES,
                  period: float = PERIOD) -> tuple[dict[str, float], float]:
    """Run ``fn`` in this (the main) thread; returns ({phase: CPU seconds of this thread}, process CPU seconds)."""
    main = threading.get_ident()
    clock = time.pthread_getcpuclockid(main)
    counts: collections.Counter = collections.Counter()
    done = threading.Event()

    def sampler():
        last = time.clock_gettime(clock)
        while not done.wait(period / 5):
            n = int((time.clock_gettime(clock) - last) / period)
            if n:
                last += n * period
                frame = sys._current_frames().get(main)
                counts[phase_of(_frames(frame), phases) if frame is not None else "other"] += n

    thread = threading.Thread(target=sampler, daemon=True)
    c0 = time.process_time()
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return {k: n * period for k, n in counts.most_common()}, time.process_time() - c0


def run_command(overrides: Sequence[str] = ()) -> None:
    """``python -m cl_vit.run OVERRIDE ...`` in this process (its module run afresh, as the command runs it)."""
    argv = sys.argv
    sys.argv = ["cl_vit.run", *overrides]
    try:
        runpy.run_module("cl_vit.run", run_name="__main__")
    except SystemExit as e:  # Hydra's main exits on an error only
        if e.code:
            raise
    finally:
        sys.argv = argv


#: the line of the measuring process's output that carries its results
MARK = "cl_vit.bench.startup: "


def _measure(overrides: Sequence[str]) -> None:
    """In the fresh process: the command, sampled, and the collector's work; the results as one marked line."""
    collections_: dict[int, list[float]] = {}
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.process_time()]
        elif started:
            entry = collections_.setdefault(info["generation"], [0, 0.0])
            entry[0] += 1
            entry[1] += time.process_time() - started[0]

    gc.callbacks.append(on_gc)

    def command():
        run_command(overrides)
        gc.collect()  # as the interpreter's exit does

    phases, process_cpu = sample_phases(command)
    gc.callbacks.remove(on_gc)
    print(MARK + json.dumps({"phases": phases, "process_cpu": process_cpu, "gc": collections_}), flush=True)


def run(quick: bool = False, overrides: Sequence[str] = ()) -> dict:
    if quick:
        overrides = ["trainer.max_epochs=1", "benchmark.n_experiences=2", *overrides]
    # a fresh process that imports nothing of the suite before the sampler starts (this file run by path)
    code = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='cl_vit.bench.startup.measure')"
    out = subprocess.run([sys.executable, "-c", code, __file__, json.dumps(list(overrides))], capture_output=True,
                         text=True, env=dict(os.environ), cwd=os.getcwd())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(MARK)]
    if out.returncode or not lines:
        raise RuntimeError(f"python -m cl_vit.run {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    res = json.loads(lines[-1][len(MARK):])
    phases = res["phases"]
    total = sum(phases.values()) or 1.0
    from cl_vit.bench import row

    rows = [row(label, "main-thread CPU s / all", sec, total) for label, sec in phases.items()]
    gcs = ", ".join(f"generation {g}: {n} collections, {sec:.2f} s" for g, (n, sec) in sorted(res["gc"].items()))
    return {"name": "startup", "device": "cpu", "rows": rows,
            "notes": [f"python -m cl_vit.run {' '.join(overrides)}".rstrip()
                      + f": process CPU {res['process_cpu']:.1f} s, main thread sampled {total:.1f} s",
                      f"garbage collector: {gcs}"]}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m cl_vit.bench.startup", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="overrides of python -m cl_vit.run (e.g. hydra.run.dir=DIR)")
    p.add_argument("--quick", action="store_true", help="one epoch, two experiences")
    args = p.parse_args(argv)
    res = run(args.quick, args.overrides)
    print(res["notes"][0])
    for r in res["rows"]:
        print(f"  {r['case']:<48} {r['value']:7.2f} s  {100 * r['ratio']:5.1f}%")
    print(res["notes"][1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
if __name__ == "cl_vit.bench.startup.measure":
    _measure(json.loads(sys.argv[2]))
