"""Streams: protocols are explicit data; Avalanche scenarios in and out."""
import random

import numpy as np
import pytest
import torch

from cl_vit.data import build_source
from cl_vit.errors import ConfigError, UserError
from cl_vit.data.protocol import experience_sizes, resolve_class_order
from cl_vit.streams import StreamInfo, build_stream


@pytest.fixture(scope="module")
def digits():
    return build_source("digits", data_root="unused")


def test_split_digits_protocol(digits):
    scenario, info = build_stream(digits, n_experiences=5)
    assert info.train_classes == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(digits.train) + len(digits.test) == 1797
    n_train = [len(e.dataset) for e in scenario.train_stream]
    n_test = [len(e.dataset) for e in scenario.test_stream]
    assert sum(n_train) == len(digits.train) and sum(n_test) == len(digits.test)
    # stratified: every class keeps its 25% share in the test split (to within one image)
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target)
    assert np.all(np.abs(np.bincount(digits.test_targets) - 0.25 * totals) <= 1)
    for e, classes in zip(scenario.train_stream, info.train_classes):
        assert set(int(c) for c in e.classes_in_this_experience) == set(classes)


def test_class_order_is_remapped_and_recorded(digits):
    scenario, info = build_stream(digits, n_experiences=5, class_order="seeded", seed=3)
    order = list(range(10))
    random.seed(3)
    random.shuffle(order)  # CODA-Prompt's rule
    assert info.class_order == order
    # stream label k is source label order[k]: the first experience holds the images of order[0] and order[1]
    exp0 = scenario.train_stream[0].dataset
    x, y = exp0[0][0], int(exp0[0][1])
    matches = [i for i in range(len(digits.train)) if torch.equal(digits.train[i][0], x)]
    assert digits.train.targets[matches[0]] == order[y]
    assert resolve_class_order("coda", 10, 0)[0] == list(range(10))
    assert resolve_class_order("coda", 10, 3)[0] == order


def test_leftover_classes_are_an_error_or_kept(digits):
    with pytest.raises(UserError, match="benchmark.remainder=last"):
        build_stream(digits, n_experiences=3)
    assert experience_sizes(10, n_experiences=3, remainder="last") == [3, 3, 4]
    assert experience_sizes(10, classes_per_experience=4, remainder="last") == [4, 4, 2]
    scenario, info = build_stream(digits, n_experiences=3, remainder="last")
    assert sorted(c for exp in info.train_classes for c in exp) == list(range(10))
    assert sum(len(e.dataset) for e in scenario.train_stream) == len(digits.train)
    with pytest.raises(ConfigError, match="benchmark.n_experiences"):
        experience_sizes(10, n_experiences=11)


def test_bad_class_order_is_one_clear_error(digits):
    with pytest.raises(UserError, match="not a permutation"):
        build_stream(digits, n_experiences=5, class_order=[0, 1, 2])
    with pytest.raises(ConfigError, match="benchmark.class_order"):
        build_stream(digits, n_experiences=5, class_order="sorted-by-name")


def test_joint_trains_once_and_evaluates_per_experience(digits):
    scenario, info = build_stream(digits, n_experiences=5, joint=True)
    assert len(scenario.train_stream) == 1 and len(scenario.test_stream) == 5
    assert info.train_classes == [list(range(10))]
    assert info.seen_eval_experiences(0) == [0, 1, 2, 3, 4]


def test_stream_info_from_an_avalanche_scenario(digits):
    from avalanche.benchmarks import nc_benchmark

    sc = nc_benchmark(digits.train, digits.test, n_experiences=5, task_labels=False, seed=1)
    info = StreamInfo.from_scenario(sc)
    assert len(info.train_classes) == 5 and info.n_classes == 10
    assert sorted(c for exp in info.train_classes for c in exp) == list(range(10))
