"""L2 parameter regularisation toward an anchor (Smith et al., "A Closer Look at Rehearsal-Free Continual Learning",
CVPR-W 2023): loss + lambda * sum_j (theta_j - theta*_j)^2 over a selection of backbone parameters.

The anchor theta* is the pre-trained (or checkpoint) weights during the first experience, which is what lets L2 act
from the first task on ("L2 from the start", shaunak27/data-free-continual-learning learners/kd.py
``init_task_param_reg``), and the weights at the end of each experience afterwards. A backbone initialised at
random has no anchor, hence no penalty, in its first experience. ``train_only_selected`` freezes the rest of the
backbone (the classifier stays trainable): the paper's ViT setting, where only the qkv projections are fine-tuned.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cl_vit.errors import ConfigError
from cl_vit.models import weights_origin
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.selection import QKV, freeze_unselected, select_parameters, snapshot, to_cpu, to_device


def l2_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], lam: float,
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``lam * sum_j w_j (theta_j - theta*_j)^2``; w = 1 is L2, w = the Fisher diagonal is EWC.

    No factor 1/2, as the authors' code (``eps * MSELoss(reduction='none')(p, anchor).sum()``, learners/kd.py
    EWC_MC): the gradient is ``2 * lam * w * (theta - theta*)``."""
    terms = [((p - anchor[n]) ** 2 * (1 if weights is None else weights[n])).sum() for n, p in params.items()]
    return lam * torch.stack(terms).sum()


def _number(key: str, value, lo: float = 0.0, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lo or (hi is not None and value > hi):
        raise ConfigError(key, value, f"a number in [{lo}, {hi}]" if hi is not None else f"a number >= {lo}")
    return float(value)


@register_strategy
class L2(Strategy):
    name = "l2"

    def __init__(self, lam: float = 1e-3, params: Sequence[str] = QKV, exclude: Sequence[str] = (),
                 train_only_selected: bool = False):
        self.lam = _number(f"strategy.{self.name}.lam", lam)
        if isinstance(params, str):
            params = [params]
        self.patterns, self.exclude = list(params), [exclude] if isinstance(exclude, str) else list(exclude)
        self.train_only_selected = bool(train_only_selected)
        self.anchor: dict[str, torch.Tensor] | None = None
        self._params: dict[str, torch.nn.Parameter] = {}
        self._pretrained = False

    def setup(self, module) -> None:
        self._params = select_parameters(module.net, self.patterns, self.exclude, key=f"strategy.{self.name}.params")
        self._pretrained = weights_origin(module.net) is not None

    def on_fit_start(self, module) -> None:
        self.anchor = to_device(self.anchor, module.device)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if self.train_only_selected:
            freeze_unselected(module.net, list(self._params))
        if experience.index == 0 and self.anchor is None and self._pretrained:
            self.anchor = snapshot(self._params)

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None:
            return None
        return l2_penalty(self._params, self.anchor, self.lam)

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        term = self.penalty()
        return {} if term is None else {self.name: term}

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        self.anchor = snapshot(self._params)

    def state_dict(self) -> dict:
        return {"anchor": to_cpu(self.anchor)}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = to_cpu(state.get("anchor"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(lam={self.lam}, params={self.patterns}, train_only_selected={self.train_only_selected})"
