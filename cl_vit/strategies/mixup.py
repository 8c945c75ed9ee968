"""``strategy=mixup``: timm's Mixup/CutMix with label smoothing on every training batch (DeiT / timm train.py's
``--mixup --cutmix --smoothing``), for recipes without DeiT-LT (Refiner-ViT on ImageNet). The deit_lt strategy mixes
its own batches the same way (cl_vit.strategies.deit_lt.mix_batch).

A uint8 batch (``benchmark.source_args.augment.prefetcher: true``, timm's prefetcher loader order) is mixed as the
collate of timm 0.4.8 (the version Refiner-ViT bundles) mixes it, by :func:`mix_uint8`: before normalisation, Mixup
rounded back to integers, CutMix's box as 0.4.8 cuts it."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target

from cl_vit.errors import UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy

#: the modes :func:`mix_uint8` follows (timm's 'half' mode halves the batch, which the suite's loop does not expect)
UINT8_MODES = ("batch", "pair", "elem")


def check_uint8_mode(mode: str) -> None:
    if mode not in UINT8_MODES:
        raise UserError(f"strategy.mixup.mode={mode!r} is not supported on uint8 batches "
                        f"(benchmark.source_args.augment.prefetcher=true): use one of {list(UINT8_MODES)}")


def cutmix_box_v048(shape, lam, minmax=None, correct_lam: bool = True):
    """CutMix's box ``(top, bottom, left, right)`` and the label weight, drawn from numpy's global generator as timm
    0.4.8 draws them (zhoudaquan/Refiner_ViT b3e8cb0, timm/data/mixup.py L30-87). Its lambda box spans ``cut // 2``
    pixels on either side of the centre (L47-50), one pixel less than timm 1.0's for odd sizes; its min-max box starts
    below ``size - cut`` (L70-71), timm 1.0's at or below it. ``lam`` keeps its numpy type: 0.4.8 takes the square
    root of a float32 weight in the per-sample modes."""
    h, w = shape[-2:]
    if minmax is not None:
        cut_h = np.random.randint(int(h * minmax[0]), int(h * minmax[1]))
        cut_w = np.random.randint(int(w * minmax[0]), int(w * minmax[1]))
        top, left = np.random.randint(0, h - cut_h), np.random.randint(0, w - cut_w)
        box = (top, top + cut_h, left, left + cut_w)
    else:
        side = np.sqrt(1 - lam)
        cut_h, cut_w = int(h * side), int(w * side)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        box = (np.clip(cy - cut_h // 2, 0, h), np.clip(cy + cut_h // 2, 0, h),
               np.clip(cx - cut_w // 2, 0, w), np.clip(cx + cut_w // 2, 0, w))
    if correct_lam or minmax is not None:
        lam = 1. - (box[1] - box[0]) * (box[3] - box[2]) / float(h * w)
    return tuple(int(v) for v in box), lam


def _blend(a: torch.Tensor, b: torch.Tensor, lam) -> torch.Tensor:
    """``a * lam + b * (1 - lam)`` in float32, rounded half to even, back to uint8: the collate's integer Mixup. The
    weights are float32 as numpy makes them from ``lam`` (a Python float or a numpy float32)."""
    weight = torch.tensor(np.float32(lam), device=a.device)
    rest = torch.tensor(np.float32(1 - lam), device=a.device)
    return (a.float() * weight + b.float() * rest).round_().to(torch.uint8)


def mix_uint8(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a uint8 ``B x C x H x W`` batch as timm 0.4.8's ``FastCollateMixup`` mixes the samples it collates
    (timm/data/mixup.py L221-315): the same draws from numpy's generator in the same order, image i mixed with image
    ``B - 1 - i`` of the unmixed batch, Mixup computed in float32 and rounded to integers, CutMix with
    :func:`cutmix_box_v048`; returns the mixed uint8 batch and the smoothed soft targets. ``mixup``: timm's ``Mixup``
    with the settings (its parameter draws are 0.4.8's)."""
    check_uint8_mode(mixup.mode)
    n = len(x)
    if n % 2:  # as mix_batch: an odd last batch leaves its last image unmixed (timm's collate asserts an even batch)
        head, target = mix_uint8(mixup, x[:-1], y[:-1]) if n > 1 else (x[:0], None)
        last = mixup_target(y[-1:], mixup.num_classes, 1.0, mixup.label_smoothing)
        return torch.cat([head, x[-1:]]), last if target is None else torch.cat([target, last])
    out = x.clone()

    if mixup.mode == "batch":
        lam, use_cutmix = mixup._params_per_batch()
        if use_cutmix:  # the box, and the weight it gives, are drawn before any image is mixed
            (t, b, l, r), lam = cutmix_box_v048(x.shape, lam, mixup.cutmix_minmax, mixup.correct_lam)
        if lam != 1.:
            if use_cutmix:
                out[:, :, t:b, l:r] = x.flip(0)[:, :, t:b, l:r]
            else:
                out = _blend(x, x.flip(0), lam)
        weights = lam
    else:
        m = n // 2 if mixup.mode == "pair" else n
        lams, use_cutmix = mixup._params_per_elem(m)
        for i in range(m):
            j, lam = n - 1 - i, lams[i]
            if lam == 1.:
                continue
            if use_cutmix[i]:
                (t, b, l, r), lams[i] = cutmix_box_v048(x.shape, lam, mixup.cutmix_minmax, mixup.correct_lam)
                out[i, :, t:b, l:r] = x[j, :, t:b, l:r]
                if mixup.mode == "pair":  # the partner gets image i's box, with the same weight
                    out[j, :, t:b, l:r] = x[i, :, t:b, l:r]
            else:
                out[i] = _blend(x[i], x[j], lam)
                if mixup.mode == "pair":
                    out[j] = _blend(x[j], x[i], lam)
        if mixup.mode == "pair":
            lams = np.concatenate((lams, lams[::-1]))
        weights = torch.tensor(lams, device=x.device).unsqueeze(1)
    return out, mixup_target(y, mixup.num_classes, weights, mixup.label_smoothing)


@register_strategy
class MixupCutMix(Strategy):
    name = "mixup"
    uint8_batches = True

    def __init__(self, mixup: float = 0.8, cutmix: float = 1.0, cutmix_minmax: Sequence[float] | None = None,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1):
        self.args = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
                         switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing)
        self.mixup: Mixup | None = None

    def setup(self, module) -> None:
        if module.batch_stage is not None:  # uint8 batches: a mode mix_uint8 follows, checked before training
            check_uint8_mode(self.args["mode"])

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        self.mixup = Mixup(num_classes=experience.n_classes, **self.args)

    def before_batch(self, module, batch: dict) -> dict:
        from cl_vit.strategies.deit_lt import mix_batch

        if batch["x"].dtype == torch.uint8:  # timm's prefetcher order: mixed before normalisation
            x, y = mix_uint8(self.mixup, batch["x"], batch["y"])
        else:
            x, y = mix_batch(self.mixup, batch["x"].clone(), batch["y"])
        return {**batch, "x": x, "y": y}
