"""Sweeps on Hydra's launcher plugins (docs/scale.md): joblib (runs side by side on one machine) and submitit_local
(submitit's local executor, the same code path as submitit_slurm on a cluster) give the report a sequential sweep
gives."""
import contextlib
import csv
import functools
import io

import pytest
from analysis_helpers import FAST, sweep  # noqa: F401  (fixture)
from conftest import run_cli

from cl_vit.report import main as report_main
from cl_vit.runs import load_runs

#: what a launcher may change: where and how long the runs ran
WHERE = ("wall_time_s", "wall_time_s_std", "peak_memory_bytes", "peak_memory_bytes_std", "run_dirs")


@functools.lru_cache  # the sequential sweep's row once for both launchers
def _finetune_row(path) -> dict:
    """``python -m cl_vit.report PATH --csv``'s finetune row (the report's main in this process)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert report_main([str(path), "--csv"]) == 0
    (row,) = [r for r in csv.DictReader(io.StringIO(out.getvalue())) if r["strategy"] == "finetune"]
    return {k: v for k, v in row.items() if k not in WHERE}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]])
def test_a_sweep_on_a_launcher_plugin_reports_as_the_sequential_one(sweep, tmp_path, launcher):  # noqa: F811
    out = tmp_path / "sweep"
    # the sequential sweep's finetune runs (analysis_helpers.make_multirun), on the launcher
    run_cli("-m", *launcher, "strategy=finetune", "seed=0,1", *FAST, "benchmark.n_experiences=2",
            f"hydra.sweep.dir={out}", data_root=tmp_path, check=True, timeout=600)
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    row = _finetune_row(out)
    assert row["seeds"] == "0,1" and row["runs"] == "2" and row["status"] == "completed"
    assert row == _finetune_row(sweep)
    runs = {(r.strategy, r.seed): r.results for r in load_runs(out)}
    for r in load_runs(sweep):
        if r.strategy == "finetune":
            mine = runs[r.strategy, r.seed]
            assert mine["accuracy_matrix"] == r.results["accuracy_matrix"] and mine["metrics"] == r.results["metrics"]
