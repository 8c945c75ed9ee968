"""SimpleCIL (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024): the pre-trained backbone stays frozen and each class is its prototype, the
mean embedding of its training images; an image goes to the class of highest cosine similarity.

As the official code (zhoudw-zdw/RevisitingCIL models/simplecil.py ``replace_fc`` L27-50, also LAMDA-PILOT): the
prototype of class c is ``embedding.mean(0)`` over c's training images, written once, when c's experience ends; the
classifier is ``CosineLinear`` (convs/linears.py L55-65), logits ``sigma * cos(f, p_c)`` with sigma = 1, which leaves
the argmax unchanged. The prototypes are a buffer of that head (``net.head.prototypes`` on a timm ViT), so each
experience checkpoint holds them with the network. Nothing is trained: the backbone is frozen in every experience, so the runner skips the fit.

The training images are embedded under the test transform (``statistics_transform=test``), as the official code
re-reads them (simplecil.py L66 ``mode="test"``); ``statistics_transform=train`` embeds them as the training loader
delivers them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.embeddings import (check_statistics_transform, embedding_dim, experience_embeddings, freeze,
                                          replace_classifier)


def class_means(feats: torch.Tensor, labels: torch.Tensor, classes) -> dict[int, torch.Tensor]:
    """Mean embedding of each class in ``classes`` that has images (the official ``embedding.mean(0)``)."""
    return {int(c): feats[labels == c].mean(0) for c in classes if bool((labels == c).any())}


class CosinePrototypeHead(nn.Module):
    """``logits = sigma * cos(f, p_c)`` over one prototype per class (prototypes are buffers: nothing is trained)."""

    def __init__(self, in_features: int, n_classes: int, sigma: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, n_classes
        self.register_buffer("prototypes", torch.zeros(n_classes, in_features))
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.prototypes, dim=1))


@register_strategy
class SimpleCIL(Strategy):
    name = "simplecil"

    def __init__(self, statistics_transform: str = "test"):
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.head: CosinePrototypeHead | None = None

    def setup(self, module) -> None:
        self.head = CosinePrototypeHead(embedding_dim(module.net), module.n_classes)
        replace_classifier(module.net, self.head)
        freeze(module.net)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        freeze(module.net)  # another strategy may have unfrozen parameters: SimpleCIL trains nothing

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        feats, labels = experience_embeddings(module, experience, self.statistics_transform)
        with torch.no_grad():
            for c, mean in class_means(feats, labels, experience.classes).items():
                self.head.prototypes[c] = mean.to(self.head.prototypes)
