"""Shared test helpers: compose the real Hydra configs with tiny overrides, and run the CLI as a user would.

Tests never download anything: data comes from scikit-learn's bundled digits or is generated under tmp_path.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

# before torch loads (libgomp reads them once): one OpenMP thread per test process, sleeping when idle; the suite
# honours OMP_NUM_THREADS (cl_vit.hardware.choose_threads), so in-process runs keep it too
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"


def script_module(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module (the golden scripts are no package): their data generators, checksums and
    settings, which the tests share instead of copying."""
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Small models on 2 cores: one intra-op thread per test process avoids oversubscription when several run at once.
torch.set_num_threads(1)

#: one epoch per experience on CPU, no TensorBoard unless a test asks for it, whatever the model
TINY_ANY_MODEL = ["trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none"]
#: the smallest sensible run: TINY_ANY_MODEL on the micro ViT (the default backbone is Refiner-ViT-tiny)
TINY = ["model=vit_micro", *TINY_ANY_MODEL]


def compose(overrides=(), data_root: Path | None = None):
    """The run config exactly as ``python -m cl_vit.run <overrides>`` would compose it."""
    import cl_vit.run  # noqa: F401  (registers the resolvers the config uses)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides)
    if data_root is not None:
        overrides.append(f"data_root={data_root}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def cli_env(data_root: Path | None = None) -> dict:
    env = dict(os.environ)
    # the checkout under test, whatever is installed
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if data_root is not None:
        env["CL_VIT_DATA"] = str(data_root)
    env.setdefault("OMP_NUM_THREADS", "1")  # the suite runs one worker per core (pytest-xdist): one thread each
    return env


def run_cli(*args, module: str = "cl_vit.run", cwd: Path | None = None, data_root: Path | None = None,
            timeout: float = 300, env: dict | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """``python -m <module> <args>`` in a subprocess; returns the completed process (stdout/stderr as text)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=str(cwd or REPO_ROOT),
        env={**cli_env(data_root), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


def run_ddp(args, run_dir: Path, data_root: Path) -> None:
    """``python -m cl_vit.run <args>`` under trainer=ddp on 2 CPU processes (gloo) into ``run_dir``; fails the test
    unless it completes as a 2-process run."""
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "data.num_workers=0", "data.pin_memory=false", f"hydra.run.dir={run_dir}", f"data_root={data_root}"]
    run_cli(*args, *ddp, env={"OMP_NUM_THREADS": "1"}, check=True)
    assert "Distributed run: 2 processes" in (Path(run_dir) / "run.log").read_text()

def interrupt_after(monkeypatch, index):
    """Make a run stop (raise the returned exception) right after experience ``index`` is saved: a resume test's cut."""
    from cl_vit.runner import ContinualRunner

    class Stop(Exception):
        pass

    save = ContinualRunner._save

    def save_then_stop(self, i, status):
        save(self, i, status)
        if i == index:
            raise Stop

    monkeypatch.setattr(ContinualRunner, "_save", save_then_stop)
    return Stop


def cached_runs(tmp_path_factory, over):
    """For a module-scoped fixture: one uninterrupted run per strategy name, made on first use and shared by the
    tests that read it: ``get(name) -> (config, data_root, folder, results)`` with the overrides ``over(name)``."""
    from cl_vit.run import run

    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            (root / "data").mkdir()
            cfg = compose(over(name), root / "data")
            cache[name] = (cfg, root / "data", root, run(cfg, root / "whole"))
        return cache[name]

    return get


def record_steps(monkeypatch) -> list:
    """Per training step of the runs that follow, (the learning rates of the optimiser's groups, the loss): the
    golden tests' record of the suite's side."""
    from cl_vit.module import ContinualModule

    steps = []
    training_step = ContinualModule.training_step

    def recording(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        steps.append(([g["lr"] for g in self.trainer.optimizers[0].param_groups], loss.item()))
        return loss

    monkeypatch.setattr(ContinualModule, "training_step", recording)
    return steps


def patch_loader_order(monkeypatch, order) -> None:
    """The runner's loaders (the plain ones and the experiences' resumable training loaders) built through
    ``order(loader_class)``, the golden scripts' fixed batch order: one ``order`` shared by both, so that a later
    shuffled loader of a data set (EWC's Fisher pass) can continue its training loader's order. Subclasses, so that
    the runner's ``isinstance`` checks of its resumable loader still hold."""
    import cl_vit.runner as runner

    make = order(lambda dataset, *args, **kwargs: (dataset, args, kwargs))

    def ordered(cls):
        def __init__(self, dataset, *args, **kwargs):
            dataset, args, kwargs = make(dataset, *args, **kwargs)
            cls.__init__(self, dataset, *args, **kwargs)

        return type(cls.__name__, (cls,), {"__init__": __init__})

    monkeypatch.setattr(runner, "DataLoader", ordered(runner.DataLoader))
    monkeypatch.setattr(runner, "_ResumableLoader", ordered(runner._ResumableLoader))


def cut_and_resume(monkeypatch, overrides, data_root, run_dir, after: int = 0) -> dict:
    """Run ``overrides`` into ``run_dir``, stopped right after experience ``after`` is saved, then resume it there
    (``monkeypatch`` is undone in between); returns the resumed run's results."""
    from cl_vit.run import run

    Stop = interrupt_after(monkeypatch, after)
    with pytest.raises(Stop):
        run(compose(overrides, data_root), run_dir)
    monkeypatch.undo()
    return run(compose([*overrides, f"resume={run_dir}"], data_root), run_dir)


def assert_checkpointing_changes_nothing(plain, checkpointed, x) -> None:
    """``checkpointed`` (gradient checkpointing on) and ``plain`` (the same weights, off) in training mode: equal
    outputs and buffers (BatchNorm running statistics: the recomputation in backward must not count a batch twice),
    gradients to rounding."""
    ya, yb = plain(x), checkpointed(x)
    torch.testing.assert_close(ya, yb, rtol=0, atol=0)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), pb in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)
    for (n, ba), bb in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(ba, bb, rtol=0, atol=0, msg=n)


def assert_same_checkpoints(dir_a, dir_b, experiences=(0, 1)) -> None:
    """The experiences' checkpoints of the runs in ``dir_a`` and ``dir_b`` hold the same module and strategy state,
    bit for bit (a resumed run against an uninterrupted one)."""
    from cl_vit.rundir import RunDirectory

    for i in experiences:
        a, b = RunDirectory(dir_a).load_checkpoint(i), RunDirectory(dir_b).load_checkpoint(i)
        assert state_equal(a["module"], b["module"]) and state_equal(a["strategies"], b["strategies"]), i


def state_equal(a, b) -> bool:
    """Nested checkpoint state (dicts, lists, tensors, plain values) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(state_equal(x, z) for x, z in zip(a, b))
    return a == b


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root
