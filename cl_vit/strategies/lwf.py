"""Learning without Forgetting: prediction distillation from the model frozen at the end of the previous experience.

Two forms, both over the classes seen before the current experience ("old" classes):

- ``mc`` (default), LwF.MC as in iCaRL and in the authors' LWF_MC learner of "A Closer Look at Rehearsal-Free
  Continual Learning" (shaunak27/data-free-continual-learning learners/kd.py): sigmoid BCE over the seen classes
  whose targets are one-hot for the current classes and the sigmoid of the old model's logits for the old ones.
  With ``loss.name=bce`` that BCE *is* the classification loss, so ``lwf`` replaces the module's loss by it
  (``cls_loss_weight`` 0) and logs its two parts, ``lwf/cls`` (current classes) and ``lwf/kd`` (old classes), which
  sum to the authors' loss exactly. With ``loss.name=ce`` the softmax loss stays and ``lwf/kd`` adds
  ``lam`` times the BCE distillation averaged over the old classes.
- ``kd``: the softmax distillation of Li & Hoiem (2017) at temperature 2, ``lam`` times the cross-entropy between
  the softened old and new predictions over the old classes, without the T^2 factor (authors' ``loss_fn_kd``,
  learners/default.py), added to the classification loss.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.l2 import _number
from cl_vit.strategies.selection import freeze_unselected, select_parameters

FORMS = ("mc", "kd")


def lwf_mc_terms(logits: torch.Tensor, old_logits: torch.Tensor, y: torch.Tensor, seen: torch.Tensor,
                 old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LwF.MC split in two: (BCE on the current classes, BCE on the old classes), each summed over its columns and
    divided by batch * seen classes, so that their sum is the mean BCE over the seen classes with old-class
    targets sigmoid(old_logits). ``seen`` and ``old`` are boolean class masks; ``y`` labels or soft targets."""
    target = y.to(logits.dtype) if y.ndim == 2 else F.one_hot(y, logits.shape[1]).to(logits.dtype)
    target = torch.where(old, torch.sigmoid(old_logits).to(logits.dtype), target)
    per = F.binary_cross_entropy_with_logits(logits[:, seen], target[:, seen], reduction="none")
    is_old = old[seen]
    return per[:, ~is_old].sum() / per.numel(), per[:, is_old].sum() / per.numel()


def bce_distillation(logits: torch.Tensor, old_logits: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Mean BCE of the old classes' logits against the old model's sigmoids."""
    return F.binary_cross_entropy_with_logits(logits[:, old], torch.sigmoid(old_logits[:, old]).to(logits.dtype))


def kd_distillation(logits: torch.Tensor, old_logits: torch.Tensor, old: torch.Tensor,
                    temperature: float = 2.0) -> torch.Tensor:
    """Cross-entropy between softmax(old / T) and softmax(new / T) over the old classes, mean over the batch."""
    target = F.softmax(old_logits[:, old] / temperature, dim=1)
    return -(target * F.log_softmax(logits[:, old] / temperature, dim=1)).sum(1).mean()


def frozen_copy(net: nn.Module) -> nn.Module:
    old = copy.deepcopy(net).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


class PreviousModel(Strategy):
    """Holds the network frozen at the end of the previous experience (saved with every checkpoint).

    ``train_only``: glob patterns over backbone parameter names; only those and the classifier are trained (the
    ImageNet-R setting of Smith et al. 2023, qkv projections only, as ``l2``'s ``train_only_selected``)."""

    def __init__(self, train_only: Sequence[str] | str | None = None):
        self.old_net: nn.Module | None = None
        self._net: nn.Module | None = None
        self.train_only = [train_only] if isinstance(train_only, str) else list(train_only or [])
        self._trained: list[str] = []

    def setup(self, module) -> None:
        self._net = module.net
        if self.train_only:
            self._trained = list(select_parameters(module.net, self.train_only,
                                                   key=f"strategy.{self.name}.train_only"))

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if self.train_only:
            freeze_unselected(module.net, self._trained)

    def on_fit_start(self, module) -> None:
        if self.old_net is not None:
            self.old_net.to(module.device)

    def old_outputs(self, x: torch.Tensor) -> dict:
        from cl_vit.module import net_outputs

        with torch.no_grad():
            return net_outputs(self.old_net, x)

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        self.old_net = frozen_copy(module.net)

    def state_dict(self) -> dict:
        if self.old_net is None:
            return {"old_net": None}
        return {"old_net": {k: v.detach().cpu().clone() for k, v in self.old_net.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("old_net") is None:
            self.old_net = None
            return
        self.old_net = frozen_copy(self._net)
        self.old_net.load_state_dict(state["old_net"])


@register_strategy
class LwF(PreviousModel):
    name = "lwf"
    reads_old_logits = True  # the distillation trains the classifier rows of past classes

    def __init__(self, form: str = "mc", lam: float = 1.0, temperature: float = 2.0,
                 train_only: Sequence[str] | str | None = None):
        super().__init__(train_only)
        if form not in FORMS:
            raise ConfigError(f"strategy.{self.name}.form", form, f"one of {list(FORMS)}")
        self.form = form
        self.lam = _number(f"strategy.{self.name}.lam", lam)
        self.temperature = _number(f"strategy.{self.name}.temperature", temperature, 1e-6)
        self.old_classes: list[int] = []
        self._loss = "ce"

    def setup(self, module) -> None:
        super().setup(module)
        self._loss = module.loss_name

    @property
    def replaces_classification(self) -> bool:
        return self.form == "mc" and self._loss == "bce" and self.old_net is not None and bool(self.old_classes)

    @property
    def cls_loss_weight(self) -> float:  # LwF.MC with BCE is the classification loss itself
        return 0.0 if self.replaces_classification else 1.0

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        super().before_experience(module, experience)
        self.old_classes = sorted(set(experience.seen_classes) - set(experience.classes))

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        if self.old_net is None or not self.old_classes:
            return {}
        logits = outputs["logits"]
        old_logits = self.old_outputs(batch["x"])["logits"]
        old = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        old[self.old_classes] = True
        if self.form == "kd":
            return {"kd": self.lam * kd_distillation(logits, old_logits, old, self.temperature)}
        if self.replaces_classification:
            cls, kd = lwf_mc_terms(logits, old_logits, batch["y"], module.seen_mask, old)
            return {"cls": cls, "kd": self.lam * kd}
        return {"kd": self.lam * bce_distillation(logits, old_logits, old)}

    def __repr__(self) -> str:
        only = f", train_only={self.train_only}" if self.train_only else ""
        return f"LwF(form={self.form!r}, lam={self.lam}, temperature={self.temperature}{only})"
