"""Task-wise low-rank updates of a ViT's attention projections, the mechanism InfLoRA and SD-LoRA share.

Both methods leave the pre-trained weights frozen and add, per task t, a rank-r term B_t A_t (A_t: r x d_in,
B_t: d_out x r) to some output slices of each block's ``qkv`` projection; they differ in which slices, in how the
terms are weighted and in what trains (cl_vit/strategies/inflora.py, sdlora.py):

* InfLoRA (liangyanshuo/InfLoRA models/vit_inflora.py ``Attention_LoRA.forward`` L232-262): keys and values,
  k += x (sum_t B_t A_t)^T, every term with weight 1;
* SD-LoRA (WuYichen-97/SD-Lora-CL backbone/lora.py ``_LoRA_qkv_timm_train.forward`` L153-195): queries and values,
  q += sum_{t<T} alpha_t B_t A_t x / (||B_t|| ||A_t||) + alpha_T B_T A_T x for the newest task T, one magnitude
  alpha_t per task shared by every layer and both slices (``wrapped_param`` / ``wrapped_param_prev`` L326-328).

A term is applied as one merged weight per slice, ``F.linear(x, sum_t c_t B_t A_t)``: for ViT-B's 197 tokens and
rank 10 a d x d product per forward costs less than the per-token low-rank products the official SD-LoRA runs (the
same sum, other round-off). The modules hook the projection's output, so the pre-trained parameters keep their
names and state-dict keys; the updates live in ``net.lora`` (``lora.layers.<i>.<task>.A_k`` ...).

Refiner-ViT (cl_vit/models/refiner.py): an attend block's ``qkv`` is timm's layout; a share block computes no queries
or keys, its projection ``v`` gets the value term alone.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import UserError

#: how SD-LoRA normalises an earlier task's direction: ``factors`` ||B|| ||A|| as its code (lora.py L183-188),
#: ``product`` ||B A|| as its paper writes it (Eq. 3)
DIRECTION_NORMS = ("factors", "product")


def attention_projections(net: nn.Module) -> list[tuple[str, nn.Linear, dict[str, tuple[int, int]]]]:
    """(name, Linear, {slice: (start, stop)}) of every block's attention input projection, in block order."""
    from timm.models.vision_transformer import Attention

    from cl_vit.models.refiner import RefinerAttention

    out = []
    for i, blk in enumerate(getattr(net, "blocks", None) or []):
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, (Attention, RefinerAttention)):
            break
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear):
            d = qkv.in_features
            if qkv.out_features != 3 * d:
                raise UserError(f"blocks.{i}.attn.qkv maps {d} to {qkv.out_features} features, not 3 x {d}: LoRA "
                                "expects equal query, key and value widths")
            out.append((f"blocks.{i}.attn.qkv", qkv, {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}))
        elif isinstance(getattr(attn, "v", None), nn.Linear):  # a Refiner-ViT share block
            out.append((f"blocks.{i}.attn.v", attn.v, {"v": (0, attn.v.out_features)}))
    blocks = getattr(net, "blocks", None)
    if not out or len(out) != len(blocks or []):
        raise UserError(f"LoRA adapts the attention of a ViT's blocks; {type(net).__name__}'s blocks have neither "
                        "timm's Attention nor RefinerAttention (net.blocks[i].attn): use a timm ViT or a "
                        "Refiner-ViT, e.g. model=vit_base_patch16_224")
    return out


class TaskLoRA(nn.Module):
    """The low-rank terms of every adapted projection of a network, one set per task, and SD-LoRA's magnitudes.

    ``layers[i][t]`` holds A_<s> (r x d_in) and B_<s> (d_out x r) of task t for each adapted slice s of projection
    i. ``decoupled``: SD-LoRA's weighting (module docstring); otherwise every term has weight 1 (InfLoRA)."""

    def __init__(self, projections, targets: tuple[str, ...], rank: int, decoupled: bool = False,
                 magnitude_init: float = 0.8, direction_norm: str = "factors"):
        super().__init__()
        self.names = [name for name, _, _ in projections]
        self.slices = [{s: span for s, span in spans.items() if s in targets} for _, _, spans in projections]
        if not all(self.slices):
            raise UserError(f"LoRA on {list(targets)}: a projection has none of these slices")
        self.in_features = [lin.in_features for _, lin, _ in projections]
        self.rank, self.decoupled = int(rank), bool(decoupled)
        self.magnitude_init, self.direction_norm = float(magnitude_init), direction_norm
        self.layers = nn.ModuleList(nn.ModuleList() for _ in projections)
        #: SD-LoRA's alpha_t, one scalar per task for the whole network (empty for InfLoRA)
        self.magnitude = nn.ParameterList()
        self._hooks = [lin.register_forward_hook(partial(_add_updates, self, i))
                       for i, (_, lin, _) in enumerate(projections)]

    @property
    def n_tasks(self) -> int:
        return len(self.layers[0])

    def add_task(self, device=None) -> None:
        """New terms for the next task: A kaiming-uniform (a = sqrt 5), B zero (InfLoRA ``init_param`` L202-207,
        SD-LoRA ``reset_parameters`` L378-384), so the network's function is unchanged; alpha = 0.8 (L326)."""
        for i, layer in enumerate(self.layers):
            terms = nn.ParameterDict()
            for s, (start, stop) in self.slices[i].items():
                a = torch.empty(self.rank, self.in_features[i], device=device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                terms[f"A_{s}"] = nn.Parameter(a)
                terms[f"B_{s}"] = nn.Parameter(torch.zeros(stop - start, self.rank, device=device))
            layer.append(terms)
        if self.decoupled:
            self.magnitude.append(nn.Parameter(torch.full((), self.magnitude_init, device=device)))

    def coefficients(self, i: int, s: str) -> list[torch.Tensor | float]:
        """c_t of each task's term on slice s of projection i."""
        if not self.decoupled:
            return [1.0] * self.n_tasks
        out = []
        for t, terms in enumerate(self.layers[i]):
            alpha = self.magnitude[t]
            if t == self.n_tasks - 1:  # the newest direction trains unnormalised (lora.py L190-191)
                out.append(alpha)
                continue
            A, B = terms[f"A_{s}"], terms[f"B_{s}"]
            norm = B.norm() * A.norm() if self.direction_norm == "factors" else (B @ A).norm()
            # a direction that never trained (B = 0) adds nothing, instead of 0 / 0
            out.append(alpha / norm.clamp_min(torch.finfo(norm.dtype).tiny))
        return out

    def delta(self, i: int, s: str) -> torch.Tensor:
        """sum_t c_t B_t A_t: the update of slice s of projection i (d_out x d_in)."""
        terms = self.layers[i]
        return sum(c * (terms[t][f"B_{s}"] @ terms[t][f"A_{s}"]) for t, c in enumerate(self.coefficients(i, s)))

    def merged(self, i: int) -> dict[str, torch.Tensor]:
        return {s: self.delta(i, s) for s in self.slices[i]} if self.n_tasks else {}


def _add_updates(lora: TaskLoRA, i: int, module: nn.Linear, args, output: torch.Tensor) -> torch.Tensor:
    deltas = lora.merged(i)
    if not deltas:
        return output
    x = args[0]
    parts, at = [], 0
    for s, (start, stop) in sorted(lora.slices[i].items(), key=lambda kv: kv[1][0]):
        if start > at:
            parts.append(output[..., at:start])
        parts.append(output[..., start:stop] + F.linear(x, deltas[s].to(x.dtype)))
        at = stop
    if at < output.shape[-1]:
        parts.append(output[..., at:])
    return torch.cat(parts, dim=-1)


def add_lora(net: nn.Module, targets: tuple[str, ...], rank: int, **kwargs) -> TaskLoRA:
    """Attach a :class:`TaskLoRA` as ``net.lora`` over every block's attention projection (no task yet)."""
    if hasattr(net, "lora"):
        raise UserError("the network already has LoRA terms (net.lora): add one LoRA strategy")
    lora = TaskLoRA(attention_projections(net), targets, rank, **kwargs)
    net.add_module("lora", lora)
    return lora
