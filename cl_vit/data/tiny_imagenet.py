"""Tiny-ImageNet-200 (Stanford CS231n): 200 ImageNet classes at 64x64 pixels, 500 training and 50 validation images
each: ``benchmark=tiny-imagenet``, GCAB-CFDC's Tiny-ImageNet (``experiment=gcab-tiny-imagenet``).

``<data_root>/tiny-imagenet-200/`` as the official zip (``python -m cl_vit.data.download tiny-imagenet``) extracts:
``wnids.txt``, ``train/<wnid>/images/<wnid>_<i>.JPEG``, ``val/images/val_<k>.JPEG`` labelled by
``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box``). The validation set is the test set (``test/`` has no
labels), as in every continual-learning paper on it. Labels are the sorted wnids (torchvision ImageFolder's order on
``train/``), the label space of the class-order files in tasks/.
"""
from __future__ import annotations

from pathlib import Path

from cl_vit.data.base import Source
from cl_vit.errors import UserError

LAYOUT = ("<root>/wnids.txt, <root>/train/<wnid>/images/*.JPEG, <root>/val/images/*.JPEG and "
          "<root>/val/val_annotations.txt (the extracted tiny-imagenet-200.zip)")


def read_tiny_imagenet(root: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """``(train, test, wnids)``: samples under ``root`` labelled by the sorted wnids of ``wnids.txt``."""
    wnids_file = root / "wnids.txt"
    annotations = root / "val" / "val_annotations.txt"
    for p in (wnids_file, annotations):
        if not p.is_file():
            raise UserError(f"{p} is missing: expected {LAYOUT.replace('<root>', str(root))}")
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    label = {w: i for i, w in enumerate(wnids)}
    train = []
    for w in wnids:
        folder = root / "train" / w / "images"
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpeg", ".jpg")) if folder.is_dir() else []
        if not files:
            raise UserError(f"class folder {folder} is missing or holds no JPEG: expected "
                            f"{LAYOUT.replace('<root>', str(root))}")
        train += [(str(p), label[w]) for p in files]
    test = []
    with open(annotations) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if parts == [""]:
                continue
            if len(parts) < 2 or parts[1] not in label:
                raise UserError(f"{annotations}:{lineno}: expected '<file><TAB><wnid of wnids.txt><TAB>...', got "
                                f"{line.strip()!r}")
            test.append((str(root / "val" / "images" / parts[0]), label[parts[1]]))
    return train, test, wnids


def build_tiny_imagenet(data_root: str | Path, root: str | Path | None = None, **args) -> Source:
    """``root``: default ``<data_root>/tiny-imagenet-200``. ``args``: the image and pipeline arguments of every file
    source (cl_vit.data.imagenet.IMAGE_ARGS, PIPELINE_ARGS, DECODE_ARGS), at 64 px by default."""
    from cl_vit.data.download import missing_dataset_error
    from cl_vit.data.filelist import _make_source, check_files_exist
    from cl_vit.data.imagenet import image_source_args

    data_root = Path(data_root).expanduser()
    root = Path(root).expanduser() if root else data_root / "tiny-imagenet-200"
    if not root.is_dir():
        raise missing_dataset_error("tiny-imagenet", root, LAYOUT, data_root)
    train, test, wnids = read_tiny_imagenet(root)
    check_files_exist(test, root / "val" / "val_annotations.txt")
    meta = {"root": str(root), "layout": "tiny-imagenet-200: labels = sorted wnids; the val/ set is the test set"}
    return _make_source("tiny-imagenet", train, test, wnids, data_root=data_root, map_targets_flag=False, meta=meta,
                        **image_source_args({"img_size": 64, **args}))
