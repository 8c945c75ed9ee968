"""memory: peak resident memory of the default run, each measured in a fresh process.

``python -m cl_vit.run`` with every default (split-digits, 5 experiences, TensorBoard) against a bare PyTorch loop
over the same stream (cl_vit.bench.runner.bare_run) and against the imports alone. A small wrapper process runs
each command and reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``: the peak of the command's process tree.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cl_vit.bench import row, scratch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]

_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)\n"
)


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident memory (MiB) of ``cmd`` and its children, run to completion in a fresh process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env,
                         cwd=str(PACKAGE_ROOT))
    maxrss, rc = out.stdout.split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {rc}): {out.stderr[-2000:]}")
    return int(maxrss) / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def run(quick: bool = False) -> dict:
    overrides = ["trainer.max_epochs=1"] if quick else []
    with scratch("cl_vit_bench_memory_") as root:
        suite = peak_rss_mib([sys.executable, "-m", "cl_vit.run", *overrides, f"hydra.run.dir={root / 'run'}"])
        bare = peak_rss_mib([sys.executable, "-c",
                             f"from cl_vit.bench.runner import bare_run; bare_run({overrides!r})"])
        imports = peak_rss_mib([sys.executable, "-c", "import cl_vit.run, cl_vit.runner, lightning, timm, avalanche"])
        case = "default run" + (" (1 epoch)" if quick else "")
        n = 30 if quick else 100
        slope, first, late, early = long_stream_slope(root, n)
        return {
            "name": "memory",
            "device": "cpu",
            "rows": [
                row(case, "peak RSS MiB: suite / bare", suite, bare),
                row(case, "peak RSS MiB: suite / imports", suite, imports),
                # value: RSS growth per experience (MiB); baseline: the RSS after the first experience
                row(f"{n}-experience stream", "RSS slope MiB/exp / RSS", slope, first),
                # training + evaluation of one experience; the evaluation covers the n test images seen so far
                row(f"{n}-experience stream", "s/exp: last 10 / exps 5-14", late, early),
            ],
            "notes": ["python -m cl_vit.run (split-digits, TensorBoard) vs a bare PyTorch loop over the same stream "
                      "and vs importing the stack; each in a fresh process"],
        }


def long_stream_slope(root: Path, n: int = 100) -> tuple[float, float, float, float]:
    """A synthetic stream of ``n`` one-class experiences on the micro ViT in a fresh process: the least-squares slope
    of its resident memory over the experiences (MiB per experience; flat is 0), its RSS after the first one, and the
    mean training plus evaluation time (s) of its last ten experiences and of experiences 5-14."""
    import json

    import numpy as np

    run_dir = root / "long"
    cmd = [sys.executable, "-m", "cl_vit.run", "model=vit_micro", "benchmark=synthetic", f"benchmark.n_experiences={n}",
           f"benchmark.source_args.n_classes={n}", "benchmark.source_args.n_train=4", "benchmark.source_args.n_test=1",
           "benchmark.source_args.size=8", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none",
           "+trainer.enable_progress_bar=false", f"data_root={root / 'data'}", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(PACKAGE_ROOT))
    if out.returncode != 0:
        raise RuntimeError(f"the {n}-experience stream failed (exit {out.returncode}): {out.stderr[-2000:]}")
    doc = json.loads((run_dir / "results.json").read_text())
    rss, wall = doc["rss_mib"]["per_experience"], doc["wall_time"]["per_experience"]
    return (float(np.polyfit(np.arange(len(rss)), rss, 1)[0]), float(rss[0]),
            float(np.mean(wall[-10:])), float(np.mean(wall[4:14])))
