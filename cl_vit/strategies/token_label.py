"""``strategy=token_label``: Refiner-ViT's dense loss (zhoudaquan/Refiner_ViT, the ``relabel`` / ``return_dense`` run of
scripts/refiner_l.yaml L97-102).

With ``relabel`` and ``relabel_size`` > 1 main.py (L570-580) trains with loss/cross_entropy.py's
``RelabelCrossEntropy`` (L62-119): the class token's soft-target cross-entropy times ``cls_weight`` plus, times
``dense_weight``, the same cross-entropy of the dense head ``aux_head`` on every patch token against its image's
target (repeated for each patch, L96-97). Without token-label files (``relabel_data: null``) that target is the
batch's own Mixup / CutMix target (main.py L488-507 build the plain Mixup; L704-706 only smooth hard labels). The
model's training outputs carry the dense logits (``dense_logits``: cl_vit.models.refiner ``forward_outputs`` with
``model.return_dense=true``); the class-token term is the module's classification loss, scaled by ``cls_weight``.
Hard labels (without strategy=mixup) are not smoothed here, as the classification loss does not smooth them; main.py
smooths them by ``smoothing`` (L704-706, data/mixup.py L94-111). Not implemented: ``mix_token`` (false in
scripts/refiner_l.yaml L99; it would cut patch tokens between images) and main.py's ``--annealing-weight`` (off by
default, L231; it scales dense_weight by lr / base lr, L618-621).
"""
from __future__ import annotations

import torch

from cl_vit.errors import UserError
from cl_vit.strategies.base import Strategy, register_strategy


def dense_target_loss(dense_logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """The classification loss of ``dense_logits`` (B x N x C) with every one of the N tokens labelled with its
    image's target ``y`` (B, or B x C soft); ``mask``: the classes it covers (C, or B x C per sample)."""
    from cl_vit.module import classification_loss

    n = dense_logits.shape[1]
    if mask.ndim == 2:
        mask = mask.repeat_interleave(n, 0)
    return classification_loss(dense_logits.flatten(0, 1), y.repeat_interleave(n, 0), mask, kind)


@register_strategy
class TokenLabel(Strategy):
    name = "token_label"
    uint8_batches = True  # the images are left alone

    def __init__(self, dense_weight: float = 0.5, cls_weight: float = 1.0):
        if dense_weight < 0 or cls_weight < 0 or dense_weight + cls_weight <= 0:
            raise UserError(f"strategy.token_label: dense_weight={dense_weight} and cls_weight={cls_weight} must be "
                            f">= 0 with a positive sum")
        self.dense_weight = float(dense_weight)
        self.cls_loss_weight = float(cls_weight)

    def setup(self, module) -> None:
        if getattr(module.net, "aux_head", None) is None:
            raise UserError("strategy token_label trains Refiner-ViT's dense head: use model=refiner_vit_s/m/l with "
                            "model.return_dense=true")
        if module.loss_name != "ce":
            raise UserError(f"strategy token_label needs loss.name=ce (soft-target cross-entropy), not "
                            f"{module.loss_name!r}")

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        dense = outputs.get("dense_logits")
        if dense is None:
            raise UserError("strategy token_label: the model's training outputs carry no 'dense_logits': use "
                            "model.return_dense=true on a Refiner-ViT without a strategy that replaces its outputs")
        y = batch["y"]
        return {"token_label": self.dense_weight * dense_target_loss(dense, y, module.loss_mask(y), module.loss_name)}
