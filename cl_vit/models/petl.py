"""Parameter-efficient modules added to a built timm ViT: SSF and AdaptFormer, as RanPAC's first session uses them.

RanPAC (RanPAC/RanPAC @ 012927f) trains one of these in its first session and nothing else of the backbone
(args/*_publish.csv ``model_name``: ``ssf`` on ImageNet-R, ``adapter`` on CIFAR-100):

* **SSF** (petl/vision_transformer_ssf.py): a learnt per-channel ``x * scale + shift`` (``ssf_ada`` L388-395, scale
  ~ N(1, 0.02), shift ~ N(0, 0.02): ``init_ssf_scale_shift`` L378-386) after the patch projection (L366-367), after
  each block's two LayerNorms (L254-255), after ``qkv`` and ``proj`` in attention (L199, L210-211), after ``fc1``
  and ``fc2`` in the MLP (L159-166) and after the final norm (L534-535). On a timm ViT that is: after every
  LayerNorm, every Linear and the patch-embedding Conv2d, the classifier excepted (:func:`add_ssf`).
* **AdaptFormer** (petl/vision_transformer_adapter.py, configured in inc_net.py L116-133): in every block a
  bottleneck ``up(dropout(relu(down(x)))) * 0.1`` (``Adapter`` L31-90: 64 hidden units, dropout 0.1, no LayerNorm,
  ``lora`` init: kaiming-uniform down, zero up and biases) that reads the block's residual stream after attention
  and is added in parallel to the MLP branch (``Block.forward`` L165-183) (:func:`add_adaptformer`); in Refiner-ViT's
  blocks inside their residual scaling (:class:`AdaptFormerRefinerBlock`, the suite's extension).

The modules are added in place, so the pre-trained parameters keep their names; the new ones are named
``*.ssf.scale`` / ``*.ssf.shift`` and ``blocks.N.adaptmlp.*`` (:data:`PETL_PARAMS` selects them).

APER and EASE read the network with its modules switched off as well (:func:`petl_disabled`: the pre-trained
network, whose weights the modules never change), and EASE keeps one adapter per task in every block
(:class:`AdapterSet`, :func:`add_adapter_sets`), of which one, or none, runs at a time (:func:`use_adapter`).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from cl_vit.errors import UserError
from cl_vit.models.refiner import RefinerBlock

#: the parameters each method trains (glob patterns over ``net.named_parameters()``)
PETL_PARAMS = {"ssf": ["*.ssf.*"], "adaptformer": ["*.adaptmlp.*"]}


class SSF(nn.Module):
    """Scale and shift of the channel dimension: the last one, or dim 1 of an NCHW map."""

    #: False: the identity (:func:`petl_disabled`)
    enabled = True

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.shift = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if x.ndim == 4:
            return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return x * self.scale + self.shift


def _apply_ssf(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return module.ssf(output)


def _channels(m: nn.Module) -> int:
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    return int(m.out_features if isinstance(m, nn.Linear) else m.out_channels)


def add_ssf(net: nn.Module) -> list[str]:
    """An :class:`SSF` after the output of every LayerNorm, Linear and Conv2d of ``net`` but its classifier; returns
    the names of the modules that got one. Calling it twice is an error (the parameters would double)."""
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    head_modules = set(map(id, head.modules())) if isinstance(head, nn.Module) else set()
    done = []
    for name, m in list(net.named_modules()):
        if id(m) in head_modules or not isinstance(m, (nn.LayerNorm, nn.Linear, nn.Conv2d)):
            continue
        if hasattr(m, "ssf"):
            raise UserError(f"{name} already has SSF parameters: add SSF once")
        m.ssf = SSF(_channels(m)).to(next(m.parameters()).device)
        m.register_forward_hook(_apply_ssf)
        done.append(name)
    return done


class Adapter(nn.Module):
    """AdaptFormer's bottleneck ``up(dropout(relu(down(x)))) * scale`` (no LayerNorm, lora init)."""

    #: False: the block runs without it (:func:`petl_disabled`)
    enabled = True

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.scale, self.dropout = float(scale), float(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up_proj.weight)
            nn.init.zeros_(self.down_proj.bias)
            nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down_proj(x)), p=self.dropout, training=self.training)
        return self.up_proj(h) * self.scale


class AdaptFormerBlock(Block):
    """timm's ViT block with the adapter in parallel to its MLP branch (``block.adaptmlp``)."""

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        branch = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.adaptmlp.enabled:
            branch = branch + self.adaptmlp(x)  # the official sum order: x + (mlp + adapter)
        return x + branch


class AdaptFormerRefinerBlock(RefinerBlock):
    """Refiner-ViT's block with the adapter in parallel to its MLP branch, inside the block's residual scaling:
    ``x + r (mlp(LN(x / r)) + adapter(x / r))`` (the suite's extension: AdaptFormer is defined on plain ViT blocks;
    r = 1 gives the :class:`AdaptFormerBlock` sum)."""

    def forward(self, x, attn_prev=None, need_map: bool = False, maps=None):
        r = self.residual_scale
        y, attn_next = self.attn(self.norm1(x), attn_prev, need_map, maps)
        x = torch.add(x, self.drop_path1(self.ls1(y)), alpha=r)
        branch = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.adaptmlp.enabled:
            branch = branch + self.adaptmlp(x if r == 1.0 else x / r)
        return torch.add(x, branch, alpha=r), attn_next


_ADAPTER_BLOCK = {Block: AdaptFormerBlock, RefinerBlock: AdaptFormerRefinerBlock}


def _vit_blocks(net: nn.Module, what: str) -> list[Block]:
    blocks = [m for m in net.modules() if type(m) in (*_ADAPTER_BLOCK, *_ADAPTER_BLOCK.values())]
    if not blocks:
        raise UserError(f"{what} adds adapters to timm ViT or Refiner-ViT blocks; {type(net).__name__} has none: use "
                        "a timm VisionTransformer or a Refiner-ViT, or strategy.<name>.petl=ssf / null where the "
                        "strategy offers it")
    if any(hasattr(b, "adaptmlp") for b in blocks):
        raise UserError(f"{type(net).__name__} already has adapters: add AdaptFormer once")
    return blocks


def add_adaptformer(net: nn.Module, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> int:
    """An :class:`Adapter` in every timm ``Block`` (or Refiner-ViT block) of ``net`` (in place); returns how many
    blocks got one."""
    blocks = _vit_blocks(net, "AdaptFormer")
    for b in blocks:
        dim = b.norm2.normalized_shape[-1]
        b.adaptmlp = Adapter(dim, bottleneck, scale, dropout).to(b.norm2.weight.device).train(b.training)
        b.__class__ = _ADAPTER_BLOCK[type(b)]
    return len(blocks)


class AdapterSet(nn.Module):
    """Several adapters in one block's place, one per task (EASE), ``active`` the one that runs (None: none)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleList()
        self.active: int | None = None

    @property
    def enabled(self) -> bool:
        return self.active is not None and self.adapters[self.active].enabled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapters[self.active](x)


def add_adapter_sets(net: nn.Module) -> int:
    """An empty :class:`AdapterSet` in every timm ``Block`` (or Refiner-ViT block) of ``net`` (in place); returns how
    many blocks got one."""
    blocks = _vit_blocks(net, "EASE")
    for b in blocks:
        b.adaptmlp = AdapterSet()
        b.__class__ = _ADAPTER_BLOCK[type(b)]
    return len(blocks)


def adapter_sets(net: nn.Module) -> list[AdapterSet]:
    return [m for m in net.modules() if isinstance(m, AdapterSet)]


def grow_adapters(net: nn.Module, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> int:
    """A new :class:`Adapter` (lora init, from the global generator) at the end of every block's set, in block
    order; returns the index of the new adapters."""
    blocks = [b for b in net.modules() if isinstance(getattr(b, "adaptmlp", None), AdapterSet)]
    for b in blocks:
        adapter = Adapter(b.norm2.normalized_shape[-1], bottleneck, scale, dropout)
        b.adaptmlp.adapters.append(adapter.to(b.norm2.weight.device).train(b.training))
    return len(blocks[0].adaptmlp.adapters) - 1


def use_adapter(net: nn.Module, index: int | None) -> None:
    """Every block runs its adapter ``index`` (None: none, the pre-trained network)."""
    for s in adapter_sets(net):
        s.active = index


@contextlib.contextmanager
def petl_disabled(net: nn.Module):
    """``net`` without its SSF modules and adapters for the duration (the pre-trained network)."""
    modules = [m for m in net.modules() if isinstance(m, (SSF, Adapter))]
    try:
        for m in modules:
            m.enabled = False
        yield net
    finally:
        for m in modules:
            m.enabled = True
