"""DualPrompt (Wang et al., ECCV 2022) as GT-RIPL/CODA-Prompt implements and runs it (models/zoo.py ``DualPrompt``
L206-312): G-prompts shared by all experiences in blocks 0-1 and a pool of E-prompts, one per experience, with keys,
in blocks 2-4, all as prefixes (first half of each prompt's tokens to the keys, second half to the values).

Training uses the experience's own E-prompt (``task_id_bootstrap``) and adds the key-matching loss
sum_b (1 - cos(q_b, k_task)) per E-block (L259-263); at evaluation each image takes the E-prompt whose key is most
similar to its query (top-1, L269-272). The loss is the cross-entropy over the current experience's classes
(learners/prompt.py L29-37; configs/strategy/dualprompt.yaml sets ``loss.mask_old_logits``); only the prompts, keys
and classifier train.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import register_strategy
from cl_vit.strategies.prompting import PromptStrategy, key_query_cosine, tensor_prompt


class PromptPool(nn.Module):
    """E-prompts with keys (and optional G-prompts): DualPrompt, and L2P with ``g_layers=()`` and top-k selection."""

    def __init__(self, emb_d: int, pool_size: int, e_length: int, g_length: int, e_layers, g_layers, top_k: int,
                 task_id_bootstrap: bool, key_loss_shards: int = 1):
        super().__init__()
        self.key_loss_shards = key_loss_shards
        self.emb_d, self.pool_size, self.e_length, self.g_length = emb_d, pool_size, e_length, g_length
        self.e_layers, self.g_layers = list(e_layers), list(g_layers)
        self.top_k, self.task_id_bootstrap = top_k, task_id_bootstrap
        for g in self.g_layers:
            setattr(self, f"g_p_{g}", tensor_prompt(g_length, emb_d))
        for e in self.e_layers:
            setattr(self, f"e_p_{e}", tensor_prompt(pool_size, e_length, emb_d))
            setattr(self, f"e_k_{e}", tensor_prompt(pool_size, emb_d))
        self.register_buffer("task_id", torch.zeros((), dtype=torch.long))

    def start_task(self, index: int, n_tasks: int) -> None:
        if self.task_id_bootstrap and self.pool_size < n_tasks:
            raise UserError(f"DualPrompt trains E-prompt t in experience t: its pool of {self.pool_size} is smaller "
                            f"than the {n_tasks} experiences; set strategy.dualprompt.pool_size={n_tasks}")
        self.task_id.fill_(index)

    def frozen_rows(self) -> dict[str, list[int]]:
        """With the task-id bootstrap (DualPrompt) an experience trains its own E-prompt and key only (L259-263): the
        other rows get no gradient and stay as they are; L2P's selection may train any row."""
        if not self.task_id_bootstrap:
            return {}
        others = [r for r in range(self.pool_size) if r != int(self.task_id)]
        return {f"e_{n}_{e}": others for e in self.e_layers for n in ("p", "k")}

    def forward(self, query: torch.Tensor, layer: int, train: bool = False):
        B = query.shape[0]
        loss = query.new_zeros(())
        keys, values = [], []
        if layer in self.e_layers:
            K, p = getattr(self, f"e_k_{layer}"), getattr(self, f"e_p_{layer}")
            cos = key_query_cosine(query, K)
            i = self.e_length // 2
            if train and self.task_id_bootstrap:
                t = int(self.task_id)
                loss = (1.0 - cos[:, t]).sum()
                P = p[t].expand(B, -1, -1)
                keys.append(P[:, :i]), values.append(P[:, i:])
            else:
                idx = torch.topk(cos, self.top_k, dim=1).indices
                if train:  # zoo.py L265-267, indexing as the official code does: cos[:, idx] is B x B x top_k,
                    # within each shard of the batch (key_loss_shards: DataParallel's chunks, summed when gathered)
                    loss = sum((1.0 - c[:, i]).sum() for c, i in zip(cos.chunk(self.key_loss_shards),
                                                                      idx.chunk(self.key_loss_shards)))
                P = p[idx]
                keys.append(P[:, :, :i].reshape(B, -1, self.emb_d))
                values.append(P[:, :, i:].reshape(B, -1, self.emb_d))
        if layer in self.g_layers:
            j = self.g_length // 2
            P = getattr(self, f"g_p_{layer}").expand(B, -1, -1)
            keys.append(P[:, :j]), values.append(P[:, j:])
        if not keys:
            return None, loss
        return (torch.cat(keys, dim=1), torch.cat(values, dim=1)), (loss if train else query.new_zeros(()))


@register_strategy
class DualPrompt(PromptStrategy):
    name = "dualprompt"

    def __init__(self, pool_size: int = 10, e_length: int = 20, g_length: int = 6, first_session: bool = False):
        for key, value in (("pool_size", pool_size), ("e_length", e_length), ("g_length", g_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"strategy.dualprompt.{key}", value, "an integer >= 1")
        self.pool_size, self.e_length, self.g_length = pool_size, e_length, g_length
        self._set_first_session("dualprompt", first_session)

    def make_prompt(self, emb_d: int, depth: int) -> nn.Module:
        # zoo.py _init_smart L227-239: G in blocks 0-1, E in blocks 2-4, top-1, task-id bootstrap in training
        return PromptPool(emb_d, self.pool_size, self.e_length, self.g_length,
                          e_layers=[b for b in (2, 3, 4) if b < depth], g_layers=[b for b in (0, 1) if b < depth],
                          top_k=1, task_id_bootstrap=True)

    def __repr__(self) -> str:
        return (f"DualPrompt(pool_size={self.pool_size}, e_length={self.e_length}, g_length={self.g_length}, "
                f"first_session={self.first_session})")
