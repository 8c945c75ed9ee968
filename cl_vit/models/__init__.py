"""Backbones. Every model the suite defines is a timm model, registered on import; any timm name works too."""
from __future__ import annotations

import sys
from pathlib import Path

import timm
import torch.nn as nn

from cl_vit.errors import UserError
from cl_vit.models import micro  # noqa: F401  (registers vit_micro_patch2_8)
from cl_vit.models import refiner  # noqa: F401  (registers refiner_vit_*)

#: model config keys that are not timm keyword arguments
RESERVED = ("name", "pretrained", "checkpoint", "pretrained_tag")


def _create(name: str, pretrained: bool, num_classes: int, kwargs: dict, optional: dict) -> nn.Module:
    """timm.create_model, offering the benchmark's input geometry only to models that take it (a CNN has no
    img_size): a TypeError naming an offered keyword drops that keyword and tries again."""
    optional = dict(optional)
    while True:
        try:
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs, **optional)
        except TypeError as e:
            bad = [k for k in optional if f"'{k}'" in str(e)]
            if bad:
                for k in bad:
                    optional.pop(k)
                continue
            for k in kwargs:
                if f"'{k}'" in str(e):
                    raise UserError(f"model.{k} is not accepted by timm model {name!r}: remove it (~model.{k})") from e
            raise


def build_model(cfg: dict, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """A timm model from the ``model`` config group, with a head over ``num_classes`` classes.

    Every key of the group other than ``RESERVED`` that is not null is a timm keyword argument; ``img_size`` and
    ``in_chans`` default to the benchmark's. ``model.checkpoint=PATH`` loads local weights after creation;
    ``model.pretrained=true`` uses timm's own download and fails offline with a line saying how to give weights.
    """
    cfg = dict(cfg)
    name = cfg.get("name")
    if not name or not timm.is_model(name):
        stem = str(name).split("_")[0] if name else ""
        close = timm.list_models(f"*{stem}*")[:5] if stem else []
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"model.name={name!r} is not a timm model{hint}: see timm.list_models() or configs/model/")
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED and v is not None}
    optional = {k: v for k, v in (("img_size", img_size), ("in_chans", in_chans)) if k not in kwargs}
    pretrained = bool(cfg.get("pretrained")) and not cfg.get("checkpoint")
    if pretrained and cfg.get("pretrained_tag"):
        name = f"{name}.{cfg['pretrained_tag']}"
    try:
        model = _create(name, pretrained, num_classes, kwargs, optional)
    except UserError:
        raise
    except Exception as e:
        if pretrained:
            raise UserError(
                f"could not fetch pretrained weights for {name!r} ({type(e).__name__}): offline, download them "
                "elsewhere and pass model.checkpoint=PATH (.safetensors, .pth or .bin)"
            ) from e
        raise
    if cfg.get("checkpoint"):
        load_checkpoint(model, cfg["checkpoint"])
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load local weights (.safetensors, .pth, .pt, .bin) into ``model``.

    timm's ``load_state_dict`` reads the file (unwrapping ``state_dict``/``model`` keys); the model family's
    ``checkpoint_filter_fn`` adapts foreign layouts (resampled position embeddings, ViT -> Refiner-ViT); a classifier
    whose shape differs from the benchmark's is left at its initialisation. Anything else missing is an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.checkpoint={str(path)!r} does not exist: give the path of a .safetensors/.pth/.bin file")
    state = timm.models.load_state_dict(str(path))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    heads = _classifier_prefixes(model)
    is_head = lambda k: any(k.startswith(f"{h}.") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not (is_head(k) and k in own and own[k].shape != v.shape)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        raise UserError(
            f"model.checkpoint {path.name} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); check model.name"
        )
