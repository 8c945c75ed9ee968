"""`python -m cl_vit.run` as a user runs it: the command line, one-line errors, and resume after SIGKILL."""
import hashlib
import json
import signal

import pytest
from conftest import compose, run_cli

FAST = ["trainer.max_epochs=2", "trainer.accelerator=cpu", "logger=none"]


def test_the_documented_command_line(tmp_path, data_root):
    out = tmp_path / "run"
    proc = run_cli("benchmark=split-digits", "strategy=finetune", "trainer.max_epochs=2", "seed=3",
                   "trainer.accelerator=cpu", f"hydra.run.dir={out}", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Experience 3/5" in proc.stdout  # says which experience it is on
    assert "Accuracy matrix" in proc.stdout and "A_N (final average accuracy" in proc.stdout
    assert f"run directory: {out}" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema_version"] >= 1 and doc["seed"] == 3 and doc["status"] == "completed"
    for key in ("class_order", "experiences", "accuracy_matrix", "metrics", "confusion", "wall_time", "versions"):
        assert key in doc
    from cl_vit.run import code_version

    assert doc["code"] == code_version() and (doc["code"] is None or len(doc["code"]["commit"]) == 40)
    assert set(doc["metrics"]) >= {"final_average_accuracy", "global_accuracy", "average_incremental_accuracy",
                                   "forgetting_max", "forgetting_first_last", "forgetting_consecutive", "bwt"}
    assert {"torch", "timm", "lightning", "avalanche-lib"} <= set(doc["versions"])
    assert (out / "accuracy_matrix.csv").read_text().startswith("trained_up_to,exp_1,exp_2")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"exp_{i:03d}.pt" for i in range(5)]
    assert "seed: 3" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "args, key",
    [
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["loss.name=hinge"], "loss.name"),
        (["benchmark=nope"], "benchmark"),
        (["model.name=not_a_model"], "model.name"),
        (["benchmark.n_experiences=3"], "benchmark.remainder"),
    ],
)
def test_bad_values_fail_in_one_line_before_training(tmp_path, data_root, args, key):
    out = tmp_path / "run"
    proc = run_cli(*args, "logger=none", f"hydra.run.dir={out}", data_root=data_root)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    assert not (out / "results.json").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["trainer.max_epoch=3"], "trainer.max_epoch is not a config key: did you mean trainer.max_epochs?"),
        # Hydra's own hint for the line above: Lightning's Trainer would raise a TypeError once training starts
        (["+trainer.max_epoch=3"], "trainer.max_epoch is not an argument of lightning.Trainer: did you mean "
                                   "trainer.max_epochs"),
        (["strategy=l2", "+strategy.l2.lamda=1"], "did you mean strategy.l2.lam?"),
        (["+max_epochs=3"], "+max_epochs: nothing reads max_epochs"),
        (["+traner.max_epochs=3"], "+traner.max_epochs: nothing reads traner.max_epochs (did you mean trainer"),
        (["-m", "strategy=finetune,l2", "strategy.l2.lam=1"], "++benchmark.strategy_args.l2.lam=... sets it"),
    ],
)
def test_unknown_keys_fail_in_one_line_with_the_closest_keys(tmp_path, data_root, args, expected):
    out = tmp_path / "run"
    proc = run_cli(*args, *FAST, f"hydra.run.dir={out}", f"hydra.sweep.dir={out}", data_root=data_root)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (out / "results.json").exists() and not (out / "checkpoints").exists()


def test_dry_run_prints_the_module_tree_and_the_parameter_groups(tmp_path, data_root):
    out = tmp_path / "dry"
    proc = run_cli("dry_run=true", "model=vit_micro", f"hydra.run.dir={out}", data_root=data_root, check=True)
    lines = proc.stdout.splitlines()
    n_params = json.loads((out / "stream.json").read_text())["n_params"]
    root = next(ln.split() for ln in lines if ln.startswith("(model)"))
    assert root[1] == "VisionTransformer" and int(root[2].replace(",", "")) == n_params
    assert any(ln.split()[1:4] == ["4", "x", "Block"] for ln in lines if "[0..3]" in ln)  # the blocks, folded
    assert next(ln.split() for ln in lines if ln.strip().startswith("head "))[2] == f"{64 * 10 + 10:,}"
    groups = [ln for ln in lines if ln.startswith("  group ")]
    trainable = sum(int(ln.split(", ")[2].split()[0].replace(",", "")) for ln in groups)
    assert len(groups) == 2 and trainable == n_params  # weight decay and none: every parameter in one group
    assert {ln.split(", ")[1] for ln in groups} == {"weight_decay 0.0", "weight_decay 0.05"}


def test_results_record_the_code_commit(tmp_path):
    import subprocess

    from cl_vit.run import code_version

    assert code_version(tmp_path) is None  # not a git checkout
    git = lambda *a: subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == {"commit": head, "dirty": True}


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CL_VIT_DATA", str(tmp_path / "somewhere"))
    assert compose().data_root == str(tmp_path / "somewhere")
    monkeypatch.delenv("CL_VIT_DATA")
    assert compose().data_root == "~/data"


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, data_root):
    from cl_vit.run import run

    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(compose(FAST, data_root), ref)  # the uninterrupted run in this process: the command line is tested below

    # SIGKILL at batch 3 of experience 3 (index 2)
    proc = run_cli(*FAST, f"hydra.run.dir={cut}", data_root=data_root, env={"CL_VIT_TEST_SIGKILL_AT": "2:3"})
    assert proc.returncode == -signal.SIGKILL
    before = json.loads((cut / "results.json").read_text())
    assert before["status"] == "running" and before["completed_experiences"] == 2
    kept = {p.name: _digest(p) for p in (cut / "checkpoints").glob("exp_00[01].pt")}
    assert len(kept) == 2

    proc = run_cli(f"resume={cut}", data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resuming" in proc.stdout and "Experience 1/5" not in proc.stdout
    after = json.loads((cut / "results.json").read_text())
    reference = json.loads((ref / "results.json").read_text())
    assert after["accuracy_matrix"] == reference["accuracy_matrix"]
    assert after["metrics"] == reference["metrics"]
    assert after["confusion"] == reference["confusion"]
    # nothing completed before the kill was lost or rewritten
    assert after["accuracy_matrix"][:2] == before["accuracy_matrix"][:2]
    assert {p: _digest(cut / "checkpoints" / p) for p in kept} == kept
    assert len(list((cut / "checkpoints").glob("*.pt"))) == 5


def test_resume_refuses_to_change_what_the_run_computes(tmp_path, data_root, monkeypatch):
    from conftest import interrupt_after

    from cl_vit.run import run

    cut = tmp_path / "cut"
    Stop = interrupt_after(monkeypatch, 0)  # a run stopped after its first experience (the kill is tested above)
    with pytest.raises(Stop):
        run(compose([*FAST, "benchmark.n_experiences=2"], data_root), cut)
    monkeypatch.undo()
    assert json.loads((cut / "results.json").read_text())["completed_experiences"] == 1
    proc = run_cli(f"resume={cut}", "optimizer.lr=0.5", data_root=data_root)
    assert proc.returncode == 2 and "optimizer.lr=0.5" in proc.stderr
    proc = run_cli(*FAST, f"hydra.run.dir={cut}", data_root=data_root)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
