"""ImageNet-1k (ILSVRC-2012) from its train/val class folders: ``benchmark=imagenet`` (Refiner-ViT's training data),
and DyTox's ImageNet-100 subset of it (``benchmark=imagenet100``).

``<data_root>/imagenet/train/<wnid>/*.JPEG`` and ``<data_root>/imagenet/val/<wnid>/*.JPEG`` (the validation images
sorted into class folders, as timm's and torchvision's ImageFolder read them, and as zhoudaquan/Refiner_ViT's
main.py reads ``--data``/train and /val). Labels are the sorted wnids (0 = n01440764), the standard ImageNet ids; the
validation set is the test set, as in every ImageNet paper.
"""
from __future__ import annotations

from pathlib import Path

from cl_vit.data.base import Source, scan_image_folder
from cl_vit.errors import UserError
from cl_vit.loading import read_yaml

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"

LAYOUT = "<root>/train/<wnid>/<images> and <root>/val/<wnid>/<images> (ILSVRC-2012, validation sorted into folders)"


#: the image arguments every file source takes (cl_vit.data.filelist, cl_vit.data.imagenet_r), with their defaults
IMAGE_ARGS = dict(img_size=224, normalize="imagenet", mean=None, std=None, test_resize="crop", skip_corrupt=False,
                  verify="header")
PIPELINE_ARGS = dict(train_transform="default", test_transform="default", augment=None, test_crop_pct=None)
DECODE_ARGS = dict(backend="opencv", crop_scale=(0.08, 1.0), train_interpolation="bilinear",
                   test_interpolation="bilinear", exif_orientation="apply")


def image_source_args(args: dict) -> dict:
    """The keyword arguments of cl_vit.data.filelist._make_source from a source's ``args``, with the defaults."""
    return {**{k: args.get(k, v) for k, v in IMAGE_ARGS.items()},
            "pipelines": {k: args.get(k, v) for k, v in PIPELINE_ARGS.items()},
            "decode": {k: args.get(k, v) for k, v in DECODE_ARGS.items()}}


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
    return _make_source("imagenet", train, test, classes, data_root=data_root, map_targets_flag=False, meta=meta,
                        **image_source_args(args))


SUBSET_FILES = ("train_100.txt", "val_100.txt")
SUBSET_DIR = "imagenet100-splits"
#: where DyTox's split files are (arthurdouillard/dytox at the commit whose val_100.txt tasks/ records)
SUBSET_URL = "https://github.com/arthurdouillard/dytox/tree/4da25c13ef34e827e5361f78dcda08811a413c74/imagenet100_splits"


def build_imagenet100(data_root: str | Path, root: str | Path | None = None, split_dir: str | Path | None = None,
                      **args) -> Source:
    """DyTox's ImageNet-100: the images its split files ``train_100.txt`` / ``val_100.txt`` list (lines
    ``train/<wnid>/<file>.JPEG <label>``, paths under the ImageNet folder ``root``, default ``<data_root>/imagenet``;
    labels 0-99 as in the files), as continuum's ImageNet100(data_subset=...) reads them for DyTox and GCAB-CFDC
    (continual/datasets.py L86-90). ``split_dir``: default ``<data_root>/imagenet100-splits``. The labels must name
    the wnids of tasks/imagenet100-dytox.yaml. ``args``: as :func:`build_imagenet`."""
    import hashlib


    from cl_vit.data.download import missing_dataset_error
    from cl_vit.data.filelist import _make_source, check_files_exist, read_file_list

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "imagenet"
    split_dir = Path(split_dir).expanduser() if split_dir else data_root / SUBSET_DIR
    if not root.is_dir():
        raise missing_dataset_error("imagenet100", root, LAYOUT, data_root)
    lists = [split_dir / name for name in SUBSET_FILES]
    for p in lists:
        if not p.is_file():
            raise UserError(f"DyTox's ImageNet-100 split file {p} is missing: download train_100.txt and val_100.txt "
                            f"from {SUBSET_URL} into {split_dir} (or give benchmark.source_args.split_dir=DIR)")
    train = read_file_list(lists[0], root, 100)
    test = read_file_list(lists[1], root, 100)
    check_files_exist(train, lists[0])
    check_files_exist(test, lists[1])
    doc = read_yaml(TASKS_DIR / "imagenet100-dytox.yaml")
    wnids = [str(w) for w in doc["wnids"]]
    for (path, label), listing in [(s, lists[0]) for s in train] + [(s, lists[1]) for s in test]:
        if Path(path).parent.name != wnids[label]:
            raise UserError(f"{listing} gives {path} label {label}, DyTox's label of {wnids[label]} "
                            "(tasks/imagenet100-dytox.yaml): these are not DyTox's split files")
    meta = {"root": str(root), "split_dir": str(split_dir),
            "layout": "DyTox imagenet100_splits lists over ILSVRC-2012 train/ and val/ class folders",
            "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in lists}}
    return _make_source("imagenet100", train, test, wnids, data_root=data_root, map_targets_flag=False, meta=meta,
                        **image_source_args(args))
