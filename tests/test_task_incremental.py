"""Task-incremental ("local") accuracy: each test sample predicted among its own task's classes, as CODA-Prompt
reports it beside the class-incremental numbers."""
import json

import numpy as np
import torch
from conftest import TINY, compose

from cl_vit.module import task_local_predictions
from cl_vit.runs import load_run
from cl_vit.run import run


def test_local_prediction_is_the_argmax_within_the_true_classes_task():
    task_of_class = torch.tensor([0, 0, 1, 1, -1])
    logits = torch.tensor([[0.0, 1.0, 5.0, 0.0, 9.0],    # true 0: global argmax is 4 (unseen task), local 1
                           [0.0, 1.0, 5.0, 0.0, 9.0],    # true 3: local 2
                           [3.0, 1.0, 0.0, 2.0, 0.0]])   # true 2: local 3
    y = torch.tensor([0, 3, 2])
    assert task_local_predictions(logits, y, task_of_class).tolist() == [1, 2, 3]


def test_run_stores_and_prints_local_accuracy_with_its_forgetting(tmp_path, data_root, capsys):
    cfg = compose([*TINY, "benchmark.n_experiences=5", "trainer.limit_train_batches=3"], data_root)
    doc = run(cfg, tmp_path / "run")
    local = doc["task_incremental"]
    R, L = np.array(doc["accuracy_matrix"], dtype=float), np.array(local["accuracy_matrix"], dtype=float)
    assert L.shape == R.shape == (5, 5) and np.array_equal(np.isnan(L), np.isnan(R))
    # a restricted argmax keeps every correct task-agnostic prediction: local >= class-incremental, cell by cell
    assert np.all(L[~np.isnan(L)] >= R[~np.isnan(R)] - 1e-12)
    assert abs(local["metrics"]["final_average_accuracy"] - np.nanmean(L[-1])) < 1e-9
    assert local["metrics"]["forgetting_consecutive"] is not None
    assert "local" not in doc["heads"] and "local" not in json.loads((tmp_path / "run" / "results.json").read_text())["heads"]
    assert "Task-incremental (local" in capsys.readouterr().out
    summary = load_run(tmp_path / "run").summary()
    assert summary["task_incremental_accuracy"] == local["metrics"]["final_average_accuracy"]
    assert summary["task_incremental_forgetting"] == local["metrics"]["forgetting_consecutive"]


def test_single_experience_has_no_local_accuracy(tmp_path, data_root):
    doc = run(compose([*TINY, "benchmark.n_experiences=1", "trainer.limit_train_batches=2"], data_root),
              tmp_path / "run")
    assert "task_incremental" not in doc
