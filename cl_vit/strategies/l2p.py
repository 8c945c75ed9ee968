"""L2P++ (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022, in the form CODA-Prompt's paper and
code run it: GT-RIPL/CODA-Prompt models/zoo.py ``L2P`` L321-339): a pool of prompts with keys; each image takes the
``top_k = 5`` prompts whose keys are most similar to the frozen model's query, inserted as prefixes (prefix-tuning,
the "++" of CODA-Prompt's paper, where the original prepends prompt tokens to the input) in block 0, or in blocks 0-4
when ``deep`` (the code's ``prompt_param[2] > 0``; the published runs use -1, block 0 only). Training adds the
key-matching loss over the selected keys, computed as the official code indexes it (``cos[:, idx]``, B x B x k). That
term couples the images of a batch, so it depends on how the batch is split: the published runs use 4-GPU
DataParallel (experiments/*.sh ``GPUID='0 1 2 3'``), which computes it per 32-image chunk and sums the four
(``key_loss_shards=4``: the same value on one device; 1: over the whole batch, 4x larger).
The loss is the cross-entropy over the current experience's classes (configs/strategy/l2p.yaml sets
``loss.mask_old_logits``); only the prompts, keys and classifier train.
"""
from __future__ import annotations

import torch.nn as nn

from cl_vit.errors import ConfigError
from cl_vit.strategies.base import register_strategy
from cl_vit.strategies.dualprompt import PromptPool
from cl_vit.strategies.prompting import PromptStrategy


@register_strategy
class L2P(PromptStrategy):
    name = "l2p"

    def __init__(self, pool_size: int = 30, length: int = 20, top_k: int = 5, deep: bool = False,
                 key_loss_shards: int = 1, first_session: bool = False):
        for key, value in (("pool_size", pool_size), ("length", length), ("top_k", top_k),
                           ("key_loss_shards", key_loss_shards)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.l2p.{key}", value, "an integer >= 1")
        if top_k > pool_size:
            raise ConfigError("strategy.l2p.top_k", top_k, f"at most pool_size ({pool_size})")
        self.pool_size, self.length, self.top_k, self.deep = pool_size, length, top_k, bool(deep)
        self.key_loss_shards = key_loss_shards
        self._set_first_session("l2p", first_session)

    def make_prompt(self, emb_d: int, depth: int) -> nn.Module:
        layers = [b for b in range(5) if b < depth] if self.deep else [0]
        return PromptPool(emb_d, self.pool_size, self.length, g_length=0, e_layers=layers, g_layers=(),
                          top_k=self.top_k, task_id_bootstrap=False, key_loss_shards=self.key_loss_shards)

    def __repr__(self) -> str:
        return (f"L2P(pool_size={self.pool_size}, length={self.length}, top_k={self.top_k}, deep={self.deep}, "
                f"key_loss_shards={self.key_loss_shards}, first_session={self.first_session})")
