"""Faults during and after a run (docs/reliability.md): each is injected, and the test asserts the one line, the
status (results.json, exit code) and that no completed result changed."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT, TINY, cli_env, compose, run_cli

from cl_vit import strategies as S
from cl_vit.loading import DamagedCheckpoint, UnsafeCheckpoint
from cl_vit.errors import Interrupted, NonFiniteLoss, RunStopped, UserError
from cl_vit.report import main as report_main
from cl_vit.rundir import RunDirectory, RunLock
from cl_vit.runs import load_run
from cl_vit.run import resume_config, run
from cl_vit.strategies.base import Strategy

THREE = [*TINY, "benchmark.n_experiences=3", "benchmark.remainder=last"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert lines, "no message"
    return lines[-1]


class Fault(Strategy):
    """A test plug-in that injects a fault in experience ``at`` (index), step ``step``: a NaN loss term or a signal."""

    name = "fault"

    def __init__(self, at: int = 1, step: int = 2, kind: str = "nan"):
        self.at, self.step, self.kind = at, step, kind
        self.steps = 0

    def before_experience(self, module, experience):
        self.index, self.steps = experience.index, 0

    def training_loss(self, module, batch, outputs):
        self.steps += 1
        hit = self.index == self.at and self.steps == self.step
        if hit and self.kind == "signal":
            os.kill(os.getpid(), signal.SIGINT)
        if hit and self.kind == "data":  # an image that stopped decoding since the run started
            from cl_vit.data.base import CorruptImage

            raise CorruptImage("", path="/data/imagenet-r/n01443537/broken.jpg", problem="truncated")
        value = float("nan") if hit and self.kind == "nan" else 0.0
        return {"probe": torch.tensor(value)}

    def after_backward(self, module):
        if self.kind == "grad" and self.index == self.at and self.steps == self.step:  # an overflow in backward
            next(p for p in module.net.parameters() if p.grad is not None).grad.fill_(float("inf"))


class Watch(Fault):
    """Fault that also keeps the weights as each step of the faulty experience begins (Watch.seen, by step)."""

    name = "watch"
    seen: dict = {}

    def training_loss(self, module, batch, outputs):
        if self.index == self.at:
            Watch.seen[self.steps + 1] = [p.detach().clone() for p in module.net.parameters()]
        return super().training_loss(module, batch, outputs)


@pytest.fixture
def fault_registered(monkeypatch):
    monkeypatch.setitem(S.STRATEGIES, "fault", Fault)


# -- 5: no code runs from a file ----------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_and_creates_nothing(tmp_path):
    from cl_vit.models import build_model, load_checkpoint
    from cl_vit.models.teachers import load_teacher

    marker = tmp_path / "created_by_unpickling"
    evil = tmp_path / "checkpoints" / "exp_000.pt"
    evil.parent.mkdir()
    torch.save({"module": {"net.w": torch.zeros(1)}, "model": {"name": "vit_micro_patch2_8"}, "input_size": [3, 8, 8],
                "class_names": ["a"], "class_counts": [1], "payload": _Payload(marker)}, evil)
    net = build_model({"name": "vit_micro_patch2_8"}, 10, 1, 8)
    for load in (lambda: RunDirectory(tmp_path).load_checkpoint(0),  # resume, Run.restore
                 lambda: load_teacher(evil),                         # strategy.deit_lt.teacher=
                 lambda: load_checkpoint(net, evil)):                # model.checkpoint=
        with pytest.raises(UnsafeCheckpoint) as e:
            load()
        assert "\n" not in str(e.value) and "could run code" in str(e.value) and str(evil) in str(e.value)
        assert not marker.exists()


def test_checkpoints_of_a_run_load_with_weights_only(tmp_path, data_root):
    run(compose(TINY + ["strategy=l2", "benchmark.n_experiences=2"], data_root), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "exp_001.pt", weights_only=True)
    assert state["strategies"]["l2"]["anchor"] and state["row"]["evaluation"]["main"]


# -- 1: a non-finite loss stops the run -----------------------------------------------------------------------------


def test_a_nan_loss_term_stops_the_run_and_resume_continues(tmp_path, data_root, fault_registered):
    overrides = [*THREE, "+strategy.fault.at=1"]
    cut = tmp_path / "cut"
    with pytest.raises(NonFiniteLoss) as e:
        run(compose(overrides, data_root), cut)
    msg = str(e.value)
    assert "experience 2, epoch 1, step 2" in msg and "fault/probe=nan" in msg and "optimizer.lr" in msg
    doc = json.loads((cut / "results.json").read_text())
    assert doc["status"] == "failed" and doc["reason"] == msg and doc["completed_experiences"] == 1
    kept = _digest(cut / "checkpoints" / "exp_000.pt")
    assert not (cut / "checkpoints" / "exp_001.pt").exists()
    assert load_run(cut).state == "failed (1/3)"

    # the fix: a learning rate may change after a failure, and config.yaml records it for every later resume
    fixed = [*THREE, "+strategy.fault.at=99"]
    resumed_cfg = resume_config(compose([*fixed, f"resume={cut}", "optimizer.lr=0.0005"], data_root),
                                [f"resume={cut}", "optimizer.lr=0.0005"])
    assert resumed_cfg.optimizer.lr == 0.0005
    resumed_cfg.strategy.fault.at = 99  # (the injected fault is not part of what a user fixes)
    out = run(resumed_cfg, cut)
    assert out["status"] == "completed" and out["completed_experiences"] == 3
    assert out["accuracy_matrix"][0] == doc["accuracy_matrix"][0]
    assert _digest(cut / "checkpoints" / "exp_000.pt") == kept
    assert "resumed_with" in (cut / "config.yaml").read_text()


def test_a_non_finite_gradient_stops_the_run_before_the_step(tmp_path, data_root, fault_registered):
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient in experience 1, epoch 1, step 2: parameter "):
        run(compose([*TINY, "benchmark.n_experiences=2", "+strategy.fault.at=0", "+strategy.fault.kind=grad"],
                    data_root), tmp_path / "r")
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "failed"


def test_deferred_checks_skip_the_bad_step_and_stop_naming_it(tmp_path, data_root, monkeypatch):
    """trainer.finite_check_every=4: no read per step, yet the bad step's update never reaches the weights (the fused
    AdamW skips it) and the run stops within 4 steps with the step it happened in."""
    monkeypatch.setitem(S.STRATEGIES, "watch", Watch)
    Watch.seen = {}
    base = [*TINY, "benchmark.n_experiences=2", "trainer.finite_check_every=4", "+strategy.watch.at=0"]
    with pytest.raises(NonFiniteLoss) as e:
        run(compose([*base, "+strategy.watch.kind=grad"], data_root), tmp_path / "g")
    msg = str(e.value)
    assert msg.startswith("non-finite gradient (the loss was finite) in experience 1, epoch 1, step 2 (")
    assert "trainer.finite_check_every=4" in msg and "\n" not in msg
    assert sorted(Watch.seen) == [1, 2, 3, 4]  # steps 3 and 4 ran before the read after step 4
    assert all(torch.equal(a, b) for a, b in zip(Watch.seen[2], Watch.seen[3]))  # step 2 changed no weight
    assert not all(torch.equal(a, b) for a, b in zip(Watch.seen[3], Watch.seen[4]))  # step 3 trained as usual
    assert json.loads((tmp_path / "g" / "results.json").read_text())["status"] == "failed"
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss in experience 1, epoch 1, step 2 \(found"):
        run(compose(base, data_root), tmp_path / "n")  # (Fault's default kind: a NaN loss term)


def test_deferred_checks_change_no_number(tmp_path, data_root):
    """Without a fault, reading the checks every 4 steps trains exactly as reading them every step."""
    every = [run(compose([*TINY, "benchmark.n_experiences=2", f"trainer.finite_check_every={k}"], data_root),
                 tmp_path / f"k{k}") for k in (1, 4)]
    assert every[0]["status"] == every[1]["status"] == "completed"
    assert every[0]["accuracy_matrix"] == every[1]["accuracy_matrix"]
    a, b = (torch.load(tmp_path / f"k{k}" / "checkpoints" / "exp_001.pt", weights_only=True)["module"] for k in (1, 4))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_a_nan_loss_exits_non_zero_with_one_line(tmp_path, data_root):
    proc = run_cli(*TINY, "benchmark.n_experiences=2", "optimizer.lr=1e30", f"hydra.run.dir={tmp_path / 'r'}",
                   data_root=data_root)
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert line.startswith("error: non-finite") and "experience 1, epoch 1" in line
    assert f"resume={tmp_path / 'r'}" in line and "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "failed"


# -- 4: signals -------------------------------------------------------------------------------------------------------


def test_sigint_ends_the_step_and_keeps_completed_experiences(tmp_path, data_root, fault_registered):
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted) as e:
        run(compose([*THREE, "+strategy.fault.kind=signal"], data_root), cut)
    assert e.value.exit_code == 130 and e.value.experience == 1
    doc = json.loads((cut / "results.json").read_text())
    assert doc["status"] == "interrupted" and doc["completed_experiences"] == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_sigterm_prints_how_to_continue_and_exits_143(tmp_path, data_root):
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "cl_vit.run", *TINY, "trainer.max_epochs=2", "benchmark.n_experiences=2",
           f"hydra.run.dir={cut}"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**cli_env(data_root), "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shown = []
    for line in proc.stdout:  # experience 1 is saved and experience 2 starts training (2 epochs, a few seconds)
        shown.append(line)
        if line.startswith("Experience 2/2"):
            break
    kept = _digest(cut / "checkpoints" / "exp_000.pt")
    before = json.loads((cut / "results.json").read_text())
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    shown.append(out)
    assert proc.returncode == 143, err[-2000:]
    assert _one_line(err) == f"interrupted during experience 2: continue with python -m cl_vit.run resume={cut}"
    after = json.loads((cut / "results.json").read_text())
    assert after["status"] == "interrupted" and after["accuracy_matrix"] == before["accuracy_matrix"]
    assert _digest(cut / "checkpoints" / "exp_000.pt") == kept
    part = torch.load(cut / "checkpoints" / "exp_001.epoch.pt", weights_only=True)  # the step it stopped at
    assert part["global_step"] >= 1
    # 9: the evaluation bar says what it evaluates
    shown = "".join(shown)  # (Lightning's bars write to stdout)
    assert "exp 1/2 · evaluating" in shown and "Predicting DataLoader" not in shown


# -- 2: damaged run directories ---------------------------------------------------------------------------------------


def test_a_truncated_checkpoint_and_a_damaged_results_json_are_recovered(tmp_path, data_root, caplog, capsys):
    ref = run(compose(THREE, data_root), tmp_path / "ref")
    for case in ("checkpoint", "results"):
        cut = tmp_path / case
        shutil.copytree(tmp_path / "ref", cut)
        # a full disk or a killed copy: the last checkpoint cut short; or results.json cut short
        target = cut / "checkpoints" / "exp_002.pt" if case == "checkpoint" else cut / "results.json"
        target.write_bytes(target.read_bytes()[:200])
        if case == "results":
            (cut / "checkpoints" / "exp_002.pt").unlink()  # killed before its results were written
        kept = {p.name: _digest(p) for p in (cut / "checkpoints").glob("exp_00[01].pt")}
        if case == "results":
            assert load_run(cut).state.startswith("damaged (results.json cannot be read")
            assert report_main([str(cut)]) == 0 and "damaged" in capsys.readouterr().out
        caplog.clear()
        out = run(resume_config(compose([*THREE, f"resume={cut}"], data_root), [f"resume={cut}"]), cut)
        notes = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("cannot be read" in n and "\n" not in n for n in notes), notes
        assert out["accuracy_matrix"] == ref["accuracy_matrix"] and out["confusion"] == ref["confusion"]
        assert {p: _digest(cut / "checkpoints" / p) for p in kept} == kept
        assert load_run(cut).finished


def test_restore_of_a_damaged_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "checkpoints" / "exp_000.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DamagedCheckpoint) as e:
        RunDirectory(tmp_path).load_checkpoint(0)
    assert "\n" not in str(e.value) and "truncated or damaged" in str(e.value)


# -- 3: one process per run directory -------------------------------------------------------------------------------


def test_a_live_run_directory_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, data_root):
    rd = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom cl_vit.rundir import RunLock\n"
                               f"lock = RunLock(__import__('pathlib').Path({str(rd)!r}))\nprint('held', flush=True)\n"
                               "time.sleep(600)"], cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"is being written by another process \\(pid {holder.pid} "):
            run(compose(TINY, data_root), rd)
        assert not (rd / "config.yaml").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    RunLock(rd).release()  # the kernel dropped the killed process's lock


# -- 6: full disk -----------------------------------------------------------------------------------------------------


def test_a_full_disk_stops_in_one_line_and_keeps_earlier_files(tmp_path, data_root):
    cut = tmp_path / "cut"
    # from experience 2 on, no file may grow past 64 KiB: its checkpoint cannot be written
    proc = run_cli(*TINY, "benchmark.n_experiences=2", f"hydra.run.dir={cut}", data_root=data_root,
                   env={"CL_VIT_TEST_FSIZE_AT": "1:65536"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert line.startswith(f"error: writing {cut / 'checkpoints' / 'exp_001.pt'} failed (File too large)"), line
    assert f"resume={cut}" in line and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["exp_000.pt"]  # no partial file left
    doc = json.loads((cut / "results.json").read_text())
    assert doc["completed_experiences"] == 1 and doc["status"] == "failed"
    assert RunDirectory(cut).load_checkpoint(0)["experience"] == 0


# -- 8: what a resume may change --------------------------------------------------------------------------------------


def test_resume_accepts_logger_progress_bar_and_eval_batch_size_and_names_a_forbidden_key(tmp_path, data_root):
    cut = tmp_path / "cut"
    run(compose([*TINY, "benchmark.n_experiences=2", "logger=tensorboard"], data_root), cut)
    allowed = [f"resume={cut}", "logger=none", "data.eval_batch_size=64", "+trainer.enable_progress_bar=false",
               "trainer=cpu"]
    cfg = resume_config(compose(allowed, data_root), allowed)
    assert not cfg.logger and cfg.data.eval_batch_size == 64 and cfg.trainer.enable_progress_bar is False
    assert cfg.trainer.max_epochs == 1 and "sync_batchnorm" not in cfg.trainer  # a preset changes the device only
    for bad in ("optimizer.lr=0.5", "trainer.max_epochs=3"):
        with pytest.raises(UserError) as e:
            resume_config(compose([f"resume={cut}", bad], data_root), [f"resume={cut}", bad])
        assert repr(bad) in str(e.value) and "logger" in str(e.value) and "data.eval_batch_size" in str(e.value)


# -- 9: a clean console -----------------------------------------------------------------------------------------------


def test_no_qpsolvers_warning_when_no_qp_solver_is_installed(tmp_path):
    # a fresh process (pytest resets warning filters between tests): a qpsolvers that warns as the real one does on
    # a machine without QP solvers (qpsolvers/solvers/__init__.py), imported through avalanche as a run imports it
    fake = tmp_path / "fake" / "qpsolvers"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import warnings\nwarnings.warn('no QP solver found on your system, you can "
                                      "install solvers from PyPI by ``pip install qpsolvers[open_source_solvers]``')\n")
    env = {**cli_env(), "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(fake.parent)])}
    # cl_vit.streams defers qpsolvers (loading.defer_import): reading __path__, which the stand-in lacks, loads it
    proc = subprocess.run([sys.executable, "-W", "always::UserWarning", "-c",
                           "import cl_vit.streams, qpsolvers; print(qpsolvers.__path__[0])"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and str(fake) in proc.stdout, proc.stderr[-2000:]
    assert "QP solver" not in proc.stderr


# -- 7: long streams stay flat ----------------------------------------------------------------------------------------


def test_a_hundred_experiences_keep_memory_and_work_flat(tmp_path, data_root, monkeypatch):
    """A 100-experience stream: memory stays flat, and every experience does exactly the work its protocol needs
    (its own training images, then one pass over the test images seen so far), nothing more as the stream grows.

    The work is counted in images through the network, not timed: a timed assertion failed in CI whenever another
    test ran beside this one. How the time per experience evolves is measured by ``python -m cl_vit.bench runner``."""
    import gc
    import warnings

    import lightning as L

    from cl_vit import module as module_lib
    from cl_vit import report
    from cl_vit.runner import ContinualRunner

    images, per_experience, save, outputs = [0], [], ContinualRunner._save, module_lib.net_outputs

    def counted_outputs(net, x):
        images[0] += int(x.shape[0])
        return outputs(net, x)

    def counted_save(self, i, status):  # an experience ends with its save
        per_experience.append(images[0])
        images[0] = 0
        save(self, i, status)
        if i % 10 == 9:
            live.append(live_state())

    def live_state():  # what a leak would keep alive: trainers, modules, and the bytes of live tensors
        gc.collect()
        objs = gc.get_objects()
        with warnings.catch_warnings():  # type checks on every object touch deprecated lazy attributes
            warnings.simplefilter("ignore")
            return (sum(isinstance(o, L.Trainer) for o in objs),
                    sum(isinstance(o, L.LightningModule) for o in objs),
                    sum(o.untyped_storage().nbytes() for o in objs if torch.is_tensor(o) and not o.is_meta))

    live = []

    monkeypatch.setattr(module_lib, "net_outputs", counted_outputs)
    monkeypatch.setattr(ContinualRunner, "_save", counted_save)
    monkeypatch.setattr(report, "finish_run", lambda *a, **k: None)  # the final figures are not what is measured
    n_train = 4
    out = run(compose(["model=vit_micro", "benchmark=synthetic", "benchmark.n_experiences=100",
                       "benchmark.source_args.n_classes=100", f"benchmark.source_args.n_train={n_train}",
                       "benchmark.source_args.n_test=1", "benchmark.source_args.size=8",
                       "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none",
                       "+trainer.enable_progress_bar=false"], data_root), tmp_path / "long")
    assert out["completed_experiences"] == 100
    rss = out["rss_mib"]["per_experience"]
    first, last = sum(rss[:10]) / 10, sum(rss[-10:]) / 10
    # RSS grows by about 0.5 MiB an experience: the results themselves (one confusion per pair of experiences, so
    # 5,050 here, kept and written to results.json) and the allocator's fragmentation; measured 4.6% over 100
    assert last <= first * 1.15, (first, last)
    # nothing else is left behind: the same trainers and modules alive after experience 20 as after 100, and tensor
    # bytes grow only by the last evaluation's per-image outputs (labels, predictions, experience ids: measured
    # 32 bytes an image; 80 test images more here). One leaked batch an experience would add 240 KiB.
    assert all(state[:2] == live[1][:2] for state in live[1:]), live
    assert live[-1][2] - live[1][2] <= 64 * 80, live
    # experience i (1-based): one epoch over its class's n_train images, then the i test images seen so far
    assert per_experience == [n_train + i for i in range(1, 101)], per_experience
    wall = out["wall_time"]["per_experience"]
    print(f"RSS {first:.0f} -> {last:.0f} MiB; train+eval {sum(wall[4:14]) / 10:.3f} -> {sum(wall[-10:]) / 10:.3f} s")


# -- runs never mixed, nothing left behind, files the group can read (issue 23, cases 5, 6, 8-13) ------------------


def test_resume_into_another_run_directory_is_refused_in_one_line(tmp_path, data_root):
    ref = tmp_path / "ref"
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("seed: 1\n")  # another (l2) run killed after 2 experiences
    before = sorted(p.name for p in other.iterdir())
    with pytest.raises(UserError) as e:
        run(compose([*TINY, f"resume={ref}"], data_root), other)
    assert "\n" not in str(e.value) and "not in" in str(e.value) and "hydra.run.dir" in str(e.value)
    assert sorted(p.name for p in other.iterdir()) == before


def test_a_split_that_changed_since_the_run_started_is_refused_naming_both_digests(tmp_path):
    from cl_vit.run import _check_same_data

    rd = RunDirectory(tmp_path)
    rd.write_json("results.json", {"completed_experiences": 1, "source": {"split": {"name": "own", "sha256": "a" * 64}}})
    _check_same_data(rd, {"split": {"name": "own", "sha256": "a" * 64}})  # the same data: nothing to say
    _check_same_data(rd, {"name": "digits"})  # a source without a split digest
    with pytest.raises(UserError) as e:
        _check_same_data(rd, {"split": {"name": "own", "sha256": "b" * 64}})
    assert "\n" not in str(e.value) and "aaaaaaaaaaaaaaaa" in str(e.value) and "bbbbbbbbbbbbbbbb" in str(e.value)


def test_a_data_file_failing_mid_run_marks_it_failed_and_resume_with_skip_corrupt_continues(
        tmp_path, data_root, fault_registered):
    cut = tmp_path / "cut"
    with pytest.raises(RunStopped) as e:
        run(compose([*THREE, "+strategy.fault.at=1", "+strategy.fault.kind=data"], data_root), cut)
    assert e.value.resume_args == ("skip_corrupt=true",) and "broken.jpg" in str(e.value)
    doc = json.loads((cut / "results.json").read_text())
    assert doc["status"] == "failed" and "broken.jpg" in doc["reason"] and doc["completed_experiences"] == 1
    assert doc["stopped_in_experience"] == 2
    # the suggested fix is accepted by a resume (it changes which files are read, nothing else)
    cfg = resume_config(compose([*THREE, f"resume={cut}", "skip_corrupt=true"], data_root),
                        [f"resume={cut}", "skip_corrupt=true"])
    assert cfg.skip_corrupt is True
    assert run(compose([*THREE, f"resume={cut}"], data_root), cut)["status"] == "completed"


def test_a_second_signal_during_the_checkpoint_write_keeps_that_experience(tmp_path, data_root, monkeypatch):
    save = RunDirectory.save_checkpoint

    def save_with_two_signals(self, i, state):
        if i == 1:  # a scheduler's SIGTERM, and a second one 20 ms later, while the checkpoint is written
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return save(self, i, state)

    monkeypatch.setattr(RunDirectory, "save_checkpoint", save_with_two_signals)
    cut = tmp_path / "cut"
    with pytest.raises(Interrupted):
        run(compose(THREE, data_root), cut)
    doc = json.loads((cut / "results.json").read_text())
    assert doc["status"] == "interrupted" and doc["completed_experiences"] == 2
    assert doc["stopped_in_experience"] == doc["completed_experiences"] + 1
    assert (cut / "checkpoints" / "exp_001.pt").exists() and load_run(cut).state == "interrupted (2/3)"


def test_resume_removes_temporary_files_left_by_a_killed_write(tmp_path, data_root, monkeypatch):
    from conftest import interrupt_after

    cut = tmp_path / "cut"
    Stop = interrupt_after(monkeypatch, 0)
    with pytest.raises(Stop):
        run(compose(THREE, data_root), cut)
    monkeypatch.undo()
    stale = [cut / "checkpoints" / ".exp_001.pt.k2j4h5g6.tmp", cut / ".results.json.a1b2c3d4.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = cut / "notes.tmp"  # not the suite's own temporary file: left alone
    keep.write_text("mine")
    run(compose([*THREE, f"resume={cut}"], data_root), cut)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert not [p for p in cut.rglob(".*.tmp")]


def test_run_files_get_the_umask_mode(tmp_path, data_root):
    old = os.umask(0o027)
    try:
        run(compose([*TINY, "benchmark.n_experiences=2"], data_root), tmp_path / "run")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"]
    assert {"results.json", "config.yaml", "stream.json", "accuracy_matrix.csv", "exp_001.pt"} <= {p.name for p in files}
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {oct(0o640)}, modes


@pytest.mark.parametrize("path", ["/tmp/runs/a-1", "/tmp/my runs/é x", "/tmp/it's/x", "/tmp/a\\b c/x=y,z"])
def test_a_printed_resume_line_pastes_as_printed(path):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from cl_vit.errors import resume_command

    words = shlex.split(resume_command(path))
    assert words[:3] == ["python", "-m", "cl_vit.run"] and len(words) == 4
    parsed = OverridesParser.create().parse_override(words[3])
    assert parsed.key_or_group == "resume" and parsed.value() == path


# -- preemption inside a long experience (issue 24, item 7) ---------------------------------------------------------


def _weights(path):
    return torch.load(path, weights_only=True)["module"]


def test_a_kill_inside_an_experience_resumes_from_the_last_epoch_boundary_with_equal_results(tmp_path, data_root,
                                                                                              caplog):
    """SIGKILL in experience 2, epoch 2 of 3, with a checkpoint every epoch: the resume continues from epoch 2's
    start (it does not retrain epoch 1) and ends with the results and weights of an uninterrupted run."""
    args = [*TINY, "benchmark.n_experiences=2", "trainer.max_epochs=3", "checkpoint_every_epochs=1"]
    ref = run(compose(args, data_root), tmp_path / "ref")
    cut = tmp_path / "cut"
    killed = run_cli(*args, f"hydra.run.dir={cut}", data_root=data_root,
                     env={"CL_VIT_TEST_SIGKILL_AT": "1:1:1"})
    assert killed.returncode == -signal.SIGKILL
    assert (cut / "checkpoints" / "exp_001.epoch.pt").exists() and not (cut / "checkpoints" / "exp_001.pt").exists()
    part = torch.load(cut / "checkpoints" / "exp_001.epoch.pt", weights_only=True)
    assert part["epoch"] == 0  # the state after epoch 1 (Lightning counts from 0)
    with caplog.at_level("INFO", logger="cl_vit"):  # the resume in this process: the kill needs the subprocess
        run(compose([*args, f"resume={cut}"], data_root), cut)
    assert "continuing experience 2 from exp_001.epoch.pt" in caplog.text
    doc = json.loads((cut / "results.json").read_text())
    assert doc["accuracy_matrix"] == ref["accuracy_matrix"] and doc["confusion"] == ref["confusion"]
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "exp_001.pt"), _weights(cut / "checkpoints" / "exp_001.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((cut / "checkpoints").glob("*.epoch.pt"))  # dropped once each experience is saved


def _signal_at(monkeypatch, sig, experience, epoch, batch):
    """Send ``sig`` to this process at the end of one training step (once): the run's own handler receives it."""
    from lightning.pytorch.callbacks import Callback

    from cl_vit.runner import ContinualRunner

    class SignalAt(Callback):
        def __init__(self, index):
            self.index = index

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            if (self.index, trainer.current_epoch, batch_idx) == (experience, epoch, batch):
                os.kill(os.getpid(), sig)

    fit_callbacks = ContinualRunner._fit_callbacks
    monkeypatch.setattr(ContinualRunner, "_fit_callbacks", lambda self, i: [*fit_callbacks(self, i), SignalAt(i)])


def _logged(run_dir):
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


@pytest.mark.parametrize("sig,every,epoch,batch,ema", [
    (signal.SIGTERM, 0, 1, 4, None),  # inside an epoch, no checkpoint_every_epochs
    (signal.SIGTERM, 0, 0, 20, 0.9),  # after epoch 1's last step: written at its end
    (signal.SIGINT, 1, 1, 20, 0.9),  # after the last epoch's last step: the resume only finishes the experience
])
def test_a_signal_mid_epoch_saves_the_step_and_resume_continues_it_with_equal_results(
        tmp_path, data_root, monkeypatch, sig, every, epoch, batch, ema):
    """A signal in experience 2 (2 epochs of 21 steps) after step ``batch`` of ``epoch``: the experience's state is
    written at that step, with or without checkpoint_every_epochs (after an epoch's last step: at the epoch's end,
    also the last epoch's); the resume trains only the steps after it and ends with the results, weights and logged
    losses and accuracies of an uninterrupted run, the model EMA's average included."""
    args = [*TINY, "benchmark.n_experiences=2", "trainer.max_epochs=2", f"checkpoint_every_epochs={every}",
            "logger=csv", "trainer.log_every_n_steps=1", f"ema.decay={'null' if ema is None else ema}"]
    ref = run(compose(args, data_root), tmp_path / "ref")
    cut = tmp_path / "cut"
    _signal_at(monkeypatch, sig, 1, epoch, batch)
    with pytest.raises(Interrupted) as e:
        run(compose(args, data_root), cut)
    monkeypatch.undo()
    assert e.value.exit_code == 128 + sig and e.value.experience == 1
    part = torch.load(cut / "checkpoints" / "exp_001.epoch.pt", weights_only=True)
    assert part["global_step"] == 21 * epoch + batch + 1  # the step the signal ended, not the last epoch boundary
    position = part["callbacks"]["_EpochCheckpoint"].get("loader")  # where the training loader stands
    assert (position["batches"] == batch + 1) if batch < 20 else position is None  # 20: at the epoch's end
    steps = []
    from cl_vit.module import ContinualModule

    monkeypatch.setattr(ContinualModule, "on_train_batch_start",
                        lambda self, b, i: steps.append((self.current_epoch, i)))
    run(compose([*args, f"resume={cut}"], data_root), cut)
    monkeypatch.undo()
    assert steps == [(e, i) for e in range(epoch, 2) for i in range(21) if (e, i) > (epoch, batch)]  # only the rest
    doc = json.loads((cut / "results.json").read_text())
    assert doc["accuracy_matrix"] == ref["accuracy_matrix"] and doc["confusion"] == ref["confusion"]
    a, b = _weights(tmp_path / "ref" / "checkpoints" / "exp_001.pt"), _weights(cut / "checkpoints" / "exp_001.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _logged(cut) == _logged(tmp_path / "ref")  # every step's losses, each epoch's training accuracy
    assert not list((cut / "checkpoints").glob("*.epoch.pt"))  # dropped once the experience is saved


def test_keep_checkpoints_last_keeps_what_resume_needs(tmp_path, data_root):
    run(compose([*THREE, "keep_checkpoints=last"], data_root), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["exp_002.pt"]
    run(compose([*THREE, "keep_checkpoints=2"], data_root), tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["exp_001.pt", "exp_002.pt"]
    with pytest.raises(UserError) as e:
        run(compose([*THREE, "keep_checkpoints=none"], data_root), tmp_path / "bad")
    assert "keep_checkpoints" in str(e.value) and not (tmp_path / "bad" / "results.json").exists()
