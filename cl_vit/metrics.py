"""Metrics derived from the stored truth: one confusion matrix per (trained-up-to, evaluated) pair.

Conventions
-----------
``R[i, j]`` is the accuracy on the test data of evaluation experience ``j`` after training up to (and including)
training experience ``i``; ``nan`` where ``j`` had not been seen yet. In class-incremental streams ``R`` is square and
lower-triangular; in a joint run it has one row. A column's *first* row is the first ``i`` at which ``j`` was seen.

Confusions are sparse: an ``(K, 3)`` integer array of ``(true, predicted, count)`` rows over the stream's (remapped)
label space. That keeps 200-class ImageNet-R or 8,142-class iNaturalist results small and exact.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# -- confusions -----------------------------------------------------------------------------------------------------


def confusion_entries(targets: np.ndarray, preds: np.ndarray) -> np.ndarray:
    """Sparse confusion ``(true, pred, count)`` rows, sorted, from two label vectors."""
    targets = np.asarray(targets, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    if targets.shape != preds.shape:
        raise ValueError(f"targets {targets.shape} and preds {preds.shape} differ in shape")
    if targets.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    pairs, counts = np.unique(np.stack([targets, preds], 1), axis=0, return_counts=True)
    return np.concatenate([pairs, counts[:, None]], 1).astype(np.int64)


def confusion_accuracy(entries) -> float:
    """Fraction of correct predictions in a sparse confusion; ``nan`` when it is empty."""
    e = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
    total = e[:, 2].sum()
    return float(e[e[:, 0] == e[:, 1], 2].sum() / total) if total else float("nan")


def per_class_counts(entries, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct, total) per true class from a sparse confusion."""
    e = np.asarray(entries, dtype=np.int64).reshape(-1, 3)
    total = np.bincount(e[:, 0], weights=e[:, 2], minlength=n_classes)
    hit = e[:, 0] == e[:, 1]
    correct = np.bincount(e[hit, 0], weights=e[hit, 2], minlength=n_classes)
    return correct.astype(np.int64), total.astype(np.int64)


def per_class_accuracy(entries, n_classes: int) -> np.ndarray:
    """Accuracy of each true class (``nan`` for classes without test samples)."""
    correct, total = per_class_counts(entries, n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def shot_group_accuracy(entries, groups: Sequence[str], order: Sequence[str] = ("many", "medium", "few"),
                        average: str = "class") -> dict:
    """Accuracy of each shot group (``groups[c]`` names class ``c``'s group); groups without test samples are
    left out.

    ``average="class"``: the mean of the per-class accuracies of the group's classes that have test samples, as
    OLTR's ``shot_acc`` (used by LDAM-DRW-style code) and DeiT-LT's ``engine.evaluate`` compute it.
    ``"sample"``: correct over total test samples of the group. The two agree on balanced test sets.
    """
    correct, total = per_class_counts(entries, len(groups))
    groups = np.asarray(groups)
    out = {}
    for g in order:
        sel = (groups == g) & (total > 0)
        if not sel.any():
            continue
        if average == "class":
            out[g] = float(np.mean(correct[sel] / total[sel]))
        elif average == "sample":
            out[g] = float(correct[sel].sum() / total[sel].sum())
        else:
            raise ValueError(f"average must be 'class' or 'sample', got {average!r}")
    return out


# -- the accuracy matrix ------------------------------------------------------------------------------------------


def accuracy_matrix(confusions: Mapping[tuple[int, int], np.ndarray], n_rows: int, n_cols: int) -> np.ndarray:
    """``R`` from the sparse confusions keyed ``(trained_up_to, evaluated)``; ``nan`` where nothing was evaluated."""
    R = np.full((n_rows, n_cols), np.nan)
    for (i, j), entries in confusions.items():
        R[i, j] = confusion_accuracy(entries)
    return R


def _first_rows(R: np.ndarray) -> np.ndarray:
    seen = ~np.isnan(R)
    return np.where(seen.any(0), seen.argmax(0), R.shape[0])


def average_accuracy(R: np.ndarray) -> np.ndarray:
    """``A_t`` for every row t: the mean accuracy over the experiences seen by then (mean over tasks)."""
    return np.array([np.nanmean(r) if np.any(~np.isnan(r)) else np.nan for r in R])


def final_average_accuracy(R: np.ndarray) -> float:
    """``A_N = mean_j R[N, j]`` over the experiences seen at the end (the CL papers' "average accuracy")."""
    return float(average_accuracy(R)[-1])


def average_incremental_accuracy(R: np.ndarray) -> float:
    """Mean of ``A_t`` over the stream (Rebuffi et al. 2017, iCaRL)."""
    return float(np.nanmean(average_accuracy(R)))


def global_accuracy(confusions_of_last_row: Sequence[np.ndarray]) -> float:
    """Accuracy over all seen test samples pooled (sample-weighted, unlike ``A_N``)."""
    entries = [np.asarray(e).reshape(-1, 3) for e in confusions_of_last_row]
    return confusion_accuracy(np.concatenate(entries) if entries else np.zeros((0, 3)))


def _forgettable_columns(R: np.ndarray) -> np.ndarray:
    last = R.shape[0] - 1
    return np.flatnonzero(_first_rows(R) < last)


def forgetting_max(R: np.ndarray) -> float | None:
    """Max-based forgetting (Chaudhry et al. 2018, RWalk): mean over j of ``max_{l<N} R[l, j] - R[N, j]``.

    The max runs over the rows from j's first evaluation up to the one before the last. ``None`` when no experience
    was evaluated before the last row (a single experience, or a joint run).
    """
    cols = _forgettable_columns(R)
    if cols.size == 0:
        return None
    return float(np.mean([np.nanmax(R[:-1, j]) - R[-1, j] for j in cols]))


def forgetting_first_last(R: np.ndarray) -> float | None:
    """First-minus-last forgetting (Avalanche's ExperienceForgetting): mean over j of ``R[first_j, j] - R[N, j]``."""
    cols = _forgettable_columns(R)
    if cols.size == 0:
        return None
    first = _first_rows(R)
    return float(np.mean([R[first[j], j] - R[-1, j] for j in cols]))


def forgetting_consecutive(R: np.ndarray) -> float | None:
    """Consecutive-drop forgetting, as CODA-Prompt's ``utils/calc_forgetting.py``.

    ``(1 / (T - 1)) * sum_{t=1}^{T-1} (1 / t) * sum_{i<t} (R[t-1, i] - R[t, i])``: the mean drop between consecutive
    evaluations, averaged over tasks. Defined for square class-incremental matrices only (``None`` otherwise).
    """
    T, C = R.shape
    if T != C or T < 2:
        return None
    total = 0.0
    for t in range(1, T):
        total += sum(R[t - 1, i] - R[t, i] for i in range(t)) / t
    return float(total / (T - 1))


def bwt(R: np.ndarray) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017, GEM): mean over j < N of ``R[N, j] - R[j, j]``.

    Uses the row at which j was first evaluated as ``R[j, j]``; equal to ``-forgetting_first_last``.
    """
    f = forgetting_first_last(R)
    return None if f is None else -f


METRIC_KEYS = (
    "final_average_accuracy",
    "global_accuracy",
    "average_incremental_accuracy",
    "forgetting_max",
    "forgetting_first_last",
    "forgetting_consecutive",
    "bwt",
)


def summarize(R: np.ndarray, confusions: Mapping[tuple[int, int], np.ndarray]) -> dict:
    """The headline metrics of a (possibly partial) stream; keys as ``METRIC_KEYS``."""
    last = R.shape[0] - 1
    return {
        "final_average_accuracy": final_average_accuracy(R),
        "global_accuracy": global_accuracy([confusions[k] for k in sorted(confusions) if k[0] == last]),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting_max": forgetting_max(R),
        "forgetting_first_last": forgetting_first_last(R),
        "forgetting_consecutive": forgetting_consecutive(R),
        "bwt": bwt(R),
    }


def default_shot_kind(record: dict | None) -> str:
    """The definition a run reports by default: the official index cut-offs where the benchmark has them (as the
    papers count), else the count thresholds."""
    return "index" if isinstance((record or {}).get("index"), dict) else "count"
