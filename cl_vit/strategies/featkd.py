"""Feature distillation: lambda * mean squared error between the current and the previous model's pre-logit
features (the penultimate features, timm's ``forward_head(pre_logits=True)``), on the current experience's data.

As the feature term of the authors' LWF_MC_FEATKD learner ("A Closer Look at Rehearsal-Free Continual Learning",
shaunak27/data-free-continual-learning learners/kd.py: ``mu * MSELoss(reduction='none')(feat, old_feat).mean()``).
That learner adds it to LwF.MC: ``strategy=[lwf,featkd] loss.name=bce`` is the same combination here.

``from_start`` (default, as that learner): in the first experience the previous model is the network as the run
begins, so the features are held to the pre-trained ones from the first step on, as L2's anchor is; as for that
anchor, a backbone initialised at random has none (the authors' backbones are always pre-trained).
``from_start=false`` adds the term from the second experience on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from cl_vit.errors import UserError
from cl_vit.models import weights_origin
from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.l2 import _number
from cl_vit.strategies.lwf import PreviousModel, frozen_copy


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """Mean over batch and feature dimensions of the squared difference."""
    return F.mse_loss(features, old_features.to(features.dtype))


@register_strategy
class FeatKD(PreviousModel):
    name = "featkd"

    def __init__(self, lam: float = 1.0, train_only: Sequence[str] | str | None = None, from_start: bool = True):
        super().__init__(train_only)
        self.lam = _number(f"strategy.{self.name}.lam", lam)
        self.from_start = bool(from_start)
        self._pretrained = False

    def setup(self, module) -> None:
        super().setup(module)
        self._pretrained = weights_origin(module.net) is not None

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        super().before_experience(module, experience)
        if self.from_start and self._pretrained and experience.index == 0 and self.old_net is None:
            self.old_net = frozen_copy(module.net).to(module.device)

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        if self.old_net is None:
            return {}
        if "pre_logits" not in outputs:
            raise UserError(f"strategy=featkd needs pre-logit features, which {type(module.net).__name__}."
                            "forward_outputs does not return: add 'pre_logits' to its outputs")
        old = self.old_outputs(batch["x"])["pre_logits"]
        return {self.name: self.lam * feature_distillation(outputs["pre_logits"], old)}

    def __repr__(self) -> str:
        only = f", train_only={self.train_only}" if self.train_only else ""
        return f"FeatKD(lam={self.lam}, from_start={self.from_start}{only})"
