"""The runner end to end in-process: the strategy hook protocol, joint training, dry runs, TensorBoard, evaluation."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose

from cl_vit import strategies as S
from cl_vit.runs import load_run
from cl_vit.run import build, run
from cl_vit.runner import ContinualRunner
from cl_vit.rundir import RunDirectory
from cl_vit.strategies.base import Strategy


class Probe(Strategy):
    """A test plug-in: a constant extra loss term, and state that must survive resume."""

    name = "probe"

    def __init__(self, value: float = 0.5):
        self.value = value
        self.batches = 0
        self.experiences = []

    def training_loss(self, module, batch, outputs):
        self.batches += 1
        return {"const": torch.tensor(self.value)}

    def after_experience(self, module, experience):
        self.experiences.append(experience.index)
        self.last_metrics = {k: float(v) for k, v in module.trainer.callback_metrics.items()}

    def state_dict(self):
        return {"batches": self.batches, "experiences": list(self.experiences)}

    def load_state_dict(self, state):
        self.batches = state["batches"]
        self.experiences = list(state["experiences"])


@pytest.fixture
def probe_registered(monkeypatch):
    monkeypatch.setitem(S.STRATEGIES, "probe", Probe)


def test_plugin_terms_are_added_and_logged(tmp_path, data_root, probe_registered):
    cfg = compose(TINY + ["+strategy.probe.value=0.5"], data_root)
    _, scenario, info, module, counts = build(cfg)
    probe = [s for s in module.strategies if s.name == "probe"][0]
    runner = ContinualRunner(module, scenario, info, RunDirectory(tmp_path / "run"), trainer=dict(cfg.trainer))
    runner.run()
    m = probe.last_metrics
    assert m["train/loss/probe/const"] == pytest.approx(0.5)
    assert m["train/loss"] == pytest.approx(m["train/loss/cls"] + 0.5, abs=1e-5)
    assert probe.experiences == [0, 1, 2, 3, 4]


def test_strategy_state_survives_resume(tmp_path, data_root, probe_registered, monkeypatch):
    overrides = TINY + ["+strategy.probe.value=0.0"]
    full = run(compose(overrides, data_root), tmp_path / "full")

    # interrupt after the second experience is saved, then resume
    original_save = ContinualRunner._save

    def save_then_stop(self, i, status):
        original_save(self, i, status)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ContinualRunner, "_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(compose(overrides, data_root), tmp_path / "cut")
    monkeypatch.setattr(ContinualRunner, "_save", original_save)
    saved = torch.load(tmp_path / "cut" / "checkpoints" / "exp_001.pt", weights_only=False)
    assert saved["strategies"]["probe"]["experiences"] == [0, 1]

    restored = {}
    original_load = Probe.load_state_dict

    def spy(self, state):
        restored.update(state)
        original_load(self, state)

    monkeypatch.setattr(Probe, "load_state_dict", spy)
    resumed = run(compose(overrides + [f"resume={tmp_path / 'cut'}"], data_root), tmp_path / "cut")
    assert restored == saved["strategies"]["probe"]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    final = torch.load(tmp_path / "cut" / "checkpoints" / "exp_004.pt", weights_only=False)
    assert final["strategies"]["probe"]["experiences"] == [0, 1, 2, 3, 4]
    assert final["strategies"]["probe"]["batches"] == full_batches(tmp_path / "full")


def full_batches(run_dir):
    return torch.load(run_dir / "checkpoints" / "exp_004.pt", weights_only=False)["strategies"]["probe"]["batches"]


def test_evaluation_counts_every_test_image_once(tmp_path, data_root):
    doc = run(compose(TINY, data_root), tmp_path / "run")
    stream = json.loads((tmp_path / "run" / "stream.json").read_text())
    for c in doc["confusion"]:
        n = sum(row[2] for row in c["entries"])
        assert n == stream["experiences"][c["evaluated"]]["n_test"]
        # predictions only among classes seen by then
        seen = {k for exp in doc["experiences"][: c["trained_up_to"] + 1] for k in exp}
        assert {row[1] for row in c["entries"]} <= seen
    R = np.array([[np.nan if v is None else v for v in row] for row in doc["accuracy_matrix"]])
    assert np.all(np.isnan(R[np.triu_indices(5, 1)])) and not np.any(np.isnan(R[np.tril_indices(5)]))
    run_ = load_run(tmp_path / "run")
    assert run_.finished and run_.metrics["final_average_accuracy"] == doc["metrics"]["final_average_accuracy"]
    assert doc["versions"]["torch"] and doc["versions"]["avalanche-lib"]
    assert len(doc["wall_time"]["per_experience"]) == 5
    # where each experience's time went (cost.time_s): training (set-up and hooks included) and evaluation make up
    # its wall time; the checkpoint's write is timed apart
    for wall, cost in zip(doc["wall_time"]["per_experience"], doc["cost"]["per_experience"]):
        spent = cost["time_s"]
        assert min(spent["train"], spent["evaluate"], spent["checkpoint"]) > 0
        assert spent["train"] + spent["evaluate"] == pytest.approx(wall, rel=1e-9)
        assert len(spent["epochs"]) == 1 and 0 < spent["epochs"][0] < spent["train"]  # TINY: one epoch each


def test_joint_is_one_experience_evaluated_per_original_experience(tmp_path, data_root):
    doc = run(compose(TINY + ["strategy=joint", "trainer.max_epochs=4"], data_root), tmp_path / "run")
    assert len(doc["accuracy_matrix"]) == 1 and len(doc["accuracy_matrix"][0]) == 5
    assert doc["metrics"]["final_average_accuracy"] == pytest.approx(np.mean(doc["accuracy_matrix"][0]))
    assert doc["metrics"]["forgetting_max"] is None
    # the upper bound learns every experience at once: after 4 epochs each one is well above chance (1/10)
    assert min(doc["accuracy_matrix"][0]) > 0.2 and doc["metrics"]["final_average_accuracy"] > 0.4


def test_dry_run_writes_the_stream_and_trains_nothing(tmp_path, data_root, capsys):
    out = run(compose(["dry_run=true"], data_root), tmp_path / "run")
    stream = json.loads((tmp_path / "run" / "stream.json").read_text())
    assert stream == json.loads(json.dumps(out))
    assert [e["classes"] for e in stream["experiences"]] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert sum(e["n_train"] + e["n_test"] for e in stream["experiences"]) == 1797
    assert stream["n_params"] > 0
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
    printed = capsys.readouterr().out
    assert "n_train" in printed and f"{stream['n_params']:,} parameters" in printed


def test_tensorboard_holds_losses_accuracies_and_the_matrix(tmp_path, data_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(compose(TINY[:-1] + ["logger=tensorboard"], data_root), tmp_path / "run")
    # one event file for the whole stream, although each experience's Trainer finalizes the logger
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert {"train/loss", "train/loss/cls", "eval/A_t", "eval/acc/exp_1", "eval/acc/exp_5"} <= set(scalars)
    assert [e.step for e in acc.Scalars("eval/A_t")] == [1, 2, 3, 4, 5]  # experiences numbered from 1
    assert "eval/accuracy_matrix" in acc.Tags()["images"]


def test_any_timm_model_is_a_backbone(tmp_path, data_root):
    doc = run(compose(TINY + ["benchmark.n_experiences=2", "model.name=resnet10t"], data_root), tmp_path / "cnn")
    assert doc["model"] == "resnet10t" and len(doc["accuracy_matrix"]) == 2
    cfg = compose(TINY + ["model.name=vit_tiny_patch16_224", "model.patch_size=2", "+model.depth=1",
                          "+model.embed_dim=24", "+model.num_heads=2", "dry_run=true"], data_root)
    _, _, _, module, _ = build(cfg)
    assert module.net.patch_embed.patch_size == (2, 2) and len(module.net.blocks) == 1
    assert module.net.patch_embed.img_size == (8, 8)  # taken from the benchmark


def test_runs_a_ready_avalanche_scenario(tmp_path, data_root):
    from avalanche.benchmarks import nc_benchmark

    from cl_vit.data import build_source

    digits = build_source("digits", data_root=data_root)
    scenario = nc_benchmark(digits.train, digits.test, n_experiences=2, task_labels=False, seed=0,
                            fixed_class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    doc = run(compose(TINY, data_root), tmp_path / "run", scenario=scenario)
    assert doc["experiences"] == [[5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    assert len(doc["accuracy_matrix"]) == 2 and doc["accuracy_matrix"][0][1] is None
    n_test = sum(len(e.dataset) for e in scenario.test_stream)
    assert sum(r[2] for c in doc["confusion"] if c["trained_up_to"] == 1 and c["head"] == "main" for r in c["entries"]) == n_test


def test_atomic_writes_keep_the_old_file_when_a_write_fails(tmp_path):
    from cl_vit.rundir import _atomic_write, atomic_write_json

    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})

    def half_then_fail(f):
        f.write(b'{"a": ')  # part of the new content reaches the temporary file, then the writer dies
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind


def test_interpolated_values_reach_the_model_and_optimiser_resolved():
    """A value written as an interpolation (here optimizer.weight_decay=${optimizer.lr}) arrives as its number, not
    as the string Lightning and timm would fail on."""
    cfg = compose(TINY + ["optimizer.weight_decay=${optimizer.lr}", "scheduler.warmup_epochs=${trainer.max_epochs}",
                          "+model.drop_rate=${optimizer.lr}"])
    module = build(cfg)[3]
    assert module.optimizer_cfg["weight_decay"] == cfg.optimizer.lr
    assert module.scheduler_cfg["warmup_epochs"] == cfg.trainer.max_epochs
    assert any(isinstance(m, torch.nn.Dropout) and m.p == cfg.optimizer.lr for m in module.net.modules())
