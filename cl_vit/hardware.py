"""Where a run computes: the Trainer arguments for the machine at hand (precision, accelerator) and torch.compile.

``trainer=cpu``, ``trainer=gpu`` and ``trainer=ddp`` (configs/trainer/) choose the device; everything else about a
run stays the same. On a GPU without bf16 (before Ampere: V100, T4) ``bf16-*`` precision falls back to the fp16
equivalent, with loss scaling, and says so once.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from cl_vit.errors import UserError

log = logging.getLogger("cl_vit")

CUDA_ACCELERATORS = ("gpu", "cuda")


def uses_cuda(accelerator: str, cuda_available: bool) -> bool:
    return accelerator in CUDA_ACCELERATORS or (accelerator == "auto" and cuda_available)


def resolve_precision(precision: str, on_cuda: bool, bf16_supported: bool,
                      device_name: str = "this GPU") -> tuple[str, str | None]:
    """``(precision to use, message or None)``: bf16 on a CUDA device without native bf16 becomes fp16."""
    precision = str(precision)
    if on_cuda and precision.startswith("bf16") and not bf16_supported:
        fallback = "16-mixed" if precision == "bf16-mixed" else "16-true"
        return fallback, (f"trainer.precision={precision}: {device_name} has no native bf16; "
                          f"using {fallback} (fp16, with loss scaling where mixed)")
    return precision, None


def _bf16_supported() -> bool:
    try:  # emulated bf16 (pre-Ampere GPUs) runs, but slower than fp16: count only the native kind
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and reports native support only
        return torch.cuda.is_bf16_supported()


def trainer_kwargs(trainer_cfg: Mapping[str, Any], cuda_available: bool | None = None) -> dict:
    """The Lightning Trainer arguments of ``cfg.trainer`` for this machine; one line when they cannot work here."""
    kwargs = dict(trainer_cfg)
    accelerator = str(kwargs.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator in CUDA_ACCELERATORS and not cuda:
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible (torch.cuda.is_available() is False): "
            "run with trainer=cpu, or check CUDA_VISIBLE_DEVICES and that torch is a CUDA build"
        )
    if uses_cuda(accelerator, cuda):
        precision, message = resolve_precision(kwargs.get("precision", "32-true"), True, _bf16_supported(),
                                               torch.cuda.get_device_name())
        if message:
            log.warning(message)
        kwargs["precision"] = precision
        # fp32 matmuls (fp32 precision, or what autocast leaves in fp32) may use TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    return kwargs


#: torch optimisers (timm names) with a fused implementation on CPU and CUDA (torch >= 2.4)
FUSED_OPTIMIZERS = ("adam", "adamw")


def trainable_parameters(net: torch.nn.Module) -> list:
    return [p for p in net.parameters() if p.requires_grad]


def create_optimizer(net: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0, **kwargs):
    """timm's ``create_optimizer_v2``, with torch's fused implementation where it exists and nothing says otherwise.

    The fused AdamW updates every tensor in one kernel: the same algorithm, a fraction of the time the default
    per-tensor loop takes for a ViT's many small tensors (python -m cl_vit.bench avalanche). ``optimizer.foreach`` or
    ``optimizer.fused`` in the config choose explicitly."""
    from timm.optim import create_optimizer_v2

    if kwargs.get("filter_bias_and_bn") is False and weight_decay and "param_group_fn" not in kwargs:
        # every trainable parameter decayed, the model's no_weight_decay() (cls_token, pos_embed) too: what timm < 1.0
        # did for filter_bias_and_bn=False and what torch.optim.SGD(model.parameters()) does (RanPAC, SLCA, LDAM-DRW)
        kwargs["param_group_fn"] = trainable_parameters
    if name.lower() in FUSED_OPTIMIZERS and "fused" not in kwargs and "foreach" not in kwargs:
        try:
            return create_optimizer_v2(net, opt=name, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # older torch, or a device/dtype without a fused kernel
            pass
    return create_optimizer_v2(net, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def compile_forward(module, **compile_kwargs) -> None:
    """``compile=true``: torch.compile the module's forward pass (backbone and heads) in place.

    The compiled function replaces ``module.forward_outputs`` on this instance only; parameters, buffers and
    state_dict keys stay as they are (no ``_orig_mod.`` prefix), so checkpoints, strategies that address parameters
    by name and copies of ``module.net`` are unaffected. A strategy that regrows the network triggers a recompile.
    """
    if getattr(module, "_cl_vit_compiled", False):
        return
    module.forward_outputs = torch.compile(module.forward_outputs, **compile_kwargs)
    module._cl_vit_compiled = True
