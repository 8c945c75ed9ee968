"""CIFAR-10 / CIFAR-100 from the python pickle archives, and their long-tailed versions (LDAM-DRW / DeiT-LT).

Read directly from ``<data_root>/cifar-10-batches-py/`` and ``<data_root>/cifar-100-python/`` (what the official
archives extract to). torchvision's CIFAR classes would check each file's md5, which a re-pickled or generated copy
cannot pass; the archive itself is checked by ``python -m cl_vit.data.download``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cl_vit.data.base import Source, TensorImageDataset
from cl_vit.data.longtail import longtail_subset, ltcil_holdout
from cl_vit.data.transforms import (
    array_pipeline,
    check_pipelines,
    cifar_eval_pipeline,
    cifar_train_pipeline,
    decode_options,
    deit_eval_transform,
    deit_train_transform,
    resolve_normalization,
    uses_prefetcher,
)
from cl_vit import loading
from cl_vit.errors import UserError

ARCHIVES = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "names": "label_names", "labels": "labels",
                "n_classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "names": "fine_label_names", "labels": "fine_labels", "n_classes": 100},
}


class ArrayImageDataset(TensorImageDataset):
    """RGB uint8 images ``[N, H, W, 3]`` in memory, augmented with an albumentations pipeline."""

    def __getitem__(self, i):
        img = self.images[i]
        if self.transform is not None:
            return self.transform(image=img)["image"], self.targets[i]
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), self.targets[i]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(path)
    try:  # the archives are Python 2 pickles; only arrays and plain values are admitted
        doc = loading.load_pickle(path, "CIFAR file", encoding="latin1")
    except loading.UnsafeFile:
        raise
    except Exception as e:
        raise UserError(f"CIFAR file {path} cannot be read ({type(e).__name__}): it is corrupt; delete the folder and "
                        "download the archive again") from e
    if not isinstance(doc, dict):
        raise UserError(f"CIFAR file {path} does not hold a CIFAR batch (a dict): download the archive again")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in doc.items()}


def _batches(folder: Path, files: list[str], label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = folder / name
        doc = _unpickle(path)
        if "data" not in doc or label_key not in doc:
            raise UserError(f"CIFAR file {path} lacks 'data' or '{label_key}': is it the right archive?")
        data = np.asarray(doc["data"], dtype=np.uint8)
        y = np.asarray(doc[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(y):
            raise UserError(f"CIFAR file {path} holds data of shape {data.shape} for {len(y)} labels: expected "
                            "[N, 3072] uint8 rows (3x32x32, channel-major)")
        bad = np.flatnonzero((y < 0) | (y >= n_classes))
        if bad.size:
            raise UserError(f"CIFAR file {path} has label {int(y[bad[0]])} (record {int(bad[0])}) outside the class "
                            f"range 0..{n_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def load_cifar(data_root: str | Path, variant: str):
    """``(x_train, y_train, x_test, y_test, class_names)`` with images as ``[N, 32, 32, 3]`` uint8 (HWC)."""
    from cl_vit.data.download import missing_dataset_error

    spec = ARCHIVES[variant]
    data_root = Path(data_root).expanduser()
    folder = data_root / spec["folder"]
    layout = f"<root> with {', '.join(spec['train'] + spec['test'] + [spec['meta']])} (python pickles)"
    if not folder.is_dir():
        raise missing_dataset_error(variant, folder, layout, data_root)
    try:
        x_tr, y_tr = _batches(folder, spec["train"], spec["labels"], spec["n_classes"])
        x_te, y_te = _batches(folder, spec["test"], spec["labels"], spec["n_classes"])
        names = [str(n) for n in _unpickle(folder / spec["meta"])[spec["names"]]]
    except FileNotFoundError as e:
        raise UserError(f"CIFAR file {e.args[0]} is missing: expected {layout}; download again with "
                        f"python -m cl_vit.data.download {variant} --root {data_root}") from None
    if len(names) != spec["n_classes"]:
        raise UserError(f"{folder / spec['meta']} names {len(names)} classes, expected {spec['n_classes']}")
    return x_tr, y_tr, x_te, y_te, names


def build_cifar(
    data_root: str | Path,
    variant: str = "cifar100",
    imbalance_ratio: float | None = None,
    img_size: int = 32,
    normalize: str = "cifar",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_transform: str = "default",
    test_transform: str = "default",
    augment: dict | None = None,
    backend: str = "opencv",
    crop_scale: Sequence[float] = (0.08, 1.0),
    train_interpolation: str = "bilinear",
    test_interpolation: str = "bilinear",
    test_resize: str = "squash",
    holdout: dict | None = None,
    **_,
) -> Source:
    """CIFAR-10/100; with ``imbalance_ratio`` the long-tailed training set of LDAM-DRW (the test set stays balanced).

    ``train_transform``/``test_transform``: ``default`` is LDAM-DRW's pad-crop-flip (albumentations; the image resized
    to ``img_size`` first when it is not 32); ``deit`` is DeiT-LT's student pipeline on the 32x32 image (timm's
    RandomResizedCrop to ``img_size``, RandAugment, random erasing; evaluation resize + centre crop); ``coda`` is
    CODA-Prompt's (RandomResizedCrop to ``img_size`` + flip; evaluation: resize to ``img_size``), see
    cl_vit.data.transforms; ``backend``, ``crop_scale``, ``train_interpolation``, ``test_interpolation`` and
    ``test_resize`` (``squash``: Resize(img_size); ``crop``: Resize(img_size * 256 / 224) + CenterCrop) set its
    options (RanPAC's and RevisitingCIL's variants: configs/experiment/ranpac-cifar100.yaml).

    ``holdout``: Long-Tailed-CIL's validation split (:func:`_ltcil_holdout`), on the long-tailed training set."""
    coda = {"train": train_transform == "coda", "test": test_transform == "coda"}
    transforms = check_pipelines("default" if coda["train"] else train_transform,
                                 "default" if coda["test"] else test_transform, augment)
    if any(coda.values()):
        transforms["decode"] = decode_options(backend, crop_scale, train_interpolation, test_interpolation)
        transforms["test_resize"] = test_resize
        transforms.update({k: "coda" for k, on in coda.items() if on},
                          coda_source="GT-RIPL/CODA-Prompt dataloaders/utils.py L42-62: train RandomResizedCrop + "
                                      "flip, test Resize")
    x_tr, y_tr, x_te, y_te, names = load_cifar(data_root, variant)
    mean, std = resolve_normalization(normalize, mean, std)
    meta = {"root": str(Path(data_root).expanduser() / ARCHIVES[variant]["folder"]),
            "normalization": {"mean": list(mean), "std": list(std)}, "transforms": transforms}
    name = variant
    if imbalance_ratio is not None:
        if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float)) or imbalance_ratio < 1:
            raise UserError(f"benchmark.imbalance_ratio={imbalance_ratio!r} must be a number >= 1 "
                            "(published: 10, 50, 100)")
        keep, counts = longtail_subset(y_tr, imbalance_ratio, seed=0)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
        name = f"{variant}-lt"
        meta.update(imbalance_ratio=imbalance_ratio, train_counts=counts,
                    profile="LDAM-DRW exponential profile, per-class indices shuffled by numpy seed 0, first n_i kept")
    if holdout:
        if imbalance_ratio is None:
            raise UserError("benchmark.source_args.holdout is Long-Tailed-CIL's validation split of the long-tailed "
                            "training set: use it with a -lt source, or set it to null")
        keep, meta["holdout"] = _ltcil_holdout(y_tr, len(names), **holdout)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    meta.update(n_train=int(len(y_tr)), n_test=int(len(y_te)))
    resize_im = img_size > 32  # build_transform_deit's test: CIFAR at its own size is padded and cropped, not resized
    if train_transform == "deit":
        train_tf = deit_train_transform(img_size, mean, std, augment, resize_im=resize_im)
    elif coda["train"]:
        train_tf = array_pipeline(img_size, mean, std, True, **transforms["decode"])
    else:
        train_tf = cifar_train_pipeline(img_size, mean, std)
    if test_transform == "deit":
        test_tf = deit_eval_transform(img_size, mean, std, resize_im=resize_im,
                                      prefetcher=uses_prefetcher(train_transform, augment))
    elif coda["test"]:
        test_tf = array_pipeline(img_size, mean, std, False, test_resize, **transforms["decode"])
    else:
        test_tf = cifar_eval_pipeline(img_size, mean, std)
    return Source(
        name=name,
        train=ArrayImageDataset(x_tr, y_tr, train_tf),
        test=ArrayImageDataset(x_te, y_te, test_tf),
        classes=names,
        in_chans=3,
        img_size=img_size,
        meta=meta,
    )


def _ltcil_holdout(labels, n_classes: int, fraction: float = 0.1, seed: int = 0, class_order="identity",
                   n_experiences=None, classes_per_experience=None) -> tuple[np.ndarray, dict]:
    """Positions kept for training and the record of what Long-Tailed-CIL's validation split held back
    (cl_vit.data.longtail.ltcil_holdout); the class order and task sizes are the stream's, as the official split is
    made per task."""
    from cl_vit.data.protocol import experience_sizes, resolve_class_order  # the stream's own rules

    if not 0 <= float(fraction) < 1:
        raise UserError(f"benchmark.source_args.holdout.fraction={fraction} must be in [0, 1)")
    order, rule = resolve_class_order(class_order, n_classes, int(seed))
    sizes = experience_sizes(n_classes, n_experiences, classes_per_experience)
    kept, held = ltcil_holdout(labels, order, sizes, float(fraction), int(seed))
    left = np.bincount(np.asarray(labels)[kept], minlength=n_classes)
    if (left == 0).any():  # the n <= 5 quirk can empty a class of a tiny data set (never the real CIFAR-100-LT)
        raise UserError(f"benchmark.source_args.holdout leaves class {int(np.argmin(left))} without training images: "
                        "set benchmark.source_args.holdout=null, or use more images per class")
    return kept, {"rule": "xialeiliu/Long-Tailed-CIL memory_dataset.py L116-130: round(n * fraction) random images "
                          "per class and task held back (random.sample, the run's seed); n <= 5 pops the task's first "
                          "image instead (L121-122)",
                  "fraction": float(fraction), "seed": int(seed), "class_order": rule, "sizes": sizes,
                  "n_held_out": int(len(held)),
                  "held_out_per_class": np.bincount(np.asarray(labels)[held], minlength=n_classes).tolist()}


def build_cifar10(data_root, **kw) -> Source:
    return build_cifar(data_root, variant="cifar10", **kw)


def build_cifar100(data_root, **kw) -> Source:
    return build_cifar(data_root, variant="cifar100", **kw)


def build_cifar10_lt(data_root, imbalance_ratio: float = 100, **kw) -> Source:
    return build_cifar(data_root, variant="cifar10", imbalance_ratio=imbalance_ratio, **kw)


def build_cifar100_lt(data_root, imbalance_ratio: float = 100, **kw) -> Source:
    return build_cifar(data_root, variant="cifar100", imbalance_ratio=imbalance_ratio, **kw)
