"""Pretrained configs borrowed from another registered timm model (the backbone a suite model is built on)."""
from __future__ import annotations

from collections import deque
from dataclasses import replace

from timm.models._pretrained import DefaultCfg
from timm.models._registry import _model_default_cfgs, get_pretrained_cfg


def mirror_cfgs(source: str, **overrides) -> DefaultCfg:
    """``source``'s registered pretrained cfgs, every tag (hub ids already completed with ``source.tag``), with
    ``overrides``; timm's ``register_model`` files them under the model's own name and tags. The weights a model so
    configured loads are ``source``'s, through the model's own ``pretrained_filter_fn``."""
    tags = list(_model_default_cfgs[source].tags)
    cfgs = {tag: replace(get_pretrained_cfg(f"{source}.{tag}" if tag else source), architecture=None, tag=None,
                         **overrides) for tag in tags}
    return DefaultCfg(tags=deque(tags), cfgs=cfgs)
