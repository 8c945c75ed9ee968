"""trainer=ddp on 2 CPU processes (gloo): exact distributed evaluation and statistics reduced across processes.

One 2-process run of split-digits (2 experiences, 1 epoch); then every checkpoint is re-evaluated in this single
process and must give the same confusions (hence the same accuracy matrix) as the distributed evaluation did.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, cli_env, compose

from cl_vit import distributed
from cl_vit.errors import UserError
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.runner import ContinualRunner, LoaderConfig, merge_predictions

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
       "data.num_workers=0", "data.pin_memory=false", "data.persistent_workers=false",
       "trainer.max_epochs=1", "benchmark.n_experiences=2"]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "run"
    args = [*DDP, "+strategy.probe_stats={}", f"hydra.run.dir={run_dir}", f"data_root={root / 'data'}"]
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "ddp_probe.py"), *args], cwd=str(REPO_ROOT),
                          env={**cli_env(), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_ddp_evaluation_counts_every_test_image_once_and_matches_one_process(ddp_run, data_root):
    run_dir, proc = ddp_run
    doc = json.loads((run_dir / "results.json").read_text())
    assert "Distributed run: 2 processes" in (run_dir / "run.log").read_text()

    cfg = compose([*DDP[4:], "trainer=cpu", "logger=none"], data_root)
    _, scenario, info, module, _ = build(cfg)
    test_sizes = [len(e.dataset) for e in scenario.test_stream]
    confusions = {(c["trained_up_to"], c["evaluated"]): np.asarray(c["entries"]).reshape(-1, 3)
                  for c in doc["confusion"] if c["head"] == "main"}
    assert sorted(confusions) == [(0, 0), (1, 0), (1, 1)]
    for (i, j), entries in confusions.items():
        assert entries[:, 2].sum() == test_sizes[j]  # no padding duplicates, nothing dropped

    rd = RunDirectory(run_dir)
    runner = ContinualRunner(module, scenario, info, rd, trainer={"accelerator": "cpu", "devices": 1},
                             loader=LoaderConfig(eval_batch_size=256))
    single = {}
    for i in range(2):
        module.load_state_dict(rd.load_checkpoint(i)["module"])
        for j, entries in runner.evaluate(i)["main"].items():
            single[(i, j)] = entries
    assert sorted(single) == sorted(confusions)
    for key in single:
        np.testing.assert_array_equal(single[key], confusions[key])
    R = np.array([[np.nan if v is None else v for v in row] for row in doc["accuracy_matrix"]])
    np.testing.assert_array_equal(np.isnan(R), [[False, True], [False, False]])


def test_ddp_strategy_statistics_are_reduced_over_processes(ddp_run, data_root):
    run_dir, _ = ddp_run
    cfg = compose([*DDP[4:], "trainer=cpu", "logger=none"], data_root)
    _, scenario, info, _, _ = build(cfg)
    for i, experience in enumerate(scenario.train_stream):
        stats = RunDirectory(run_dir).load_checkpoint(i)["strategies"]["probe_stats"]["stats"][i]
        labels = torch.as_tensor(list(experience.dataset.targets))
        assert stats["world_size"] == 2
        # summed over both processes' shards: every training image exactly once
        assert torch.equal(stats["counts"], torch.bincount(labels, minlength=info.n_classes).double())
        assert stats["mean_share"].item() == len(labels) / 2
        assert stats["rank0"].item() == 0.0
        assert stats["device"] == "cpu"


def test_ddp_processes_train_from_seed_plus_rank_and_agree_after_the_fit(ddp_run):
    """DeiT-LT's main.py L69-71 and DyTox's main.py L335 seed each process with seed + rank: with one seed on every
    process both would draw the same drop-path masks and Mixup boxes. After the fit the processes draw alike again."""
    from cl_vit.runner import experience_seed

    run_dir, _ = ddp_run
    for i in range(2):
        draws = RunDirectory(run_dir).load_checkpoint(i)["strategies"]["probe_stats"]["stats"][i]["draws"]
        (fit0, after0), (fit1, after1) = draws
        seed = experience_seed(0, i)
        assert torch.equal(fit0, torch.rand(4, generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(fit1, torch.rand(4, generator=torch.Generator().manual_seed(seed + 1)))
        assert torch.equal(after0, after1)


def test_only_rank_zero_writes_the_run_directory(ddp_run):
    run_dir, proc = ddp_run
    log = (run_dir / "run.log").read_text()
    assert log.count("Experience 1/2") == 1 and log.count("Experience 2/2") == 1
    assert proc.stdout.count("Accuracy matrix") == 1
    assert not list(run_dir.rglob("*.tmp"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["exp_000.pt", "exp_001.pt"]
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # one writing process (pid in the name)


def test_ddp_outside_the_command_line_is_one_clear_line(tmp_path, data_root):
    """From Python (a notebook, a test) Lightning has no command line to re-run for the other processes."""
    with pytest.raises(UserError, match="starts from the command line: python -m cl_vit.run trainer=ddp"):
        run(compose(DDP, data_root), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_merge_predictions_rejects_duplicates_and_gaps():
    share = lambda idx: {"index": np.array(idx), "y": np.array(idx) % 3,  # noqa: E731
                         "preds": {"main": np.array(idx) % 2}}
    merged = merge_predictions([share([0, 2, 4]), share([1, 3])], 5)
    np.testing.assert_array_equal(merged["y"], np.arange(5) % 3)
    np.testing.assert_array_equal(merged["preds"]["main"], np.arange(5) % 2)
    with pytest.raises(RuntimeError, match="1 seen more than once"):
        merge_predictions([share([0, 2, 4]), share([1, 3, 0])], 5)  # a padded sampler repeats sample 0
    with pytest.raises(RuntimeError, match="1 missed"):
        merge_predictions([share([0, 2]), share([1, 3])], 5)


def test_consistency_check_names_the_part_that_differs():
    net = torch.nn.Linear(3, 2)
    same = {"the network": distributed.fingerprint(net), "strategy a": distributed.fingerprint({"n": 3})}
    assert distributed.first_mismatch([same, dict(same)]) is None
    other = {**same, "strategy a": distributed.fingerprint({"n": 4})}
    assert distributed.first_mismatch([same, dict(same), other]) == ("strategy a", 2)
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    assert distributed.first_mismatch([same, {**same, "the network": distributed.fingerprint(net)}]) == \
        ("the network", 1)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("rank", [1, 0])
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, rank):
    """SIGTERM reaches one rank only (a node's scheduler, or a user's kill of one process): both ranks agree on the
    stop before the next collective, nothing hangs (rank 0: Lightning's own SIGTERM handler hung here), rank 0
    records the interruption and writes experience 2's state at the step it stopped at."""
    import signal
    import time

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cl_vit.run", *DDP, "trainer.max_epochs=3", "model=vit_micro", "logger=none",
           f"hydra.run.dir={run_dir}", f"data_root={tmp_path / 'data'}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**cli_env(), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # experience 1 is saved; experience 2 trains for 3 epochs
            if line.startswith("Experience 2/2"):
                break
        ranks = []
        for _ in range(100):
            ranks = [c for c in _children(proc.pid) if "cl_vit.run" in Path(f"/proc/{c}/cmdline").read_text()]
            if ranks:
                break
            time.sleep(0.1)
        assert len(ranks) == 1, ranks
        os.kill(ranks[0] if rank == 1 else proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-2000:]
    doc = json.loads((run_dir / "results.json").read_text())
    assert doc["status"] == "interrupted" and doc["completed_experiences"] == 1
    assert (run_dir / "checkpoints" / "exp_001.epoch.pt").exists()
