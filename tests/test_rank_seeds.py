"""Training draws under DDP come from seed + rank (DeiT-LT main.py L69-71, DyTox main.py L335); one process is left
as it was. The 2-process run is in tests/test_ddp.py; here the state handling, in this process."""
import random

import numpy as np
import torch

from cl_vit import distributed
from cl_vit.runner import RankSeeds


def _draws():
    return torch.rand(3), np.random.rand(3), random.random()


def _same(a, b):
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _seed(n):
    torch.manual_seed(n), np.random.seed(n), random.seed(n)


def test_one_process_keeps_its_random_stream():
    _seed(5)
    expected = _draws()
    _seed(5)
    seeds = RankSeeds(123)
    seeds.setup(None, None, "fit")
    got = _draws()
    seeds.teardown(None, None, "fit")
    assert _same(got, expected)


def test_each_process_draws_from_seed_plus_rank_and_the_common_state_comes_back(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    inside = {}
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        _seed(5)
        seeds = RankSeeds(123)
        seeds.setup(None, None, "predict")  # only a fit is seeded per process
        assert _same(_draws(), (_seed(5), _draws())[1])
        _seed(5)
        seeds.setup(None, None, "fit")
        inside[rank] = _draws()
        seeds.teardown(None, None, "fit")
        after = _draws()
        _seed(5)
        assert _same(after, _draws())  # the state before the fit is the state after it
        _seed(123 + rank)
        assert _same(inside[rank], _draws())
    assert not torch.equal(inside[0][0], inside[1][0])
