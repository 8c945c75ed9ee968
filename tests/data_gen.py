"""Tiny datasets in the real on-disk formats, for the data tests (nothing is downloaded).

Images are class-coloured noise so that a tiny model can tell classes apart; folder names, file names, pickle keys
and list formats are the real ones.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import yaml

#: a few real ImageNet-R wnids (the first five of the sorted list)
WNIDS = ["n01443537", "n01484850", "n01494475", "n01498041", "n01514859"]
STYLES = ["art", "cartoon", "sketch", "toy"]


def class_image(label: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """RGB uint8 image whose mean colour identifies ``label``."""
    base = np.array([(label * 67) % 256, (label * 131 + 60) % 256, (label * 29 + 120) % 256], dtype=np.float32)
    img = base[None, None, :] + rng.normal(0, 30, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, img_rgb: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(img_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])


def make_imagenet_r(data_root: Path, wnids=WNIDS, per_class: int = 10, size=(48, 40), seed: int = 0) -> Path:
    """``<data_root>/imagenet-r/<wnid>/<style>_<i>.jpg`` (the real layout and file naming)."""
    rng = np.random.default_rng(seed)
    root = data_root / "imagenet-r"
    for label, wnid in enumerate(wnids):
        for i in range(per_class):
            h, w = size[0] + int(rng.integers(0, 9)), size[1] + int(rng.integers(0, 9))
            write_jpeg(root / wnid / f"{STYLES[i % len(STYLES)]}_{i}.jpg", class_image(label, rng, h, w))
    return root


def write_coda_split(split_dir: Path, root: Path, train_labels: dict, test_fraction: float = 0.3) -> None:
    """CODA-Prompt split files over the images under ``root``: ``train_labels`` maps wnid -> label id."""
    split_dir.mkdir(parents=True, exist_ok=True)
    docs = {"train": {"data": [], "targets": []}, "test": {"data": [], "targets": []}}
    for wnid, label in train_labels.items():
        files = sorted((root / wnid).glob("*.jpg"))
        n_test = max(1, int(len(files) * test_fraction))
        for k, f in enumerate(files):
            doc = docs["test" if k < n_test else "train"]
            doc["data"].append(f"data/imagenet-r/{wnid}/{f.name}")
            doc["targets"].append(label)
    for split, doc in docs.items():
        (split_dir / f"imagenet-r_{split}.yaml").write_text(yaml.safe_dump(doc))


def make_pilot_split(data_root: Path, wnids=WNIDS, train: int = 4, test: int = 2, seed: int = 0) -> Path:
    """LAMDA-PILOT / EASE's ImageNet-R archive unpacked: ``<data_root>/imagenet-r-pilot/{train,test}/<wnid>/*.jpg``."""
    rng = np.random.default_rng(seed)
    root = data_root / "imagenet-r-pilot"
    for label, wnid in enumerate(wnids):
        for part, n in (("train", train), ("test", test)):
            for i in range(n):
                write_jpeg(root / part / wnid / f"{STYLES[i % len(STYLES)]}_{part}_{i}.jpg", class_image(label, rng, 40, 36))
    return root


def make_cifar(data_root: Path, variant: str = "cifar10", train_counts=None, test_per_class: int = 4,
               seed: int = 0) -> Path:
    """The python-pickle archive layout: cifar-10-batches-py/data_batch_{1..5}, test_batch, batches.meta or
    cifar-100-python/train, test, meta, with the real keys (data [N, 3072] uint8 channel-major, labels)."""
    rng = np.random.default_rng(seed)
    n_classes = 10 if variant == "cifar10" else 100
    train_counts = train_counts or [10] * n_classes

    def batch(counts):
        labels = np.repeat(np.arange(n_classes), counts)
        rng.shuffle(labels)
        images = np.stack([class_image(int(y), rng, 32, 32) for y in labels])
        return images.transpose(0, 3, 1, 2).reshape(len(labels), -1).astype(np.uint8), labels.tolist()

    x_tr, y_tr = batch(train_counts)
    x_te, y_te = batch([test_per_class] * n_classes)
    if variant == "cifar10":
        folder = data_root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i, part in enumerate(np.array_split(np.arange(len(y_tr)), 5)):
            _dump(folder / f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5", "labels":
                  [y_tr[k] for k in part], "data": x_tr[part], "filenames": [f"img_{k}.png" for k in part]})
        _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y_te, "data": x_te,
                                      "filenames": [f"t_{k}.png" for k in range(len(y_te))]})
        _dump(folder / "batches.meta", {"label_names": [f"c10_{k}" for k in range(10)], "num_vis": 3072,
                                        "num_cases_per_batch": 10000})
    else:
        folder = data_root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
            _dump(folder / name, {"filenames": [f"{name}_{k}.png" for k in range(len(y))], "batch_label": name,
                                  "fine_labels": y, "coarse_labels": [v // 5 for v in y], "data": x})
        _dump(folder / "meta", {"fine_label_names": [f"c100_{k}" for k in range(100)],
                                "coarse_label_names": [f"super_{k}" for k in range(20)]})
    return folder


def _dump(path: Path, doc: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(doc, f, protocol=2)


def make_imagenet_lt(data_root: Path, train_counts, test_per_class: int = 2, seed: int = 0) -> Path:
    """``<data_root>/imagenet-lt/`` with OLTR's list files and ImageNet-style train/<wnid>/, val/<wnid>/ images."""
    rng = np.random.default_rng(seed)
    root = data_root / "imagenet-lt"
    lines = {"train": [], "test": []}
    for label, n in enumerate(train_counts):
        wnid = f"n0{label:07d}"
        for i in range(n):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            write_jpeg(root / rel, class_image(label, rng, 24, 24))
            lines["train"].append(f"{rel} {label}")
        for i in range(test_per_class):
            rel = f"val/{wnid}/ILSVRC2012_val_{label:04d}{i:04d}.JPEG"
            write_jpeg(root / rel, class_image(label, rng, 24, 24))
            lines["test"].append(f"{rel} {label}")
    for split, ls in lines.items():
        (root / f"ImageNet_LT_{split}.txt").write_text("\n".join(ls) + "\n")
    return root


def make_inat(data_root: Path, train_counts, val_per_class: int = 2, seed: int = 0, fmt: str = "list") -> Path:
    """``<data_root>/inat2018/train_val2018/<super>/<category>/<id>.jpg`` with DeiT-LT's lists or the official
    COCO-style json files."""
    rng = np.random.default_rng(seed)
    root = data_root / "inat2018"
    items = {"train": [], "val": []}
    k = 0
    for label, n in enumerate(train_counts):
        for split, count in (("train", n), ("val", val_per_class)):
            for _ in range(count):
                rel = f"train_val2018/Plantae/{label}/{k:032x}.jpg"
                write_jpeg(root / rel, class_image(label, rng, 24, 24))
                items[split].append((k, rel, label))
                k += 1
    for split, rows in items.items():
        if fmt == "list":
            (root / f"iNaturalist18_{split}.txt").write_text("".join(f"{rel} {y}\n" for _, rel, y in rows))
        else:
            doc = {"info": {"year": 2018}, "images": [{"id": i, "file_name": rel, "width": 24, "height": 24}
                                                      for i, rel, _ in rows],
                   "annotations": [{"id": i, "image_id": i, "category_id": y} for i, _, y in rows],
                   "categories": [{"id": c, "name": f"species_{c}", "supercategory": "Plantae"}
                                  for c in range(len(train_counts))]}
            (root / f"{split}2018.json").write_text(json.dumps(doc))
    return root


def make_tiny_imagenet(data_root: Path, n_classes: int = 4, train: int = 3, val: int = 2, seed: int = 0) -> Path:
    """``<data_root>/tiny-imagenet-200/`` as the official zip extracts: wnids.txt (unsorted, as theirs),
    train/<wnid>/images/<wnid>_<i>.JPEG with train/<wnid>/<wnid>_boxes.txt, val/images/val_<k>.JPEG with
    val/val_annotations.txt (file, wnid, box; tab-separated), test/images/ without labels."""
    rng = np.random.default_rng(seed)
    root = data_root / "tiny-imagenet-200"
    wnids = [f"n0{(53 * c + 31) % 97:07d}" for c in range(n_classes)]  # not in sorted order
    (root).mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    annotations = []
    k = 0
    for w in wnids:
        label = sorted(wnids).index(w)
        boxes = []
        for i in range(train):
            write_jpeg(root / "train" / w / "images" / f"{w}_{i}.JPEG", class_image(label, rng, 64, 64))
            boxes.append(f"{w}_{i}.JPEG\t0\t0\t63\t63\n")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
        for _ in range(val):
            write_jpeg(root / "val" / "images" / f"val_{k}.JPEG", class_image(label, rng, 64, 64))
            annotations.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("".join(annotations))
    write_jpeg(root / "test" / "images" / "test_0.JPEG", class_image(0, rng, 64, 64))
    return root


def make_imagenet100(data_root: Path, wnids, train: int = 3, val: int = 2, seed: int = 0) -> tuple[Path, Path]:
    """An ImageNet folder (``<data_root>/imagenet/{train,val}/<wnid>/``, ILSVRC file names) holding ``wnids`` and
    one more class outside the subset, and DyTox's split files (``<data_root>/imagenet100-splits/{train,val}_100.txt``,
    lines ``train/<wnid>/<file>.JPEG <label>``, label = position of the wnid in ``wnids``)."""
    rng = np.random.default_rng(seed)
    root = data_root / "imagenet"
    lines = {"train": [], "val": []}
    for label, w in enumerate(list(wnids) + ["n09999999"]):
        for split, n in (("train", train), ("val", val)):
            for i in range(n):
                name = f"{w}_{i}.JPEG" if split == "train" else f"ILSVRC2012_val_{label:04d}{i:04d}.JPEG"
                write_jpeg(root / split / w / name, class_image(label, rng, 40, 48))
                if label < len(wnids):
                    lines[split].append(f"{split}/{w}/{name} {label}\n")
    splits = data_root / "imagenet100-splits"
    splits.mkdir(parents=True, exist_ok=True)
    for split, rows in lines.items():
        (splits / f"{split}_100.txt").write_text("".join(rows))
    return root, splits
