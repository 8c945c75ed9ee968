"""CPU threads: chosen from the cores the process may use, shared among the processes a run starts, OpenMP threads
that sleep instead of spinning, and the choice recorded in results.json (issue 26)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import TINY, cli_env, compose

from cl_vit import hardware
from cl_vit.errors import UserError


def test_threads_come_from_the_config_then_the_environment_then_the_cores():
    choose = hardware.choose_threads
    assert choose(3, processes=1, workers=0, cores=2, env_threads="1") == (3, "trainer.threads")
    assert choose(None, processes=1, workers=0, cores=8, env_threads="2") == (2, "OMP_NUM_THREADS")
    assert choose(None, processes=1, workers=0, cores=8, env_threads=None) == (8, "cores")
    # DDP: Lightning's launcher sets OMP_NUM_THREADS itself; the cores are divided among the local ranks
    assert choose(None, processes=4, workers=0, cores=8, env_threads="2") == (2, "cores")
    assert choose(None, processes=3, workers=0, cores=2, env_threads=None) == (1, "cores")
    # one core per data-loader worker (each runs one thread), never fewer than one thread for the step
    assert choose(None, processes=1, workers=2, cores=8, env_threads=None) == (6, "cores")
    assert choose(None, processes=2, workers=2, cores=16, env_threads=None) == (6, "cores")
    assert choose(None, processes=1, workers=8, cores=2, env_threads=None) == (1, "cores")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True])
def test_bad_thread_count_is_one_line(bad):
    with pytest.raises(UserError, match=r"trainer.threads=.* must be a whole number >= 1"):
        hardware.choose_threads(bad, cores=2)


def test_jobs_side_by_side_share_the_cores():
    """What a launcher of parallel runs (joblib, seeds side by side) gives each child."""
    assert hardware.threads_per_process(2, cores=2) == 1
    assert hardware.threads_per_process(3, cores=16) == 5
    assert hardware.threads_per_process(4, cores=2) == 1
    env = hardware.thread_environment(4, cores=16)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"
    assert env["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert hardware.available_cores() == sorted(os.sched_getaffinity(0))


def test_passive_openmp_keeps_a_policy_the_user_chose(monkeypatch):
    monkeypatch.setattr(hardware, "_OMP_WAIT_POLICY", hardware._OMP_WAIT_POLICY)
    env = {}
    hardware.passive_openmp(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"} and hardware._OMP_WAIT_POLICY == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    hardware.passive_openmp(env, torch_loaded=False)
    assert env == {"OMP_WAIT_POLICY": "ACTIVE"} and hardware._OMP_WAIT_POLICY == "ACTIVE"
    env = {}  # too late once torch is loaded: nothing is set, and the record keeps what torch loaded with
    hardware.passive_openmp(env, torch_loaded=True)
    assert env == {} and hardware._OMP_WAIT_POLICY == "ACTIVE"


# torch is first imported through `import cl_vit`: print the policy OpenMP reads at that moment, and stop there
_PROBE = """
import importlib.abc, os, sys
class Probe(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print(os.environ.get("OMP_WAIT_POLICY"), flush=True)
            os._exit(0)
sys.meta_path.insert(0, Probe())
import cl_vit
"""


@pytest.mark.parametrize("user_policy,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_policy_is_set_before_torch_is_imported(user_policy, expected):
    env = {k: v for k, v in cli_env().items() if k != "OMP_WAIT_POLICY"}
    if user_policy:
        env["OMP_WAIT_POLICY"] = user_policy
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [expected]


def test_trainer_threads_sets_torch_threads_and_results_json_records_them(tmp_path, data_root):
    from cl_vit.run import run

    saved = torch.get_num_threads()
    want = 2 if saved != 2 else 1
    try:
        doc = run(compose([*TINY, "benchmark=split-digits", "benchmark.n_experiences=1",
                           "trainer.limit_train_batches=2", f"trainer.threads={want}"],
                          data_root), tmp_path / "run")
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(saved)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    for record in (doc["threads"], on_disk["threads"]):
        assert record["torch_threads"] == want and record["source"] == "trainer.threads"
        assert record["affinity"] == sorted(os.sched_getaffinity(0))
        assert record["processes"] == 1 and record["loader_workers"] == 0
        assert record["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]  # conftest: set before torch loads


def test_trainer_threads_is_not_passed_to_lightning():
    kwargs = hardware.trainer_kwargs({"accelerator": "cpu", "devices": 1, "threads": 3}, cuda_available=False)
    assert "threads" not in kwargs and kwargs["accelerator"] == "cpu"
