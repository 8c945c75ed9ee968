"""DER++ (Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020)
as Mammoth runs it (aimagelab/mammoth models/derpp.py ``observe`` L32-58):

    loss = CE(batch) + alpha * MSE(f(x'), z') + beta * CE(f(x''), y'')

with (x', z') and (x'', y'') two independent draws of ``batch_size`` samples from a reservoir memory (L41, L47) that
stores each training sample's label and the logits the network gave it when it was trained on (L56-58). Both
replay terms are separate forward passes, as there. The label term uses the module's classification loss, the same
as the current batch's (Mammoth uses its ``self.loss`` for both). The MSE covers every output, as Mammoth's
``F.mse_loss(buf_outputs, buf_logits)`` (L44): the logits of classes not seen when a sample was stored included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_vit.strategies.l2 import _number
from cl_vit.strategies.base import register_strategy
from cl_vit.strategies.replay import Replay


def derpp_terms(logits_a: torch.Tensor, stored_logits: torch.Tensor, logits_b: torch.Tensor, labels_b: torch.Tensor,
                alpha: float, beta: float, label_loss) -> dict[str, torch.Tensor]:
    """The two replay terms of DER++: ``alpha`` * MSE to the stored logits, ``beta`` * the label loss."""
    return {"logits": alpha * F.mse_loss(logits_a, stored_logits.to(logits_a.dtype)),
            "labels": beta * label_loss(logits_b, labels_b)}


@register_strategy
class DERpp(Replay):
    name = "derpp"
    keeps_logits = True

    def __init__(self, alpha: float = 0.3, beta: float = 0.5, memory_size: int = 500, batch_size: int = 32):
        super().__init__(memory_size=memory_size, policy="reservoir", selection="random", mix="batch",
                         batch_size=batch_size)
        self.alpha = _number(f"strategy.{self.name}.alpha", alpha)
        self.beta = _number(f"strategy.{self.name}.beta", beta)

    def before_batch(self, module, batch: dict) -> dict:
        return batch  # the memory's samples are separate forward passes (training_loss), not part of the batch

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        from cl_vit.module import classification_loss

        terms = {}
        if len(self):
            pos_a, a = self.sample(module, self.batch_size)
            pos_b, b = self.sample(module, self.batch_size)
            stored = self.logits[pos_a].to(module.device)
            terms = derpp_terms(module.forward_outputs(a["x"])["logits"], stored,
                                module.forward_outputs(b["x"])["logits"], b["y"], self.alpha, self.beta,
                                lambda z, y: classification_loss(z, y, module.training_mask, module.loss_name))
        n = len(batch["key"])  # the batch's own samples (another replay strategy may have appended its memory's)
        self.add(batch["key"], batch["y"][:n], outputs["logits"][:n])  # after the draws, as Mammoth L56
        return terms

    def __repr__(self) -> str:
        return (f"DERpp(alpha={self.alpha}, beta={self.beta}, memory_size={self.memory_size}, "
                f"batch_size={self.batch_size})")
