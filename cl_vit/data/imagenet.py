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


def build_imagenet(
    data_root: str | Path,
    root: str | Path | None = None,
    n_classes: int | None = None,
    img_size: int = 224,
    normalize: str = "imagenet",
    mean=None,
    std=None,
    test_resize: str = "crop",
    skip_corrupt: bool = False,
    verify: str = "header",
    train_transform: str = "default",
    test_transform: str = "default",
    augment: dict | None = None,
    **_,
) -> Source:
    """``n_classes``: the first n sorted wnids only (tests, quick runs); default all (1,000)."""
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
    return _make_source("imagenet", train, test, classes, data_root=data_root, map_targets_flag=False,
                        img_size=img_size, normalize=normalize, mean=mean, std=std, test_resize=test_resize,
                        skip_corrupt=skip_corrupt, verify=verify, meta=meta,
                        pipelines=dict(train_transform=train_transform, test_transform=test_transform, augment=augment))
