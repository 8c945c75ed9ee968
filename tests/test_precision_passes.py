"""The forward passes the suite runs outside Lightning's steps follow ``trainer.precision`` as the steps do.

Class statistics and coresets (cl_vit.strategies.embeddings, iCaRL's exemplar means, InfLoRA's covariances), EWC's
Fisher information, DyTox's fine-tuning on its memory, DER++'s memory samples, SLCA's aligned head and the per-epoch
test evaluation of long-tailed runs read their batches themselves. Under ``64-true`` (the golden runs' precision)
each of them fed a float32 batch to the float64 network and failed, and a pass before the experience's first fit
(InfLoRA's covariances, SimpleCIL's prototypes: it never fits) ran a float32 network; now the runner converts the
network when it makes the experience's trainer, and the batch is cast by the trainer's precision plugin
(cl_vit.module.as_step_input / outside_step). Under mixed precision the statistics passes stay in float32
without autocast, and the per-epoch evaluation runs under the autocast of Lightning's own evaluation step.
"""
import contextlib
import json

import numpy as np
import pytest
import torch
from conftest import TINY, compose

from cl_vit.epoch_eval import ShotGroupEpochEval
from cl_vit.run import run
from cl_vit.strategies import embeddings, simplecil

#: every strategy with a pass of its own outside the training step (simplecil: the shared class-statistics pass of
#: simplecil, aper, ease, ranpac's ridge; dytox: its coreset and its fine-tuning)
OWN_PASSES = ["ewc", "simplecil", "ranpac", "inflora", "dytox", "icarl", "slca", "derpp"]


@contextlib.contextmanager
def output_dtypes():
    """The output dtype of every nn.Linear and nn.Conv2d call inside the block."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            seen.append(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _matrix(run_dir) -> np.ndarray:
    return np.array(json.loads((run_dir / "results.json").read_text())["accuracy_matrix"], dtype=float)


@pytest.mark.parametrize("strategy", OWN_PASSES)
def test_every_pass_runs_in_float64_under_64_true(strategy, tmp_path):
    cfg = compose([*TINY, f"strategy={strategy}", "trainer.precision=64-true", "data.batch_size=16",
                   "benchmark.n_experiences=2"], tmp_path / "data")
    with output_dtypes() as seen:
        run(cfg, tmp_path / "run")
    assert seen and set(seen) == {torch.float64}
    matrix = _matrix(tmp_path / "run")
    assert matrix.shape == (2, 2) and np.isfinite(np.diag(matrix)).all()


def test_class_statistics_stay_float32_without_autocast_under_mixed_precision(tmp_path, monkeypatch):
    """bf16-mixed trains under CPU autocast; the class-statistics pass (SimpleCIL's prototypes) runs outside it."""
    inside = []
    embed = embeddings.experience_embeddings

    def recorded(module, *a, **k):
        with output_dtypes() as seen:
            out = embed(module, *a, **k)
        inside.append((set(seen), torch.is_autocast_enabled("cpu")))
        return out

    monkeypatch.setattr(simplecil, "experience_embeddings", recorded)
    cfg = compose([*TINY, "strategy=simplecil", "trainer.precision=bf16-mixed", "data.batch_size=16",
                   "benchmark.n_experiences=2"], tmp_path / "data")
    run(cfg, tmp_path / "run")
    assert inside and all(dtypes == {torch.float32} and not autocast for dtypes, autocast in inside)


@pytest.mark.parametrize("precision, dtype", [("bf16-mixed", torch.bfloat16), ("64-true", torch.float64)])
def test_the_per_epoch_evaluation_runs_as_lightnings_evaluation_step(precision, dtype, tmp_path, monkeypatch):
    """The long-tailed runs' per-epoch test pass: under bf16-mixed the autocast of Lightning's own evaluation (it ran
    in float32 before), under 64-true a float64 batch (it failed before)."""
    inside = []
    evaluate = ShotGroupEpochEval.evaluate

    def recorded(self, pl_module):
        with output_dtypes() as seen:
            out = evaluate(self, pl_module)
        inside.append(set(seen))
        return out

    monkeypatch.setattr(ShotGroupEpochEval, "evaluate", recorded)
    cfg = compose(["experiment=teacher-digits-lt", *TINY, "trainer.limit_train_batches=2", "data.batch_size=16",
                   f"trainer.precision={precision}"], tmp_path / "data")
    run(cfg, tmp_path / "run")
    assert inside and all(dtype in dtypes for dtypes in inside)
