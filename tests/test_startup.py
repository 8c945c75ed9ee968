"""The default run imports only what it uses (issue 26): modules that are imported lazily stay out of
``python -m cl_vit.run``'s process, and what needs them imports them on first use."""
import subprocess
import sys

from conftest import cli_env

#: imported on first use only; none of them is needed by the default run (split-digits, Refiner-ViT-tiny,
#: TensorBoard). albumentations: the image pipelines (cl_vit/data/transforms.py); qpsolvers (its solver probe
#: imports JAX): imported by avalanche-lib's GEM, deferred by cl_vit.loading.defer_import (it stands in sys.modules
#: unloaded: its submodules tell whether its code ran); wandb: imported by timm's summary writer and avalanche-lib's
#: confusion matrix, which get it at first use (cl_vit.loading.import_deferring)
LAZY = ("albumentations", "qpsolvers.solvers", "jax", "wandb")

_SCRIPT = """
import runpy, sys
sys.argv = ["cl_vit.run", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "benchmark.n_experiences=1",
            "hydra.run.dir=" + sys.argv[1]]
runpy.run_module("cl_vit.run", run_name="__main__")
lazy = {lazy!r}
print("default run:", *[m in sys.modules for m in lazy])
import gc
print("collector:", gc.isenabled(), gc.get_freeze_count() > 100000)  # the command froze what its imports built

import numpy as np
from cl_vit.data.transforms import cifar_train_pipeline, imagenet_transforms
img = np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8)
x = cifar_train_pipeline(32, (0.5,) * 3, (0.25,) * 3)(image=img)["image"]
_, to_tensor = imagenet_transforms(16, (0.5,) * 3, (0.25,) * 3, train=True)
y = to_tensor(image=img[:16, :16])["image"]

# GEM's quadratic programme through the module avalanche-lib imported
from avalanche.training.plugins import gem
q = gem.qpsolvers.solve_qp(P=np.eye(2), q=-np.ones(2), G=np.ones((1, 2)), h=np.ones(1), solver="quadprog")
# the W&B plot of avalanche-lib's confusion matrix and timm's row writer, through the names their modules hold: the
# real wandb, imported as usual
from avalanche.evaluation.metrics import confusion_matrix
from timm.utils import summary
assert confusion_matrix.wandb.plot is sys.modules["wandb"].plot and type(sys.modules["wandb"]).__name__ == "module"
assert summary.wandb.log is sys.modules["wandb"].log
print("pipelines:", tuple(x.shape), tuple(y.shape), *q.round(6), *[m in sys.modules for m in lazy])
"""


def test_default_run_leaves_lazy_modules_unimported_and_they_load_when_needed(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(lazy=LAZY), str(tmp_path / "run")],
                         capture_output=True, text=True, env=cli_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split(":")[0]: line.split(":")[1].split() for line in out.stdout.splitlines() if ":" in line}
    assert (tmp_path / "run" / "results.json").exists()
    assert lines["default run"] == ["False"] * len(LAZY)
    assert lines["collector"] == ["True", "True"]
    assert lines["pipelines"] == ["(3,", "32,", "32)", "(3,", "16,", "16)", "0.5", "0.5"] + ["True"] * len(LAZY)


def test_a_deferred_library_runs_once_at_its_first_attribute_and_imports_as_usual(tmp_path, monkeypatch):
    from cl_vit.loading import defer_import

    pkg = tmp_path / "deferred_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import sys\nsys.deferred_probe_runs = getattr(sys, 'deferred_probe_runs', 0) + 1\n"
                                     "VALUE = 3\n")
    (pkg / "sub.py").write_text("X = 4\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        defer_import("deferred_probe")
        import deferred_probe  # another library's import statement: nothing runs yet

        assert not hasattr(sys, "deferred_probe_runs")
        assert deferred_probe.VALUE == 3 and sys.deferred_probe_runs == 1
        from deferred_probe.sub import X

        assert X == 4 and deferred_probe.sub.X == 4 and sys.deferred_probe_runs == 1
        defer_import("deferred_probe")  # already imported: unchanged
        assert sys.modules["deferred_probe"].VALUE == 3 and sys.deferred_probe_runs == 1
        defer_import("deferred_probe_not_installed")
        assert "deferred_probe_not_installed" not in sys.modules
    finally:
        for name in ("deferred_probe", "deferred_probe.sub"):
            sys.modules.pop(name, None)
        if hasattr(sys, "deferred_probe_runs"):
            del sys.deferred_probe_runs


def test_a_library_imported_deferring_another_gets_it_at_first_use_and_sys_modules_keeps_no_stand_in(
        tmp_path, monkeypatch):
    from cl_vit.loading import import_deferring

    (tmp_path / "probe_lib").mkdir()
    (tmp_path / "probe_lib" / "__init__.py").write_text("from probe_lib import summary\n")
    (tmp_path / "probe_lib" / "summary.py").write_text("import probe_opt\n\n\ndef log():\n    return probe_opt.VALUE\n")
    (tmp_path / "probe_opt.py").write_text("import sys\nsys.probe_opt_runs = getattr(sys, 'probe_opt_runs', 0) + 1\n"
                                           "VALUE = 5\n")
    (tmp_path / "probe_eager.py").write_text("from probe_opt import VALUE\n")  # reads it while importing
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        import_deferring("probe_lib", "probe_opt")
        import probe_lib

        assert "probe_opt" not in sys.modules and not hasattr(sys, "probe_opt_runs")
        assert probe_lib.summary.log() == 5 and sys.probe_opt_runs == 1
        import probe_opt  # as usual: the real module, imported once

        assert type(probe_opt).__name__ == "module" and probe_opt.VALUE == 5 and sys.probe_opt_runs == 1
        for name in ("probe_opt", "probe_lib", "probe_lib.summary"):
            sys.modules.pop(name)
        del sys.probe_opt_runs
        import_deferring("probe_eager", "probe_opt")  # an attribute read at import: imported then, as usual
        assert sys.modules["probe_eager"].VALUE == 5 and type(sys.modules["probe_opt"]).__name__ == "module"
        import_deferring("probe_lib", "probe_opt")  # already imported: nothing deferred
        assert sys.modules["probe_lib"].summary.probe_opt is sys.modules["probe_opt"] and sys.probe_opt_runs == 1
    finally:
        for name in ("probe_lib", "probe_lib.summary", "probe_opt", "probe_eager"):
            sys.modules.pop(name, None)
        if hasattr(sys, "probe_opt_runs"):
            del sys.probe_opt_runs


def test_the_startup_breakdown_files_cpu_time_under_the_first_phase_on_the_stack():
    import time

    from cl_vit.bench.startup import PHASES, phase_of, sample_phases

    def spin(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    def alpha():
        spin(0.4)

    def beta():
        spin(0.1)

    got, process_cpu = sample_phases(lambda: (alpha(), beta()), (("a", "test_startup.py:alpha"),
                                                                ("b", "test_startup.py:beta")))
    assert set(got) <= {"a", "b", "other"} and 0.3 <= got["a"] <= 0.5 and 0.03 <= got["b"] <= 0.17
    assert process_cpu >= got["a"] + got["b"] - 0.02
    # a lazy import inside training counts as an import; the loss inside backward-less code as forward
    assert phase_of(["x/cl_vit/module.py:training_step", "<frozen importlib._bootstrap>:_find_and_load"]) == "imports"
    assert phase_of(["x/cl_vit/module.py:training_step", "y/lightning/pytorch/trainer/trainer.py:fit"]) == \
        "forward and loss"
    assert phase_of(["z.py:f"]) == "other" and len({p for p, _ in PHASES}) >= 10


def test_the_collector_is_paused_for_imports_and_runs_after_with_their_objects_in_its_oldest_generation():
    import gc

    from cl_vit.loading import gc_paused

    class Node:
        pass

    frozen = gc.get_freeze_count()  # 0 unless something in this process ran the command (python -m cl_vit.run)
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            pass
        assert not gc.isenabled()  # the outer block decides
        kept = [Node() for _ in range(5000)]
        assert gc.get_count()[0] >= 5000
    assert gc.isenabled() and gc.get_freeze_count() == frozen
    if not frozen:
        assert gc.get_count()[0] < 5000 and any(o is kept[0] for o in gc.get_objects(generation=2))
    a, b = Node(), Node()
    a.other, b.other = b, a  # cyclic garbage made after the block is still collected
    ref = __import__("weakref").ref(a)
    del a, b
    gc.collect()
    assert ref() is None
    if not frozen:
        gc.freeze()  # someone else's freeze stays
        try:
            n = gc.get_freeze_count()
            with gc_paused():
                pass
            assert gc.get_freeze_count() == n
        finally:
            gc.unfreeze()
