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

    As LDAM-DRW's ``gen_imbalanced_data``: ``n_max`` is the dataset size over the number of classes (unrounded, as
    DeiT-LT's ``get_img_num_per_cls``; LDAM-DRW rounds it down first, the same for CIFAR's 500 and 5,000); one NumPy
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
COUNT_DEFINITION = "training images per class: many > 100, medium 20-100, few < 20 (OLTR / LDAM-DRW shot_acc)"

#: DeiT-LT's index cut-offs (main.py ``args.categories``): classes sorted by training frequency, [0, a) many,
#: [a, b) medium, [b, C) few
DEIT_LT_CUTOFFS = {"cifar10-lt": (3, 7), "cifar100-lt": (36, 71), "imagenet-lt": (390, 835), "inat2018": (842, 4543)}


def shot_groups(train_counts: Sequence[int], many: int = 100, few: int = 20) -> list[str]:
    """Shot group of each class by its training-set size: many (> 100), medium (20-100), few (< 20)."""
    return ["many" if n > many else "few" if n < few else "medium" for n in train_counts]


def frequency_order(train_counts: Sequence[int]) -> np.ndarray:
    """Class ids by descending training frequency, as DeiT-LT's map-targets (``np.argsort(-counts)``, numpy's
    default sort: ties come out in numpy's order, which ``map_targets`` must reproduce exactly)."""
    return np.argsort(-np.asarray(train_counts, dtype=np.int64))


def index_shot_groups(train_counts: Sequence[int], cutoffs: Sequence[int]) -> list[str]:
    """DeiT-LT's groups: by the class's rank in descending training frequency, [0, a) many, [a, b) medium, rest few.

    DeiT-LT applies the cut-offs to label ids that are already frequency-sorted (CIFAR-LT by construction, ImageNet-LT
    and iNaturalist after map-targets); a stable sort of the counts gives exactly those ids back in that case and a
    sensible ranking otherwise.
    """
    a, b = (int(c) for c in cutoffs)
    if not 0 <= a <= b:
        raise ValueError(f"shot index cut-offs must satisfy 0 <= a <= b, got {cutoffs}")
    rank = np.empty(len(train_counts), dtype=np.int64)
    rank[np.argsort(-np.asarray(train_counts, dtype=np.int64), kind="stable")] = np.arange(len(train_counts))
    return ["many" if r < a else "medium" if r < b else "few" for r in rank]


def shot_group_record(train_counts: Sequence[int], cutoffs: Sequence[int] | None = None,
                      order: Sequence[int] | None = None) -> dict:
    """results.json's ``shot_groups``: each definition with the group of every stream label.

    ``train_counts`` are per source label; ``order[k]`` is the source label of stream label ``k`` (identity if None).
    """
    counts = np.asarray(train_counts, dtype=np.int64)
    order = np.arange(len(counts)) if order is None else np.asarray(order, dtype=np.int64)
    by_count = shot_groups(counts)
    out = {"count": {"definition": COUNT_DEFINITION, "groups": [by_count[c] for c in order]}}
    if cutoffs is not None:
        a, b = (int(c) for c in cutoffs)
        groups = index_shot_groups(counts, (a, b))
        out["index"] = {"definition": f"DeiT-LT cut-offs on classes sorted by training frequency: rank < {a} many, "
                                      f"{a} <= rank < {b} medium, rank >= {b} few",
                        "cutoffs": [a, b], "groups": [groups[c] for c in order]}
    return out
