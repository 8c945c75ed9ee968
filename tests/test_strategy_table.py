"""The strategy table: python -m cl_vit.experiments.strategy_table, every strategy against fine-tuning."""
from __future__ import annotations

import json

import numpy as np

from conftest import TINY


def test_the_table_lists_each_strategy_with_the_a_n_of_its_runs(tmp_path, data_root, monkeypatch, capsys):
    from cl_vit.experiments import strategy_table

    monkeypatch.setenv("CL_VIT_DATA", str(data_root))
    out = tmp_path / "table"
    argv = ["--strategies", "gcab", "--seeds", "0", "--out", str(out), *TINY, "trainer.limit_train_batches=2",
            "benchmark.n_experiences=2"]
    assert strategy_table.main(argv) == 0
    printed = capsys.readouterr().out
    text = (out / "strategy_table.md").read_text()
    assert text.split("\n\n", 1)[1] in printed  # the file holds the printed table, after the command
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith(("| strategy", "| ---"))}
    assert list(rows) == ["finetune", "gcab"]  # fine-tuning always runs: every row compares to it
    a_n = {}
    for name in rows:
        doc = json.loads((out / name / "seed0" / "results.json").read_text())
        assert doc["status"] == "completed" and doc["seed"] == 0 and doc["strategy"] == [name]
        a_n[name] = 100 * doc["metrics"]["final_average_accuracy"]
        assert rows[name][2] == f"{a_n[name]:.2f}" and rows[name][3] == f"{a_n['finetune']:.2f}"
    assert rows["gcab"][4] == f"{a_n['gcab'] - a_n['finetune']:+.2f}" and rows["finetune"][4] == "—"
    # the setting: the strategy's arguments, then what else differs from fine-tuning's config (gcab's loss; the run
    # length is the command line's here, the same for both)
    assert "s_max=800" in rows["gcab"][1] and "loss.name=bce" in rows["gcab"][1]
    assert "trainer.max_epochs" not in rows["gcab"][1] and rows["finetune"][1] == "—"
    # the same as a figure: a PNG beside the table, named on the console
    png = out / "strategy_table.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figure: {png}" in printed
    # a second call trains nothing and gives the same table
    assert strategy_table.main(argv) == 0
    assert "0 runs to train, 2 found done" in capsys.readouterr().out
    assert (out / "strategy_table.md").read_text() == text
    # a run whose setting is no longer what the command composes (a default changed since) is not shown as today's
    assert strategy_table.main([*argv, "optimizer.weight_decay=0.01"]) == 2
    assert "ran with optimizer.weight_decay=0.05, today's setting is 0.01: remove it" in capsys.readouterr().err
    assert np.isfinite(list(a_n.values())).all()


def test_a_shipped_file_in_a_setting_is_named_by_its_place_in_the_repository():
    from conftest import REPO_ROOT

    from cl_vit.experiments import strategy_table

    shipped = str(REPO_ROOT / "weights" / "refiner_vit_tiny-fmnist8.safetensors")
    assert strategy_table._compact(shipped) == "weights/refiner_vit_tiny-fmnist8.safetensors"
    assert strategy_table._compact("/elsewhere/w.safetensors") == "/elsewhere/w.safetensors"
    assert strategy_table._compact([1e-8, 0.1, 1.0, 1e8]) == "[1e-08, ..., 1e+08]"


def test_a_run_from_before_a_config_key_existed_is_the_same_setting_as_its_repetition_today(tmp_path):
    from cl_vit.runs import ADDED_KEYS, Run

    old = {"seed": 0, "strategy": {"finetune": {}}, "loss": {"name": "ce", "mask_old_logits": False}}
    today = {**old, "loss": {**old["loss"], "mask_unseen": True}}
    other = {**old, "loss": {**old["loss"], "mask_unseen": False}}
    key = lambda c: Run(path=tmp_path, config=c, results={}, stream=None).setting_key()  # noqa: E731
    assert ADDED_KEYS["loss.mask_unseen"] is True
    assert key(old) == key(today) != key(other)
