"""What the classifier-statistics strategies share: the embeddings of an experience's training data, the same on
every process, and swapping a timm model's classifier for one of theirs.

SimpleCIL's prototypes, RanPAC's Gram matrix and SLCA's class Gaussians are functions of the pre-logits embeddings
of the experience's training images. Under DDP each process embeds its share (``train_loader(shard=True)``:
Lightning's unrepeated sampler gives rank r the images r, r + W, r + 2W, ...) and the shares are gathered and put
back in dataset order, so every process computes the statistics from the same matrix in the same order: the result
is bit-identical across processes and equal to a one-process run's (up to the backbone's own batch-size rounding).

``statistics_transform``: which transform the training images are embedded under. ``test`` (the default) as the
official code of all three methods: they re-read the experience's training images in test mode before computing
their statistics (RanPAC RanPAC.py L167, GengDavid/SLCA models/base.py L253, RevisitingCIL models/simplecil.py L66);
``train``: the images as the training loader delivers them (the benchmark's training augmentation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from cl_vit import distributed
from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import ExperienceInfo


STATISTICS_TRANSFORMS = ("test", "train")


def check_statistics_transform(value, strategy: str) -> str:
    if value not in STATISTICS_TRANSFORMS:
        raise ConfigError(f"strategy.{strategy}.statistics_transform", value, "test or train")
    return value


def interleave(shares: Sequence[np.ndarray]) -> np.ndarray:
    """The rows of W processes' shares back in dataset order: share r holds rows r, r + W, r + 2W, ..."""
    world = len(shares)
    n = sum(len(s) for s in shares)
    out = np.empty((n, *shares[0].shape[1:]), dtype=shares[0].dtype)
    for r, share in enumerate(shares):
        if len(share) != len(range(r, n, world)):
            raise RuntimeError(f"process {r} embedded {len(share)} of {n} images; expected {len(range(r, n, world))}")
        out[r::world] = share
    return out


@torch.no_grad()
def experience_embeddings(module, experience: ExperienceInfo, transform: str = "test"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings N x D float32, float64 under ``trainer.precision=64-true``, labels N) of the experience's
    training data under the ``test`` or ``train`` transform, in dataset order, on the CPU.

    The network runs in eval mode on its current device, and every module gets its own mode back after (a frozen
    part kept in eval mode stays so); every process returns the same tensors."""
    from cl_vit.module import as_step_input, modes_kept, net_outputs, outside_step

    net = module.net
    device = next(net.parameters()).device
    feats, labels = [], []
    with modes_kept(net), outside_step(module):
        net.eval()
        for batch in experience.train_loader(train=False, shard=distributed.world_size() > 1, transform=transform):
            x = as_step_input(module, batch[0].to(device))
            pre = net_outputs(net, x)["pre_logits"]  # float32, or float64 under trainer.precision=64-true
            feats.append(pre.to(torch.promote_types(pre.dtype, torch.float32)).cpu())
            labels.append(batch[1].cpu())
    f = torch.cat(feats).numpy() if feats else np.zeros((0, 0), dtype=np.float32)
    y = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    if distributed.world_size() > 1:
        shares = distributed.all_gather_object((f, y))
        f, y = interleave([s[0] for s in shares]), interleave([s[1] for s in shares])
    return torch.from_numpy(np.ascontiguousarray(f)), torch.from_numpy(np.ascontiguousarray(y)).long()


def classifier_path(net: nn.Module) -> str:
    """The attribute path of ``net.get_classifier()`` inside ``net`` (``head`` for timm ViTs)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    for name, m in net.named_modules():
        if name and m is head:
            return name
    raise UserError(f"{type(net).__name__} has no single classifier module (get_classifier()): the prototype and "
                    "ridge classifiers replace it, so use a timm model with one linear head")


def replace_classifier(net: nn.Module, head: nn.Module) -> None:
    """Put ``head`` where ``net.get_classifier()`` was (``forward_head`` and ``get_classifier`` then use it)."""
    path = classifier_path(net)
    parent_name, _, attr = path.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, attr, head)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def embedding_dim(net: nn.Module) -> int:
    dim = getattr(net, "head_hidden_size", None) or getattr(net, "num_features", None)
    if not dim:
        raise UserError(f"{type(net).__name__} does not say its embedding size (num_features): use a timm model")
    return int(dim)
