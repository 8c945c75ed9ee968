"""Refiner-ViT: Vision Transformers whose self-attention maps are refined by convolutions, registered with timm.

"Refiner: Refining Self-attention for Vision Transformers" (Zhou et al. 2021), official code
github.com/zhoudaquan/Refiner_ViT (models/refined_transformer.py, models/refiner_utils.py). Where this file says
"official" it means that code; where the paper and the code differ, the code is the default and the paper's variant
is an option.

The refiner (the code's ``DLA``, distributed local attention) treats an attention map ``A`` of shape [B, H, N, N] as
an image with H channels (class-token row and column included) and adds a mobile-inverted-bottleneck branch to it:
1x1 conv H -> e*H, norm, ReLU6; depthwise kxk conv (zero padding k//2), norm, ReLU6; 1x1 conv e*H -> H, norm.

Two layouts:

* ``layout="shared"`` (the released models, default of refiner_vit_s/m/l): blocks alternate. An even ("attend")
  block computes ``softmax(q k^T)`` (q and k each scaled by sqrt(head_dim^-0.5)), adds ``scale * A_prev`` when an
  earlier map exists, and passes the sum on. An odd ("share") block has no q or k: it refines the map it received,
  ``R = adapt_norm(DLA(A_prev)) * scale`` (no softmax afterwards), multiplies R with its own V and passes A_prev on
  unchanged. Blocks use a doubled residual (``x + 2 * f(LN(x / 2))``) and a LayerScale (init 1e-5) on the MLP only.
* ``layout="every"`` (the paper's description): every block refines its own softmax map, nothing is carried between
  blocks, and the refiner's last norm starts at zero, so a refiner block is exactly a ViT block at initialisation:
  timm ViT weights load through :func:`checkpoint_filter_fn` with unchanged outputs (vit_base_patch16_224_refined).

Normalisation inside the refiner (``refiner_norm``; the conv stem follows it unless ``stem_norm`` is given):

* ``"batch"``: BatchNorm2d, the official choice and the default. Use it to reproduce the paper or to train on one
  fixed data distribution. Its running statistics are what evaluation uses, and in continual learning they follow
  the latest experience, so the refined attention of earlier tasks is evaluated with statistics they never produced.
* ``"instance"`` (GroupNorm with one group per channel: per-sample, per-channel statistics over the N x N map) or
  ``"layer"`` (GroupNorm with one group: per-sample statistics over all channels and positions): batch-independent,
  no running statistics, identical in training and evaluation. Use one of them for continual learning, for small or
  class-skewed batches (rehearsal, long-tailed streams), and for anything evaluated on a different distribution than
  the last training batches. ``"instance"`` is the closer analogue of BatchNorm's per-channel normalisation.

Prompt prefixes (the prompt methods L2P, DualPrompt, CODA-Prompt): :class:`RefinerAttention` takes a prefix
(P_k, P_v) prepended to its keys and values; the refiner and the carried map act on the token part of the map only.

Extending: the prefix tokens (class token, and e.g. a distillation token in a subclass) are handled only by timm's
``VisionTransformer._pos_embed`` and ``num_prefix_tokens``; ``RefinerViT`` changes only how blocks are chained
(``_run_blocks``), so timm's token/head mixins such as ``VisionTransformerDistilled`` compose with it by inheritance.
"""

import contextlib
import inspect
import logging
from functools import partial
from typing import Any, Callable, Dict, Final, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.layers.format import Format, nchw_to
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import adapt_input_conv, checkpoint
from timm.models import vision_transformer as vit

from cl_vit.errors import UserError

__all__ = ["RefinerViT", "Refiner", "RefinerAttention", "RefinerBlock", "ConvStem", "checkpoint_filter_fn",
           "UnknownArgument"]

_logger = logging.getLogger(__name__)

LAYOUTS = ("shared", "every")
NORMS = ("batch", "instance", "layer")

#: an attention map per block as get_attention_maps returns it
Maps = List[Dict[str, Optional[torch.Tensor]]]


class UnknownArgument(UserError, TypeError):
    """A keyword the model does not take: one line for the suite, a TypeError for timm's callers (create_model)."""


def conv_norm(kind: str, channels: int, device=None, dtype=None) -> nn.Module:
    """A normalisation over [B, C, H, W] maps: ``batch`` (official), ``instance`` or ``layer`` (batch-independent)."""
    dd = dict(device=device, dtype=dtype)
    if kind == "batch":
        return nn.BatchNorm2d(channels, **dd)
    if kind == "instance":
        return nn.GroupNorm(channels, channels, **dd)
    if kind == "layer":
        return nn.GroupNorm(1, channels, **dd)
    raise UserError(f"refiner norm {kind!r} is not one of {NORMS}: set model.refiner_norm to one of them")


class Refiner(nn.Module):
    """The official DLA: ``A + norm3(reduce(relu6(norm2(dw(relu6(norm1(expand(A))))))))`` over [B, H, N, N] maps.

    ``zero_init_last`` zero-initialises norm3's weight, which makes the module an exact identity at initialisation
    (in training mode too: the branch is 0 * normalised + 0).
    """

    def __init__(self, num_heads: int, expand_ratio: float = 3.0, kernel_size: int = 3, norm: str = "batch",
                 zero_init_last: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if kernel_size % 2 != 1:
            raise UserError(f"model.refiner_kernel_size={kernel_size} must be odd (same padding)")
        hidden = round(num_heads * expand_ratio)
        self.zero_init_last = zero_init_last
        # expand_ratio 1 skips the expansion, as in the official DLA
        self.expand = nn.Conv2d(num_heads, hidden, 1, bias=False, **dd) if hidden != num_heads else None
        self.norm1 = conv_norm(norm, hidden, **dd) if self.expand is not None else None
        self.dw = nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden, bias=False, **dd)
        self.norm2 = conv_norm(norm, hidden, **dd)
        self.reduce = nn.Conv2d(hidden, num_heads, 1, bias=False, **dd)
        self.norm3 = conv_norm(norm, num_heads, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        if self.zero_init_last:
            nn.init.zeros_(self.norm3.weight)

    def forward(self, attn: torch.Tensor) -> torch.Tensor:
        # channels_last, with the 1x1 convolutions as GEMMs over the NHWC view: on CPU ~1.1-1.5x faster than NCHW
        # convolutions (depthwise and 1x1 conv kernels are slow there); the result stays channels_last and callers
        # make it contiguous once
        attn = attn.contiguous(memory_format=torch.channels_last)
        x = attn
        if self.expand is not None:
            x = F.relu6(self.norm1(_conv1x1(self.expand.weight, x)), inplace=True)
        x = F.relu6(self.norm2(self.dw(x)), inplace=True)
        return attn + self.norm3(_conv1x1(self.reduce.weight, x))


@contextlib.contextmanager
def _running_stats_kept(modules: List[nn.Module]):
    """Batch norms that run as in any training step (batch statistics, the same saved tensors) and afterwards hold
    the running statistics and num_batches_tracked they had before: a recomputation must not count a batch twice."""
    bns = [m for mod in modules for m in mod.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
    try:
        yield
    finally:  # also when torch stops the recomputation early (it raises once it has what it needs)
        with torch.no_grad():
            for m, values in zip(bns, saved):
                for b, v in zip((m.running_mean, m.running_var, m.num_batches_tracked), values):
                    b.copy_(v)


def _conv1x1(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 convolution (of ``weight``) of a channels_last map as one matrix product (no copies either
    way)."""
    return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1)).permute(0, 3, 1, 2)


def _bn_forward(bn: nn.BatchNorm2d, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training-mode BatchNorm2d as its module runs it (running statistics updated once): (out, mean, invstd)."""
    bn.num_batches_tracked.add_(1)
    return torch.native_batch_norm(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, bn.momentum,
                                   bn.eps)


def _bn_apply(bn: nn.BatchNorm2d, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """The normalisation of a batch whose statistics are known: the recomputation skips their pass over the map."""
    alpha = bn.weight * invstd
    beta = bn.bias - mean * alpha
    return torch.addcmul(beta.view(1, -1, 1, 1), x, alpha.view(1, -1, 1, 1))


def _bn_backward(bn: nn.BatchNorm2d, g: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor):
    """(grad input, grad weight, grad bias) of a training-mode batch norm, the kernel autograd uses."""
    return torch.ops.aten.native_batch_norm_backward(g, x, bn.weight, None, None, mean, invstd, True, bn.eps,
                                                     [True, True, True])


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """A channels_last [B, C, H, W] map as its [B*H*W, C] matrix (a view)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _SharedRefinedProduct(torch.autograd.Function):
    """``adapt_norm(refiner(A)) @ v`` with batch norms (a share block in training), keeping for backward only A (as
    given, which the block that made it keeps anyway), v and the five norms' batch statistics: the backward
    recomputes the expanded maps with those statistics (no second pass to collect them, and the running statistics
    are updated once, in forward) and runs the kernels autograd would run on them (native_batch_norm_backward,
    hardtanh_backward, convolution_backward, matrix products)."""

    @staticmethod
    def forward(ctx, attn: torch.Tensor, v: torch.Tensor, refiner: "Refiner", adapt: nn.BatchNorm2d,
                *params: torch.Tensor) -> torch.Tensor:
        r = refiner
        a = attn.contiguous(memory_format=torch.channels_last)
        stats = []
        x, m, i = _bn_forward(r.norm1, _conv1x1(r.expand.weight, a))
        stats.append((m, i))
        x, m, i = _bn_forward(r.norm2, r.dw(F.relu6(x, inplace=True)))
        stats.append((m, i))
        x, m, i = _bn_forward(r.norm3, _conv1x1(r.reduce.weight, F.relu6(x, inplace=True)))
        stats.append((m, i))
        x, m, i = _bn_forward(adapt, a + x)
        stats.append((m, i))
        ctx.modules = (r, adapt)
        # the map as it came (the attend block's product with V keeps it anyway), not its channels_last copy: one
        # map less kept per share block, for a copy again in backward
        ctx.save_for_backward(attn, v, *[t for st in stats for t in st])
        return x.contiguous() @ v

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative fails in one line instead of silently
    def backward(ctx, g_out: torch.Tensor):
        r, adapt = ctx.modules
        attn, v, m1, i1, m2, i2, m3, i3, m4, i4 = ctx.saved_tensors
        # the forward again, with the saved statistics
        a = attn.contiguous(memory_format=torch.channels_last)
        e1 = _conv1x1(r.expand.weight, a)
        r1 = _bn_apply(r.norm1, e1, m1, i1).clamp_(0, 6)
        d = r.dw(r1)
        r2 = _bn_apply(r.norm2, d, m2, i2).clamp_(0, 6)
        p = _conv1x1(r.reduce.weight, r2)
        o = a + _bn_apply(r.norm3, p, m3, i3)
        z = _bn_apply(adapt, o, m4, i4).contiguous()
        # and backward through it
        g_z = g_out @ v.transpose(-2, -1)
        g_v = z.transpose(-2, -1) @ g_out
        del z
        g_o, gw4, gb4 = _bn_backward(adapt, g_z, o, m4, i4)
        del o, g_z
        g_p, gw3, gb3 = _bn_backward(r.norm3, g_o, p, m3, i3)
        del p
        gp2 = _pixels(g_p)
        g_wr = (gp2.t() @ _pixels(r2)).view_as(r.reduce.weight)
        g_r2 = (gp2 @ r.reduce.weight.flatten(1)).view(g_p.shape[0], g_p.shape[2], g_p.shape[3], -1).permute(
            0, 3, 1, 2)
        del g_p, gp2
        g_n2 = torch.ops.aten.hardtanh_backward(g_r2, r2, 0.0, 6.0)
        del g_r2, r2
        g_d, gw2, gb2 = _bn_backward(r.norm2, g_n2, d, m2, i2)
        del g_n2, d
        g_r1, g_wdw, _ = torch.ops.aten.convolution_backward(
            g_d, r1, r.dw.weight, None, r.dw.stride, r.dw.padding, r.dw.dilation, False, [0, 0], r.dw.groups,
            [True, True, False])
        del g_d
        g_n1 = torch.ops.aten.hardtanh_backward(g_r1, r1, 0.0, 6.0)
        del g_r1, r1
        g_e1, gw1, gb1 = _bn_backward(r.norm1, g_n1, e1, m1, i1)
        del g_n1, e1
        ge2 = _pixels(g_e1)
        g_we = (ge2.t() @ _pixels(a)).view_as(r.expand.weight)
        g_a = g_o + (ge2 @ r.expand.weight.flatten(1)).view(g_e1.shape[0], g_e1.shape[2], g_e1.shape[3],
                                                            -1).permute(0, 3, 1, 2)
        # gradients in the order of _SharedRefinedProduct.params
        return (g_a, g_v, None, None, g_we, gw1, gb1, g_wdw, gw2, gb2, g_wr, gw3, gb3, gw4, gb4)

    @staticmethod
    def params(refiner: "Refiner", adapt: nn.Module) -> Tuple[torch.Tensor, ...]:
        r = refiner
        return (r.expand.weight, r.norm1.weight, r.norm1.bias, r.dw.weight, r.norm2.weight, r.norm2.bias,
                r.reduce.weight, r.norm3.weight, r.norm3.bias, adapt.weight, adapt.bias)

    @staticmethod
    def applies(refiner: "Refiner", adapt: nn.Module) -> bool:
        """Batch norms with affine weights and a fixed momentum throughout, and an expansion (the official DLA)."""
        norms = (refiner.norm1, refiner.norm2, refiner.norm3, adapt)
        return refiner.expand is not None and all(
            type(n) is nn.BatchNorm2d and n.affine and n.track_running_stats and n.momentum is not None
            for n in norms) and refiner.dw.bias is None


class RefinerAttention(nn.Module):
    """Multi-head self-attention with a refined attention map.

    ``share``: the block computes no q/k and refines the map it receives (official odd blocks; its projection is
    ``v``). Otherwise the block computes ``softmax(q k^T)``; ``carry`` adds ``scale * A_prev``; ``refine`` applies the
    refiner to its own map (layout ``every``). A non-refining block whose map nobody downstream needs keeps timm's
    fused ``scaled_dot_product_attention``.

    Prompt prefixes (no official code; the design of docs/models.md "Prompt prefixes"): ``self.prefix = (P_k, P_v)``,
    B x L x C each, is prepended to the keys and values in embedding space and split into heads like them (as
    cl_vit/strategies/prompting.py does for timm's Attention). A map is then N x (L + N), prefix columns first; the
    softmax runs over all L + N keys, while the carried map (its token columns only) is added to, and the refiner
    convolves, the token part alone: prefix columns have no place in the token grid. A share block refines the token
    part of the map it receives; with a prefix of its own (of the map's prefix length: it has no keys, so P_k is
    unused) its P_v are the values of the map's prefix columns, without one those columns are dropped.
    """

    #: (P_k, P_v), B x L x C each, or None: set by the prompt methods for one forward pass (not a parameter)
    prefix: Optional[Tuple[torch.Tensor, torch.Tensor]]
    # constants to TorchScript, which then compiles only the branch a block takes (a share block has no qkv)
    share: Final[bool]
    refine: Final[bool]
    carry: Final[bool]

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, share: bool = False, refine: bool = False,
                 carry: bool = False, expand_ratio: float = 3.0, kernel_size: int = 3, norm: str = "batch",
                 adapt_norm: bool = True, zero_init_last: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        assert dim % num_heads == 0, "dim should be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.prefix = None
        self.share, self.refine, self.carry = share, refine and not share, carry and not share
        # recompute the attention maps in backward instead of keeping them (``_recomputing``), for maps of at least
        # ``recompute_min_tokens`` rows; False keeps them: the same gradients, more memory. Small maps (the 17-token
        # refiner_vit_tiny) cost little memory and recomputing them costs time: bench refiner, --recompute
        self.recompute = True
        self.recompute_min_tokens = 64
        if share:
            self.v = nn.Linear(dim, dim, bias=qkv_bias, **dd)  # official: `qkv` of width dim, i.e. V only
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        if share or self.refine:
            self.refiner = Refiner(num_heads, expand_ratio, kernel_size, norm, zero_init_last, **dd)
            self.adapt_norm = conv_norm(norm, num_heads, **dd) if adapt_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t: torch.Tensor, B: int, N: int) -> torch.Tensor:
        return t.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def _refined(self, attn: torch.Tensor, L: int) -> torch.Tensor:
        """The refiner (and adapt norm) over the token part of an N x (L + N) map; the L prefix columns pass as
        they are."""
        if L == 0:
            return self.adapt_norm(self.refiner(attn)).contiguous()
        return torch.cat((attn[..., :L], self.adapt_norm(self.refiner(attn[..., L:])).contiguous()), dim=-1)

    def _attend_map(self, q: torch.Tensor, k: torch.Tensor, prev: Optional[torch.Tensor],
                    L: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(attention map after dropout, softmax map) of an attend block's explicit attention."""
        # the official code scales q and k each by sqrt(scale); one multiply of q is the same product
        raw = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = raw
        if prev is not None:
            attn = torch.add(raw, prev, alpha=self.scale) if L == 0 else \
                torch.cat((raw[..., :L], torch.add(raw[..., L:], prev, alpha=self.scale)), dim=-1)
        return self.attn_drop(attn), raw

    # -- recomputation in backward (eager training only; TorchScript, FX and export see the plain forward) ---------

    def _recomputing(self, t: torch.Tensor) -> bool:
        """While training with gradients, the [B, H, N, N] maps (the softmax, the sum with the carried map, the
        refiner's expanded maps: e x the map's size, several of them) are not kept for backward but recomputed from
        the block's inputs, which are kept anyway. Keeping them, Refiner-ViT-S's training step at 224 needed 5.7x
        the memory of its plain twin (python -m cl_vit.bench refiner). The same operations run again in backward:
        the gradients are the ones keeping them gives."""
        return (not isinstance(t, torch.fx.Proxy) and not torch.jit.is_tracing() and self.recompute
                and self.training and torch.is_grad_enabled() and t.shape[-2] >= self.recompute_min_tokens)

    def _checkpointed(self, fn: Callable, *args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False,
                                                 preserve_rng_state=self.attn_drop.p > 0,
                                                 context_fn=self._recompute_contexts)

    def _recompute_contexts(self):
        """torch.utils.checkpoint's (forward, recomputation) contexts: the recomputation runs the batch norms on
        the same batch statistics without updating their running statistics a second time."""
        if not hasattr(self, "refiner"):
            return contextlib.nullcontext(), contextlib.nullcontext()
        return contextlib.nullcontext(), _running_stats_kept([self.refiner, self.adapt_norm])

    def _shared_product(self, src: torch.Tensor, v: torch.Tensor, L: int) -> torch.Tensor:
        return (self.adapt_norm(self.refiner(src)).contiguous() if L == 0 else self._refined(src, L)) @ v

    def _refined_product(self, q, k, v, prev, L):
        attn, _ = self._attend_map(q, k, prev, L)
        attn = self._refined(attn, L)
        return attn @ v, attn

    @torch.jit.unused
    def _shared_recomputed(self, src: torch.Tensor, v: torch.Tensor, L: int) -> torch.Tensor:
        if L == 0 and _SharedRefinedProduct.applies(self.refiner, self.adapt_norm):
            return _SharedRefinedProduct.apply(src, v, self.refiner, self.adapt_norm,
                                               *_SharedRefinedProduct.params(self.refiner, self.adapt_norm))
        return self._checkpointed(self._shared_product, src, v, L)

    @torch.jit.unused
    def _refined_recomputed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev: Optional[torch.Tensor],
                            L: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._checkpointed(self._refined_product, q, k, v, prev, L)

    @torch.jit.unused
    def _map_recomputed(self, q: torch.Tensor, k: torch.Tensor, prev: Optional[torch.Tensor], L: int) -> torch.Tensor:
        return self._checkpointed(self._attend_map, q, k, prev, L)[0]

    def forward(self, x: torch.Tensor, attn_prev: Optional[torch.Tensor] = None, need_map: bool = False,
                maps: Optional[Maps] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns (output, map for later blocks or None). ``maps``: a list to append {"raw", "refined"} to."""
        B, N, C = x.shape
        attn_next: Optional[torch.Tensor] = None
        prefix = self.prefix
        if prefix is not None and prefix[1].shape[1] == 0:
            prefix = None
        if self.share:
            if attn_prev is None:
                raise RuntimeError("a share block needs the attention map of an earlier block")
            L = attn_prev.shape[-1] - N  # the prefix columns of the map it reuses
            # (R * scale) @ v computed as R @ (v * scale): the scale touches [B, N, C] instead of [B, H, N, N]
            v = self._heads(self.v(x) * self.scale, B, N)
            # only the token part applies without a prefix (all of the map for L = 0: no branch on a traced shape)
            src, Ls = attn_prev[..., L:], 0
            if prefix is not None:
                if prefix[1].shape[1] != L:
                    raise UserError(
                        f"a Refiner-ViT share block got a prompt prefix of {prefix[1].shape[1]} tokens, but the "
                        f"attention map it reuses has {L} prefix columns: give it the prefix length of the attend "
                        "block before it, or no prefix")
                src, Ls = attn_prev, L
                v = torch.cat((self._heads(prefix[1].to(v.dtype) * self.scale, B, L), v), dim=2)
            recompute = False
            if not torch.jit.is_scripting():
                recompute = maps is None and self._recomputing(src)
            if recompute:
                out = self._shared_recomputed(src, v, Ls)
            else:
                attn = self.adapt_norm(self.refiner(src)).contiguous() if prefix is None else self._refined(src, Ls)
                if maps is not None:
                    entry: Dict[str, Optional[torch.Tensor]] = {"raw": attn_prev.detach(),
                                                                "refined": attn.detach() * self.scale}
                    maps.append(entry)
                out = attn @ v
            attn_next = attn_prev
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            v_tokens, L = v, 0
            if prefix is not None:
                L = prefix[0].shape[1]
                pk, pv = self._heads(prefix[0].to(k.dtype), B, L), self._heads(prefix[1].to(k.dtype), B, L)
                k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            prev: Optional[torch.Tensor] = None
            if self.carry and attn_prev is not None:  # the carried map's token columns only (all of a plain map)
                prev = attn_prev[..., -N:]
            explicit = self.refine or need_map or maps is not None
            if not explicit:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
                if prev is not None:
                    # softmax(qk)v + s*A_prev v: only the carried map needs an explicit product
                    out = out + prev @ (v_tokens * self.scale)
            else:
                recompute = False
                if not torch.jit.is_scripting():
                    recompute = maps is None and self._recomputing(q)
                if recompute and self.refine:  # the refined product, its maps recomputed in backward
                    out, attn = self._refined_recomputed(q, k, v, prev, L)
                    if need_map:
                        attn_next = attn
                elif recompute and (prev is not None or self.attn_drop.p > 0):
                    # the map passes on and is kept anyway: only the softmax map it sums (another tensor when a map
                    # is carried or dropped out) is recomputed, and attn @ v runs once
                    attn = self._map_recomputed(q, k, prev, L)
                    out = attn @ v
                    attn_next = attn
                else:
                    out, attn_next = self._explicit(q, k, v, prev, L, need_map, maps)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn_next

    def _explicit(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prev: Optional[torch.Tensor], L: int,
                  need_map: bool, maps: Optional[Maps]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """An attend block's explicit attention, every map kept: (attn @ v, the map for later blocks or None)."""
        attn, raw = self._attend_map(q, k, prev, L)
        refined: Optional[torch.Tensor] = None
        if self.refine:
            attn = self._refined(attn, L)
            refined = attn
        if maps is not None:
            record: Dict[str, Optional[torch.Tensor]] = {
                "raw": raw.detach(), "refined": None if refined is None else refined.detach()}
            maps.append(record)
        return attn @ v, (attn if need_map else None)


class RefinerBlock(nn.Module):
    """Pre-norm transformer block around :class:`RefinerAttention`, with timm's ``Block`` child names.

    ``residual_scale`` r: ``x + r * f(LN(x / r))`` (official r = 2, its ``adjust_ratio`` 0.5). LN(x / r) with eps
    equals LN(x) with eps * r^2 (bit for bit when r is a power of two), so the norms carry that eps and the division
    is never computed. ``mlp_init_values``: LayerScale on the MLP branch only (official 1e-5); ``init_values``:
    LayerScale on both branches (timm's ViT option).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 init_values: Optional[float] = None, drop_path: float = 0.0, act_layer=nn.GELU,
                 norm_layer=nn.LayerNorm, mlp_layer=Mlp, depth: int = 0, layout: str = "shared",
                 residual_scale: float = 1.0, mlp_init_values: Optional[float] = None, refiner_args=None,
                 qk_norm: bool = False, scale_attn_norm: bool = False, scale_mlp_norm: bool = False,
                 attn_layer=None, device=None, dtype=None):
        super().__init__()
        # what timm's VisionTransformer passes every block_fn: options a refined attention cannot honour are refused
        for k, v in (("qk_norm", qk_norm), ("scale_attn_norm", scale_attn_norm), ("scale_mlp_norm", scale_mlp_norm)):
            if v:
                raise UserError(f"model.{k}=true is not supported by Refiner-ViT: remove it")
        if attn_layer not in (None, "attn", vit.Attention):
            raise UserError(f"model.attn_layer={getattr(attn_layer, '__name__', attn_layer)!r} is not supported by "
                            "Refiner-ViT (its attention is RefinerAttention): remove it")
        dd = dict(device=device, dtype=dtype)
        self.index = depth  # timm passes the block index as `depth`
        share = layout == "shared" and depth % 2 == 1
        self.residual_scale = residual_scale
        if residual_scale != 1.0:
            eps = norm_layer(1).eps * residual_scale ** 2
            norm_layer = partial(norm_layer, eps=eps)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = RefinerAttention(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop,
            share=share, refine=layout == "every", carry=layout == "shared", **(refiner_args or {}), **dd)
        self.ls1 = LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             bias=proj_bias, drop=proj_drop, **dd)
        ls2 = mlp_init_values or init_values
        self.ls2 = LayerScale(dim, init_values=ls2, **dd) if ls2 else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def is_share(self) -> bool:
        return self.attn.share

    def forward(self, x: torch.Tensor, attn_prev: Optional[torch.Tensor] = None, need_map: bool = False,
                maps: Optional[Maps] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        r = self.residual_scale  # the norms' eps holds the division by r (see the class docstring)
        y, attn_next = self.attn(self.norm1(x), attn_prev, need_map, maps)
        x = torch.add(x, self.drop_path1(self.ls1(y)), alpha=r)
        x = torch.add(x, self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), alpha=r)
        return x, attn_next


class ConvStem(PatchEmbed):
    """The official convolutional patch embedding: 7x7/2 conv (32 channels), 3x3 (64), 3x3 (128), each with norm and
    ReLU, then a conv with kernel = stride = patch_size / 2 to the embedding width; total stride = patch_size.

    A drop-in for timm's ``PatchEmbed`` (same grid bookkeeping, output formats and size checks). patch_size must be
    even: at 8x8 inputs patch_size=2 gives a 4x4 token grid.
    """

    def __init__(self, img_size: Optional[Union[int, Tuple[int, int]]] = 224, patch_size: int = 16,
                 in_chans: int = 3, embed_dim: int = 768, norm_layer: Optional[Callable] = None,
                 flatten: bool = True, output_fmt: Optional[str] = None, bias: bool = True,
                 strict_img_size: bool = True, dynamic_img_pad: bool = False, stem_norm: str = "batch",
                 stem_chs: Tuple[int, int, int] = (32, 64, 128), device=None, dtype=None):
        nn.Module.__init__(self)
        dd = dict(device=device, dtype=dtype)
        p = int(patch_size[0] if isinstance(patch_size, (tuple, list)) else patch_size)
        if p < 2 or p % 2:
            raise UserError(f"model.patch_size={patch_size} does not fit the conv stem (stride 2 then patch/2): "
                            "use an even patch size, or model.stem=patch")
        self.patch_size = (p, p)
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)
        if output_fmt is not None:
            self.flatten, self.output_fmt = False, Format(output_fmt)
        else:
            self.flatten, self.output_fmt = flatten, Format.NCHW
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        c1, c2, c3 = stem_chs
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c1, 7, stride=2, padding=3, bias=False, **dd), conv_norm(stem_norm, c1, **dd),
            nn.ReLU(True),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False, **dd), conv_norm(stem_norm, c2, **dd), nn.ReLU(True),
            nn.Conv2d(c2, c3, 3, padding=1, bias=False, **dd), conv_norm(stem_norm, c3, **dd), nn.ReLU(True),
        )
        self.proj = nn.Conv2d(c3, embed_dim, kernel_size=p // 2, stride=p // 2, bias=bias, **dd)
        self.norm = norm_layer(embed_dim, **dd) if norm_layer else nn.Identity()

    def set_input_size(self, img_size=None, patch_size=None):
        if patch_size is not None and tuple(to_2tuple(patch_size)) != self.patch_size:
            raise UserError("the conv stem's patch size is fixed at construction: build a new model instead")
        super().set_input_size(img_size=img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None:
            if self.strict_img_size:
                torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
                torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
            elif not self.dynamic_img_pad:
                torch._assert(H % ph == 0 and W % pw == 0, f"Input {H}x{W} should be divisible by patch size {ph}.")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (pw - W % pw) % pw, 0, (ph - H % ph) % ph))
        # channels_last: the stem's convolutions run ~1.1-1.2x faster on CPU, and flatten + transpose of the
        # channels_last output is already a contiguous [B, N, C]
        x = self.proj(self.stem(x.contiguous(memory_format=torch.channels_last)))
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt != Format.NCHW:
            x = nchw_to(x, self.output_fmt)
        return self.norm(x)


class RefinerViT(vit.VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks refine their attention maps (see the module docstring).

    Args (beyond timm's VisionTransformer):
        layout: ``"shared"`` (released code: attend/share pairs, maps carried) or ``"every"`` (paper: each block
            refines its own map; equals a ViT at initialisation).
        stem: ``"conv"`` (official conv stem, total stride patch_size) or ``"patch"`` (timm's linear patch embedding).
        refiner_norm: ``"batch"`` (official), ``"instance"`` or ``"layer"``; see the module docstring for when.
        stem_norm: the conv stem's norm (default: the same as ``refiner_norm``).
        refiner_expand: the refiner's expansion ratio e (official 3, also for the models whose ``head_expand`` is 6:
            the official share blocks never receive it). refiner_kernel_size: its depthwise kernel (official 3).
        adapt_norm: the extra norm after the refiner (official ``adapt_bn``; default: on for ``shared``, off for
            ``every``, where it would break the exact ViT identity).
        zero_init_refiner: zero-initialise the refiner's last norm (default: on for ``every``, off for ``shared``).
        residual_scale: r in ``x + r * f(LN(x / r))`` (official 2). mlp_init_values: LayerScale on the MLP branch
            only (official 1e-5).
        return_dense: the official token-labelling head ``aux_head`` on the patch tokens (scripts/refiner_l.yaml
            L98); the logits are then ``head(cls) + 0.5 * max over patches of aux_head(patches)``, the official
            evaluation (models/refined_transformer.py L466-468). In training ``forward_outputs`` gives the class
            token's logits and the dense ones apart (strategy=token_label adds their loss, as Refiner-ViT-L trains).
    """

    def __init__(self, *args, layout: str = "shared", stem: str = "conv", refiner_norm: str = "batch",
                 stem_norm: Optional[str] = None, refiner_expand: float = 3.0, refiner_kernel_size: int = 3,
                 adapt_norm: Optional[bool] = None, zero_init_refiner: Optional[bool] = None,
                 residual_scale: float = 1.0, mlp_init_values: Optional[float] = None, return_dense: bool = False,
                 **kwargs):
        if layout not in LAYOUTS:
            raise UserError(f"model.layout={layout!r} is not one of {LAYOUTS}")
        if stem not in ("conv", "patch"):
            raise UserError(f"model.stem={stem!r} is not one of ('conv', 'patch')")
        for key, value in (("refiner_norm", refiner_norm), ("stem_norm", stem_norm or refiner_norm)):
            if value not in NORMS:
                raise UserError(f"model.{key}={value!r} is not one of {NORMS}")
        for key in ("block_fn", "embed_layer"):
            if key in kwargs:
                raise UserError(f"model.{key} is fixed by Refiner-ViT: use model.layout / model.stem instead")
        unknown = sorted(set(kwargs) - _VIT_KWARGS)
        if unknown:
            raise UnknownArgument(f"model.{unknown[0]} is not an argument of Refiner-ViT (timm VisionTransformer's "
                                  f"or {sorted(_OWN_KWARGS)}): remove it or check its spelling")
        self.layout, self.stem_type, self.refiner_norm = layout, stem, refiner_norm
        refiner_args = dict(
            expand_ratio=refiner_expand, kernel_size=refiner_kernel_size, norm=refiner_norm,
            adapt_norm=(layout == "shared") if adapt_norm is None else adapt_norm,
            zero_init_last=(layout == "every") if zero_init_refiner is None else zero_init_refiner,
        )
        block_fn = partial(RefinerBlock, layout=layout, residual_scale=residual_scale,
                           mlp_init_values=mlp_init_values, refiner_args=refiner_args)
        embed_layer = partial(ConvStem, stem_norm=stem_norm or refiner_norm) if stem == "conv" else PatchEmbed
        img_size, patch_size = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
        _check_grid(img_size, patch_size, kwargs.get("dynamic_img_size", False))
        super().__init__(*args, block_fn=block_fn, embed_layer=embed_layer, **kwargs)
        # the blocks pass (x, map) along and are chained by _run_blocks: a ModuleList (same state-dict keys), as a
        # Sequential's own forward cannot chain them (and TorchScript would compile it)
        self.blocks = nn.ModuleList(self.blocks)
        self.return_dense = bool(return_dense)
        self._reset_aux_head()

    def _reset_aux_head(self) -> None:
        # None without return_dense: no module, no state-dict keys, and TorchScript compiles the head without it
        self.aux_head: Optional[nn.Module] = None
        if self.return_dense:
            dd = get_device_dtype(self)
            self.aux_head = nn.Linear(self.embed_dim, self.num_classes, **dd) if self.num_classes > 0 else nn.Identity()
            if isinstance(self.aux_head, nn.Linear):  # official _init_weights: trunc_normal(0.02), zero bias
                trunc_normal_(self.aux_head.weight, std=0.02)
                nn.init.zeros_(self.aux_head.bias)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self._reset_aux_head()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # timm's head spelled out (TorchScript compiles no super() call), plus the dense head
        out = self.head_drop(self.fc_norm(self.pool(x)))
        if pre_logits:
            return out
        out = self.head(out)
        if self.aux_head is not None:
            out = self._with_dense(out, self.aux_head(x[:, self.num_prefix_tokens:]))
        return out

    def _with_dense(self, logits: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """The official evaluation's logits with the dense head: the class token's plus 0.5 x the dense head's max
        over patches (models/refined_transformer.py L466-467)."""
        return logits + 0.5 * dense.max(1)[0]

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode=mode, needs_reset=needs_reset)
        if self.layout == "shared" and self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)  # official init (timm's ViT uses normal(std=1e-6))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Union[str, List]]:
        return dict(
            stem=r"^cls_token|reg_token|dist_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    def _maps_needed(self) -> List[bool]:
        """Per block: whether a later block consumes its attention map (the next block shares it, or a later
        attend block carries it). Blocks whose map is not needed keep the fused attention kernel. Read from the
        blocks at each call (pruned or edited blocks count), in plain loops that TorchScript compiles."""
        share: List[bool] = []
        carry: List[bool] = []
        for blk in self.blocks:
            share.append(blk.attn.share)
            carry.append(blk.attn.carry)
        need: List[bool] = []
        for i in range(len(share)):
            carried = False
            for j in range(i + 1, len(share)):
                carried = carried or carry[j]
            nxt_share = i + 1 < len(share) and share[i + 1]
            need.append(not share[i] and (nxt_share or (carry[i] and carried)))
        return need

    def _run_blocks(self, x: torch.Tensor, take_indices: Optional[List[int]] = None, maps: Optional[Maps] = None,
                    stop_at: Optional[int] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Chain the blocks, passing attention maps along; returns (x, [x after each block in take_indices])."""
        attn: Optional[torch.Tensor] = None
        taken: List[torch.Tensor] = []
        take: List[int] = []
        if take_indices is not None:
            take = take_indices
        need = self._maps_needed()
        for i, blk in enumerate(self.blocks):
            # stop_at: blocks after it are not run (a loop over a ModuleList cannot break in TorchScript, and a
            # sliced one cannot be scripted)
            if stop_at is None or i <= stop_at:
                if not torch.jit.is_scripting() and self.grad_checkpointing and maps is None \
                        and torch.is_grad_enabled():
                    x, attn_next = _checkpoint_block(blk, x, attn, need[i])
                else:
                    x, attn_next = blk(x, attn, need[i], maps)
                if not blk.attn.share:
                    attn = attn_next  # a share block passes on the map it received (official)
                if i in take:
                    taken.append(x)
        return x, taken

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # all prefix-token handling lives here (class, register, distillation tokens)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    # forward(x) and forward_features(x) take no attention mask (a refined map is a full map): timm's
    # ``attn_mask=None, is_causal=False`` would become inputs of an FX trace, which cannot branch on them
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self._run_blocks(self._embed(x))
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def forward_outputs(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The suite's outputs (cl_vit.module.net_outputs): ``logits`` and ``pre_logits``. With the dense head, as the
        official forward (models/refined_transformer.py L461-476): in training ``logits`` is the class token's alone
        and ``dense_logits`` (B x patches x classes) the head on every patch token, which strategy=token_label
        trains; in evaluation ``logits`` is ``forward``'s, the class token's plus 0.5 x the max over patches."""
        feats = self.forward_features(x)
        pre = self.forward_head(feats, pre_logits=True)
        out = {"logits": self.head(pre), "pre_logits": pre}
        if self.aux_head is not None:
            dense = self.aux_head(feats[:, self.num_prefix_tokens:])
            if self.training:
                out["dense_logits"] = dense
            else:
                out["logits"] = self._with_dense(out["logits"], dense)
        return out

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              output_dict: bool = False, attn_mask: Optional[torch.Tensor] = None,
                              is_causal: bool = False) -> Any:
        """timm's forward_intermediates contract (NCHW or NLC intermediates, prefix tokens split off)."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("Refiner-ViT refines full attention maps: attn_mask/is_causal are not supported")
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x, intermediates = self._run_blocks(self._embed(x), take_indices, stop_at=max_index if stop_early else None)
        intermediates = [self.norm(y) if norm else y for y in intermediates]
        npt = self.num_prefix_tokens
        prefix = [y[:, :npt] for y in intermediates] if npt else None
        intermediates = [y[:, npt:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            intermediates = list(zip(intermediates, prefix))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> List[Dict[str, Optional[torch.Tensor]]]:
        """The attention maps of every block for a batch, in eval mode without gradients.

        One dict per block: ``"raw"`` [B, H, N, N] is the softmax map the block computed (for a share block: the map
        it received); ``"refined"`` [B, H, N, N] is the map the block multiplied with V after the refiner, or None
        for a block that does not refine. N counts the prefix tokens first (index 0 = class token). While prompt
        prefixes are set (:class:`RefinerAttention`), a map has L + N columns, the L prompt columns first.
        """
        was_training = self.training
        self.eval()
        try:
            maps: list = []
            self._run_blocks(self._embed(x), maps=maps)
        finally:
            self.train(was_training)
        return maps


def _checkpoint_block(blk: RefinerBlock, x: torch.Tensor, attn: Optional[torch.Tensor], need_map: bool):
    """Gradient checkpointing that leaves BatchNorm running statistics as one forward pass leaves them: the
    recomputation during backward would otherwise update them a second time with the same batch."""
    calls = []

    def run(x, attn):
        if calls and blk.training:
            with _running_stats_kept([blk]):
                return blk(x, attn, need_map)
        calls.append(1)
        return blk(x, attn, need_map)

    return checkpoint(run, x, attn)


#: names the ViT twins had before: they read as the official Refiner-ViT-S and were not (build_model says so)
RENAMED = {f"refiner_vit_{size}_patch16_224": f"vit_{size}_patch16_224_refined" for size in ("tiny", "small", "base")}

#: keyword arguments RefinerViT passes on to timm's VisionTransformer, and its own; anything else is refused
_VIT_KWARGS = set(inspect.signature(vit.VisionTransformer.__init__).parameters) - {"self", "args", "kwargs"}
_OWN_KWARGS = {"layout", "stem", "refiner_norm", "stem_norm", "refiner_expand", "refiner_kernel_size", "adapt_norm",
               "zero_init_refiner", "residual_scale", "mlp_init_values", "return_dense"}


def _check_grid(img_size, patch_size, dynamic: bool) -> None:
    if img_size is None or dynamic:
        return
    img = to_2tuple(img_size)
    p = to_2tuple(patch_size)
    if any(i < q for i, q in zip(img, p)):
        raise UserError(
            f"Refiner-ViT at {img[0]}x{img[1]} input with patch_size {p[0]} has no tokens: pass a smaller "
            f"model.patch_size (e.g. model.patch_size={max(2, img[0] // 4)}) or use model=refiner_vit_tiny")


# official checkpoint names -> these modules (models/refined_transformer.py, models/refiner_utils.py)
_OFFICIAL_RENAMES = (
    ("patch_embed.conv1.", "patch_embed.stem.0."), ("patch_embed.bn1.", "patch_embed.stem.1."),
    ("patch_embed.conv2.", "patch_embed.stem.3."), ("patch_embed.bn2.", "patch_embed.stem.4."),
    ("patch_embed.conv3.", "patch_embed.stem.6."), ("patch_embed.bn3.", "patch_embed.stem.7."),
    (".attn.DLA.conv_exp.", ".attn.refiner.expand."), (".attn.DLA.bn1.", ".attn.refiner.norm1."),
    (".attn.DLA.depth_sep_conv.", ".attn.refiner.dw."), (".attn.DLA.bn2.", ".attn.refiner.norm2."),
    (".attn.DLA.conv_pro.", ".attn.refiner.reduce."), (".attn.DLA.bn3.", ".attn.refiner.norm3."),
    (".attn.adapt_bn.", ".attn.adapt_norm."), (".mlp.scale_channel", ".ls2.gamma"),
)


def _convert_official(state_dict: Dict[str, torch.Tensor], model: RefinerViT) -> Dict[str, torch.Tensor]:
    out = {}
    share = {i for i, b in enumerate(model.blocks) if b.is_share}
    for k, v in state_dict.items():
        if k.startswith("aux_head.") and not getattr(model, "return_dense", False):
            # return_dense=True (token labelling; scripts/refiner_l.yaml L98): the official evaluation adds
            # 0.5 x max over patches of aux_head to the class-token logits (models/refined_transformer.py L466-468)
            raise UserError("this official Refiner-ViT checkpoint carries the dense auxiliary head aux_head "
                            "(return_dense / token labelling), whose logits the official evaluation adds "
                            "(x_cls + 0.5 x max over patches): load it with model.return_dense=true")
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(old, new)
        parts = k.split(".")
        if parts[0] == "blocks" and int(parts[1]) in share and parts[2:4] == ["attn", "qkv"]:
            k = ".".join(parts[:3] + ["v"] + parts[4:])
        out[k] = v
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RefinerViT) -> Dict[str, torch.Tensor]:
    """Adapt a checkpoint to ``model``: an official Refiner-ViT checkpoint (names mapped), or a timm ViT state dict.

    From a ViT: timm's own filter resamples position / patch embeddings; a share block takes the V third of the
    ViT's qkv; the refiner, its adapt norm and LayerScales the ViT lacks keep the model's initialisation (for the
    ``every`` layout an exact identity, so the outputs equal the ViT's); a patch embedding that does not fit a conv
    stem is left at initialisation with a warning. Input channels are adapted as timm does for pretrained weights.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    if any(".attn.DLA." in k or k.startswith("patch_embed.conv1.") for k in state_dict):
        state_dict = _convert_official(state_dict, model)
    own = model.state_dict()
    pe = "patch_embed.proj.weight"
    if pe in state_dict and state_dict[pe].ndim == 4 and pe in own:
        w, target = state_dict[pe], own[pe]
        if isinstance(model.patch_embed, ConvStem) and w.shape[1] != target.shape[1]:
            _logger.warning("checkpoint patch embedding %s does not fit the conv stem: left at initialisation",
                            tuple(w.shape))
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("patch_embed.proj.")}
        elif w.shape[1] != target.shape[1] and not isinstance(model.patch_embed, ConvStem):
            state_dict = dict(state_dict)
            state_dict[pe] = adapt_input_conv(target.shape[1], w)
    first = "patch_embed.stem.0.weight"
    if first in state_dict and first in own and state_dict[first].shape[1] != own[first].shape[1]:
        state_dict = dict(state_dict)
        state_dict[first] = adapt_input_conv(own[first].shape[1], state_dict[first])
    out = vit.checkpoint_filter_fn(state_dict, model)
    for i, blk in enumerate(model.blocks):
        qkv, v = f"blocks.{i}.attn.qkv.", f"blocks.{i}.attn.v."
        if blk.is_share and f"{qkv}weight" in out and out[f"{qkv}weight"].shape[0] == 3 * model.embed_dim:
            for name in ("weight", "bias"):
                t = out.pop(qkv + name, None)
                if t is not None:
                    out[v + name] = t[2 * model.embed_dim:]  # the rows of V in timm's [q; k; v] layout
    fill = (".attn.refiner.", ".attn.adapt_norm.", ".ls1.gamma", ".ls2.gamma", "patch_embed.")
    for k, t in own.items():
        if k not in out and any(f in k for f in fill):
            out[k] = t.clone()
    return out


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),  # official default_cfgs
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.stem.0",
        "classifier": "head",
        **kwargs,
    }


def _vit_mirror_cfgs(arch: str, vit_arch: str) -> Dict[str, Dict[str, Any]]:
    """One cfg per pretrained tag of a timm ViT: `pretrained=True` fetches that ViT's weights from the HF hub and
    converts them with checkpoint_filter_fn (the refiner starts as an identity)."""
    out = {}
    for tag in vit.default_cfgs[vit_arch].tags:
        cfg = vit.default_cfgs[vit_arch].cfgs[tag].to_dict()
        hub = cfg.get("hf_hub_id")
        cfg.update(url="", custom_load=False, hf_hub_id=f"{hub}{vit_arch}.{tag}" if hub == "timm/" else hub,
                   first_conv="patch_embed.proj")
        out[f"{arch}.{tag}"] = cfg
    return out


default_cfgs = generate_default_cfgs({
    # no downloadable weights: the official checkpoints live on Google Drive (see the official README)
    "refiner_vit_tiny.untrained": _cfg(num_classes=10, input_size=(1, 8, 8), crop_pct=1.0, fixed_input_size=False,
                                       first_conv="patch_embed.proj"),
    "refiner_vit_s.untrained": _cfg(crop_pct=0.9),
    "refiner_vit_m.untrained": _cfg(crop_pct=1.0),
    "refiner_vit_l.untrained": _cfg(crop_pct=1.13),
    **_vit_mirror_cfgs("vit_tiny_patch16_224_refined", "vit_tiny_patch16_224"),
    **_vit_mirror_cfgs("vit_small_patch16_224_refined", "vit_small_patch16_224"),
    **_vit_mirror_cfgs("vit_base_patch16_224_refined", "vit_base_patch16_224"),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> RefinerViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        RefinerViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


# official Refiner_ViT_S/M/L: patch 16 via the conv stem, MLP ratio 3, qkv bias, LayerNorm eps 1e-6 (timm's
# LayerNorm default), doubled residual, LayerScale 1e-5 on the MLP, attend/share block pairs
_OFFICIAL = dict(patch_size=16, mlp_ratio=3.0, qkv_bias=True, layout="shared", stem="conv", residual_scale=2.0,
                 mlp_init_values=1e-5)
# the ViT twins vit_{tiny,small,base}_patch16_224_refined: ViT geometry, every block refined, identical to timm's ViT
# at load time. Named after the ViT they mirror, so that they cannot be taken for the official Refiner-ViT-S/M/L.
_VIT = dict(patch_size=16, mlp_ratio=4.0, qkv_bias=True, layout="every", stem="patch")


@register_model
def refiner_vit_tiny(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-Tiny for 8x8 inputs on CPU: 4 blocks (2 attend/share pairs), width 64, 4 heads, patch 2 with a
    linear patch embedding (16 tokens + class token); the official layout otherwise. ``stem="conv"`` also works
    at 8x8 (patch 2: a 7x7/2 conv then a 1x1 projection)."""
    args = dict(_OFFICIAL, img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, stem="patch")
    return _create("refiner_vit_tiny", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def refiner_vit_s(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-S (official): 16 blocks, width 384, 12 heads; 25.0M parameters at 224 with 1000 classes."""
    args = dict(_OFFICIAL, embed_dim=384, depth=16, num_heads=12)
    return _create("refiner_vit_s", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def refiner_vit_m(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-M (official): 32 blocks, width 420, 12 heads; 55.0M parameters at 224 with 1000 classes."""
    args = dict(_OFFICIAL, embed_dim=420, depth=32, num_heads=12)
    return _create("refiner_vit_m", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def refiner_vit_l(pretrained: bool = False, **kwargs) -> RefinerViT:
    """Refiner-ViT-L (official): 32 blocks, width 512, 16 heads; 80.6M parameters at 224 with 1000 classes."""
    args = dict(_OFFICIAL, embed_dim=512, depth=32, num_heads=16)
    return _create("refiner_vit_l", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_tiny_patch16_224_refined(pretrained: bool = False, **kwargs) -> RefinerViT:
    """A ViT-Ti/16 twin (not an official Refiner-ViT): timm's vit_tiny_patch16_224 with every block's attention
    refined (layout "every"); loads any vit_tiny_patch16_224 weights with unchanged outputs."""
    args = dict(_VIT, embed_dim=192, depth=12, num_heads=3)
    return _create("vit_tiny_patch16_224_refined", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_small_patch16_224_refined(pretrained: bool = False, **kwargs) -> RefinerViT:
    """A ViT-S/16 twin (not an official Refiner-ViT): timm's vit_small_patch16_224 with every block's attention
    refined (layout "every"); loads any vit_small_patch16_224 weights with unchanged outputs."""
    args = dict(_VIT, embed_dim=384, depth=12, num_heads=6)
    return _create("vit_small_patch16_224_refined", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def vit_base_patch16_224_refined(pretrained: bool = False, **kwargs) -> RefinerViT:
    """A ViT-B/16 twin (not an official Refiner-ViT): timm's vit_base_patch16_224 with every block's attention
    refined (layout "every"); loads any vit_base_patch16_224 weights with unchanged outputs."""
    args = dict(_VIT, embed_dim=768, depth=12, num_heads=12)
    return _create("vit_base_patch16_224_refined", pretrained=pretrained, **dict(args, **kwargs))
