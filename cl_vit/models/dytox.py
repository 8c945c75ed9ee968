"""DyTox's network (Douillard et al., "DyTox: Transformers for Continual Learning with DYnamic TOken eXpansion",
CVPR 2022; official code github.com/arthurdouillard/dytox, continual/dytox.py), built from GCAB's pieces
(cl_vit/models/gated.py): GCAB is DyTox with gates, so DyTox is GCAB's class-attention block with every gate open.

    image -> the backbone's blocks except the last (the shared encoder, SABs) -> patch features
          -> for every task t: the task-attention block (one shared class-attention block) queried by task t's token
          -> task t's classifier (LayerNorm + Linear over task t's classes) on task t's embedding
          -> the classifiers' logits concatenated over every class of the stream

The official CIFAR recipe's classifiers are independent, one per task on its own task embedding
(options/model/cifar_dytox.yaml ``ind_clf: 1-1``; continual/dytox.py forward_classifier). From the second task on, a
divergence head (LayerNorm + Linear, the new classes + 1 "old" class) reads the newest task embedding in training
(add_model, ``head_div_mode: tr``). The training policy lives in cl_vit/strategies/dytox.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from cl_vit.models.gated import TaskHead, sab_features, split_last_block


class DyToxNet(nn.Module):
    """A timm ViT (or Refiner-ViT) turned into DyTox: its blocks but the last are the encoder, the last becomes the
    task-attention block (TAB). Grows by :meth:`add_task`; ``forward_outputs(x)`` needs no task id."""

    def __init__(self, backbone: nn.Module, n_classes: int, init_from_last_block: bool = True,
                 norm_eps: float | None = None):
        super().__init__()
        cab, last, dim, hidden = split_last_block(backbone, "dytox", norm_eps)
        self.backbone = backbone
        self.embed_dim, self.hidden_dim, self.n_classes = dim, hidden, n_classes
        self.tab = cab
        self.tab_from_backbone = bool(init_from_last_block) and self.tab.init_from_block(last)
        # every gate of GCAB's block open: x * 1 is exact, so the block computes DyTox's ungated class attention
        self.register_buffer("open0", torch.ones(dim), persistent=False)
        self.register_buffer("open2", torch.ones(hidden), persistent=False)
        self.tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.head_div: TaskHead | None = None
        self.register_buffer("class_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.task_classes: list[list[int]] = []
        self.backbone_no_decay = True

    @property
    def n_tasks(self) -> int:
        return len(self.tokens)

    def add_task(self, classes: Sequence[int], divergence: bool = True) -> None:
        """A new task token and classifier for ``classes``; from the second task on (``divergence``) a fresh
        divergence head over the new classes + 1, replacing the previous task's (official add_model)."""
        classes = [int(c) for c in classes]
        if not classes or any(c < 0 or c >= self.n_classes for c in classes):
            raise ValueError(f"task classes must be stream labels in [0, {self.n_classes}), got {classes}")
        device = self.open0.device
        token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=device))
        trunc_normal_(token, std=0.02)  # add_model: a copy of the last token re-drawn with trunc_normal(0.02)
        self.tokens.append(token)
        self.heads.append(TaskHead(self.embed_dim, len(classes)).to(device))
        self.head_div = TaskHead(self.embed_dim, len(classes) + 1).to(device) if divergence and self.n_tasks > 1 \
            else None
        self.task_classes.append(classes)
        self.class_index = torch.tensor([c for cs in self.task_classes for c in cs], dtype=torch.long, device=device)

    def forward_outputs(self, x: torch.Tensor) -> dict:
        """Logits over every class of the stream (classes of tasks not grown yet read 0). Extra outputs: ``tokens``
        (every task embedding), ``pre_logits`` (their concatenation: the features the official ``icarl_all``
        herding reads, continual/rehearsal.py extract_features) and, in training, ``div`` (the divergence head's
        logits on the newest embedding; None before the second task)."""
        if self.n_tasks == 0:
            raise RuntimeError("DyToxNet has no task yet: the dytox strategy grows one in before_experience")
        feats = sab_features(self.backbone, x)
        B = feats.shape[0]
        tokens = [self.tab(token.expand(B, -1, -1), feats, self.open0, self.open2)[:, 0] for token in self.tokens]
        logits = torch.cat([head(tok) for head, tok in zip(self.heads, tokens)], dim=1)
        full = logits.new_zeros(B, self.n_classes).index_copy(1, self.class_index, logits)
        div = self.head_div(tokens[-1]) if self.training and self.head_div is not None else None
        return {"logits": full, "pre_logits": torch.cat(tokens, dim=1), "tokens": tokens, "div": div}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_outputs(x)["logits"]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The backbone's own list (timm ConViT/ViT: pos_embed, cls_token) unless ``backbone_no_decay`` is off."""
        nwd = getattr(self.backbone, "no_weight_decay", None) if self.backbone_no_decay else None
        return {f"backbone.{n}" for n in (nwd() if callable(nwd) else ())}


__all__ = ["DyToxNet"]
