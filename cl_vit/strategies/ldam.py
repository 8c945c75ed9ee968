"""LDAM loss with deferred re-weighting (Cao et al., NeurIPS 2019): how the DeiT-LT teachers are trained.

Plain functions first (``class_balanced_weights`` is also DeiT-LT's DRW weighting of the distillation loss), then the
``ldam_drw`` strategy, which replaces the module's cross-entropy with the LDAM loss. Defaults and their sources:

- margins ``m_c = C / n_c^(1/4)`` with the largest margin ``max_margin = 0.5`` and logit scale ``s = 30``
  (kaidic/LDAM-DRW losses.py ``LDAMLoss(max_m=0.5, s=30)``; val-iisc/Saddle-LongTail cifar_train_sam.py passes the
  same; their ImageNet-LT / iNaturalist runs use ``--margin 0.3``, Saddle-LongTail run.sh);
- DRW: unweighted until epoch 160 of 200, then class-balanced weights with beta 0.9999 (LDAM-DRW cifar_train.py and
  Saddle-LongTail cifar_train_sam.py: ``idx = epoch // 160; betas = [0, 0.9999]``; ImageNet-LT: ``epoch // 60`` of 90).

Train the teacher with SAM through the optimiser config (``optimizer.sam_rho``: 0.8 for the CIFAR LDAM teachers,
Saddle-LongTail run.sh ``--loss_type LDAM --train_rule DRW --rho 0.8``) and with a cosine classifier
(``model.use_norm=true`` for resnet32_cifar, or resnet50_ldam), which LDAM-DRW pairs with the LDAM loss
(``use_norm = True if args.loss_type == 'LDAM'``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cl_vit.errors import UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy


def _counts(counts: Sequence[int], what: str) -> np.ndarray:
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or np.any(n < 1):
        raise UserError(f"{what} needs at least one training image in every class (counts {list(counts)[:10]}...)")
    return n


def class_balanced_weights(counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """``w_c = (1 - beta) / (1 - beta^n_c)``, normalised to sum to the number of classes (Cui et al. 2019).

    As LDAM-DRW cifar_train.py and val-iisc/DeiT-LT main.py compute ``per_cls_weights``; ``beta = 0`` gives all ones.
    """
    n = _counts(counts, "class-balanced re-weighting")
    w = (1.0 - beta) / (1.0 - np.power(beta, n))
    return torch.as_tensor(w / w.sum() * len(n), dtype=torch.float32)


def ldam_margins(counts: Sequence[int], max_margin: float = 0.5) -> torch.Tensor:
    """``m_c`` proportional to ``n_c^(-1/4)``, the largest one equal to ``max_margin``."""
    m = 1.0 / np.sqrt(np.sqrt(_counts(counts, "the LDAM loss")))
    return torch.as_tensor(m * (max_margin / m.max()), dtype=torch.float32)


def ldam_loss(logits: torch.Tensor, target: torch.Tensor, margins: torch.Tensor, scale: float = 30.0,
              weight: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``scale * (logits - m_y at the target)``; ``weight`` as ``F.cross_entropy``'s (a weighted
    mean); classes outside ``mask`` take no part (task-agnostic class-incremental training)."""
    shifted = logits - F.one_hot(target, logits.shape[1]).to(logits.dtype) * margins.to(logits)[target, None]
    shifted = scale * shifted
    if mask is not None:
        shifted = shifted.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(shifted, target, weight=None if weight is None else weight.to(logits))


@register_strategy
class LDAMDRW(Strategy):
    """``strategy=ldam_drw``: the LDAM loss (replacing the module's cross-entropy), re-weighted from epoch
    ``drw_start_epoch`` on with class-balanced weights (``beta``); ``drw_start_epoch=null`` never re-weights."""

    name = "ldam_drw"
    cls_loss_weight = 0.0  # the LDAM term is the classification loss

    def __init__(self, max_margin: float = 0.5, scale: float = 30.0, drw_start_epoch: int | None = 160,
                 beta: float = 0.9999):
        if max_margin <= 0 or scale <= 0:
            raise UserError(f"strategy.ldam_drw: max_margin ({max_margin}) and scale ({scale}) must be > 0")
        if drw_start_epoch is not None and drw_start_epoch < 0:
            raise UserError(f"strategy.ldam_drw.drw_start_epoch={drw_start_epoch} is not allowed: an epoch >= 0 or null")
        if not 0 <= beta < 1:
            raise UserError(f"strategy.ldam_drw.beta={beta} is not allowed: a number in [0, 1)")
        self.max_margin, self.scale, self.drw_start_epoch, self.beta = max_margin, scale, drw_start_epoch, beta
        self.margins: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if experience.class_counts is None:
            raise UserError("strategy ldam_drw needs the per-class training counts of the benchmark (a cl_vit source)")
        self.margins = ldam_margins(experience.class_counts, self.max_margin)
        self.weights = class_balanced_weights(experience.class_counts, self.beta)

    def in_drw(self, epoch: int) -> bool:
        return self.drw_start_epoch is not None and epoch >= self.drw_start_epoch

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        y = batch["y"]
        if y.ndim != 1:
            raise UserError("strategy ldam_drw needs hard labels: turn batch mixing (Mixup/CutMix) off")
        mask = module.current_mask if module.mask_old_logits else module.seen_mask
        weight = self.weights if self.in_drw(module.current_epoch) else None
        return {"ldam": ldam_loss(outputs["logits"], y, self.margins, self.scale, weight, mask)}

    def __repr__(self) -> str:
        return (f"LDAMDRW(max_margin={self.max_margin}, scale={self.scale}, drw_start_epoch={self.drw_start_epoch}, "
                f"beta={self.beta})")
