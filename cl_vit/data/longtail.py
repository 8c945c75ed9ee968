"""Long-tail profiles and shot groups (LDAM-DRW / DeiT-LT protocol)."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np


def longtail_counts(n_max: float, n_classes: int, imbalance_ratio: float) -> list[int]:
    """``n_i = int(n_max * (1 / rho) ** (i / (C - 1)))``: the exponential profile of LDAM-DRW's IMBALANCECIFAR."""
    if n_classes == 1:
        return [int(n_max)]
    return [int(n_max * (1.0 / imbalance_ratio) ** (i / (n_classes - 1.0))) for i in range(n_classes)]


def longtail_subset(targets: Sequence[int], imbalance_ratio: float, seed: int = 0,
                    n_max: int | None = None) -> tuple[np.ndarray, list[int]]:
    """Positions to keep so that class i has ``longtail_counts(...)[i]`` samples, and those counts.

    As LDAM-DRW's ``gen_imbalanced_data``: ``n_max`` is the dataset size over the number of classes (unrounded, as
    DeiT-LT's ``get_img_num_per_cls``; LDAM-DRW rounds it down first, the same for CIFAR's 500 and 5,000); one NumPy
    RandomState seeded once (``np.random.seed(0)`` in their code) shuffles each class's indices in class order and
    the first ``n_i`` are kept. Positions are returned sorted by class, then by that shuffle, as theirs are.
    ``n_max`` caps the head class (a smaller data set with the same profile; the same shuffle, so a prefix of it).
    """
    targets = np.asarray(targets, dtype=np.int64)
    classes = np.unique(targets)
    counts = longtail_counts(n_max or len(targets) / len(classes), len(classes), imbalance_ratio)
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


def numpy1_argsort(values: Sequence[int]) -> np.ndarray:
    """``np.argsort(values)`` exactly as numpy 1.24 computes it (its default introsort, ``aquicksort_`` in
    numpy/core/src/npysort/quicksort.cpp), on every numpy version and CPU.

    DeiT-LT's class map (datasets.py L265, L386: ``np.argsort(-counts)``) ran on numpy 1.24.3 (its environment.yml);
    numpy >= 1.25 may sort 64-bit keys with AVX-512 (x86-simd-sort) and orders equal counts differently, and
    ImageNet-LT and iNaturalist have many equal counts. A port of the scalar algorithm keeps the official tie order.
    """
    v = [int(x) for x in np.asarray(values).reshape(-1)]
    n = len(v)
    a = list(range(n))
    if n < 2:
        return np.asarray(a, dtype=np.int64)
    small = 15  # SMALL_QUICKSORT

    def heapsort(lo: int, hi: int) -> None:  # aheapsort_ on a[lo..hi], 1-based as numpy's
        m = hi - lo + 1
        at = lambda k: a[lo + k - 1]  # noqa: E731

        def sift(i: int, tmp: int, m: int) -> None:
            j = i << 1
            while j <= m:
                if j < m and v[at(j)] < v[at(j + 1)]:
                    j += 1
                if v[tmp] < v[at(j)]:
                    a[lo + i - 1] = at(j)
                    i, j = j, j + j
                else:
                    break
            a[lo + i - 1] = tmp

        for k in range(m >> 1, 0, -1):
            sift(k, at(k), m)
        while m > 1:
            tmp = at(m)
            a[lo + m - 1] = at(1)
            m -= 1
            sift(1, tmp, m)

    pl, pr = 0, n - 1
    stack: list[tuple[int, int, int]] = []
    cdepth = (n.bit_length() - 1) * 2  # npy_get_msb(num) * 2
    while True:
        if cdepth < 0:
            heapsort(pl, pr)
        else:
            while pr - pl > small:
                pm = pl + ((pr - pl) >> 1)
                if v[a[pm]] < v[a[pl]]:
                    a[pm], a[pl] = a[pl], a[pm]
                if v[a[pr]] < v[a[pm]]:
                    a[pr], a[pm] = a[pm], a[pr]
                if v[a[pm]] < v[a[pl]]:
                    a[pm], a[pl] = a[pl], a[pm]
                vp = v[a[pm]]
                pi, pj = pl, pr - 1
                a[pm], a[pj] = a[pj], a[pm]
                while True:
                    pi += 1
                    while v[a[pi]] < vp:
                        pi += 1
                    pj -= 1
                    while vp < v[a[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    a[pi], a[pj] = a[pj], a[pi]
                pk = pr - 1
                a[pi], a[pk] = a[pk], a[pi]
                cdepth -= 1
                if pi - pl < pr - pi:  # the larger part waits on the stack
                    stack.append((pi + 1, pr, cdepth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, cdepth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):  # insertion sort
                vi = a[i]
                x = v[vi]
                j = i
                while j > pl and x < v[a[j - 1]]:
                    a[j] = a[j - 1]
                    j -= 1
                a[j] = vi
        if not stack:
            break
        pl, pr, cdepth = stack.pop()
    return np.asarray(a, dtype=np.int64)


def frequency_order(train_counts: Sequence[int]) -> np.ndarray:
    """Class ids by descending training frequency, as DeiT-LT's map-targets (``np.argsort(-counts)`` under numpy
    1.24, its environment): ties in the official order, the same on every numpy version (``numpy1_argsort``)."""
    return numpy1_argsort(-np.asarray(train_counts, dtype=np.int64))


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


def ltcil_holdout(labels: Sequence[int], class_order: Sequence[int], sizes: Sequence[int], fraction: float = 0.1,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The validation images Long-Tailed-CIL holds back from training: ``(kept, held)`` positions into ``labels``.

    As xialeiliu/Long-Tailed-CIL src/datasets/memory_dataset.py L116-130 (``validation=.1``, data_loader.py L18):
    the images go to per-task lists in ``labels`` order (the long-tailed set is sorted by class, L86-93); per task,
    per task-local class (``class_order`` within the task), ``round(n * fraction)`` random positions of that class
    (Python's ``random.sample``, the global generator seeded with the run's seed by ``utils.seed_everything`` just
    before the loaders are built, main_incremental.py L199) leave the list, popped from the back. The quirk, L121-122:
    a class with ``round(n * fraction) == 0`` (n <= 5, NumPy rounds 0.5 to even) pops position 0 of its task's list
    instead, the first remaining image of the task's lowest-labelled class, and keeps all its own."""
    rng = random.Random(seed)
    local = {int(c): i for i, c in enumerate(class_order)}
    ends = np.cumsum(sizes)
    starts = ends - np.asarray(sizes)
    tasks: list[list[tuple[int, int]]] = [[] for _ in sizes]
    for pos, y in enumerate(labels):
        k = local[int(y)]
        t = int((k >= ends).sum())
        tasks[t].append((pos, k - int(starts[t])))
    held = []
    for t, items in enumerate(tasks):
        for cc in range(int(sizes[t])):
            cls_idx = [i for i, (_, y) in enumerate(items) if y == cc]
            n = int(np.round(len(cls_idx) * fraction))
            picks = [0] if n == 0 else rng.sample(cls_idx, n)
            for i in sorted(picks, reverse=True):
                held.append(items.pop(i)[0])
    kept = sorted(pos for items in tasks for pos, _ in items)
    return np.asarray(kept, dtype=np.int64), np.asarray(sorted(held), dtype=np.int64)
