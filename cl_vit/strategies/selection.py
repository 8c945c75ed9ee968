"""Which parameters a regulariser covers: glob patterns over the backbone's parameter names.

Names are those of ``net.named_parameters()`` (timm ViT: ``blocks.3.attn.qkv.weight``). The classifier is never
selected: the authors of "A Closer Look at Rehearsal-Free Continual Learning" regularise the feature extractor only
(shaunak27/data-free-continual-learning learners/kd.py, ``self.model.feat.named_parameters()``), and the head grows
new classes every experience.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from cl_vit.errors import ConfigError

#: the query/key/value projections of every attention block, weight and bias (timm ViT, DeiT, Refiner-ViT names):
#: Smith et al. 2023 regularise and train only these in their ViT experiments on ImageNet-R
QKV = ("*attn.qkv.*",)


def classifier_names(net: nn.Module) -> set[str]:
    """Parameter names of the classifier(s): timm's ``pretrained_cfg['classifier']`` prefixes, else the parameters
    of ``get_classifier()``."""
    prefixes = (getattr(net, "pretrained_cfg", None) or {}).get("classifier") or ()
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    names = {n for n, _ in net.named_parameters() if any(n == p or n.startswith(f"{p}.") for p in prefixes)}
    if not names and hasattr(net, "get_classifier"):
        heads = net.get_classifier()
        heads = heads if isinstance(heads, (tuple, list)) else (heads,)
        ids = {id(p) for h in heads if isinstance(h, nn.Module) for p in h.parameters()}
        names = {n for n, p in net.named_parameters() if id(p) in ids}
    return names


def select_parameters(net: nn.Module, patterns: Iterable[str], exclude: Iterable[str] = (),
                      key: str = "strategy.params") -> dict[str, nn.Parameter]:
    """Backbone parameters whose name matches a pattern of ``patterns`` and none of ``exclude``, in model order.

    Raises a one-line ConfigError when nothing matches, naming a few parameter names to write patterns against.
    """
    patterns, exclude = list(patterns), list(exclude)
    heads = classifier_names(net)
    out = {n: p for n, p in net.named_parameters()
           if n not in heads and any(fnmatchcase(n, pat) for pat in patterns)
           and not any(fnmatchcase(n, pat) for pat in exclude)}
    if not out:
        names = [n for n, _ in net.named_parameters() if n not in heads]
        raise ConfigError(key, patterns, f"glob patterns matching backbone parameter names of "
                                         f"{type(net).__name__}, e.g. {names[:2]} ... {names[-2:]}")
    return out


def freeze_unselected(net: nn.Module, selected: Sequence[str]) -> None:
    """Train only ``selected`` and the classifier: every other parameter gets ``requires_grad=False``.

    The module builds its optimiser from the parameters that require grad at each experience's start, so frozen
    parameters receive neither updates nor weight decay."""
    keep = set(selected) | classifier_names(net)
    for n, p in net.named_parameters():
        p.requires_grad_(n in keep)


def snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies (on the parameters' device) of ``params``."""
    return {n: p.detach().clone() for n, p in params.items()}


def to_device(tensors: dict[str, torch.Tensor] | None, device) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.to(device) for n, t in tensors.items()}


def to_cpu(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if tensors is None else {n: t.detach().cpu().clone() for n, t in tensors.items()}
