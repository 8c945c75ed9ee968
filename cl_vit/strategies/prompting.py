"""Prefix-tuning of a ViT for the prompt methods (L2P, DualPrompt, CODA-Prompt), as GT-RIPL/CODA-Prompt does it.

CODA-Prompt's repository implements all three the same way (models/zoo.py ``ViTZoo.forward``, models/vit.py):

* the query is the [CLS] output (after the final norm) of the frozen pre-trained model without prompts, computed
  without gradient (zoo.py L392-395);
* for every block l the prompt module returns a prefix (P_k, P_v) or nothing, and a loss term; the block's attention
  prepends P_k to its keys and P_v to its values, split into heads like them (vit.py ``Attention.forward`` L68-73):
  prefix tokens are in the embedding space and bypass the qkv projection;
* the classifier reads the [CLS] token of the prompted pass (zoo.py L396-403); the prompt losses of all blocks are
  summed into the training loss (vit.py L186-192, learners/prompt.py L37).

Any timm ViT (blocks whose ``attn`` is timm's ``Attention``) and Refiner-ViT (``RefinerAttention``, which takes a
prefix itself; design in docs/models.md) work. Prompts go only into blocks the network has: the official block lists
(0-4) are clipped to the depth, e.g. blocks 0-3 of the 4-block refiner_vit_tiny.

Here the attention modules of the network are given a prefix-aware forward (their parameters and state-dict keys stay
as they are) and the network a ``forward_outputs`` that runs the two passes; a prompt module is attached to the
network as ``net.prompt``, so its parameters are trained by the module's optimiser and saved in every checkpoint.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy


def prefix_attention_forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
    """timm ``Attention.forward`` with ``self.prefix = (P_k, P_v)`` (B x L x C each) prepended to keys and values."""
    prefix = getattr(self, "prefix", None)
    if prefix is None:
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    B, N, C = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    pk, pv = (p.reshape(B, -1, self.num_heads, self.head_dim).permute(0, 2, 1, 3).to(k.dtype) for p in prefix)
    k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                       dropout_p=self.attn_drop.p if self.training else 0.0)
    x = x.transpose(1, 2).reshape(B, N, -1)
    x = self.norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


def enable_prefixes(net: nn.Module) -> list[nn.Module]:
    """Make every block's attention take a prefix; returns the attention modules in block order.

    timm ``Attention`` gets the prefix-aware forward above; Refiner-ViT's ``RefinerAttention`` takes a prefix itself
    (cl_vit/models/refiner.py: the softmax runs over prefix and token keys, the refiner and the carried map act on
    the token columns only, a share block reuses the prefix columns of the map it receives)."""
    from timm.models.vision_transformer import Attention

    from cl_vit.models.refiner import RefinerAttention

    blocks = getattr(net, "blocks", None)
    attns = [getattr(b, "attn", None) for b in (blocks or [])]
    if not attns or not all(isinstance(a, (Attention, RefinerAttention)) for a in attns):
        raise UserError(f"the prompt methods insert prefixes into the attention of a ViT's blocks; "
                        f"{type(net).__name__}'s blocks have neither timm's Attention nor RefinerAttention "
                        "(net.blocks[i].attn): use a timm ViT or a Refiner-ViT, e.g. model=vit_base_patch16_224")
    for a in attns:
        a.prefix = None
        if isinstance(a, Attention):
            a.forward = MethodType(prefix_attention_forward, a)
    return attns


def set_prefixes(net: nn.Module, prefixes) -> None:
    for blk, p in zip(net.blocks, prefixes):
        blk.attn.prefix = p


def prompted_outputs(net: nn.Module, x: torch.Tensor) -> dict:
    """The two passes: the query without prompts (no gradient), then the prompted pass; ``prompt_loss`` in training."""
    set_prefixes(net, [None] * len(net.blocks))
    with torch.no_grad():
        query = net.forward_features(x)[:, 0]
    prefixes, loss = [], x.new_zeros(())
    for layer in range(len(net.blocks)):
        p, term = net.prompt(query, layer, train=net.training)
        prefixes.append(p)
        loss = loss + term
    set_prefixes(net, prefixes)
    try:
        feats = net.forward_features(x)
    finally:
        set_prefixes(net, [None] * len(net.blocks))
    pre = net.forward_head(feats, pre_logits=True)
    out = {"logits": net.get_classifier()(pre), "pre_logits": pre}
    if net.training:
        out["prompt_loss"] = loss
    return out


def install_prompt(net: nn.Module, prompt: nn.Module) -> None:
    """Attach ``prompt`` as ``net.prompt`` and make the network's outputs the prompted ones."""
    enable_prefixes(net)
    net.add_module("prompt", prompt)
    net.forward_outputs = MethodType(prompted_outputs, net)


def freeze_norm_statistics(net: nn.Module, frozen: bool = True) -> None:
    """Batch norms of the frozen backbone (Refiner-ViT's refiner) normalise with their loaded running statistics and
    do not update them: the query is then the frozen pre-trained model's, as in the official code (whose ViT has no
    running statistics), and not a function that follows each experience's data. ``frozen=False``: training mode."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(not frozen)


def tensor_prompt(*shape: int) -> nn.Parameter:
    """zoo.py ``tensor_prompt`` L342-351: uniform [0, 1) (the orthogonal init is not used by L2P / DualPrompt)."""
    return nn.Parameter(torch.empty(*shape).uniform_())


def train_only_prompt_and_classifier(net: nn.Module) -> None:
    """learners/prompt.py ``init_optimizer`` L52-54: only the prompt module and the classifier are optimised."""
    from cl_vit.strategies.selection import classifier_names

    keep = classifier_names(net)
    for n, p in net.named_parameters():
        p.requires_grad_(n in keep or n.startswith("prompt."))


def key_query_cosine(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """cos(query_b, key_k), B x K, the query detached (zoo.py L255-257)."""
    return torch.einsum("bj,kj->bk", F.normalize(query, dim=1).detach(), F.normalize(keys, dim=1))


class FrozenNormStatistics(Strategy):
    """A strategy on a frozen backbone whose batch norms (Refiner-ViT's conv stem) keep their loaded running
    statistics while its modules train: the frozen backbone stays the pre-trained function."""

    def on_fit_start(self, module) -> None:
        # the norms left in evaluation mode by the last experience's batches go back to training mode, as Lightning
        # expects every module at the start of a fit (else it prints a note per experience); before_batch freezes
        # them again before the first forward pass
        freeze_norm_statistics(module.net, frozen=False)

    def before_batch(self, module, batch: dict) -> dict:
        freeze_norm_statistics(module.net)
        return batch


class PromptStrategy(FrozenNormStatistics):
    """The shared policy of the prompt methods: a prompt module on a frozen backbone, a new task each experience.

    Subclasses build the module (``make_prompt(emb_d, depth)``, prompting only blocks below ``depth``); it has
    ``start_task(index, n_experiences)`` and ``forward(query, layer, train) -> (prefix or None, loss)``.

    ``first_session`` (not in the methods, which assume a pre-trained backbone): the first experience trains the
    whole network with the prompts, its batch norms in training mode, and the backbone is frozen from the second on;
    the first-session adaptation of Panos et al. (ICCV 2023) and RanPAC's phase 1, for a backbone trained from
    scratch, as on the default stream (``benchmark.strategy_args.<method>.first_session``)."""

    first_session = False
    _index = 0

    def _adapting(self, index: int) -> bool:
        return self.first_session and index == 0

    def _set_first_session(self, name: str, value) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"strategy.{name}.first_session", value, "true or false")
        self.first_session = value

    def before_batch(self, module, batch: dict) -> dict:
        return batch if self._adapting(self._index) else super().before_batch(module, batch)

    def make_prompt(self, emb_d: int, depth: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, module) -> None:
        from cl_vit.strategies.embeddings import embedding_dim

        enable_prefixes(module.net)  # checks the blocks first
        # prompts only in blocks the network has: an unused parameter would stop a DDP run
        install_prompt(module.net, self.make_prompt(embedding_dim(module.net), len(module.net.blocks)))

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        self._index = experience.index
        if self._adapting(experience.index):
            for p in module.net.parameters():
                p.requires_grad_(True)
        else:
            train_only_prompt_and_classifier(module.net)
        module.net.prompt.start_task(experience.index, experience.n_experiences)

    def frozen_slices(self, module) -> dict:
        # the prompt module's own frozen rows (``frozen_rows``: e.g. CODA-Prompt's earlier components)
        rows = getattr(module.net.prompt, "frozen_rows", dict)()
        return {f"prompt.{n}": r for n, r in rows.items()}

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        loss = outputs.get("prompt_loss")
        return {} if loss is None else {self.name: loss}
