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
    ignoring the aspect ratio: what CODA-Prompt's code does for ImageNet-R (dataloaders/utils.py,
    Resize((224, 224)))."""
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


# -- crops decided before decoding ----------------------------------------------------------------------------------
#
# A JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of the cost (libjpeg scales in the DCT domain). The
# training crop (RandomResizedCrop) and the evaluation crop (resize + centre crop) only shrink most of an image, so
# both are decided from the header's size first; the image is then decoded at the smallest scale that still keeps
# the crop at least as large as the output (so only downsampling follows, never upsampling a reduced image), and
# the crop is resized with OpenCV on uint8. The crop distribution is torchvision's RandomResizedCrop exactly.

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}


def image_size(path: str) -> tuple[int, int, str] | None:
    """``(height, width, format)`` from the file header (PIL parses it lazily), ``None`` if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0], im.format or ""
    except Exception:  # read_image reports the file with a proper message
        return None


def _crop_resize(img, box, full_hw, size: int):
    """Crop ``box = (top, left, height, width)`` given in full-resolution pixels out of ``img`` (possibly decoded
    at a reduced scale) and resize it to ``size`` squared."""
    sy, sx = img.shape[0] / full_hw[0], img.shape[1] / full_hw[1]
    top, left = int(box[0] * sy), int(box[1] * sx)
    h = max(1, min(img.shape[0] - top, int(round(box[2] * sy))))
    w = max(1, min(img.shape[1] - left, int(round(box[3] * sx))))
    img = img[top:top + h, left:left + w]
    if (h, w) == (size, size):
        return img
    # bilinear, as albumentations' RandomResizedCrop; the reduced decode already did most of any large shrink
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def decode_crop(path: str, box_of, size: int):
    """Decode ``path`` and return the crop ``box_of(height, width)`` resized to ``size`` squared (RGB uint8); a JPEG
    is decoded at the largest reduction keeping the crop's shorter side >= ``size``."""
    from cl_vit.data.base import read_image

    header = image_size(path)
    if header is None:  # not parsable by PIL: OpenCV decodes it, or read_image raises the line naming the file
        img = read_image(path)
        return _crop_resize(img, box_of(*img.shape[:2]), img.shape[:2], size)
    h, w, fmt = header
    box = box_of(h, w)
    factor = 1
    if fmt == "JPEG":
        factor = next((r for r in (8, 4, 2) if min(box[2], box[3]) / r >= size), 1)
    img = read_image(path, _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR)
    return _crop_resize(img, box, (h, w), size)


def random_resized_crop_box(h: int, w: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=None):
    """torchvision's ``RandomResizedCrop.get_params``: ``(top, left, height, width)``."""
    import math
    import random

    rng = rng or random
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class DecodeRandomResizedCrop:
    """Training decode: torchvision's RandomResizedCrop(size) decided on the header, then a reduced decode."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)

    def __call__(self, path: str):
        return decode_crop(path, lambda h, w: random_resized_crop_box(h, w, self.scale, self.ratio), self.size)

    def __repr__(self):
        return f"DecodeRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class DecodeResizeCenterCrop:
    """Evaluation decode: shorter side to ``size * 256 / 224`` and the centre ``size`` crop (``crop``), or the
    whole image resized to ``size`` squared (``squash``), with the same reduced decode."""

    def __init__(self, size: int, test_resize: str = "crop"):
        if test_resize not in TEST_RESIZE:
            raise ConfigError("benchmark.source_args.test_resize", test_resize, f"one of {list(TEST_RESIZE)}")
        self.size, self.mode = int(size), test_resize
        self.resize = int(round(size * 256 / 224))

    def box(self, h: int, w: int):
        if self.mode == "squash":
            return 0, 0, h, w
        s = self.resize / min(h, w)  # the centre crop of the resized image, in full-resolution pixels
        ch, cw = min(h, self.size / s), min(w, self.size / s)
        return int(round((h - ch) / 2)), int(round((w - cw) / 2)), max(1, int(round(ch))), max(1, int(round(cw)))

    def __call__(self, path: str):
        return decode_crop(path, self.box, self.size)

    def __repr__(self):
        return f"DecodeResizeCenterCrop(size={self.size}, resize={self.resize}, mode={self.mode})"


def imagenet_transforms(img_size: int, mean, std, train: bool, test_resize: str = "crop", scale=(0.08, 1.0)):
    """``(decode, transform)`` for ImageFileDataset: the crop at decode time, then albumentations on the uint8 crop
    (horizontal flip for training) and normalisation."""
    if train:
        return DecodeRandomResizedCrop(img_size, scale), A.Compose([A.HorizontalFlip(p=0.5),
                                                                    *normalize_to_tensor(mean, std)])
    return DecodeResizeCenterCrop(img_size, test_resize), A.Compose(normalize_to_tensor(mean, std))


def imagenet_style_datasets(train, test, img_size: int, mean, std, test_resize: str = "crop"):
    """Training and test ImageFileDatasets of ImageNet-like photos (ImageNet-R, ImageNet-LT, iNaturalist)."""
    from cl_vit.data.base import ImageFileDataset

    decode, transform = imagenet_transforms(img_size, mean, std, True)
    train_ds = ImageFileDataset(train, transform, decode=decode)
    decode, transform = imagenet_transforms(img_size, mean, std, False, test_resize)
    return train_ds, ImageFileDataset(test, transform, decode=decode)
