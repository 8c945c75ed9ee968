"""Loggers through Lightning's own classes (cl_vit/loggers.py): CSV, W&B offline and MLflow to a local file store in one
run (logger=[tensorboard,csv,wandb,mlflow]), steps continued across the experiences' Trainers; a multirun's jobs are
named by their overrides."""
import csv
import json

import pytest
from analysis_helpers import sweep  # noqa: F401  (fixture)
from conftest import TINY, compose

from cl_vit.loggers import run_name


def test_loggers_compose_into_one_run_each(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by the config's default, not by the environment
    from cl_vit.run import run

    store = f"file:{tmp_path / 'mlruns'}"
    overrides = [*TINY[:-1], "logger=[tensorboard,csv,wandb,mlflow]", f"logger.mlflow.tracking_uri={store}",
                 "benchmark.n_experiences=2", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                 "trainer.log_every_n_steps=1"]
    run_dir = tmp_path / "run"
    doc = run(compose(overrides, data_root), run_dir)
    a_t = doc["average_accuracy_per_experience"]
    assert len(a_t) == 2 and (run_dir / "tensorboard").is_dir()

    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps == list(range(12))  # 2 experiences x 2 epochs x 3 batches: the second experience goes on from 6
    evals = [r for r in rows if r.get("eval/A_t")]
    assert [(int(r["experience"]), int(r["step"]), float(r["eval/A_t"])) for r in evals] == [(1, 6, a_t[0]),
                                                                                           (2, 12, a_t[1])]

    import mlflow

    client = mlflow.tracking.MlflowClient(store)
    (found,) = client.search_runs([client.get_experiment_by_name("cl_vit").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "eval.A_t")] == [(6, a_t[0]),
                                                                                                    (12, a_t[1])]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train.loss")] == list(range(12))

    # wandb-core writes the run's log from its own process; wandb.teardown() waits for it to finish, as a
    # command-line run does at exit (wandb's atexit hook). Once, in a loaded CI run, the file read right after
    # finish() without it held only its 7-byte header
    import wandb

    wandb.teardown()
    (wandb_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")  # offline: nothing left the machine
    data = wandb_file.read_bytes()
    assert b"eval/A_t" in data and b"eval/acc/exp_2" in data and all(json.dumps(v).encode() in data for v in a_t)
    assert "finishing run" in next(wandb_file.parent.glob("logs/debug.log")).read_text()


def test_a_logger_that_is_not_installed_or_known_is_one_line(monkeypatch):
    import importlib.util

    from cl_vit.errors import UserError
    from cl_vit.config import check_loggers

    with pytest.raises(UserError, match=r"logger='nope' is not allowed: one of \['tensorboard', 'csv'"):
        check_loggers(["csv", "nope"])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    check_loggers(["tensorboard", "csv", "wandb"])
    with pytest.raises(UserError, match=r'^logger=mlflow needs the mlflow package: pip install -e "\.\[loggers\]"$'):
        check_loggers(["csv", "mlflow"])


def test_multirun_jobs_are_named_by_their_overrides(sweep):  # noqa: F811
    names = sorted(p.parent.name for p in sweep.glob("*/tensorboard/*/events.out.tfevents.*"))
    assert [n.split(",")[:2] for n in names] == [["strategy=finetune", "seed=0"], ["strategy=finetune", "seed=1"],
                                                 ["strategy=ftpp", "seed=0"], ["strategy=ftpp", "seed=1"]]
    assert run_name(["strategy=l2", "seed=1", "data_root=/x/y", "logger=csv", "model.checkpoint=a/b.pt"]) == \
        "strategy=l2,seed=1,model.checkpoint=a_b.pt"


@pytest.mark.parametrize("old, names", [({"name": "tensorboard"}, ["tensorboard"]), ({"name": "none"}, [])])
def test_configs_saved_before_loggers_composed_still_resume(old, names):
    from cl_vit.config import logger_names

    assert logger_names(old) == names
    assert logger_names(compose(["logger=[tensorboard,csv]"]).logger) == ["tensorboard", "csv"]
