"""``strategy=mixup``: timm's Mixup/CutMix with label smoothing on every training batch (DeiT / timm train.py's
``--mixup --cutmix --smoothing``), for recipes without DeiT-LT (Refiner-ViT on ImageNet). The deit_lt strategy mixes
its own batches the same way (cl_vit.strategies.deit_lt.mix_batch)."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.data import Mixup

from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy


@register_strategy
class MixupCutMix(Strategy):
    name = "mixup"

    def __init__(self, mixup: float = 0.8, cutmix: float = 1.0, cutmix_minmax: Sequence[float] | None = None,
                 prob: float = 1.0, switch_prob: float = 0.5, mode: str = "batch", label_smoothing: float = 0.1):
        self.args = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=prob,
                         switch_prob=switch_prob, mode=mode, label_smoothing=label_smoothing)
        self.mixup: Mixup | None = None

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        self.mixup = Mixup(num_classes=experience.n_classes, **self.args)

    def before_batch(self, module, batch: dict) -> dict:
        from cl_vit.strategies.deit_lt import mix_batch

        x, y = mix_batch(self.mixup, batch["x"].clone(), batch["y"])
        return {**batch, "x": x, "y": y}
