"""Device presets, precision fallback, fused attention, compile=true, and the evaluation schedule (eval_every)."""
import importlib
import logging
import pkgutil

import lightning as L
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, compose
from omegaconf import OmegaConf

import cl_vit
from cl_vit import hardware
from cl_vit.config import validate
from cl_vit.errors import UserError
from cl_vit.run import build, run


def _flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def test_device_presets_change_only_device_keys():
    """The same command runs on CPU and GPU with no change but the trainer group."""
    cpu, gpu, ddp = (_flat(compose([f"trainer={t}"])) for t in ("cpu", "gpu", "ddp"))
    changed = sorted(k for k in cpu if cpu[k] != gpu[k] and not k.startswith("hydra."))
    assert changed == ["data.num_workers", "data.persistent_workers", "data.pin_memory", "trainer.accelerator",
                       "trainer.precision"]
    assert gpu["trainer.precision"] == "bf16-mixed" and gpu["data.pin_memory"] is True
    assert gpu["data.persistent_workers"] is True
    assert ddp["trainer.strategy"].startswith("ddp") and ddp["trainer.devices"] == "auto"
    assert {k for k in ddp if ddp[k] != gpu[k] and not k.startswith("hydra.")} == {"trainer.strategy",
                                                                                  "trainer.devices"}


@pytest.mark.parametrize("precision,on_cuda,bf16,expected,says", [
    ("bf16-mixed", True, False, "16-mixed", True),
    ("bf16-true", True, False, "16-true", True),
    ("bf16-mixed", True, True, "bf16-mixed", False),
    ("bf16-mixed", False, False, "bf16-mixed", False),  # CPU autocast has bf16
    ("32-true", True, False, "32-true", False),
])
def test_bf16_falls_back_to_fp16_where_the_gpu_lacks_it(precision, on_cuda, bf16, expected, says):
    got, message = hardware.resolve_precision(precision, on_cuda, bf16, "Tesla V100")
    assert got == expected
    assert (message is not None) == says
    if says:
        assert "Tesla V100" in message and expected in message


def test_trainer_kwargs_on_a_gpu_without_bf16(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(hardware, "_bf16_supported", lambda: False)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda *a: None)
    cfg = compose(["trainer=gpu"])
    with caplog.at_level(logging.WARNING, logger="cl_vit"):
        kwargs = hardware.trainer_kwargs(OmegaConf.to_container(cfg.trainer))
    assert kwargs["precision"] == "16-mixed" and kwargs["accelerator"] == "gpu"
    assert "Tesla T4 has no native bf16" in caplog.text


def test_gpu_preset_without_a_gpu_is_one_clear_line():
    cfg = compose(["trainer=gpu"])
    with pytest.raises(UserError) as e:
        hardware.trainer_kwargs(OmegaConf.to_container(cfg.trainer), cuda_available=False)
    assert "\n" not in str(e.value) and "trainer=cpu" in str(e.value)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork", "ddp_notebook"])
def test_spawning_strategies_are_refused_before_training(strategy):
    with pytest.raises(UserError, match=f"trainer.strategy={strategy} .* use trainer=ddp"):
        validate(compose([f"trainer.strategy={strategy}"]))


def test_vits_use_fused_attention(data_root):
    """timm's fused scaled-dot-product attention stays on: nothing in the suite turns it off."""
    for info in pkgutil.walk_packages(cl_vit.__path__, "cl_vit."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    assert timm.layers.use_fused_attn()
    _, _, _, module, _ = build(compose(TINY, data_root))
    flags = [m.fused_attn for m in module.net.modules() if hasattr(m, "fused_attn")]
    assert flags and all(flags)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    F.scaled_dot_product_attention = counting
    try:
        module.eval()(torch.zeros(2, 1, 8, 8))
    finally:
        F.scaled_dot_product_attention = sdpa
    assert len(calls) == len(flags)


def test_compile_true_compiles_the_forward_and_keeps_state_dict_keys(tmp_path, data_root, monkeypatch):
    # a counting dynamo backend that runs the captured graphs eagerly: the wiring is under test here, not
    # inductor's code generation (minutes of C++ compilation on 2 cores)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": backend}))
    torch._dynamo.reset()
    cfg = compose([*TINY, "compile=true", "benchmark.n_experiences=1", "trainer.limit_train_batches=2"], data_root)
    _, _, _, eager, _ = build(compose(TINY, data_root))
    doc = run(cfg, tmp_path / "run")
    assert doc["completed_experiences"] == 1
    assert graphs  # the forward pass went through torch.compile
    state = torch.load(tmp_path / "run" / "checkpoints" / "exp_000.pt", weights_only=False)["module"]
    assert sorted(state) == sorted(eager.state_dict())


def test_eval_every_k_evaluates_in_one_pass_over_the_seen_test_data(tmp_path, data_root, monkeypatch):
    sizes = []
    predict = L.Trainer.predict

    def spy(self, model=None, dataloaders=None, **kwargs):
        sizes.append(len(dataloaders.dataset))
        return predict(self, model, dataloaders=dataloaders, **kwargs)

    monkeypatch.setattr(L.Trainer, "predict", spy)
    cfg = compose([*TINY, "eval_every=2", "trainer.limit_train_batches=2"], data_root)
    doc = run(cfg, tmp_path / "run")
    _, scenario, *_ = build(cfg)
    test_sizes = [len(e.dataset) for e in scenario.test_stream]
    evaluated = [i for i, row in enumerate(doc["accuracy_matrix"]) if any(v is not None for v in row)]
    assert evaluated == [1, 3, 4]  # every 2nd experience and the last
    # one predict pass per evaluation, over the union of the seen experiences' test sets
    assert sizes == [sum(test_sizes[: i + 1]) for i in evaluated]
    counts = {}
    for c in doc["confusion"]:
        counts[(c["trained_up_to"], c["evaluated"])] = int(np.asarray(c["entries"]).reshape(-1, 3)[:, 2].sum())
    assert counts == {(i, j): test_sizes[j] for i in evaluated for j in range(i + 1)}
    assert doc["metrics"]["final_average_accuracy"] is not None


def test_adamw_uses_the_fused_kernel_unless_the_config_says_otherwise(monkeypatch):
    net = torch.nn.Linear(4, 2)
    assert hardware.create_optimizer(net, "adamw", lr=1e-3, weight_decay=0.05).defaults["fused"] is True
    assert not hardware.create_optimizer(net, "adamw", lr=1e-3, foreach=True).defaults.get("fused")
    assert not hardware.create_optimizer(net, "sgd", lr=1e-3).defaults.get("fused")
    import timm.optim

    real = timm.optim.create_optimizer_v2

    def no_fused(*args, **kwargs):  # a torch or device without the fused kernel
        if kwargs.get("fused"):
            raise RuntimeError("fused=True requires ...")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm.optim, "create_optimizer_v2", no_fused)
    assert not hardware.create_optimizer(net, "adamw", lr=1e-3).defaults.get("fused")


@pytest.mark.parametrize("overrides,expected", [([], "high"), (["trainer.tf32=false"], "highest")])
def test_tf32_sets_the_fp32_matmul_precision_on_a_gpu(monkeypatch, overrides, expected):
    """trainer.tf32 (default true): fp32 matmuls on TF32 tensor cores ("high"), or full fp32 ("highest", torch's
    own default from 1.12, which the recipes of codes run on torch >= 1.12 set); a run before the key existed used
    TF32 (cl_vit.runs.ADDED_KEYS)."""
    from cl_vit.runs import ADDED_KEYS

    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    monkeypatch.setattr(hardware, "_bf16_supported", lambda: True)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", calls.append)
    cfg = compose(["trainer=gpu", *overrides])
    kwargs = hardware.trainer_kwargs(OmegaConf.to_container(cfg.trainer), cuda_available=True)
    assert calls == [expected] and "tf32" not in kwargs
    assert ADDED_KEYS["trainer.tf32"] is True


def test_tf32_must_be_true_or_false():
    cfg = OmegaConf.to_container(compose(["trainer=gpu", "trainer.tf32=maybe"]).trainer)
    with pytest.raises(UserError) as e:
        hardware.trainer_kwargs(cfg, cuda_available=True)
    assert "\n" not in str(e.value) and "trainer.tf32='maybe'" in str(e.value)
