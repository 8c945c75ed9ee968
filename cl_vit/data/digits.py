"""The 8x8 digits bundled with scikit-learn: the offline default benchmark (no download, seconds to train)."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from cl_vit.data.base import Source, TensorImageDataset
from cl_vit.data.longtail import longtail_subset


def _digits_split(test_size: float, split_seed: int):
    X, y = load_digits(return_X_y=True)
    # pixel values are 0..16; map to [-1, 1] (mean = std = 0.5 on the [0, 1] scale)
    images = torch.from_numpy(X.reshape(-1, 1, 8, 8) / 16.0).float().sub_(0.5).div_(0.5)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=test_size, stratify=y, random_state=split_seed
    )
    # sorted so that the split is a fixed set and its order never depends on sklearn internals
    return images, y, np.sort(idx_train), np.sort(idx_test)


def build_digits(test_size: float = 0.25, split_seed: int = 0, **_) -> Source:
    """1,797 images, 10 classes; a fixed stratified split (``split_seed`` is part of the protocol, not the run seed)."""
    images, y, tr, te = _digits_split(test_size, split_seed)
    return Source(
        name="digits",
        train=TensorImageDataset(images[tr], y[tr]),
        test=TensorImageDataset(images[te], y[te]),
        classes=[str(c) for c in range(10)],
        in_chans=1,
        img_size=8,
        meta={"split": f"sklearn stratified train_test_split(test_size={test_size}, random_state={split_seed})"},
    )


def build_digits_lt(test_size: float = 0.25, split_seed: int = 0, imbalance_ratio: float = 10, **_) -> Source:
    """digits with the LDAM-DRW long-tail profile on the training split; the test split stays balanced.

    The default ratio is 10 (not CIFAR's 100): with ~135 training images per class, 10 keeps every class above
    ten images and populates all three shot groups (many > 100, medium 20-100, few < 20).
    """
    images, y, tr, te = _digits_split(test_size, split_seed)
    keep, counts = longtail_subset(y[tr], imbalance_ratio)
    tr = tr[keep]
    return Source(
        name="digits-lt",
        train=TensorImageDataset(images[tr], y[tr]),
        test=TensorImageDataset(images[te], y[te]),
        classes=[str(c) for c in range(10)],
        in_chans=1,
        img_size=8,
        meta={
            "split": f"sklearn stratified train_test_split(test_size={test_size}, random_state={split_seed})",
            "imbalance_ratio": imbalance_ratio,
            "train_counts": [int(c) for c in counts],
        },
    )
