"""Small ViTs for tiny inputs (the 8x8 digits of the default benchmark), registered with timm.

They are timm VisionTransformers with a geometry sized for CPU runs; nothing here is new architecture.
"""
from __future__ import annotations

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (1, 8, 8),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"vit_micro_patch2_8.untrained": _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)  # features_only: the last 3 blocks, as timm's own ViTs
    return build_model_with_cfg(
        VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **kwargs
    )


@register_model
def vit_micro_patch2_8(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Micro/2 at 8x8: 4 blocks, width 64, 4 heads (~0.2M parameters), for the digits benchmarks on CPU."""
    args = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    return _create("vit_micro_patch2_8", pretrained=pretrained, **dict(args, **kwargs))
