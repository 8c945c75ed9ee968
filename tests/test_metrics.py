"""Metrics on hand-computed matrices (every expected number below is worked out by hand in the comments)."""
import math

import numpy as np
import pytest

from cl_vit import metrics as M

nan = np.nan
# accuracy after training experience i (rows) on experience j (columns); experience 0 improves once (0.6 -> 0.9)
R = np.array([[0.6, nan, nan], [0.9, 0.8, nan], [0.5, 0.7, 0.9]])


def test_average_accuracies():
    assert M.average_accuracy(R) == pytest.approx([0.6, 0.85, 0.7])
    assert M.final_average_accuracy(R) == pytest.approx(0.7)  # (0.5 + 0.7 + 0.9) / 3
    assert M.average_incremental_accuracy(R) == pytest.approx((0.6 + 0.85 + 0.7) / 3)


def test_three_forgettings_differ_as_defined():
    # max-based: j0: max(0.6, 0.9) - 0.5 = 0.4; j1: 0.8 - 0.7 = 0.1 -> 0.25
    assert M.forgetting_max(R) == pytest.approx(0.25)
    # first-minus-last: j0: 0.6 - 0.5 = 0.1; j1: 0.8 - 0.7 = 0.1 -> 0.1
    assert M.forgetting_first_last(R) == pytest.approx(0.1)
    # CODA-Prompt: t=1: (0.6 - 0.9) / 1 = -0.3; t=2: ((0.9 - 0.5) + (0.8 - 0.7)) / 2 = 0.25; (-0.3 + 0.25) / 2
    assert M.forgetting_consecutive(R) == pytest.approx(-0.025)
    assert M.bwt(R) == pytest.approx(-0.1)


def test_consecutive_forgetting_matches_coda_prompt_loop():
    rng = np.random.default_rng(0)
    T = 6
    y = np.tril(rng.uniform(size=(T, T)))
    # CODA-Prompt's utils/calc_forgetting.py for one trial, written out
    fgt = 0.0
    for t in range(1, T):
        for i in range(t):
            fgt += (y[t - 1, i] - y[t, i]) * (1 / t)
    expected = fgt / (T - 1)
    Rm = np.where(np.tril(np.ones((T, T))) > 0, y, np.nan)
    assert M.forgetting_consecutive(Rm) == pytest.approx(expected)


def test_forgetting_undefined_for_single_row_and_joint():
    assert M.forgetting_max(np.array([[0.5, 0.7]])) is None
    assert M.forgetting_first_last(np.array([[0.5]])) is None
    assert M.forgetting_consecutive(np.array([[0.5, 0.7]])) is None
    assert M.bwt(np.array([[0.5, 0.7]])) is None


def _entries(n_correct, n_wrong, cls, wrong_as):
    return np.array([[cls, cls, n_correct], [cls, wrong_as, n_wrong]])


def test_global_accuracy_is_sample_weighted_unlike_a_n():
    # experience sizes 20, 30, 10 with 10, 21, 9 correct: per-experience 0.5, 0.7, 0.9 (A_N 0.7); pooled 40/60
    last_row = [_entries(10, 10, 0, 1), _entries(21, 9, 2, 0), _entries(9, 1, 4, 5)]
    assert [M.confusion_accuracy(e) for e in last_row] == pytest.approx([0.5, 0.7, 0.9])
    assert M.global_accuracy(last_row) == pytest.approx(40 / 60)


def test_confusion_entries_and_per_class():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([0, 0, 1, 1, 0, 2])
    e = M.confusion_entries(y, p)
    assert e.tolist() == [[0, 0, 2], [0, 1, 1], [1, 0, 1], [1, 1, 1], [2, 2, 1]]
    acc = M.per_class_accuracy(e, 4)
    assert acc[:3] == pytest.approx([2 / 3, 0.5, 1.0]) and math.isnan(acc[3])
    # by default a shot group's accuracy is the mean over its classes (OLTR / DeiT-LT): "a" = (2/3 + 1/2) / 2;
    # sample-weighted it is 3 of 5 correct
    groups = ["a", "a", "b", "b"]
    assert M.shot_group_accuracy(e, groups, order=("a", "b")) == pytest.approx({"a": 7 / 12, "b": 1.0})
    assert M.shot_group_accuracy(e, groups, order=("a", "b"), average="sample") == pytest.approx({"a": 0.6, "b": 1.0})


def test_accuracy_matrix_from_confusions_and_summary():
    conf = {(0, 0): _entries(6, 4, 0, 1), (1, 0): _entries(3, 7, 0, 2), (1, 1): _entries(8, 2, 2, 0)}
    Rm = M.accuracy_matrix(conf, 2, 2)
    assert Rm[0, 0] == pytest.approx(0.6) and np.isnan(Rm[0, 1])
    assert Rm[1].tolist() == pytest.approx([0.3, 0.8])
    s = M.summarize(Rm, conf)
    assert set(s) == set(M.METRIC_KEYS)
    assert s["final_average_accuracy"] == pytest.approx(0.55)
    assert s["global_accuracy"] == pytest.approx(11 / 20)
    assert s["forgetting_max"] == pytest.approx(0.3)
