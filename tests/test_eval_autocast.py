"""trainer.eval_autocast: the evaluation forward under CUDA autocast (DyTox's and GCAB-CFDC's evaluate), training as
trainer.precision says. On the CPU the key does nothing; the tests open the CPU to it (hardware.EVAL_AUTOCAST_DEVICES)
to see where it reaches."""
import contextlib
import json

import lightning as L
import pytest
import torch
from conftest import TINY, compose
from omegaconf import OmegaConf

from cl_vit import hardware
from cl_vit.errors import UserError
from cl_vit.module import ContinualModule
from cl_vit.run import run

#: two experiences, a few steps each: every test here trains the same tiny run
BASE = [*TINY, "benchmark.n_experiences=2", "trainer.limit_train_batches=3", "data.num_workers=0"]


def _matrix(run_dir) -> list:
    return json.loads((run_dir / "results.json").read_text())["accuracy_matrix"]


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "exp_001.pt", weights_only=False)["module"]


@contextlib.contextmanager
def linear_dtypes():
    """(module in training mode, output dtype) of every nn.Linear call inside the block."""
    seen = []

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen.append((module.training, output.dtype))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The run without the key: its accuracy matrix and final weights."""
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    run(compose([*BASE, f"data_root={run_dir.parent / 'data'}"]), run_dir)
    return _matrix(run_dir), _weights(run_dir)


@pytest.mark.parametrize("value", ["fp16", "half", 16])
def test_a_bad_eval_autocast_is_one_line(value):
    cfg = OmegaConf.to_container(compose([*TINY, f"trainer.eval_autocast={value}"]).trainer)
    with pytest.raises(UserError) as e:
        hardware.trainer_kwargs(cfg, cuda_available=False)
    assert "\n" not in str(e.value) and f"trainer.eval_autocast={value!r}" in str(e.value)
    assert "float16" in str(e.value) and "bfloat16" in str(e.value)
    with pytest.raises(UserError):
        ContinualModule(torch.nn.Linear(4, 3), 3, eval_autocast=value)


def test_eval_autocast_is_the_suites_key_and_runs_from_before_it_group_with_null(tmp_path):
    from cl_vit.runs import Run

    kwargs = hardware.trainer_kwargs({"accelerator": "cpu", "eval_autocast": "bfloat16"}, cuda_available=False)
    assert "eval_autocast" not in kwargs  # never reaches lightning.Trainer
    today = OmegaConf.to_container(compose(TINY), resolve=False)
    assert today["trainer"]["eval_autocast"] is None
    before = {**today, "trainer": {k: v for k, v in today["trainer"].items() if k != "eval_autocast"}}
    fp16 = {**today, "trainer": {**today["trainer"], "eval_autocast": "float16"}}
    key = lambda c: Run(path=tmp_path, config=c, results={}, stream=None).setting_key()  # noqa: E731
    assert key(before) == key(today) != key(fp16)


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # a CUDA autocast built on a machine without CUDA
def test_the_context_is_cuda_autocast_of_the_dtype_and_nothing_elsewhere():
    for dtype in ("float16", "bfloat16"):
        ctx = hardware.evaluation_autocast(dtype, torch.device("cuda", 0))
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == getattr(torch, dtype)
        assert not isinstance(hardware.evaluation_autocast(dtype, torch.device("cpu")), torch.autocast)
    assert not isinstance(hardware.evaluation_autocast(None, torch.device("cuda", 0)), torch.autocast)


def test_on_the_cpu_the_key_changes_nothing(tmp_path, data_root, plain):
    with linear_dtypes() as seen:
        run(compose([*BASE, "trainer.eval_autocast=float16"], data_root), tmp_path / "run")
    assert {dtype for _, dtype in seen} == {torch.float32} and any(not training for training, _ in seen)
    matrix, weights = plain
    assert _matrix(tmp_path / "run") == matrix
    assert all(torch.equal(w, _weights(tmp_path / "run")[k]) for k, w in weights.items())


def test_the_key_reaches_the_evaluation_forward_and_only_it(tmp_path, data_root, plain, monkeypatch):
    """With the CPU opened to the key, every evaluation forward runs in bf16 and gives the predictions of a bf16
    autocast forward by hand; every training forward stays fp32 and the trained weights are the plain run's."""
    monkeypatch.setattr(hardware, "EVAL_AUTOCAST_DEVICES", ("cuda", "cpu"))
    calls = []
    predict = L.Trainer.predict

    def spy(self, model=None, dataloaders=None, **kwargs):
        out = predict(self, model, dataloaders=dataloaders, **kwargs)
        calls.append((model, dataloaders, out))
        return out

    monkeypatch.setattr(L.Trainer, "predict", spy)
    with linear_dtypes() as seen:
        run(compose([*BASE, "trainer.eval_autocast=bfloat16"], data_root), tmp_path / "run")
    assert {dtype for training, dtype in seen if training} == {torch.float32}
    assert {dtype for training, dtype in seen if not training} == {torch.bfloat16}
    matrix, weights = plain
    assert all(torch.equal(w, _weights(tmp_path / "run")[k]) for k, w in weights.items())  # training untouched

    module, loader, outputs = calls[-1]  # the last evaluation: nothing trains after it
    module.eval()
    by_hand = {torch.float32: [], torch.bfloat16: []}
    with torch.no_grad():
        for x, _, _ in loader:
            for dtype, logits in by_hand.items():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    logits.append(module.forward_outputs(x)["logits"].masked_fill(~module.seen_mask, float("-inf")))
    evaluated = torch.cat([o["preds"]["main"] for o in outputs])
    assert torch.equal(evaluated, torch.cat(by_hand[torch.bfloat16]).argmax(1))
    assert not torch.equal(torch.cat(by_hand[torch.bfloat16]).float(), torch.cat(by_hand[torch.float32]))


def test_the_key_sets_the_evaluation_dtype_inside_lightnings_mixed_precision(tmp_path, data_root, monkeypatch):
    """trainer.precision=bf16-mixed trains under Lightning's bf16 autocast; eval_autocast=float16 nests its own
    autocast in Lightning's prediction one: fp16 evaluation, bf16 training, no clash of the two."""
    monkeypatch.setattr(hardware, "EVAL_AUTOCAST_DEVICES", ("cuda", "cpu"))
    with linear_dtypes() as seen:
        run(compose([*BASE, "trainer.precision=bf16-mixed", "trainer.eval_autocast=float16"], data_root),
            tmp_path / "run")
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float16}
