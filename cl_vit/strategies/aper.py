"""APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024; ADAM in its first version): adapt the pre-trained ViT in the first experience
only, then classify every class by its prototype in the concatenated features of the pre-trained and the adapted
network, as SimpleCIL does with the pre-trained features alone.

As the official code (sun-hailong/LAMDA-PILOT models/aper_adapter.py and models/aper_ssf.py, ``Learner``; also
zhoudw-zdw/RevisitingCIL):

* first session (``_train`` L96-113, ``_init_train`` L124-158): AdaptFormer adapters (``petl=adaptformer``; the
  backbone ``pretrained_vit_b16_224_adapter``, backbone/vit_adapter.py: every pre-trained weight frozen, L404-410) or
  SSF (``petl=ssf``, aper_ssf.py L94-109) are trained together with a cosine classifier with a learnt scale
  (utils/inc_net.py ``SimpleVitNet`` L545-583, backbone/linears.py ``CosineLinear`` L37-67), cross-entropy over the
  first experience's classes; SGD over every parameter (momentum 0.9, weight decay on all), cosine to ``min_lr``
  stepped per epoch (L107-111, L144); the recipes set ``tuned_epoch``, ``init_lr``, ``batch_size``;
* then (``construct_dual_branch_network`` L119-122, inc_net.py ``MultiBranchCosineIncrementalNet`` L644-717): the
  pre-trained network without its modules and the adapted one side by side; an image's feature is
  ``cat([f_pretrained, f_adapted])``, the classifier a new ``CosineLinear`` (scale 1) whose row of class c is the mean
  feature of c's training images (``replace_fc`` L39-64) - the first experience's classes too; nothing trains again.

The two branches share the frozen pre-trained weights here: the official pre-trained branch is a second copy of the
same checkpoint (inc_net.py L706-710 builds it from the backbone name without ``_adapter`` / ``_ssf``), which the
first session never changes, so one network run with its modules switched off (:func:`petl_disabled`) is that branch;
batch norms of the backbone (Refiner-ViT's conv stem; the official ViT has none) keep their loaded statistics while
the modules train, for the same reason.
The prototypes come from the training images under the test transform (``statistics_transform=test``; L82
``mode="test"``). Not here: the VPT variant (aper_vpt.py), whose prompts are not among the suite's modules.

State: the prototypes and the first-session classifier live in the head (``net.head``), the adapters in the blocks;
all are in every experience checkpoint.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError
from cl_vit.models.petl import PETL_PARAMS, add_adaptformer, add_ssf, petl_disabled
from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.embeddings import (check_statistics_transform, embedding_dim, experience_embeddings, freeze,
                                          replace_classifier)
from cl_vit.strategies.prompting import FrozenNormStatistics
from cl_vit.strategies.selection import freeze_unselected, select_parameters
from cl_vit.strategies.simplecil import CosinePrototypeHead, class_means


def cosine_classifier(n_classes: int, in_features: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(weight, scale) of LAMDA-PILOT's ``CosineLinear`` (backbone/linears.py L51-55): weight ~ U(-1/sqrt(D),
    1/sqrt(D)), scale 1."""
    weight = nn.Parameter(torch.empty(n_classes, in_features))
    stdv = 1.0 / in_features ** 0.5
    nn.init.uniform_(weight, -stdv, stdv)
    return weight, nn.Parameter(torch.ones(1))


class AperHead(CosinePrototypeHead):
    """Before the merge: the first session's trainable cosine classifier ``scale * cos(f, w_c)`` over the adapted
    features (D); after it (``merged``): ``cos(f, p_c)`` over the prototypes of the concatenated features (2 D)."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__(2 * in_features, n_classes)
        self.weight, self.scale = cosine_classifier(n_classes, in_features)
        self.register_buffer("merged", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.merged):
            return super().forward(x)
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


def _pre_logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


def aper_outputs(net: nn.Module, x: torch.Tensor) -> dict:
    """The adapted network's features, and after the merge ``cat([pre-trained, adapted])``."""
    head = net.get_classifier()
    adapted = _pre_logits(net, x)
    if bool(head.merged):
        with torch.no_grad(), petl_disabled(net):
            base = _pre_logits(net, x)
        adapted = torch.cat([base, adapted], dim=1)
    return {"logits": head(adapted), "pre_logits": adapted}


@register_strategy
class APER(FrozenNormStatistics):
    name = "aper"

    def __init__(self, petl: str = "adaptformer", adapter_bottleneck: int = 64, statistics_transform: str = "test"):
        if petl not in PETL_PARAMS:
            raise ConfigError("strategy.aper.petl", petl, f"one of {list(PETL_PARAMS)}")
        if isinstance(adapter_bottleneck, bool) or not isinstance(adapter_bottleneck, int) or adapter_bottleneck < 1:
            raise ConfigError("strategy.aper.adapter_bottleneck", adapter_bottleneck, "an integer >= 1")
        self.petl, self.adapter_bottleneck = petl, adapter_bottleneck
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.head: AperHead | None = None
        self._params: list[str] = []

    def setup(self, module) -> None:
        net = module.net
        self.head = AperHead(embedding_dim(net), module.n_classes)
        replace_classifier(net, self.head)
        if self.petl == "ssf":
            add_ssf(net)
        else:
            add_adaptformer(net, self.adapter_bottleneck)
        self._params = list(select_parameters(net, PETL_PARAMS[self.petl], key="strategy.aper.petl"))
        net.forward_outputs = MethodType(aper_outputs, net)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if experience.index == 0 and not bool(self.head.merged):
            freeze_unselected(module.net, self._params)  # the modules and the first-session classifier
        else:
            freeze(module.net)  # the runner skips the fit

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        freeze(module.net)
        with torch.no_grad():
            self.head.merged.fill_(True)
        feats, labels = experience_embeddings(module, experience, self.statistics_transform)
        with torch.no_grad():
            for c, mean in class_means(feats, labels, experience.classes).items():
                self.head.prototypes[c] = mean.to(self.head.prototypes)

    def __repr__(self) -> str:
        return f"APER(petl={self.petl}, adapter_bottleneck={self.adapter_bottleneck})"
