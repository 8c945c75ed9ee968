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


class _Repeat:
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


def measure(model_name: str, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000, batch: int = 128,
            steps: int = 20, warmup: int = 5, device: str = "cuda", precision: str = "bf16-mixed") -> dict:
    """images/s of the suite and of a bare loop, and FLOPs per training image, for one timm model."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from timm.optim import create_optimizer_v2

    from cl_vit.models import build_model
    from cl_vit.module import ContinualModule
    from cl_vit.strategies.finetune import Finetune
    from cl_vit.strategies.base import ExperienceInfo

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_chans, img_size, img_size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def net():
        torch.manual_seed(0)
        return build_model({"name": model_name}, num_classes, in_chans, img_size).to(device)

    model = net()
    with torch.autocast(device.split(":")[0], dtype=dtype):
        flops = training_flops_per_image(model, x[:2])

    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05)
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    bare_ips = batch * steps / (time.perf_counter() - t0)
    del model, opt

    class Timer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            if batch_idx == warmup:
                sync()
                self.t0 = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            sync()
            self.elapsed = time.perf_counter() - self.t0

    module = ContinualModule(net(), num_classes, [Finetune()],
                             optimizer={"name": "adamw", "lr": 1e-4, "weight_decay": 0.05},
                             scheduler={"name": "constant"})
    classes = list(range(num_classes))
    module.start_experience(ExperienceInfo(0, 1, classes, classes, num_classes))
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, precision=precision,
                        max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, train_dataloaders=_Repeat((x, y), warmup + steps))
    suite_ips = batch * steps / timer.elapsed
    return {"images_per_s": suite_ips, "bare_images_per_s": bare_ips, "flops_per_image": flops}


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
