"""albumentations pipelines (OpenCV on uint8 arrays): the suite's image transforms.

Every pipeline takes an RGB uint8 ``HxWx3`` array and ends in ``Normalize`` + ``ToTensorV2``. Geometry runs on uint8
(OpenCV's resize and crop are several times faster on uint8 than on float), and ``Normalize`` turns the final,
already small crop into float32 once.
"""
from __future__ import annotations

from typing import Sequence

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from cl_vit.errors import ConfigError

#: named normalisations; "model" is resolved by the run from the backbone's pretrained config (model_normalization)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    # CODA-Prompt feeds [0, 1] pixels to its ViT (dataloaders/utils.py: mean 0, std 1)
    "coda": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # LDAM-DRW's CIFAR statistics (cifar_train.py), for backbones trained from scratch on CIFAR
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
}


def model_normalization(model_cfg: dict) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """Mean and std of the backbone's pretrained config (timm ``pretrained_cfg``), without creating the model.

    Returns ``(mean, std, where)``; ``where`` names the config used, for the record. Models without a pretrained
    config (the suite's untrained micro ViTs) get ImageNet's statistics.
    """
    from timm.models import get_pretrained_cfg

    name = str(model_cfg.get("name"))
    tag = model_cfg.get("pretrained_tag")
    for key in ([f"{name}.{tag}"] if tag else []) + [name]:
        try:
            cfg = get_pretrained_cfg(key)
        except Exception:  # unknown names are reported by build_model with a proper message
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None):
            return tuple(cfg.mean), tuple(cfg.std), f"timm pretrained_cfg of {key}"
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD), f"imagenet (no pretrained_cfg for {name})"


def resolve_normalization(normalize, mean=None, std=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``normalize``: a name of :data:`NORMALIZATIONS`, "model" (then ``mean``/``std`` are given by the run), or
    explicit ``mean``/``std``."""
    if mean is not None and std is not None:
        return tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if normalize in NORMALIZATIONS:
        return NORMALIZATIONS[normalize]
    if normalize == "model":
        raise ConfigError("benchmark.source_args.normalize", normalize,
                          "'model' is resolved by python -m cl_vit.run; outside a run give mean= and std=")
    raise ConfigError("benchmark.source_args.normalize", normalize, f"'model' or one of {sorted(NORMALIZATIONS)}")


def normalize_to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def resize_pipeline(img_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize to a square ``img_size`` and normalise: the evaluation pipeline of small, already-centred images."""
    return A.Compose([A.Resize(img_size, img_size), *normalize_to_tensor(mean, std)])


def imagenet_train_pipeline(img_size: int, mean, std, scale=(0.08, 1.0)) -> A.Compose:
    """RandomResizedCrop + horizontal flip: torchvision's RandomResizedCrop defaults (scale 0.08-1, ratio 3/4-4/3,
    bilinear), as CODA-Prompt's ImageNet-R training transform (dataloaders/utils.py) and DeiT's."""
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), ratio=(3 / 4, 4 / 3),
                            interpolation=cv2.INTER_LINEAR),
        A.HorizontalFlip(p=0.5),
        *normalize_to_tensor(mean, std),
    ])


TEST_RESIZE = ("crop", "squash")


def imagenet_eval_pipeline(img_size: int, mean, std, test_resize: str = "crop") -> A.Compose:
    """``crop``: shorter side to ``img_size * 256 / 224``, centre crop (Resize(256) + CenterCrop(224) at 224, the
    ImageNet-R authors' evaluation in hendrycks/imagenet-r eval.py). ``squash``: resize to ``img_size`` squared,
    ignoring the aspect ratio: what CODA-Prompt's code does for ImageNet-R (dataloaders/utils.py, Resize((224, 224)))."""
    if test_resize == "crop":
        geometry = [A.SmallestMaxSize(max_size=int(round(img_size * 256 / 224)), interpolation=cv2.INTER_LINEAR),
                    A.CenterCrop(img_size, img_size)]
    elif test_resize == "squash":
        geometry = [A.Resize(img_size, img_size, interpolation=cv2.INTER_LINEAR)]
    else:
        raise ConfigError("benchmark.source_args.test_resize", test_resize, f"one of {list(TEST_RESIZE)}")
    return A.Compose([*geometry, *normalize_to_tensor(mean, std)])


def cifar_train_pipeline(img_size: int, mean, std, padding: int = 4) -> A.Compose:
    """Zero-pad by 4, random crop back, horizontal flip: LDAM-DRW's CIFAR training transform (RandomCrop(32,
    padding=4) + RandomHorizontalFlip, cifar_train.py), and DeiT-LT's ``build_transform_ldam`` (resize to the input
    size first when it is not 32)."""
    resize = [A.Resize(img_size, img_size, interpolation=cv2.INTER_CUBIC)] if img_size != 32 else []
    return A.Compose([
        *resize,
        A.PadIfNeeded(img_size + 2 * padding, img_size + 2 * padding, border_mode=cv2.BORDER_CONSTANT, fill=0),
        A.RandomCrop(img_size, img_size),
        A.HorizontalFlip(p=0.5),
        *normalize_to_tensor(mean, std),
    ])


def cifar_eval_pipeline(img_size: int, mean, std) -> A.Compose:
    resize = [A.Resize(img_size, img_size, interpolation=cv2.INTER_CUBIC)] if img_size != 32 else []
    return A.Compose([*resize, *normalize_to_tensor(mean, std)])
