"""Gated class-attention with cascaded feature drift compensation (GCAB + CFDC; Cotogni et al., 2022).

"Exemplar-free Continual Learning of Vision Transformers via Gated Class-Attention and Cascaded Feature Drift
Compensation", arXiv:2211.12292; official code github.com/OcraM17/GCAB-CFDC (built on DyTox,
github.com/arthurdouillard/dytox). Layout of the network (:class:`GatedNet`):

    image -> the backbone's blocks except the last (the self-attention blocks, SABs) -> patch features F(x)
          -> for every task c: [P_T ... P_{c+1}] (inference only) -> gated class-attention block (one shared CAB,
             queried by task c's token, gated by task c's masks) -> task c's head (LayerNorm + Linear)
          -> the heads' logits concatenated over every class of the stream

The CAB is CaiT's class attention (only the task token queries) with HAT-style masks g = sigmoid(s * e) from per-task
embeddings e0 (width D) and e2 (MLP width) on its inputs and outputs (official: continual/convit.py, ClassAttention
and Block). Tasks before the last use the binarised mask 1[sigmoid(s e) > 0.5]. The policy (s annealing, the mask
regulariser, gradient masking, projector training, freezing) lives in the strategy, cl_vit/strategies/gcab.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from timm.layers import DropPath, trunc_normal_

from cl_vit.errors import UserError

#: the official s_max (options/model/cifar_GCAB_FDC.yaml: smax 800)
S_MAX = 800.0


def _init_linear(m: nn.Module) -> None:
    # DyTox/ConViT _init_weights: trunc_normal(0.02) weights, zero biases
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class GatedClassAttention(nn.Module):
    """Class attention whose query, keys, values and projection are gated by the task's mask ``m0`` (width D)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"gated class attention: width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, m0: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 1 + N, D) normalised [task token, patches]; returns the token's update (B, 1, D)."""
        B, N, C = x.shape
        H = self.num_heads
        xm = x * m0
        q = (self.q(xm[:, :1]) * m0).reshape(B, 1, H, C // H).transpose(1, 2)
        k = (self.k(xm) * m0).reshape(B, N, H, C // H).transpose(1, 2)
        v = self.v(xm).reshape(B, N, H, C // H).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(B, 1, C) * m0
        return self.proj_drop(self.proj(out)) * m0


class GatedMlp(nn.Module):
    """fc1 -> GELU -> fc2 with the input and output gated by ``m0`` and the hidden units by ``m2``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, m0: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.fc1(x * m0))) * m2
        return self.drop(self.fc2(x) * m0)


class GatedClassAttentionBlock(nn.Module):
    """CaiT's class-attention block (only the task token is updated), gated per task."""

    def __init__(self, dim: int, num_heads: int, hidden: int, qkv_bias: bool = False, drop_path: float = 0.0,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = GatedClassAttention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GatedMlp(dim, hidden)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.apply(_init_linear)

    def forward(self, token: torch.Tensor, patches: torch.Tensor, m0: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        """``token`` (B, 1, D), ``patches`` (B, N, D) -> the updated token (B, 1, D)."""
        x = self.norm1(torch.cat((token, patches), dim=1))
        token = token + self.drop_path(self.attn(x, m0))
        return token + self.drop_path(self.mlp(self.norm2(token), m0, m2))

    def gated_parameters(self, m0: torch.Tensor, m2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Which entries of each gated weight a task with binary masks (m0, m2) uses: name -> 0/1 tensor.

        The official get_view_for (continual/GCAB.py) for q, k, v, proj, fc1, fc2; biases of q, k, v (the official
        ConViT has none) follow their output mask.
        """
        a, mlp = self.attn, self.mlp
        outer00 = torch.outer(m0, m0)
        views = {"attn.q.weight": outer00, "attn.k.weight": outer00, "attn.v.weight": outer00,
                 "attn.proj.weight": outer00, "attn.proj.bias": m0,
                 "mlp.fc1.weight": torch.outer(m2, m0), "mlp.fc1.bias": m2,
                 "mlp.fc2.weight": torch.outer(m0, m2), "mlp.fc2.bias": m0}
        if a.q.bias is not None:
            views.update({"attn.q.bias": m0, "attn.k.bias": m0, "attn.v.bias": m0})
        return views

    @torch.no_grad()
    def init_from_block(self, block: nn.Module) -> bool:
        """Seed the CAB with a timm ViT block's weights (qkv split into q, k, v) when every shape fits.

        In the official code the TAB *is* the backbone's last block (DyTox: ``tabs = blocks[local_up_to_layer:]``),
        so with a pre-trained backbone its weights carry over; a block of another kind leaves the DyTox init.
        """
        try:
            attn, mlp = block.attn, block.mlp
            qkv, proj, fc1, fc2 = attn.qkv, attn.proj, mlp.fc1, mlp.fc2
            norms = (block.norm1, block.norm2)
        except AttributeError:
            return False
        own = self.attn
        D = own.q.weight.shape[0]
        fits = (
            isinstance(qkv, nn.Linear) and qkv.weight.shape == (3 * D, D)
            and (qkv.bias is not None) == (own.q.bias is not None)
            and proj.weight.shape == own.proj.weight.shape
            and fc1.weight.shape == self.mlp.fc1.weight.shape and fc2.weight.shape == self.mlp.fc2.weight.shape
            and all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.weight.shape == (D,) for n in norms)
            and isinstance(getattr(mlp, "act", None), nn.GELU)
        )
        if not fits:
            return False
        for i, lin in enumerate((own.q, own.k, own.v)):
            lin.weight.copy_(qkv.weight[i * D:(i + 1) * D])
            if lin.bias is not None:
                lin.bias.copy_(qkv.bias[i * D:(i + 1) * D])
        for dst, src in ((own.proj, proj), (self.mlp.fc1, fc1), (self.mlp.fc2, fc2), (self.norm1, norms[0]),
                         (self.norm2, norms[1])):
            dst.load_state_dict(src.state_dict())
        return True


class DriftProjector(nn.Sequential):
    """P_t: maps the patch features of model t to the feature space of model t-1, token by token.

    Linear(D, D) -> LayerNorm -> ReLU -> Linear(D, D), the linear layers acting on each token. The official
    projector (main.py) is Conv2d 1x1 -> ``LayerNorm((384, 1, 64))`` -> ReLU -> Conv2d 1x1 on the (B, D, 1, N)
    tokens: its LayerNorm normalises all 64 tokens of a 32-px CIFAR image jointly, with an affine weight per (channel,
    token). ``n_tokens=None`` (the default, as the issue asks) normalises each token on its own, so the projector
    works for any number of tokens; ``n_tokens=N`` is the official joint normalisation over the N tokens of an image
    (``LayerNorm((N, D))`` on (B, N, D)), which keeps the tokens' relative norms but ties P_t to N tokens.
    """

    def __init__(self, dim: int, n_tokens: int | None = None):
        norm = nn.LayerNorm(dim) if n_tokens is None else nn.LayerNorm((int(n_tokens), dim))
        super().__init__(nn.Linear(dim, dim), norm, nn.ReLU(), nn.Linear(dim, dim))


class TaskHead(nn.Module):
    """DyTox's ContinualClassifier: LayerNorm + Linear over one task's classes."""

    def __init__(self, dim: int, n_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def sab_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """F(x): the patch tokens after the SABs of a truncated backbone (see :class:`GatedNet`), (B, N, D).

    The backbone's own ``forward_features`` runs (patch embedding, position embedding, the SABs); its prefix tokens
    (class/register tokens) are dropped so that, as in DyTox, the task tokens attend to patch tokens only.
    """
    feats = backbone.forward_features(x)
    n_patches = getattr(getattr(backbone, "patch_embed", None), "num_patches", None)
    if n_patches is not None and feats.shape[1] >= n_patches:
        prefix = feats.shape[1] - n_patches  # ConViT prepends its class token only after local_up_to_layer blocks
    else:
        prefix = int(getattr(backbone, "num_prefix_tokens", 0))
    return feats[:, prefix:]


def _num_heads(block: nn.Module, backbone: nn.Module, dim: int) -> int:
    for obj in (getattr(block, "attn", None), backbone):
        h = getattr(obj, "num_heads", None)
        if isinstance(h, int) and h > 0 and dim % h == 0:
            return h
    return max(h for h in range(1, 17) if dim % h == 0)


def split_last_block(backbone: nn.Module, strategy: str,
                     norm_eps: float | None = None) -> tuple[GatedClassAttentionBlock, nn.Module, int, int]:
    """Cut a timm ViT (or Refiner-ViT) in place into SABs (its blocks but the last) and a class-attention block of
    the last block's shapes: (the CAB, the cut block, width D, MLP width). GCAB and DyTox share this layout.
    ``norm_eps``: every LayerNorm's eps, the backbone's and the CAB's (None: the backbone's own)."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) < 1 or not hasattr(
            backbone, "forward_features"):
        raise UserError(
            f"strategy {strategy} needs a ViT backbone with transformer blocks (model.blocks), got "
            f"{type(backbone).__name__}: choose a timm ViT or Refiner-ViT with model.name"
        )
    last = blocks[-1]
    backbone.blocks = blocks[:-1]
    # the features stop after the SABs; the backbone's final norm and classifier are not used
    for name in ("norm", "fc_norm", "head_drop", "head"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            setattr(backbone, name, nn.Identity())
    if isinstance(getattr(backbone, "attn_pool", None), nn.Module):
        backbone.attn_pool = None
    dim = int(getattr(backbone, "embed_dim", None) or backbone.num_features)
    fc1 = getattr(getattr(last, "mlp", None), "fc1", None)
    hidden = fc1.out_features if isinstance(fc1, nn.Linear) else 4 * dim
    qkv = getattr(getattr(last, "attn", None), "qkv", None)
    qkv_bias = isinstance(qkv, nn.Linear) and qkv.bias is not None
    dp = getattr(getattr(last, "drop_path1", getattr(last, "drop_path", None)), "drop_prob", 0.0)
    eps = getattr(getattr(last, "norm1", None), "eps", 1e-6)
    if norm_eps is not None:  # the official ConViT's nn.LayerNorm (eps 1e-5) where timm's uses 1e-6
        eps = float(norm_eps)
        for m in backbone.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = eps
    cab = GatedClassAttentionBlock(dim, _num_heads(last, backbone, dim), hidden, qkv_bias, float(dp), eps)
    return cab, last, dim, hidden


class GatedNet(nn.Module):
    """A timm ViT (or Refiner-ViT) turned into GCAB: its blocks but the last act as SABs, the last becomes the CAB.

    Grows by :meth:`add_task` (a task token, a head, the gate embeddings e0/e2 and, from the second task on, a drift
    projector); everything lives in this module so that the optimiser and the checkpoints see it.
    ``forward_outputs(x)`` needs no task id: every task token runs and the logits of all heads are concatenated.
    """

    def __init__(self, backbone: nn.Module, n_classes: int, s_max: float = S_MAX, init_from_last_block: bool = True,
                 projector_norm: str = "token", norm_eps: float | None = None):
        super().__init__()
        cab, last, dim, hidden = split_last_block(backbone, "gcab", norm_eps)

        self.projector_tokens = None  # projector_norm "token": each token normalised on its own
        if projector_norm == "image":
            n = getattr(getattr(backbone, "patch_embed", None), "num_patches", None)
            if not isinstance(n, int) or n < 1:
                raise UserError(f"strategy.gcab.projector_norm=image needs a backbone with a fixed number of patch "
                                f"tokens (patch_embed.num_patches); {type(backbone).__name__} has none: use token")
            self.projector_tokens = n
        elif projector_norm != "token":
            raise ValueError(f"projector_norm must be 'token' or 'image', got {projector_norm!r}")
        self.backbone = backbone
        self.embed_dim, self.hidden_dim, self.n_classes = dim, hidden, n_classes
        self.cab = cab
        self.cab_from_backbone = bool(init_from_last_block) and self.cab.init_from_block(last)
        self.tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.e0 = nn.ParameterList()
        self.e2 = nn.ParameterList()
        self.projectors = nn.ModuleList()
        # union of the binarised masks of the finished tasks (HAT's mask_pre), saved with the weights
        self.register_buffer("mask_pre0", torch.zeros(dim))
        self.register_buffer("mask_pre2", torch.zeros(hidden))
        self.register_buffer("class_index", torch.zeros(0, dtype=torch.long), persistent=False)
        self.task_classes: list[list[int]] = []
        self.s_max = float(s_max)
        #: the gate's scale in training (annealed per batch by the strategy); inference always uses s_max
        self.s = float(s_max)
        #: False: the gated CAB weights take no weight decay, so weights claimed by past tasks stay exactly fixed
        self.decay_gated_weights = False
        self.backbone_no_decay = True
        #: True: the gate embeddings are (1, width) rows, which timm's rule decays, as the official nn.Embedding
        self.decay_embeddings = False

    # -- growth ----------------------------------------------------------------------------------------------------

    @property
    def n_tasks(self) -> int:
        return len(self.tokens)

    def add_task(self, classes: Sequence[int]) -> None:
        """A new task token, head and gate embeddings (and the projector P_t when t > 0) for ``classes``."""
        classes = [int(c) for c in classes]
        if not classes or any(c < 0 or c >= self.n_classes for c in classes):
            raise ValueError(f"task classes must be stream labels in [0, {self.n_classes}), got {classes}")
        device = self.mask_pre0.device
        token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, device=device))
        trunc_normal_(token, std=0.02)  # DyTox add_model: a fresh trunc_normal(0.02) token per task
        self.tokens.append(token)
        self.heads.append(TaskHead(self.embed_dim, len(classes)).to(device))
        # nn.Embedding's default N(0, 1) initialisation, as the official embs_0 / embs_2; as rows (1, width) when they
        # take weight decay like the official 2-D embedding matrices (timm exempts 1-D parameters)
        row = (1,) if self.decay_embeddings else ()
        self.e0.append(nn.Parameter(torch.randn(*row, self.embed_dim, device=device)))
        self.e2.append(nn.Parameter(torch.randn(*row, self.hidden_dim, device=device)))
        if self.n_tasks > 1:
            self.projectors.append(DriftProjector(self.embed_dim, self.projector_tokens).to(device))
        self.task_classes.append(classes)
        self.class_index = torch.tensor([c for cs in self.task_classes for c in cs], dtype=torch.long, device=device)

    # -- masks -----------------------------------------------------------------------------------------------------

    def task_masks(self, c: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(m0, m2) of task ``c``: sigmoid(s e) for the last task, binarised 1[sigmoid(s e) > 0.5] for the others."""
        g0, g2 = torch.sigmoid(s * self.e0[c].flatten()), torch.sigmoid(s * self.e2[c].flatten())
        if c < self.n_tasks - 1:
            return (g0 > 0.5).to(g0.dtype), (g2 > 0.5).to(g2.dtype)
        return g0, g2

    @torch.no_grad()
    def binary_masks(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``c``'s binarised masks at s_max: what it claims once finished."""
        return ((torch.sigmoid(self.s_max * self.e0[c].flatten()) > 0.5).float(),
                (torch.sigmoid(self.s_max * self.e2[c].flatten()) > 0.5).float())

    def gated_parameters(self) -> dict[str, nn.Parameter]:
        own = dict(self.cab.named_parameters())
        return {f"cab.{n}": own[n] for n in self.cab.gated_parameters(self.mask_pre0, self.mask_pre2)}

    def claimed(self, m0: torch.Tensor | None = None, m2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> 0/1 tensor of the gated CAB weights claimed by masks (default: the union of past tasks')."""
        m0 = self.mask_pre0 if m0 is None else m0
        m2 = self.mask_pre2 if m2 is None else m2
        return {f"cab.{n}": v for n, v in self.cab.gated_parameters(m0, m2).items()}

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward_outputs(self, x: torch.Tensor, cascade: bool | None = None) -> dict:
        """Logits over every class of the stream (classes of tasks not grown yet read 0), no task id needed.

        ``cascade`` (default: in eval mode only, as the official forward with ``inference`` set): task c's token
        reads the patch features mapped back through P_T, ..., P_{c+1}. Extra outputs: ``sab`` (F(x)), ``masks``
        (the current task's (m0, m2)), ``tokens`` (every task token's output) and ``pre_logits`` (the last token).
        """
        T = self.n_tasks
        if T == 0:
            raise RuntimeError("GatedNet has no task yet: the gcab strategy grows one in before_experience")
        s = self.s if self.training else self.s_max
        cascade = (not self.training) if cascade is None else cascade
        feats = sab_features(self.backbone, x)
        B = feats.shape[0]
        patches = feats
        tokens: list[torch.Tensor] = [feats] * T  # placeholders, each replaced below
        masks = None
        for c in reversed(range(T)):
            if cascade and c < T - 1:
                patches = self.projectors[c](patches)  # projectors[c] is P_{c+1}; applied after P_T .. P_{c+2}
            m0, m2 = self.task_masks(c, s)
            if c == T - 1:
                masks = (m0, m2)
            tokens[c] = self.cab(self.tokens[c].expand(B, -1, -1), patches, m0, m2)[:, 0]
        logits = torch.cat([head(tok) for head, tok in zip(self.heads, tokens)], dim=1)
        full = logits.new_zeros(B, self.n_classes).index_copy(1, self.class_index, logits)
        return {"logits": full, "pre_logits": tokens[-1], "tokens": tokens, "sab": feats, "masks": masks}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_outputs(x)["logits"]

    # -- timm-style interface used by the optimiser ----------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Beyond timm's own rule (1-D parameters and biases take no weight decay): the backbone's list (unless
        ``backbone_no_decay`` is off) and the CAB weights past tasks claim (unless ``decay_gated_weights``)."""
        nwd = getattr(self.backbone, "no_weight_decay", None) if self.backbone_no_decay else None
        out = {f"backbone.{n}" for n in (nwd() if callable(nwd) else ())}
        if not self.decay_gated_weights:
            out |= set(self.claimed())
        return out


__all__ = ["GatedNet", "split_last_block", "GatedClassAttentionBlock", "DriftProjector", "TaskHead", "sab_features", "S_MAX"]
