"""gpu: training images/s and model FLOP utilisation (MFU) of ViT-B/16 and Refiner-ViT-S at 224 in bf16.

Both sides train on one synthetic batch that stays on the device, so that the model, not data loading, is measured:
the suite (ContinualModule in a Lightning Trainer, ``precision="bf16-mixed"``, the finetune strategy) against a bare
loop (``torch.autocast(dtype=bfloat16)``, the same timm AdamW). FLOPs per training image are counted by
``torch.utils.flop_counter`` over one forward and backward pass; MFU = counted FLOPs x images/s / the GPU's dense
bf16 peak (vendor data sheets; a GPU not in ``PEAK_BF16`` gets images/s only). Without a CUDA device nothing is
measured and the result says so.
"""
from __future__ import annotations

import time

import torch

from cl_vit.bench import row

#: label -> timm name (Refiner-ViT-S comes from cl_vit.models.refiner when that model family is installed)
MODELS = {"ViT-B/16": "vit_base_patch16_224", "Refiner-ViT-S": "refiner_vit_s"}
#: dense (no sparsity) bf16 tensor-core peak FLOP/s, by a substring of torch.cuda.get_device_name(); first match wins
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)
AIM = 0.90


class Repeat:
    """The same batch ``n`` times: a loader without data-loading cost."""

    def __init__(self, batch, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def peak_bf16_flops(device_name: str) -> float | None:
    for key, peak in PEAK_BF16:
        if key in device_name:
            return peak
    return None


def training_flops_per_image(net: torch.nn.Module, x: torch.Tensor) -> float:
    """Matmul/conv/attention FLOPs of one forward and backward pass, per image of ``x``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        net(x).float().sum().backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str, precision: str):
    if precision.startswith(("bf16", "16")):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast(device.split(":")[0], dtype=dtype)
    return torch.autocast(device.split(":")[0], enabled=False)


def resident_batch(batch: int, in_chans: int, img_size: int, num_classes: int, device: str):
    """A seeded random batch ``(x, y)`` on ``device``: the input of every step the GPU bench times."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, img_size, img_size, generator=g).to(device)
    return x, torch.randint(0, num_classes, (batch,), generator=g).to(device)


def make_net(model: str | dict, num_classes: int, in_chans: int, img_size: int, device: str) -> torch.nn.Module:
    """``model``: a timm name, or a model config (``{"name": ..., timm keyword arguments}``)."""
    from cl_vit.models import build_model

    torch.manual_seed(0)
    spec = {"name": model} if isinstance(model, str) else dict(model)
    return build_model(spec, num_classes, in_chans, img_size).to(device)


def bare_step(model_name: str | dict, img_size: int, batch: int, device: str, precision: str, num_classes: int = 1000,
              in_chans: int = 3):
    """One training step of a bare PyTorch loop (autocast, the suite's fused AdamW) on a resident batch."""
    from cl_vit.hardware import create_optimizer

    x, y = resident_batch(batch, in_chans, img_size, num_classes, device)
    model = make_net(model_name, num_classes, in_chans, img_size, device)
    opt = create_optimizer(model, "adamw", lr=1e-4, weight_decay=0.05)

    def step():
        with _autocast(device, precision):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_images_per_s(net: torch.nn.Module, num_classes: int, strategies: list, loader, warmup: int, steps: int,
                       batch: int, device: str, precision: str, compile_: bool = False,
                       class_counts=None, optimizer: dict | None = None, mask_old_logits: bool = False,
                       classes=None, finite_check_every: int = 1) -> dict:
    """images/s and peak memory of the suite's training step: ContinualModule (``strategies``, AdamW) in a Lightning
    Trainer over ``loader`` (``warmup + steps`` batches), timed from batch ``warmup`` to the end of fit."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from cl_vit.hardware import compile_forward
    from cl_vit.module import ContinualModule
    from cl_vit.strategies.base import ExperienceInfo

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if batch_idx == warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync(device)
            self.elapsed = time.perf_counter() - self.t0

    module = ContinualModule(net, num_classes, strategies, mask_old_logits=mask_old_logits,
                             optimizer=optimizer or {"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
                             scheduler={"name": "constant"}, finite_check_every=finite_check_every)
    for s in strategies:  # as cl_vit.builder.build: a strategy installs what it needs (prompts, a DIST head)
        s.setup(module)
    if compile_:
        compile_forward(module)
    classes = list(classes if classes is not None else range(num_classes))
    info = ExperienceInfo(0, 1, classes, classes, num_classes, class_counts=class_counts)
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    module.to(device)
    module.start_experience(info)
    for s in strategies:
        s.before_experience(module, info)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer = Timer()
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=warmup + steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    params = list(module.parameters())
    return {"images_per_s": batch * steps / timer.elapsed, "peak_memory_bytes": peak,
            "params_trainable": sum(p.numel() for p in params if p.requires_grad),
            "params_total": sum(p.numel() for p in params)}


def measure(model_name: str | dict, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, batch: int = 128,
            steps: int = 20, warmup: int = 5, device: str = "cuda", precision: str = "bf16-mixed",
            compile_: bool = False, bare: bool = True, finite_check_every: int = 1) -> dict:
    """images/s of the suite (and of a bare loop, ``bare``), its peak memory and FLOPs per training image, for one
    timm model; ``finite_check_every``: the suite's trainer.finite_check_every."""
    from cl_vit.strategies.finetune import Finetune

    x, y = resident_batch(batch, in_chans, img_size, num_classes, device)
    model = make_net(model_name, num_classes, in_chans, img_size, device)
    with _autocast(device, precision):
        flops = training_flops_per_image(model, x[:2])
    del model
    out = {"flops_per_image": flops}
    if bare:
        step = bare_step(model_name, img_size, batch, device, precision, num_classes, in_chans)
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            step()
        _sync(device)
        out["bare_images_per_s"] = batch * steps / (time.perf_counter() - t0)
        del step
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    out.update(train_images_per_s(make_net(model_name, num_classes, in_chans, img_size, device), num_classes,
                                  [Finetune()], Repeat((x, y), warmup + steps), warmup, steps, batch, device,
                                  precision, compile_=compile_, finite_check_every=finite_check_every))
    return out


def run(quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        return {"name": "gpu", "device": "cpu", "rows": [], "notes": [
            "no CUDA device: training images/s and MFU of ViT-B/16 and Refiner-ViT-S at 224 in bf16 not measured"]}
    import timm

    import cl_vit  # noqa: F401  (registers the suite's models)
    from cl_vit.hardware import trainer_kwargs

    name = torch.cuda.get_device_name()
    precision = trainer_kwargs({"accelerator": "gpu", "precision": "bf16-mixed"})["precision"]
    peak = peak_bf16_flops(name)
    rows, notes = [], [f"{name}; synthetic 224x224 batch resident on the GPU; precision {precision}"]
    if peak is None:
        notes.append(f"no bf16 peak known for {name}: MFU not computed")
    for label, model_name in MODELS.items():
        if not timm.is_model(model_name):
            notes.append(f"{label} ({model_name}) is not registered here: not measured")
            continue
        batch = 128 if not quick else 32
        m = measure(model_name, batch=batch, steps=5 if quick else 30, warmup=3 if quick else 10,
                    precision=precision)
        case = f"{label} 224, batch {batch}"
        rows.append(row(case, "train images/s: suite / bare", m["images_per_s"], m["bare_images_per_s"],
                        aim=f">= {AIM:.2f}x", higher_is_better=True, target=AIM, gpu=name))
        if peak is not None:
            rows.append(row(case, "MFU: FLOP/s / bf16 peak", m["images_per_s"] * m["flops_per_image"], peak,
                            gpu=name, flops_per_image=m["flops_per_image"]))
        torch.cuda.empty_cache()
    return {"name": "gpu", "device": name, "rows": rows, "notes": notes}
