"""CLS + DIST students (DeiT, Touvron et al. 2021; DeiT-LT, Rangwani et al. 2024): a ViT with a second, distillation
token read by its own head. Training gives the two heads different targets (the CLS head the labels, the DIST head the
teacher); inference averages their logits, and ``forward_outputs`` also returns each head so that evaluation stores a
CLS-only and a DIST-only confusion beside the averaged one.

Two routes to a student, both ending in the same interface:

- timm's own ``deit_*_distilled_*`` models (``VisionTransformerDistilled``) already carry the token and head;
- ``distill(model)`` gives any timm ``VisionTransformer``-like model (``cls_token``, ``num_prefix_tokens``,
  ``_pos_embed``, ``blocks``, ``norm``, ``head``; Refiner-ViT included) a DIST token and head, in place. The model's own
  token pipeline runs unchanged; the DIST token is inserted right after the class token once the position embedding
  has been added, so ``pos_embed`` keeps its shape and a checkpoint of the plain model still loads.

``model.distilled=true`` (cl_vit.models.build_model) applies ``distill`` to any backbone; every suite backbone is also
registered with timm as ``<name>_distilled`` (``timm.create_model("vit_micro_patch2_8_distilled")``).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import PatchDropout, resample_abs_pos_embed, trunc_normal_
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, register_model
from timm.models.deit import VisionTransformerDistilled

from cl_vit.errors import UserError
from cl_vit.models.cfgs import mirror_cfgs

__all__ = ["distill", "is_distilled", "register_distilled", "DistilledMixin"]

#: suite backbones that get a registered ``<name>_distilled`` twin when they exist (see ``register_suite_models``)
SUITE_BACKBONES = (
    "vit_micro_patch2_8",
    "refiner_vit_tiny",
    "refiner_vit_s",
    "refiner_vit_m",
    "refiner_vit_l",
    "vit_base_patch16_224_refined",
)


class DistilledMixin:
    """What every student has on top of its backbone class: the two heads and ``forward_outputs``.

    ``distilled_training`` (as timm's ``set_distilled_training``): while it is on and the model is training,
    ``forward_outputs(x)["logits"]`` is the CLS head alone, because DeiT-LT's classification loss reads the CLS head
    only (val-iisc/DeiT-LT losses.py: ``base_criterion(outputs, labels)`` on the CLS output). Otherwise (evaluation,
    or plain training of both heads) it is the mean of the two heads, as timm's distilled ``forward_head``.
    """

    distilled_training: bool = False

    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def _head_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        cls_tok, dist_tok = x[:, 0], x[:, 1]
        # every student has fc_norm and head_drop (distill() adds identities where a backbone has none)
        cls_tok, dist_tok = self.fc_norm(cls_tok), self.fc_norm(dist_tok)
        return self.head_drop(cls_tok), self.head_drop(dist_tok)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        cls_tok, dist_tok = self._head_tokens(x)
        if pre_logits:
            return (cls_tok + dist_tok) / 2
        return (self.head(cls_tok) + self.head_dist(dist_tok)) / 2

    def forward_outputs(self, x: torch.Tensor) -> dict:
        cls_tok, dist_tok = self._head_tokens(self.forward_features(x))
        cls_logits, dist_logits = self.head(cls_tok), self.head_dist(dist_tok)
        mean = (cls_logits + dist_logits) / 2
        return {
            "logits": cls_logits if (self.distilled_training and self.training) else mean,
            "pre_logits": (cls_tok + dist_tok) / 2,
            "heads": {"cls": cls_logits, "dist": dist_logits},
        }

    def get_classifier(self):
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool not in (None, "", "token"):
            raise ValueError("a distilled model reads the class and distillation tokens: global_pool must be 'token'")
        self.num_classes = num_classes
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        base = super().no_weight_decay() if hasattr(super(), "no_weight_decay") else set()
        return set(base) | {"dist_token"}


class _DistToken(DistilledMixin):
    """Adds the DIST token to a backbone that has none: inserted after the class token, after position embedding.

    ``num_prefix_tokens`` counts the DIST token (the blocks, heads and ``forward_intermediates`` see it), but
    ``pos_embed`` has no row for it: what resamples ``pos_embed`` (``set_input_size``, checkpoint loading) runs under
    ``_pos_embed_prefix``, which counts the prefix rows ``pos_embed`` really has, and ``_pos_embed`` (dynamic image
    sizes) counts them itself.
    """

    @contextmanager
    def _pos_embed_prefix(self):
        self.num_prefix_tokens -= 1
        try:
            yield
        finally:
            self.num_prefix_tokens += 1

    def set_input_size(self, *args, **kwargs) -> None:
        with self._pos_embed_prefix():
            super().set_input_size(*args, **kwargs)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's VisionTransformer._pos_embed for the backbone's own prefix tokens (pos_embed has no DIST row),
        # written out: TorchScript compiles neither super() nor the context manager above
        B = x.shape[0]
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            _, H, W, C = x.shape
            if pos_embed is not None:
                pos_embed = resample_abs_pos_embed(
                    pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                    num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens - 1)
            x = x.view(B, -1, C)
        tokens: List[torch.Tensor] = [self.cls_token.expand(B, -1, -1)]
        if self.reg_token is not None:
            tokens.append(self.reg_token.expand(B, -1, -1))
        if pos_embed is None:
            x = torch.cat(tokens + [x.view(B, -1, x.shape[-1])], dim=1)
        else:
            if self.no_embed_class:
                x = torch.cat(tokens + [x + pos_embed], dim=1)
            else:
                x = torch.cat(tokens + [x], dim=1) + pos_embed
            x = self.pos_drop(x)
        # DeiT gives the DIST token its own row of pos_embed; a learned token plus a learned offset is one learned
        # vector, so the token alone is the same model and leaves pos_embed (and plain checkpoints) untouched.
        return torch.cat((x[:, :1], self.dist_token.expand(B, -1, -1), x[:, 1:]), dim=1)


_CLASSES: dict[type, type] = {}


def _student_class(base: type) -> type:
    """One cached subclass per backbone class, importable from this module (so deep copies and pickling work)."""
    if base not in _CLASSES:
        mixin = DistilledMixin if issubclass(base, VisionTransformerDistilled) else _DistToken
        name = f"{base.__name__}Student" if "Distilled" in base.__name__ else f"Distilled{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_backbone_class": base})
        setattr(sys.modules[__name__], name, cls)
        _CLASSES[base] = cls
    return _CLASSES[base]


def is_distilled(model: nn.Module) -> bool:
    """A model that already carries a distillation token and head (timm's deit_*_distilled or a ``distill``-ed one)."""
    return hasattr(model, "dist_token") and hasattr(model, "head_dist")


def distill(model: nn.Module) -> nn.Module:
    """Turn ``model`` into a CLS + DIST student, in place, and return it.

    timm's distilled DeiTs only gain ``forward_outputs``; any other ViT-like model gains a DIST token (truncated
    normal, std 0.02, as DeiT) and a second linear head initialised as timm initialises heads.
    """
    if isinstance(model, DistilledMixin):
        return model
    if is_distilled(model):
        model.__class__ = _student_class(type(model))
        return model
    missing = [a for a in ("cls_token", "_pos_embed", "num_prefix_tokens", "head", "embed_dim") if not hasattr(model, a)]
    if missing or getattr(model, "cls_token", None) is None:
        raise UserError(
            f"model {type(model).__name__} cannot take a distillation token (no {missing or ['cls_token']}): "
            "use a timm ViT, a deit_*_distilled model or Refiner-ViT as the DeiT-LT student"
        )
    if getattr(model, "global_pool", "token") != "token":
        raise UserError(
            f"a distilled student reads the class and distillation tokens, but {type(model).__name__} pools "
            f"with global_pool={model.global_pool!r}: set model.global_pool=token"
        )
    dd = dict(device=model.cls_token.device, dtype=model.cls_token.dtype)
    model.dist_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim, **dd))
    trunc_normal_(model.dist_token, std=0.02)
    n = getattr(model, "num_classes", 0)
    model.head_dist = nn.Linear(model.embed_dim, n, **dd) if n > 0 else nn.Identity()
    if n > 0:
        trunc_normal_(model.head_dist.weight, std=0.02)
        nn.init.zeros_(model.head_dist.bias)
    for name in ("fc_norm", "head_drop"):  # what the two heads read (_head_tokens)
        if not isinstance(getattr(model, name, None), nn.Module):
            setattr(model, name, nn.Identity())
    model.num_prefix_tokens += 1
    if isinstance(getattr(model, "patch_drop", None), PatchDropout):  # it keeps the prefix tokens, DIST included
        model.patch_drop.num_prefix_tokens += 1
    model.__class__ = _student_class(type(model))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if cfg:
        cfg["classifier"] = ("head", "head_dist")
        model.pretrained_cfg = cfg
    return model


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Weights of the backbone (through its own filter) or of a student; a plain backbone's checkpoint leaves the
    DIST token and head at their initialisation."""
    base = getattr(type(model), "_backbone_class", type(model))
    base_filter = getattr(sys.modules.get(base.__module__), "checkpoint_filter_fn", None)
    if base_filter is not None:
        if isinstance(model, _DistToken):
            with model._pos_embed_prefix():
                state_dict = base_filter(state_dict, model)
        else:
            state_dict = base_filter(state_dict, model)
    own = model.state_dict()
    for key in ("dist_token", "head_dist.weight", "head_dist.bias"):
        if key in own and key not in state_dict:
            state_dict[key] = own[key]
    return state_dict


#: the students' pretrained cfgs, read by timm's register_model: the backbone's, under the student's name
default_cfgs: dict = {}

#: keywords of timm's features_only wrapping, applied to the student (not to the backbone inside it)
_FEATURE_KEYS = ("features_only", "out_indices", "feature_cls")


def register_distilled(base_name: str) -> str:
    """Register ``<base_name>_distilled`` with timm: the backbone made a student by ``distill``, with a pretrained
    cfg of its own name and timm's features_only wrappers."""
    name = f"{base_name}_distilled"

    def entrypoint(pretrained: bool = False, **kwargs):
        features = {k: kwargs.pop(k) for k in _FEATURE_KEYS if k in kwargs}
        cfg_args = {k: kwargs.get(k) for k in ("pretrained_cfg", "pretrained_cfg_overlay")}

        def build(**_):  # the backbone (with its weights when pretrained), made a student; then timm's wrapping
            return distill(timm.create_model(base_name, pretrained=pretrained, **kwargs))

        # kwargs_filter: the cfg's default sizes would override the backbone's real ones in the model's traits
        return build_model_with_cfg(build, name, False, feature_cfg=dict(feature_cls="getter"), **cfg_args,
                                    kwargs_filter=("num_classes", "global_pool", "in_chans", "img_size"), **features)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{base_name} with a DIST token and head (DeiT / DeiT-LT student)."
    # the backbone's cfgs, both heads the classifier: a student of base.tag starts from that backbone's weights
    # (its DIST token and head at their initialisation)
    default_cfgs[name] = mirror_cfgs(base_name, classifier=("head", "head_dist"))
    register_model(entrypoint)
    return name


def register_suite_models() -> list[str]:
    """Register the distilled twin of every suite backbone timm knows (call after the backbones' modules)."""
    return [register_distilled(b) for b in SUITE_BACKBONES if timm.is_model(b) and not timm.is_model(f"{b}_distilled")]


register_suite_models()
