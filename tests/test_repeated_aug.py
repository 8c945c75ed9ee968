"""Repeated augmentation (data.repeated_aug): timm's RepeatAugSampler is DeiT's RASampler, shards over processes,
and Lightning keeps it (facebookresearch/deit samplers.py; val-iisc/DeiT-LT samplers.py L33-59, main.py L116-120)."""
import collections
import math

import lightning as L
import pytest
import torch
from conftest import TINY, compose
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, TensorDataset

from cl_vit import distributed
from cl_vit.run import run
from cl_vit.runner import ContinualRunner, LoaderConfig


def deit_rasampler(n, num_replicas, rank, epoch, num_repeats=3):
    """val-iisc/DeiT-LT samplers.py RASampler.__iter__ (L39-59), transcribed: the reference."""
    g = torch.Generator()
    g.manual_seed(epoch)
    indices = torch.repeat_interleave(torch.randperm(n, generator=g), repeats=num_repeats, dim=0).tolist()
    num_samples = int(math.ceil(n * num_repeats / num_replicas))
    total = num_samples * num_replicas
    indices += indices[: total - len(indices)]
    return indices[rank:total:num_replicas][: int(math.floor(n // 256 * 256 / num_replicas))]


@pytest.mark.parametrize("n,world", [(1000, 1), (1000, 2), (1000, 4), (777, 3), (300, 8)])
def test_timm_repeat_aug_sampler_is_deit_rasampler(n, world):
    data = list(range(n))
    for epoch in (0, 5):
        for rank in range(world):
            s = RepeatAugSampler(data, num_replicas=world, rank=rank, num_repeats=3)
            s.set_epoch(epoch)
            assert list(s) == deit_rasampler(n, world, rank, epoch)
            assert len(s) == n // 256 * 256 // world


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_are_disjoint_and_repeat_every_index_three_times_before_truncation(world):
    n = 600  # 3 n divisible by every world size here: no padding
    shards = []
    for rank in range(world):
        s = RepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=3)
        s.set_epoch(1)
        s.num_selected_samples = s.num_samples  # before the truncation to floor(N / 256) * 256
        shards.append(list(s))
    # disjoint shares of the repeated list: sizes add up to 3 N and every index comes 3 times over all of them
    assert sum(len(x) for x in shards) == 3 * n
    assert collections.Counter(i for x in shards for i in x) == {i: 3 for i in range(n)}
    if world == 3:  # the copies of one image go to different processes (DeiT's point)
        assert all(len(set(x)) == len(x) for x in shards)
    # truncated: floor(N / 256) * 256 images over all processes, each process its first share
    for rank in range(world):
        s = RepeatAugSampler(list(range(n)), num_replicas=world, rank=rank, num_repeats=3)
        s.set_epoch(1)
        assert list(s) == shards[rank][: 512 // world]


def test_runner_builds_it_per_process_and_lightning_keeps_it(monkeypatch):
    """The runner gives each process its RepeatAugSampler; a DDP Trainer with use_distributed_sampler=False (what the
    runner sets with data.repeated_aug) keeps it, where the default would wrap it in Lightning's own sampler."""
    from lightning.pytorch.trainer.states import RunningStage

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    runner = ContinualRunner.__new__(ContinualRunner)
    runner.loader = LoaderConfig(batch_size=4, repeated_aug=True)
    ds = TensorDataset(torch.zeros(300, 1), torch.zeros(300, dtype=torch.long))
    loader = runner._loader(ds, True, seed=0, repeated=True)
    assert isinstance(loader.sampler, RepeatAugSampler)
    assert (loader.sampler.num_replicas, loader.sampler.rank, loader.sampler.num_repeats) == (2, 1, 3)
    for keep in (False, True):
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, use_distributed_sampler=not keep,
                            logger=False, enable_progress_bar=False, enable_model_summary=False)
        prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
        assert isinstance(prepared.sampler, RepeatAugSampler) == keep


def test_a_run_trains_on_the_repeated_epoch(tmp_path, data_root, monkeypatch):
    seen = []
    real_iter = RepeatAugSampler.__iter__

    def spy(self):
        out = list(real_iter(self))
        seen.append(out)
        return iter(out)

    monkeypatch.setattr(RepeatAugSampler, "__iter__", spy)
    cfg = compose([*TINY, "benchmark=digits-lt", "data.repeated_aug=true", "data.batch_size=64"], data_root)
    doc = run(cfg, tmp_path / "run")
    n = sum(doc["class_counts"])
    assert len(seen) == 1 and len(seen[0]) == n // 256 * 256  # one process: the whole truncated epoch
    assert set(collections.Counter(seen[0]).values()) <= {1, 2, 3} and max(collections.Counter(seen[0]).values()) == 3
    assert doc["status"] == "completed"
