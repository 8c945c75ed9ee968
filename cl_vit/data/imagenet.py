"""ImageNet-1k (ILSVRC-2012) from its train/val class folders: ``benchmark=imagenet`` (Refiner-ViT's training data).

``<data_root>/imagenet/train/<wnid>/*.JPEG`` and ``<data_root>/imagenet/val/<wnid>/*.JPEG`` (the validation images
sorted into class folders, as timm's and torchvision's ImageFolder read them, and as zhoudaquan/Refiner_ViT's
main.py reads ``--data``/train and /val). Labels are the sorted wnids (0 = n01440764), the standard ImageNet ids; the
validation set is the test set, as in every ImageNet paper.
"""
from __future__ import annotations

from pathlib import Path

from cl_vit.data.base import Source, scan_image_folder
from cl_vit.errors import UserError

LAYOUT = "<root>/train/<wnid>/<images> and <root>/val/<wnid>/<images> (ILSVRC-2012, validation sorted into folders)"


#: the image arguments every file source takes (cl_vit.data.filelist, cl_vit.data.imagenet_r), with their defaults
IMAGE_ARGS = dict(img_size=224, normalize="imagenet", mean=None, std=None, test_resize="crop", skip_corrupt=False,
                  verify="header")
PIPELINE_ARGS = dict(train_transform="default", test_transform="default", augment=None)
DECODE_ARGS = dict(backend="opencv", crop_scale=(0.08, 1.0), train_interpolation="bilinear",
                   test_interpolation="bilinear")


def build_imagenet(data_root: str | Path, root: str | Path | None = None, n_classes: int | None = None,
                   **args) -> Source:
    """``n_classes``: the first n sorted wnids only (tests, quick runs); default all (1,000). ``args``: the image
    and pipeline arguments of every file source (:data:`IMAGE_ARGS`, :data:`PIPELINE_ARGS`, :data:`DECODE_ARGS`)."""
    from cl_vit.data.download import missing_dataset_error
    from cl_vit.data.filelist import _make_source

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "imagenet"
    if not (root / "train").is_dir():
        raise missing_dataset_error("imagenet", root, LAYOUT, data_root)
    if not (root / "val").is_dir():
        raise UserError(f"{root / 'val'} is missing: expected {LAYOUT.replace('<root>', str(root))}")
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if n_classes is not None:
        wnids = wnids[: int(n_classes)]
    train, classes = scan_image_folder(root / "train", wnids)
    test, _ = scan_image_folder(root / "val", classes)
    meta = {"root": str(root), "layout": "ILSVRC-2012 train/ and val/ class folders, labels = sorted wnids"}
    image = {k: args.get(k, v) for k, v in IMAGE_ARGS.items()}
    pipelines = {k: args.get(k, v) for k, v in PIPELINE_ARGS.items()}
    decode = {k: args.get(k, v) for k, v in DECODE_ARGS.items()}
    return _make_source("imagenet", train, test, classes, data_root=data_root, map_targets_flag=False, meta=meta,
                        pipelines=pipelines, decode=decode, **image)
