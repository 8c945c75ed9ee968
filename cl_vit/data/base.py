"""What a source is: train and test datasets over one label space, with their class names and metadata.

A source never knows about experiences: cl_vit.streams cuts it into a stream. Every dataset here yields
``(image_tensor, int_label)`` and exposes ``targets`` (one int per sample) so that Avalanche can split it
without decoding a single image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from cl_vit.errors import UserError


@dataclass
class Source:
    name: str
    train: Dataset
    test: Dataset
    classes: list[str]
    in_chans: int
    img_size: int
    #: recorded verbatim in results.json under "source" (split hashes, imbalance profile, skipped files, ...)
    meta: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def train_targets(self) -> np.ndarray:
        return np.asarray(self.train.targets, dtype=np.int64)

    @property
    def test_targets(self) -> np.ndarray:
        return np.asarray(self.test.targets, dtype=np.int64)

    def train_counts(self) -> np.ndarray:
        """Training images per class (the long-tail profile)."""
        return np.bincount(self.train_targets, minlength=self.n_classes)


class TensorImageDataset(Dataset):
    """Images already decoded into one tensor ``[N, C, H, W]`` (small, in-memory sources such as digits)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], transform: Callable | None = None):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        x = self.images[i]
        return (self.transform(x) if self.transform is not None else x), self.targets[i]


def read_image(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    """Decode an image file to an RGB uint8 array ``[H, W, 3]`` with OpenCV; a clear error names a bad file.

    ``flags``: ``cv2.IMREAD_REDUCED_COLOR_{2,4,8}`` decode a JPEG at a reduced scale (cl_vit.data.transforms)."""
    img = cv2.imread(str(path), flags)
    if img is None:
        if not Path(path).exists():
            raise UserError(f"image file {path} does not exist: check data_root and the split file")
        raise UserError(f"cannot decode image {path} (corrupt or not an image): remove it or run with skip_corrupt=true")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class ImageFileDataset(Dataset):
    """``(path, label)`` samples decoded with OpenCV and transformed with an albumentations pipeline.

    ``transform`` takes and returns albumentations' ``image=`` keyword (it must end in ``ToTensorV2``).
    ``decode(path) -> RGB uint8 array`` replaces the plain ``read_image`` (e.g. a crop decided before decoding, so
    that a JPEG is decoded at a reduced scale: cl_vit.data.transforms.imagenet_transforms).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 decode: Callable | None = None):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        img = self.decode(path) if self.decode is not None else read_image(path)
        if self.transform is not None:
            img = self.transform(image=img)["image"]
        else:
            img = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        return img, y


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``root/<class>/<image>`` -> sorted ``(path, label)`` samples and the class list.

    Classes default to the sorted sub-folder names; a given class list fixes the label ids (missing folders and
    empty folders are errors naming the folder).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist: expected {root}/<class>/<image files>")
    if classes is None:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise UserError(f"dataset folder {root} has no class sub-folders: expected {root}/<class>/<image files>")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            raise UserError(f"class folder {folder} is missing: expected one folder per class under {root}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        samples.extend((str(p), label) for p in files)
    return samples, list(classes)
