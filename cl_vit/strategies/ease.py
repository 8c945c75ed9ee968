"""EASE (Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental Learning", CVPR
2024): a new set of adapters per experience on the frozen pre-trained ViT, each spanning its own feature subspace;
classes are prototypes in every subspace, those an old class never saw are synthesised from the new classes'
prototypes by semantic similarity, and the subspaces vote with the old ones down-weighted.

As the official code (sun-hailong/LAMDA-PILOT models/ease.py ``Learner``, backbone/vit_ease.py, utils/inc_net.py
``EaseNet`` L974-1040, backbone/linears.py ``EaseCosineLinear`` L103-186; exps/ease*.json):

* per experience t (``_train`` L253-270, ``_init_train`` L305-360): a fresh AdaptFormer adapter in every block
  (vit_ease.py ``get_new_adapter`` L285-298: 64-dim bottleneck, dropout 0.1, scale 0.1, lora init, parallel to the
  MLP) and a fresh cosine classifier with a learnt scale over the experience's classes (inc_net.py L1000-1012
  ``proxy_fc``); the cross-entropy over those classes (L325-335) trains both; the pre-trained weights and every
  earlier adapter are frozen (``after_task`` L44-47);
* then (``replace_fc`` L60-130): the training images of the experience go through the network with each adapter
  k = 0..t (``forward_proto``), and the mean of each new class is its prototype in subspace k;
* semantic-guided prototype complement (``solve_sim_reset`` L176-226, ``recalc_sim`` true): an old class of
  experience k has no prototype in the subspaces d = k+1..t of later adapters; with A the prototypes of the classes of
  experiences >= d in subspace k, B theirs in subspace d and Â those of experience k's classes in subspace k, its
  prototype in subspace d is ``softmax(cos(Â, A), dim=1) @ B``, recomputed after every experience;
* inference (``EaseCosineLinear.forward_reweight`` L138-186, ``use_reweight`` true): the [CLS] feature of every
  adapter, concatenated; the logit of class c of experience i is ``sum_j w_ij cos(f_j, p_cj)`` with w_ii = 1 and
  w_ij = alpha / t otherwise (alpha = 0.1), t the index of the latest experience.

The optimiser and schedule are the recipes' (SGD, cosine per epoch). Batch norms of the frozen backbone (Refiner-ViT's
conv stem; the official ViT has none) keep their loaded statistics, so that every adapter set reads the same
pre-trained stem. The prototypes come from the training images
under the test transform (``statistics_transform=test``; L242 ``mode="test"``). Not here: the options the published
runs leave off (``use_init_ptm``, ``use_diagonal``, ``use_old_data``, ``moni_adam``, ``recalc_sim`` false).

State: the adapters live in the blocks (``blocks.N.adaptmlp.adapters.K``), the prototypes (C x T*D), the task of
every class and the proxy classifier in the head (``net.head``): all in every experience checkpoint; the strategy's
state names the experiences' classes, from which a resumed run regrows the adapters before the weights load. The
network grows by one adapter set per experience (results.json ``cost``: ``params_total``); each experience trains one
set and the proxy classifier (``params_trainable``).
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError, UserError
from cl_vit.models.petl import add_adapter_sets, adapter_sets, grow_adapters, use_adapter
from cl_vit.strategies.aper import _pre_logits, cosine_classifier
from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.embeddings import (check_statistics_transform, embedding_dim, experience_embeddings, freeze,
                                          replace_classifier)
from cl_vit.strategies.prompting import FrozenNormStatistics
from cl_vit.strategies.simplecil import class_means


def semantic_complement(prototypes: torch.Tensor, tasks: list[list[int]], dim: int) -> torch.Tensor:
    """``prototypes`` (C x T*D, subspace k in columns k*D..(k+1)*D) with every old class's prototype in the subspaces
    of later experiences replaced by the similarity-weighted new prototypes (ease.py ``solve_sim_reset``)."""
    out = prototypes.clone()
    last = len(tasks) - 1
    for k in range(last):
        old = torch.tensor(tasks[k])
        for d in range(k + 1, last + 1):
            newer = torch.tensor([c for t in tasks[d:] for c in t])
            A, B = prototypes[newer, k * dim:(k + 1) * dim], prototypes[newer, d * dim:(d + 1) * dim]
            A_hat = prototypes[old, k * dim:(k + 1) * dim]
            sim = F.softmax(F.normalize(A_hat, dim=1) @ F.normalize(A, dim=1).T, dim=1)
            out[old, d * dim:(d + 1) * dim] = sim @ B
    return out


def ensemble_logits(feats: torch.Tensor, prototypes: torch.Tensor, task_of: torch.Tensor, alpha: float, dim: int
                    ) -> torch.Tensor:
    """``sum_j w_cj cos(f_j, p_cj)`` over the T subspaces of ``feats`` (B x T*D) and ``prototypes`` (C x T*D),
    w_cj = 1 in the subspace of class c's own experience ``task_of[c]``, alpha / (T - 1) in the others
    (linears.py ``forward_reweight``, use_init_ptm false)."""
    B, C, T = feats.shape[0], prototypes.shape[0], feats.shape[1] // dim
    f = F.normalize(feats.reshape(B, T, dim), dim=2)
    p = F.normalize(prototypes[:, :T * dim].reshape(C, T, dim), dim=2)
    cos = torch.einsum("btd,ctd->bct", f, p)
    own = task_of[:, None] == torch.arange(T, device=task_of.device)[None, :]
    weight = torch.where(own, 1.0, alpha / max(T - 1, 1)).to(cos.dtype)
    return (cos * weight).sum(2)


class EaseHead(nn.Module):
    """The proxy classifier the current adapter trains with (``scale * cos(f, w_c)``, D inputs), and the prototypes
    of every subspace (C x T*D) with the experience of every class (-1: unseen) for the ensemble."""

    def __init__(self, in_features: int, n_classes: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features, self.alpha = in_features, n_classes, float(alpha)
        self.weight, self.scale = cosine_classifier(n_classes, in_features)
        self.register_buffer("prototypes", torch.zeros(n_classes, 0))
        self.register_buffer("task_of", torch.full((n_classes,), -1, dtype=torch.long))

    @property
    def n_learnt(self) -> int:
        """Experiences whose prototypes are in: the subspaces the ensemble reads."""
        return int(self.task_of.max()) + 1

    def add_subspace(self) -> None:
        self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(self.out_features, self.in_features)],
                                    dim=1)

    def proxy(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ensemble over the concatenated features of the first ``n_learnt`` adapters."""
        return ensemble_logits(x, self.prototypes, self.task_of, self.alpha, self.in_features)


def ease_outputs(net: nn.Module, x: torch.Tensor) -> dict:
    """Training (or ``net.ease_subspace`` set): one pass with the latest (that) adapter, the proxy classifier's
    logits. Evaluation: one pass per adapter, the features concatenated, the ensemble's logits."""
    head: EaseHead = net.get_classifier()
    index = getattr(net, "ease_subspace", None)
    try:
        if net.training or index is not None or head.n_learnt == 0:
            use_adapter(net, len(adapter_sets(net)[0].adapters) - 1 if index is None else index)
            pre = _pre_logits(net, x)
            return {"logits": head.proxy(pre), "pre_logits": pre}
        feats = []
        for k in range(head.n_learnt):
            use_adapter(net, k)
            feats.append(_pre_logits(net, x))
        pre = torch.cat(feats, dim=1)
        return {"logits": head(pre), "pre_logits": pre}
    finally:
        use_adapter(net, None)


@register_strategy
class EASE(FrozenNormStatistics):
    name = "ease"

    def __init__(self, alpha: float = 0.1, adapter_bottleneck: int = 64, complement: bool = True,
                 statistics_transform: str = "test"):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
            raise ConfigError("strategy.ease.alpha", alpha, "a number >= 0")
        if isinstance(adapter_bottleneck, bool) or not isinstance(adapter_bottleneck, int) or adapter_bottleneck < 1:
            raise ConfigError("strategy.ease.adapter_bottleneck", adapter_bottleneck, "an integer >= 1")
        self.alpha, self.adapter_bottleneck, self.complement = float(alpha), adapter_bottleneck, bool(complement)
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.tasks: list[list[int]] = []
        self.module = None
        self.head: EaseHead | None = None

    def setup(self, module) -> None:
        self.module = module
        self.head = EaseHead(embedding_dim(module.net), module.n_classes, self.alpha)
        replace_classifier(module.net, self.head)
        add_adapter_sets(module.net)
        module.net.forward_outputs = MethodType(ease_outputs, module.net)

    def _grow_to(self, n: int) -> None:
        """Adapters (and prototype subspaces) up to ``n`` sets; the ones already there stay."""
        net = self.module.net
        while len(adapter_sets(net)[0].adapters) < n:
            grow_adapters(net, self.adapter_bottleneck)
            self.head.add_subspace()

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if len(self.tasks) != experience.index:
            raise UserError(f"ease: experience {experience.index + 1} follows {len(self.tasks)} learnt ones; "
                            "resume from the run's own checkpoints")
        self._grow_to(experience.index + 1)
        freeze(module.net)
        for s in adapter_sets(module.net):
            s.adapters[experience.index].requires_grad_(True)
        with torch.no_grad():  # a fresh proxy classifier per experience (inc_net.py L1004-1007)
            fresh, _ = cosine_classifier(len(experience.classes), self.head.in_features)
            self.head.weight[experience.classes] = fresh.to(self.head.weight)
            self.head.scale.fill_(1.0)
        self.head.weight.requires_grad_(True)
        self.head.scale.requires_grad_(True)

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        freeze(module.net)
        net, head, dim = module.net, self.head, self.head.in_features
        self.tasks.append(sorted(experience.classes))
        try:
            for k in range(experience.index + 1):
                net.ease_subspace = k
                feats, labels = experience_embeddings(module, experience, self.statistics_transform)
                with torch.no_grad():
                    for c, mean in class_means(feats, labels, experience.classes).items():
                        head.prototypes[c, k * dim:(k + 1) * dim] = mean.to(head.prototypes)
        finally:
            net.ease_subspace = None
        with torch.no_grad():
            head.task_of[experience.classes] = experience.index
            if self.complement:
                head.prototypes.copy_(semantic_complement(head.prototypes.cpu(), self.tasks, dim))

    def state_dict(self) -> dict:
        return {"tasks": [list(t) for t in self.tasks],
                "adapters": len(adapter_sets(self.module.net)[0].adapters) if self.module is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        if self.module is None:
            raise RuntimeError("ease: load_state_dict before setup")
        self.tasks = [list(t) for t in state.get("tasks", [])]
        self._grow_to(int(state.get("adapters", len(self.tasks))))

    def __repr__(self) -> str:
        return f"EASE(alpha={self.alpha}, adapter_bottleneck={self.adapter_bottleneck}, complement={self.complement})"
