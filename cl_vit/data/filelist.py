"""File-list sources: ImageNet-LT and iNaturalist-2018.

* ImageNet-LT (Liu et al. 2019, OLTR): ``ImageNet_LT_{train,val,test}.txt`` with lines ``relative/path label``
  (``train/n01440764/n01440764_10026.JPEG 0``), paths relative to the ImageNet folder.
* iNaturalist-2018: DeiT-LT's lists ``iNaturalist18_{train,val}.txt`` (same line format, paths like
  ``train_val2018/Plantae/7477/<id>.jpg``), or the official COCO-style ``train2018.json`` / ``val2018.json``
  (``images`` + ``annotations`` joined by image id; the category id is the label).

``map_targets=true`` re-indexes the classes by descending training frequency exactly as DeiT-LT's datasets.py
(``class_map[argsort(-counts)[i]] = i``, applied to train and test labels); the map is recorded in results.json.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from cl_vit.data.base import Source
from cl_vit.data.longtail import frequency_order
from cl_vit.data.transforms import check_pipelines, decode_options, imagenet_style_datasets, resolve_normalization
from cl_vit.data.verify import skipped_record, verify_images
from cl_vit.errors import UserError


def read_file_list(path: Path, image_root: Path, n_classes: int) -> list[tuple[str, int]]:
    """Lines ``relative/path label`` -> ``(image_root/path, label)``; a bad line is an error naming file and line."""
    samples = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{path}:{lineno}: expected '<relative/path> <integer label>', got {line.strip()!r}")
            label = int(parts[1])
            if not 0 <= label < n_classes:
                raise UserError(f"{path}:{lineno}: label {label} is outside the class range 0..{n_classes - 1}")
            samples.append((str(image_root / parts[0]), label))
    if not samples:
        raise UserError(f"file list {path} is empty: expected lines '<relative/path> <label>'")
    return samples


def read_coco_annotations(path: Path, image_root: Path, n_classes: int) -> tuple[list[tuple[str, int]], dict]:
    """iNaturalist's ``train2018.json``/``val2018.json``: samples in ``images`` order and ``{category id: name}``."""
    try:
        doc = json.loads(path.read_text())
        images = {int(im["id"]): im["file_name"] for im in doc["images"]}
        label_of = {int(a["image_id"]): int(a["category_id"]) for a in doc["annotations"]}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"annotation file {path} is not in the iNaturalist format (images, annotations with image_id "
                        f"and category_id): {type(e).__name__} {e}") from e
    samples = []
    for image_id, file_name in images.items():
        if image_id not in label_of:
            raise UserError(f"annotation file {path}: image {image_id} ({file_name}) has no annotation")
        label = label_of[image_id]
        if not 0 <= label < n_classes:
            raise UserError(f"annotation file {path}: image {image_id} ({file_name}) has category {label} outside the "
                            f"class range 0..{n_classes - 1}")
        samples.append((str(image_root / file_name), label))
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in doc.get("categories", [])}
    return samples, names


def check_files_exist(samples, listing: Path) -> None:
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise UserError(f"{missing[0]} (listed in {listing.name}) does not exist ({len(missing)} of {len(samples)} "
                        "listed files missing): check data_root / image_root")


def map_targets(train_labels: Sequence[int], n_classes: int) -> np.ndarray:
    """DeiT-LT's class map: ``class_map[c]`` is the new id of class ``c`` (0 = most frequent in training)."""
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=n_classes)
    class_map = np.empty(n_classes, dtype=np.int64)
    class_map[frequency_order(counts)] = np.arange(n_classes)
    return class_map


def _make_source(name, train, test, classes, *, data_root, map_targets_flag, img_size, normalize, mean, std,
                 test_resize, skip_corrupt, verify, meta, pipelines, decode=None) -> Source:
    meta["transforms"] = check_pipelines(**pipelines, test_resize=test_resize)
    meta["transforms"]["decode"] = decode = decode_options(**(decode or {}))
    n = len(classes)
    if map_targets_flag:
        class_map = map_targets([y for _, y in train], n)
        train = [(p, int(class_map[y])) for p, y in train]
        test = [(p, int(class_map[y])) for p, y in test]
        new_classes = [""] * n
        for old, new in enumerate(class_map):
            new_classes[new] = classes[old]
        classes = new_classes
        meta["map_targets"] = {"rule": "DeiT-LT: classes re-indexed by descending training frequency "
                                       "(class_map[argsort(-counts)[i]] = i)",
                               "class_map": class_map.tolist()}
    else:
        meta["map_targets"] = None
    mean, std = resolve_normalization(normalize, mean, std)
    meta["normalization"] = {"mean": list(mean), "std": list(std)}
    cache = Path(data_root).expanduser() / ".cache" / "cl_vit-verify"
    train, skipped_train = verify_images(train, mode=verify, skip_corrupt=skip_corrupt, cache_dir=cache, name=name)
    test, skipped_test = verify_images(test, mode=verify, skip_corrupt=skip_corrupt, cache_dir=cache, name=name)
    if skip_corrupt:
        meta["skipped_corrupt"] = skipped_record(skipped_train + skipped_test)
    meta.update(n_train=len(train), n_test=len(test))
    train_ds, test_ds = imagenet_style_datasets(train, test, img_size, mean, std, test_resize, **pipelines,
                                                decode=decode)
    return Source(
        name=name,
        train=train_ds,
        test=test_ds,
        classes=classes,
        in_chans=3,
        img_size=img_size,
        meta=meta,
    )


def build_imagenet_lt(
    data_root: str | Path,
    root: str | Path | None = None,
    image_root: str | Path | None = None,
    test_split: str = "test",
    n_classes: int = 1000,
    map_targets: bool = True,
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
    backend: str = "opencv",
    crop_scale: Sequence[float] = (0.08, 1.0),
    train_interpolation: str = "bilinear",
    test_interpolation: str = "bilinear",
    exif_orientation: str = "apply",
    **_,
) -> Source:
    """Lists in ``root`` (default ``<data_root>/imagenet-lt``); images under ``image_root`` (default: ``root``,
    so ``root/train`` and ``root/val`` may be links to ImageNet's folders). ``test_split``: test (50 per class,
    the published numbers) or val (20 per class)."""
    from cl_vit.data.download import missing_dataset_error

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "imagenet-lt"
    image_root = Path(image_root).expanduser() if image_root else root
    if test_split not in ("test", "val"):
        raise UserError(f"benchmark.source_args.test_split={test_split!r} must be 'test' or 'val'")
    lists = [_imagenet_lt_list(root, "train"), _imagenet_lt_list(root, test_split)]
    layout = (f"<root>/ImageNet_LT_train.txt and ImageNet_LT_{test_split}.txt (lines '<path> <label>'; DeiT-LT's "
              "Imagenet_LT_*.txt spelling works too) and the ImageNet images under <root>/train/<wnid>/, "
              "<root>/val/<wnid>/ (or image_root=...)")
    if not root.is_dir() or not lists[0].is_file():
        raise missing_dataset_error("imagenet-lt", root, layout, data_root)
    if not lists[1].is_file():
        raise UserError(f"{lists[1]} is missing: expected {layout}")
    train = read_file_list(lists[0], image_root, n_classes)
    test = read_file_list(lists[1], image_root, n_classes)
    check_files_exist(train, lists[0])
    check_files_exist(test, lists[1])
    classes = _names_from_paths(train, n_classes)
    meta = {"root": str(root), "image_root": str(image_root), "lists": [p.name for p in lists]}
    return _make_source("imagenet-lt", train, test, classes, data_root=data_root, map_targets_flag=map_targets,
                        img_size=img_size, normalize=normalize, mean=mean, std=std, test_resize=test_resize,
                        skip_corrupt=skip_corrupt, verify=verify, meta=meta,
                        pipelines=dict(train_transform=train_transform, test_transform=test_transform, augment=augment),
                        decode=dict(backend=backend, crop_scale=crop_scale, train_interpolation=train_interpolation,
                                    test_interpolation=test_interpolation, exif_orientation=exif_orientation))


def _imagenet_lt_list(root: Path, split: str) -> Path:
    """``ImageNet_LT_<split>.txt`` (OLTR's name), else ``Imagenet_LT_<split>.txt`` (val-iisc/DeiT-LT data_txt/)."""
    for name in (f"ImageNet_LT_{split}.txt", f"Imagenet_LT_{split}.txt"):
        if (root / name).is_file():
            return root / name
    return root / f"ImageNet_LT_{split}.txt"


def _names_from_paths(samples, n_classes: int) -> list[str]:
    """Class names from the folder holding each listed image (ImageNet wnids, iNaturalist category ids)."""
    names: dict[int, str] = {}
    for p, y in samples:
        parts = Path(p).parts
        names.setdefault(y, parts[-2] if len(parts) >= 2 else str(y))
    return [names.get(k, str(k)) for k in range(n_classes)]


def build_inat2018(
    data_root: str | Path,
    root: str | Path | None = None,
    annotations: str = "auto",
    n_classes: int = 8142,
    map_targets: bool = True,
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
    backend: str = "opencv",
    crop_scale: Sequence[float] = (0.08, 1.0),
    train_interpolation: str = "bilinear",
    test_interpolation: str = "bilinear",
    exif_orientation: str = "apply",
    **_,
) -> Source:
    """``root`` (default ``<data_root>/inat2018``) holds ``train_val2018/`` and either DeiT-LT's
    ``iNaturalist18_{train,val}.txt`` (``annotations=list``) or ``train2018.json``/``val2018.json`` (``json``);
    ``auto`` takes the lists when present. The validation set is the test set, as in every iNat-2018 LT paper."""
    from cl_vit.data.download import missing_dataset_error

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "inat2018"
    lists = [root / "iNaturalist18_train.txt", root / "iNaturalist18_val.txt"]
    jsons = [root / "train2018.json", root / "val2018.json"]
    layout = ("<root>/train_val2018/<super>/<category>/<image>.jpg with iNaturalist18_{train,val}.txt (DeiT-LT) or "
              "train2018.json and val2018.json (official)")
    if annotations not in ("auto", "list", "json"):
        raise UserError(f"benchmark.source_args.annotations={annotations!r} must be auto, list or json")
    if not root.is_dir():
        raise missing_dataset_error("inat2018", root, layout, data_root)
    use_lists = annotations == "list" or (annotations == "auto" and lists[0].is_file())
    files = lists if use_lists else jsons
    for p in files:
        if not p.is_file():
            raise UserError(f"{p} is missing: expected {layout}")
    if use_lists:
        train = read_file_list(files[0], root, n_classes)
        test = read_file_list(files[1], root, n_classes)
        classes = _names_from_paths(train, n_classes)
    else:
        train, names = read_coco_annotations(files[0], root, n_classes)
        test, _ = read_coco_annotations(files[1], root, n_classes)
        classes = [names.get(k, str(k)) for k in range(n_classes)]
    check_files_exist(train, files[0])
    check_files_exist(test, files[1])
    meta = {"root": str(root), "annotations": [p.name for p in files]}
    return _make_source("inat2018", train, test, classes, data_root=data_root, map_targets_flag=map_targets,
                        img_size=img_size, normalize=normalize, mean=mean, std=std, test_resize=test_resize,
                        skip_corrupt=skip_corrupt, verify=verify, meta=meta,
                        pipelines=dict(train_transform=train_transform, test_transform=test_transform, augment=augment),
                        decode=dict(backend=backend, crop_scale=crop_scale, train_interpolation=train_interpolation,
                                    test_interpolation=test_interpolation, exif_orientation=exif_orientation))
