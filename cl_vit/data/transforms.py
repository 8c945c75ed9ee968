"""albumentations pipelines (OpenCV on uint8 arrays): the suite's image transforms.

Every pipeline takes an RGB uint8 ``HxWx3`` array and ends in ``Normalize`` + ``ToTensorV2``. Geometry runs on uint8
(OpenCV's resize and crop are several times faster on uint8 than on float), and ``Normalize`` turns the final,
already small crop into float32 once.
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

from cl_vit.errors import ConfigError, UserError
from cl_vit.loading import LazyModule

A = LazyModule("albumentations")
_A_PYTORCH = LazyModule("albumentations.pytorch")

#: named normalisations; "model" is resolved by the run from the backbone's pretrained config (model_normalization)
NORMALIZATIONS = {
    "imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "inception": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
    # CODA-Prompt feeds [0, 1] pixels to its ViT (dataloaders/utils.py: mean 0, std 1)
    "coda": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # LDAM-DRW's CIFAR statistics (cifar_train.py), for backbones trained from scratch on CIFAR
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # CIFAR-100's own statistics, as DyTox / GCAB-CFDC normalise it (continual/datasets.py L133, L147)
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


#: interpolation names -> (OpenCV flag, torchvision InterpolationMode name)
INTERPOLATIONS = {"bilinear": (cv2.INTER_LINEAR, "BILINEAR"), "bicubic": (cv2.INTER_CUBIC, "BICUBIC")}


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
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), _A_PYTORCH.ToTensorV2()]


def resize_pipeline(img_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize to a square ``img_size`` and normalise: the evaluation pipeline of small, already-centred images."""
    return A.Compose([A.Resize(img_size, img_size), *normalize_to_tensor(mean, std)])


def imagenet_train_pipeline(img_size: int, mean, std, scale=(0.08, 1.0), interpolation: str = "bilinear"
                            ) -> A.Compose:
    """RandomResizedCrop + horizontal flip: torchvision's RandomResizedCrop defaults (scale 0.08-1, ratio 3/4-4/3,
    bilinear), as CODA-Prompt's ImageNet-R training transform (dataloaders/utils.py) and DeiT's."""
    return A.Compose([
        A.RandomResizedCrop(size=(img_size, img_size), scale=tuple(scale), ratio=(3 / 4, 4 / 3),
                            interpolation=INTERPOLATIONS[interpolation][0]),
        A.HorizontalFlip(p=0.5),
        *normalize_to_tensor(mean, std),
    ])


TEST_RESIZE = ("crop", "squash")


def imagenet_eval_pipeline(img_size: int, mean, std, test_resize: str = "crop", interpolation: str = "bilinear"
                           ) -> A.Compose:
    """``crop``: shorter side to ``img_size * 256 / 224``, centre crop (Resize(256) + CenterCrop(224) at 224, the
    ImageNet-R authors' evaluation in hendrycks/imagenet-r eval.py, and CODA-Prompt's for ImageNet-R:
    GT-RIPL/CODA-Prompt dataloaders/utils.py L50-56). ``squash``: resize to ``img_size`` squared, ignoring the aspect
    ratio (CODA-Prompt's Resize((size, size)) of ImageNet32/84, dataloaders/utils.py L37-40)."""
    flag = INTERPOLATIONS[interpolation][0]
    if test_resize == "crop":
        geometry = [A.SmallestMaxSize(max_size=int(round(img_size * 256 / 224)), interpolation=flag),
                    A.CenterCrop(img_size, img_size)]
    elif test_resize == "squash":
        geometry = [A.Resize(img_size, img_size, interpolation=flag)]
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
# backend=opencv (fast): a JPEG can be decoded at 1/2, 1/4 or 1/8 scale for a fraction of the cost (libjpeg scales in
# the DCT domain). The training crop (RandomResizedCrop) and the evaluation crop (resize + centre crop) only shrink
# most of an image, so both are decided from the header's size first; the image is then decoded at the smallest
# scale that still keeps the crop at least as large as the output (so only downsampling follows, never upsampling a
# reduced image), and the crop is resized with OpenCV on uint8. The crop distribution is torchvision's
# RandomResizedCrop exactly; the pixels are not: OpenCV's bilinear/bicubic resize of a reduced decode is not PIL's
# antialiased resize of the whole image.
# backend=pil (the official pipelines): the whole image decoded by PIL and torchvision's own RandomResizedCrop /
# Resize + CenterCrop on the PIL image, as CODA-Prompt, RanPAC and RevisitingCIL build them; several times slower.
# Both apply the EXIF orientation once (cl_vit.data.base.image_header), before any size or crop is computed; with
# exif_orientation=ignore neither does, and sizes, crops and pixels are those of the stored image, as the official
# loaders' Image.open(path).convert("RGB") sees it.

_REDUCED = {8: cv2.IMREAD_REDUCED_COLOR_8, 4: cv2.IMREAD_REDUCED_COLOR_4, 2: cv2.IMREAD_REDUCED_COLOR_2}
BACKENDS = ("opencv", "pil")
EXIF_ORIENTATIONS = ("apply", "ignore")


def check_exif_orientation(value: str) -> str:
    if value not in EXIF_ORIENTATIONS:
        raise ConfigError("benchmark.source_args.exif_orientation", value, f"one of {list(EXIF_ORIENTATIONS)}")
    return value


def check_interpolation(key: str, value: str) -> str:
    if value not in INTERPOLATIONS:
        raise ConfigError(f"benchmark.source_args.{key}", value, f"one of {list(INTERPOLATIONS)}")
    return value


def pil_geometry(size: int, train: bool, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear",
                 test_resize: str = "crop"):
    """torchvision's own geometry on PIL images (PIL's antialiased resampling), as the official pipelines build it:
    RandomResizedCrop(size, scale, ratio) for training; Resize(int(size * 256 / 224)) + CenterCrop(size) (``crop``) or
    Resize((size, size)) (``squash``) for evaluation. (A square image: Resize(size) = ``squash``.)"""
    from torchvision import transforms as T

    if test_resize not in TEST_RESIZE:
        raise ConfigError("benchmark.source_args.test_resize", test_resize, f"one of {list(TEST_RESIZE)}")
    mode = getattr(T.InterpolationMode, INTERPOLATIONS[interpolation][1])
    if train:
        return T.RandomResizedCrop(size, tuple(scale), tuple(ratio), mode)
    if test_resize == "squash":
        return T.Resize((size, size), mode)
    return T.Compose([T.Resize(int(256 / 224 * size), mode), T.CenterCrop(size)])  # RanPAC's int(), 256 at 224


class PILGeometry:
    """An albumentations-style step (``image=`` uint8 array in and out) that runs :func:`pil_geometry` on a PIL
    image of the array, then ``tail`` (an albumentations pipeline ending in ToTensorV2): in-memory sources with
    ``backend=pil``."""

    def __init__(self, geometry, tail):
        self.geometry, self.tail = geometry, tail

    def __call__(self, image, **_):
        from PIL import Image

        return self.tail(image=np.asarray(self.geometry(Image.fromarray(image))))

    def __repr__(self):
        return f"PILGeometry({self.geometry}, {self.tail})"


def _crop_resize(img, box, full_hw, size: int, interpolation: str = "bilinear"):
    """Crop ``box = (top, left, height, width)`` given in full-resolution pixels out of ``img`` (possibly decoded
    at a reduced scale) and resize it to ``size`` squared."""
    sy, sx = img.shape[0] / full_hw[0], img.shape[1] / full_hw[1]
    top, left = int(box[0] * sy), int(box[1] * sx)
    h = max(1, min(img.shape[0] - top, int(round(box[2] * sy))))
    w = max(1, min(img.shape[1] - left, int(round(box[3] * sx))))
    img = img[top:top + h, left:left + w]
    if (h, w) == (size, size):
        return img
    # the reduced decode already did most of any large shrink
    return cv2.resize(img, (size, size), interpolation=INTERPOLATIONS[interpolation][0])


def decode_crop(path: str, box_of, size: int, interpolation: str = "bilinear", exif: bool = True):
    """Decode ``path`` and return the crop ``box_of(height, width)`` resized to ``size`` squared (RGB uint8); a JPEG
    is decoded at the largest reduction keeping the crop's shorter side >= ``size``. Heights and widths are those of
    the image as displayed (EXIF orientation applied), or as stored with ``exif=False``."""
    from cl_vit.data.base import CorruptImage, image_header, read_image

    header = image_header(path, exif)
    if header is None:  # not parsable by PIL: OpenCV decodes it, or read_image raises the line naming the file
        img = read_image(path, orientation=1)
        return _crop_resize(img, box_of(*img.shape[:2]), img.shape[:2], size, interpolation)
    h, w, fmt, orientation = header
    box = box_of(h, w)
    factor = 1
    if fmt == "JPEG":
        factor = next((r for r in (8, 4, 2) if min(box[2], box[3]) / r >= size), 1)
    img = read_image(path, _REDUCED[factor] if factor > 1 else cv2.IMREAD_COLOR, orientation=orientation)
    expected = (-(-h // factor), -(-w // factor))  # libjpeg's scaled size rounds up
    if img.shape[:2] != expected:
        raise CorruptImage("", path=path, problem=f"decoded {img.shape[1]}x{img.shape[0]}, the header says "
                                                  f"{expected[1]}x{expected[0]}")
    return _crop_resize(img, box, (h, w), size, interpolation)


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


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfigError("benchmark.source_args.backend", backend, f"one of {list(BACKENDS)}")
    return backend


class DecodeRandomResizedCrop:
    """Training decode: torchvision's RandomResizedCrop(size, scale, ratio, interpolation). ``opencv``: decided on
    the header, then a reduced decode; ``pil``: torchvision's own transform on the PIL image (torch's RNG)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "bilinear",
                 backend: str = "opencv", exif_orientation: str = "apply"):
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.interpolation = check_interpolation("train_interpolation", interpolation)
        self.backend = check_backend(backend)
        self.exif_orientation = check_exif_orientation(exif_orientation)
        self.pil = pil_geometry(self.size, True, self.scale, self.ratio, self.interpolation)

    def __call__(self, path: str):
        if self.backend == "pil":
            from cl_vit.data.base import read_image_pil

            return np.asarray(self.pil(read_image_pil(path, self.exif_orientation == "apply")))
        return decode_crop(path, lambda h, w: random_resized_crop_box(h, w, self.scale, self.ratio), self.size,
                           self.interpolation, self.exif_orientation == "apply")

    def __repr__(self):
        return (f"DecodeRandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, "
                f"interpolation={self.interpolation}, backend={self.backend}, "
                f"exif_orientation={self.exif_orientation})")


class DecodeResizeCenterCrop:
    """Evaluation decode: shorter side to ``size * 256 / 224`` and the centre ``size`` crop (``crop``), or the
    whole image resized to ``size`` squared (``squash``). ``opencv``: the same reduced decode; ``pil``: torchvision's
    Resize + CenterCrop on the PIL image (antialiased)."""

    def __init__(self, size: int, test_resize: str = "crop", interpolation: str = "bilinear", backend: str = "opencv",
                 exif_orientation: str = "apply"):
        if test_resize not in TEST_RESIZE:
            raise ConfigError("benchmark.source_args.test_resize", test_resize, f"one of {list(TEST_RESIZE)}")
        self.size, self.mode = int(size), test_resize
        self.resize = int(round(size * 256 / 224))
        self.interpolation = check_interpolation("test_interpolation", interpolation)
        self.backend = check_backend(backend)
        self.exif_orientation = check_exif_orientation(exif_orientation)
        self.pil = pil_geometry(self.size, False, interpolation=self.interpolation, test_resize=test_resize)

    def box(self, h: int, w: int):
        if self.mode == "squash":
            return 0, 0, h, w
        s = self.resize / min(h, w)  # the centre crop of the resized image, in full-resolution pixels
        ch, cw = min(h, self.size / s), min(w, self.size / s)
        return int(round((h - ch) / 2)), int(round((w - cw) / 2)), max(1, int(round(ch))), max(1, int(round(cw)))

    def __call__(self, path: str):
        if self.backend == "pil":
            from cl_vit.data.base import read_image_pil

            return np.asarray(self.pil(read_image_pil(path, self.exif_orientation == "apply")))
        return decode_crop(path, self.box, self.size, self.interpolation, self.exif_orientation == "apply")

    def __repr__(self):
        return (f"DecodeResizeCenterCrop(size={self.size}, resize={self.resize}, mode={self.mode}, "
                f"interpolation={self.interpolation}, backend={self.backend}, "
                f"exif_orientation={self.exif_orientation})")


def decode_options(backend: str = "opencv", crop_scale=(0.08, 1.0), train_interpolation: str = "bilinear",
                   test_interpolation: str = "bilinear", exif_orientation: str | None = None) -> dict:
    """The default pipelines' options (``benchmark.source_args``; recipes set the official ones), validated, as
    ``Source.meta["transforms"]["decode"]`` records them. ``exif_orientation`` (file sources; arrays have no tags
    and leave it out): ``apply`` rotates each tagged photo upright on every decode path, ``ignore`` keeps the
    stored pixels, as the official loaders' ``Image.open(path).convert("RGB")`` does (the full-decode pipelines
    ``deit`` / ``torchvision`` included)."""
    scale = tuple(float(v) for v in crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError("benchmark.source_args.crop_scale", list(crop_scale), "[min, max] with 0 < min <= max <= 1")
    options = {"backend": check_backend(backend), "crop_scale": list(scale),
               "train_interpolation": check_interpolation("train_interpolation", train_interpolation),
               "test_interpolation": check_interpolation("test_interpolation", test_interpolation)}
    if exif_orientation is not None:
        options["exif_orientation"] = check_exif_orientation(exif_orientation)
    return options


def imagenet_transforms(img_size: int, mean, std, train: bool, test_resize: str = "crop", **options):
    """``(decode, transform)`` for ImageFileDataset: the crop at decode time, then albumentations on the uint8 crop
    (horizontal flip for training) and normalisation. ``options``: :func:`decode_options`."""
    o = decode_options(**options)
    exif = o.get("exif_orientation", "apply")
    if train:
        decode = DecodeRandomResizedCrop(img_size, o["crop_scale"], interpolation=o["train_interpolation"],
                                         backend=o["backend"], exif_orientation=exif)
        return decode, A.Compose([A.HorizontalFlip(p=0.5), *normalize_to_tensor(mean, std)])
    decode = DecodeResizeCenterCrop(img_size, test_resize, o["test_interpolation"], o["backend"], exif)
    return decode, A.Compose(normalize_to_tensor(mean, std))


def array_pipeline(img_size: int, mean, std, train: bool, test_resize: str = "squash", **options):
    """RandomResizedCrop + flip (training) or resize (+ centre crop) for in-memory uint8 images (CIFAR at 224, as
    CODA-Prompt, RanPAC and RevisitingCIL upscale it): albumentations on OpenCV (``backend=opencv``) or torchvision
    on PIL (``pil``, the official pipelines). ``options``: :func:`decode_options`."""
    o = decode_options(**options)
    if o["backend"] == "pil":
        interpolation = o["train_interpolation"] if train else o["test_interpolation"]
        geometry = pil_geometry(img_size, train, o["crop_scale"], interpolation=interpolation, test_resize=test_resize)
        flip = [A.HorizontalFlip(p=0.5)] if train else []
        return PILGeometry(geometry, A.Compose([*flip, *normalize_to_tensor(mean, std)]))
    if train:
        return imagenet_train_pipeline(img_size, mean, std, o["crop_scale"], o["train_interpolation"])
    return imagenet_eval_pipeline(img_size, mean, std, test_resize, o["test_interpolation"])


def imagenet_style_datasets(train, test, img_size: int, mean, std, test_resize: str = "crop",
                            train_transform: str = "default", test_transform: str = "default", augment=None,
                            test_crop_pct: float | None = None, decode: dict | None = None):
    """Training and test ImageFileDatasets of ImageNet-like photos (ImageNet-R, ImageNet-LT, iNaturalist).

    ``default``: the crops of :class:`DecodeRandomResizedCrop` / :class:`DecodeResizeCenterCrop` with the options
    ``decode`` (:func:`decode_options`: backend, crop scale, interpolations, EXIF orientation). ``deit``: DeiT's
    pipelines on the fully decoded image (:func:`deit_train_transform`, :func:`deit_eval_transform`), which honour
    ``decode["exif_orientation"]`` alone."""
    import functools

    from cl_vit.data.base import ImageFileDataset, read_image

    check_pipelines(train_transform, test_transform, augment, test_resize, test_crop_pct)
    decode = dict(decode or {})
    # the full decode: read_image's default applies the orientation, orientation=1 keeps the stored pixels
    exif = check_exif_orientation(decode.get("exif_orientation", "apply"))
    full = None if exif == "apply" else functools.partial(read_image, orientation=1)
    if train_transform == "deit":
        train_ds = ImageFileDataset(train, deit_train_transform(img_size, mean, std, augment), decode=full)
    elif train_transform == "torchvision":
        train_ds = ImageFileDataset(train, torchvision_train_transform(img_size, mean, std), decode=full)
    else:
        crop, transform = imagenet_transforms(img_size, mean, std, True, **decode)
        train_ds = ImageFileDataset(train, transform, decode=crop)
    if test_transform == "deit":
        return train_ds, ImageFileDataset(test, deit_eval_transform(img_size, mean, std, crop_pct=test_crop_pct,
                                                                    prefetcher=uses_prefetcher(train_transform,
                                                                                               augment)),
                                          decode=full)
    if test_transform == "torchvision":
        return train_ds, ImageFileDataset(test, torchvision_eval_transform(img_size, mean, std), decode=full)
    crop, transform = imagenet_transforms(img_size, mean, std, False, test_resize, **decode)
    return train_ds, ImageFileDataset(test, transform, decode=crop)


# -- DeiT's pipelines: timm's transform factory on PIL images ---------------------------------------------------------
#
# DeiT-LT's student (val-iisc/DeiT-LT datasets.py build_transform_deit, ``--student-transform 0`` in every training
# script) is trained on timm's ``create_transform`` output, the "out-of-distribution" images its teacher is distilled
# on; Mixup/CutMix follow on the batch (the deit_lt strategy). timm's RandAugment works on PIL images, so these
# pipelines make a PIL image of the uint8 array the datasets decode and run timm's own transforms. DeiT-LT pinned
# timm 0.8.15.dev0 (environment.yml L199), Refiner-ViT bundles timm 0.4.8; from the same seeds the recipes' pipelines
# under the installed timm give those versions' training and evaluation tensors bit for bit
# (tests/test_golden_augment.py, scripts/golden_augment.py). Unlike the default pipelines, file sources
# decode the whole image here: timm's crop interpolates the full-resolution image bicubically, as DeiT's does.

PIPELINES = ("default", "deit", "torchvision")

#: val-iisc/DeiT-LT arguments.py defaults, handed by datasets.py build_transform_deit to timm's create_transform
DEIT_AUGMENT = {
    "auto_augment": "rand-m9-mstd0.5-inc1",  # --aa: RandAugment, magnitude 9 (std 0.5), 2 ops, increasing severity
    "color_jitter": 0.3,         # --color-jitter; timm leaves colour jitter out whenever auto_augment is set
    "interpolation": "bicubic",  # --train-interpolation (the crop's resize and RandAugment's geometric ops)
    "re_prob": 0.25,             # --reprob: random erasing, per image, on the normalised tensor, before Mixup/CutMix
    "re_mode": "pixel",          # --remode: per-pixel normal noise
    "re_count": 1,               # --recount
    # the mean RandAugment fills uncovered pixels with (rotate, shear, translate); null: the normalisation mean.
    # "imagenet": DyTox / GCAB-CFDC, whose create_transform gets no mean and whose CIFAR Normalize is swapped in later
    "fill_mean": None,
    # build_transform_deit's crop for inputs of 32 px or less (CIFAR at its own size): RandomCrop(32, padding=4);
    # a smaller image keeps the crop's strength with the same fraction (4 of 32 px is 2 of 14)
    "crop_padding": 4,
    # timm's prefetcher loader order (train.py without --no-prefetcher, Refiner-ViT's main.py): the transform ends at
    # uint8, strategy=mixup mixes the uint8 batch, then the batch is normalised and randomly erased (PrefetchStage)
    "prefetcher": False,
}


def deit_augment(augment=None) -> dict:
    """:data:`DEIT_AUGMENT` updated with ``benchmark.source_args.augment``; an unknown key is an error."""
    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(DEIT_AUGMENT))
    if unknown:
        raise ConfigError(f"benchmark.source_args.augment.{unknown[0]}", augment[unknown[0]],
                          f"keys of the DeiT pipeline are {sorted(DEIT_AUGMENT)}")
    return {**DEIT_AUGMENT, **augment}


def uses_prefetcher(train_transform: str, augment=None) -> bool:
    """Whether a source runs timm's prefetcher order: the DeiT training pipeline with ``augment.prefetcher``. Its
    training batches then go through :class:`PrefetchStage` and its evaluation images are normalised as the
    prefetcher loader does (timm train.py scripts build both loaders with the one ``args.prefetcher``)."""
    return train_transform == "deit" and bool(deit_augment(augment)["prefetcher"])


def check_pipelines(train_transform: str, test_transform: str, augment=None, test_resize: str = "crop",
                    test_crop_pct: float | None = None) -> dict:
    """Validate the pipeline choice of a source; returns what ``Source.meta["transforms"]`` records."""
    for key, value in (("train_transform", train_transform), ("test_transform", test_transform)):
        if value not in PIPELINES:
            raise ConfigError(f"benchmark.source_args.{key}", value, f"one of {list(PIPELINES)}")
    if augment and train_transform != "deit":
        raise UserError("benchmark.source_args.augment sets the DeiT training pipeline's options: use it with "
                        "benchmark.source_args.train_transform=deit, or remove it")
    if test_transform in ("deit", "torchvision") and test_resize != "crop":
        raise UserError(f"benchmark.source_args.test_resize={test_resize!r} applies to test_transform=default; "
                        "DeiT's evaluation (test_transform=deit) is resize + centre crop")
    if test_crop_pct is not None and (test_transform != "deit" or not 0 < float(test_crop_pct) <= 2):
        raise UserError(f"benchmark.source_args.test_crop_pct={test_crop_pct!r} sets the crop fraction of "
                        "test_transform=deit (timm's evaluation: shorter side to img_size / crop_pct, centre crop): "
                        "use it with benchmark.source_args.test_transform=deit and a value in (0, 2], or remove it")
    record = {"train": train_transform, "test": test_transform}
    if test_crop_pct is not None:
        record["test_crop_pct"] = float(test_crop_pct)
    if train_transform == "deit":
        record["augment"] = deit_augment(augment)
        record["train_source"] = "val-iisc/DeiT-LT datasets.py build_transform_deit (timm create_transform)"
    return record


class PILTransform:
    """A torchvision/timm transform (PIL image in, tensor out) behind the datasets' albumentations call,
    ``transform(image=RGB uint8 HxWx3) -> {"image": CHW float tensor}``."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, **_):
        from PIL import Image

        return {"image": self.transform(Image.fromarray(image))}

    def __repr__(self):
        return f"PILTransform({self.transform})"


def posterize(img, bits_to_keep, **_):
    """timm's RandAugment posterize with the Pillow semantics of DeiT-LT's environment (Pillow 9.5): keeping 0 bits
    gives a black image. Recent Pillow (13 here) raises instead, which timm's op meets whenever the magnitude noise of
    ``mstd0.5`` reaches the maximum magnitude (PosterizeIncreasing keeps ``4 - int(4 * m / 10)`` bits)."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, int(bits_to_keep))
    return Image.new(img.mode, img.size)


def _pillow_safe(transform):
    """Swap timm's posterize for :func:`posterize` in every auto-augment op of ``transform``."""
    from timm.data import auto_augment

    for t in transform.transforms:
        ops = list(getattr(t, "ops", None) or []) + [op for sub in getattr(t, "policy", None) or [] for op in sub]
        for op in ops:
            if isinstance(op, auto_augment.AugmentOp) and op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize
    return transform


def deit_train_transform(img_size: int, mean, std, augment=None, resize_im: bool = True) -> PILTransform:
    """DeiT's training transform: timm's ``create_transform(is_training=True)`` at the student's input size:
    RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, bicubic) + horizontal flip, RandAugment, normalisation, random
    erasing; with ``augment.prefetcher`` it stops before normalisation, at a uint8 CHW tensor (:class:`PrefetchStage`
    normalises and erases the batch).
    ``resize_im=False`` (DeiT: ``input_size <= 32``, i.e. CIFAR at its own size) swaps the crop for
    ``RandomCrop(img_size, padding=4)`` as build_transform_deit does (``augment.crop_padding``)."""
    from timm.data import create_transform
    from torchvision import transforms as T

    options = deit_augment(augment)
    fill = options.pop("fill_mean")
    padding = options.pop("crop_padding")
    prefetcher = bool(options.pop("prefetcher"))
    fill = NORMALIZATIONS[fill][0] if isinstance(fill, str) else tuple(fill) if fill else tuple(mean)
    transform = create_transform(input_size=img_size, is_training=True, mean=fill, std=tuple(std),
                                 use_prefetcher=prefetcher, **options)
    # the fill mean went to RandAugment; the tensor is normalised with the dataset's own (the batch, with prefetcher)
    if fill != tuple(mean) and not prefetcher:
        transform.transforms = [T.Normalize(mean=list(mean), std=list(std)) if isinstance(t, T.Normalize) else t
                                for t in transform.transforms]
    if not resize_im:
        transform.transforms[0] = T.RandomCrop(img_size, padding=padding)
    return PILTransform(_pillow_safe(transform))


def torchvision_train_transform(img_size: int, mean, std) -> PILTransform:
    """The ImageNet-LT / iNaturalist teachers' training transform (val-iisc/Saddle-LongTail datasets/imagenet.py
    L93-98, datasets/ina2018.py L92-97): torchvision RandomResizedCrop(224) (bilinear), horizontal flip,
    ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0), normalisation, on the whole decoded image."""
    from torchvision import transforms as T

    return PILTransform(T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip(),
                                   T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0),
                                   T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]))


def torchvision_eval_transform(img_size: int, mean, std) -> PILTransform:
    """Their evaluation transform (datasets/imagenet.py L102-106): Resize(256) (bilinear), CenterCrop(224)."""
    from torchvision import transforms as T

    return PILTransform(T.Compose([T.Resize(int(256 / 224 * img_size)), T.CenterCrop(img_size), T.ToTensor(),
                                   T.Normalize(mean=list(mean), std=list(std))]))


def deit_eval_transform(img_size: int, mean, std, resize_im: bool = True,
                        crop_pct: float | None = None, prefetcher: bool = False) -> PILTransform:
    """DeiT's evaluation transform (build_transform_deit, ``is_train=False``): shorter side to
    ``int(256 / 224 * img_size)`` (bicubic), centre crop; ``resize_im=False`` (CIFAR at 32) leaves the image as is.
    ``crop_pct``: timm's evaluation (transforms_imagenet_eval, which timm train.py scripts such as Refiner-ViT's
    main.py run with the model's crop_pct): shorter side to ``floor(img_size / crop_pct)``, centre crop (zero-padded
    where the resized image is smaller, crop_pct > 1).
    ``prefetcher`` (the DeiT pipeline's ``augment.prefetcher``): the crop is normalised from uint8 with the prefetcher
    loader's float32 arithmetic, ``(x - 255 mean) / (255 std)`` (:class:`LoaderNormalization`), as Refiner-ViT's
    evaluation loader does (main.py L550-561 ``use_prefetcher=args.prefetcher``; its timm/data/loader.py L66, L89),
    in place of ToTensor + Normalize, which round many values differently in the last bit."""
    from torchvision import transforms as T

    steps = []
    if resize_im:
        size = int((256 / 224) * img_size) if crop_pct is None else int(math.floor(img_size / float(crop_pct)))
        steps += [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(img_size)]
    if prefetcher:
        return PILTransform(T.Compose([*steps, T.PILToTensor(), LoaderNormalization(mean, std)]))
    return PILTransform(T.Compose([*steps, T.ToTensor(), T.Normalize(mean=list(mean), std=list(std))]))


class LoaderNormalization:
    """:class:`PrefetchStage`'s normalisation (without erasing) of one uint8 ``CHW`` image: the evaluation images of
    a recipe with ``augment.prefetcher``."""

    def __init__(self, mean, std):
        self.stage = PrefetchStage(mean, std)

    def __call__(self, x):
        return self.stage(x[None])[0]

    def __repr__(self):
        return f"LoaderNormalization(mean={self.stage.mean}, std={self.stage.std})"


class PrefetchStage:
    """What timm's ``PrefetchLoader`` does to a training batch on the device (Refiner_ViT b3e8cb0 data/loader.py
    L71-72, L77-79, L94-96, main.py L521-547 with ``args.prefetcher`` on by default, L295): ``(x - 255 mean) /
    (255 std)`` of the uint8 batch, then timm's ``RandomErasing`` per image on the normalised batch (the one loader
    erasing; the per-image transform leaves it out with ``use_prefetcher``, timm/data/transforms_factory.py L110-122).
    Computes in float32 as the loader does (without its fp16 option), then casts to the default dtype (float64 under
    ``trainer.precision=64-true``)."""

    def __init__(self, mean, std, re_prob: float = 0.0, re_mode: str = "const", re_count: int = 1):
        self.mean = [255 * float(m) for m in mean]
        self.std = [255 * float(s) for s in std]
        self.re = dict(probability=float(re_prob), mode=re_mode, max_count=int(re_count))
        self._on = {}  # device -> (mean, std, eraser or None), built at the first batch on it, not at every step

    def _parts(self, device):
        if device not in self._on:
            import torch
            from timm.data.random_erasing import RandomErasing

            shape = (1, len(self.mean), 1, 1)
            self._on[device] = (torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape),
                                torch.tensor(self.std, dtype=torch.float32, device=device).view(shape),
                                RandomErasing(**self.re, device=device) if self.re["probability"] > 0 else None)
        return self._on[device]

    def __call__(self, x):
        import torch

        if x.dtype != torch.uint8:
            raise UserError(f"benchmark.source_args.augment.prefetcher=true expects uint8 training images from the "
                            f"DeiT pipeline; this stream gives {x.dtype}: set it to false for this stream")
        mean, std, erase = self._parts(x.device)
        x = x.float().sub_(mean).div_(std)
        if erase is not None:
            x = erase(x)
        return x.to(torch.get_default_dtype())

    def __repr__(self):
        return f"PrefetchStage(mean={self.mean}, std={self.std}, random_erasing={self.re})"


def prefetch_stage(meta: dict) -> PrefetchStage | None:
    """The batch stage a source's ``meta`` asks for (its ``transforms`` record and ``normalization``), or None when
    its DeiT pipeline's ``augment.prefetcher`` is off."""
    record = meta.get("transforms") or {}
    if not uses_prefetcher(record.get("train"), record.get("augment")):
        return None
    augment, n = record["augment"], meta["normalization"]
    return PrefetchStage(n["mean"], n["std"], augment["re_prob"], augment["re_mode"], augment["re_count"])


def prefetch_meta(source_args: dict) -> dict:
    """What :func:`prefetch_stage` reads, from ``benchmark.source_args`` alone (a stream given ready-made, whose
    source the run does not build): the pipelines' record and the normalisation (ImageNet's when none is named); empty
    when the DeiT pipeline's prefetcher is off (the pipelines are then the source's to check: the CIFAR and ImageNet-R
    sources have ones of their own, e.g. ``coda``)."""
    a = source_args
    if a.get("train_transform", "default") != "deit" or not (a.get("augment") or {}).get("prefetcher"):
        return {}
    mean, std = resolve_normalization(a.get("normalize", "imagenet"), a.get("mean"), a.get("std"))
    return {"normalization": {"mean": list(mean), "std": list(std)},
            "transforms": check_pipelines(a.get("train_transform", "default"), a.get("test_transform", "default"),
                                          a.get("augment"))}
