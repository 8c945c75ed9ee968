"""Long-tail profiles and shot groups (LDAM-DRW / DeiT-LT protocol)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def longtail_counts(n_max: float, n_classes: int, imbalance_ratio: float) -> list[int]:
    """``n_i = int(n_max * (1 / rho) ** (i / (C - 1)))``: the exponential profile of LDAM-DRW's IMBALANCECIFAR."""
    if n_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_ratio) ** (i / (n_classes - 1.0))) for i in range(n_classes)]


def longtail_subset(targets: Sequence[int], imbalance_ratio: float, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Positions to keep so that class i has ``longtail_counts(...)[i]`` samples, and those counts.

    As LDAM-DRW's ``gen_imbalanced_data``: ``n_max`` is the dataset size over the number of classes; one NumPy
    RandomState seeded once (``np.random.seed(0)`` in their code) shuffles each class's indices in class order and
    the first ``n_i`` are kept. Positions are returned sorted by class, then by that shuffle, as theirs are.
    """
    targets = np.asarray(targets, dtype=np.int64)
    classes = np.unique(targets)
    counts = longtail_counts(len(targets) / len(classes), len(classes), imbalance_ratio)
    rng = np.random.RandomState(seed)
    keep, kept = [], []
    for c, n in zip(classes, counts):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        keep.append(idx[:n])
        kept.append(int(min(n, len(idx))))
    return np.concatenate(keep), kept


SHOT_THRESHOLDS = {"many": 100, "few": 20}


def shot_groups(train_counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """Shot group of each class by its training-set size: many (> 100), medium (20-100), few (< 20)."""
    return ["many" if n > many else "few" if n < few else "medium" for n in train_counts]
