"""Saddle-LongTail's ImageNet-LT / iNaturalist teacher: torchvision init, its transforms, SAM's rho step schedule."""
import pytest
import timm
import torch
from conftest import TINY_ANY_MODEL, compose
from data_gen import make_imagenet_lt
from lightning.pytorch.callbacks import Callback

from cl_vit.run import run


def test_resnet50_ldam_is_initialised_as_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ours = timm.create_model("resnet50_ldam", num_classes=4)
    theirs = torchvision.models.resnet50()
    # torchvision leaves every BatchNorm weight at 1 (zero_init_residual=False); timm's default zeroes bn3 in blocks
    assert all(torch.all(m.weight == 1) for m in ours.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert all(torch.all(m.weight == 1) for m in theirs.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.all(timm.create_model("resnet50").layer1[0].bn3.weight == 1)
    assert set(ours.state_dict()) - {"fc.weight"} == set(theirs.state_dict()) - {"fc.weight", "fc.bias"}


class RhoSpy(Callback):
    def __init__(self):
        self.rho = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.rho.append(trainer.optimizers[0].param_groups[0]["rho"])


def test_sam_rho_follows_its_step_schedule_epoch_by_epoch(tmp_path, data_root, monkeypatch):
    import cl_vit.runner as runner

    spy = RhoSpy()
    real = runner.ContinualRunner._fit_callbacks
    monkeypatch.setattr(runner.ContinualRunner, "_fit_callbacks", lambda self, i: [*real(self, i), spy])
    cfg = compose(["model=vit_micro", *TINY_ANY_MODEL, "trainer.max_epochs=4", "benchmark.n_experiences=1",
                   "trainer.limit_train_batches=1", "optimizer.name=momentum", "optimizer.lr=0.01",
                   "optimizer.sam_rho=0.05", "optimizer.sam_rho_milestones=[1,3]", "optimizer.sam_rho_values=[0.1,0.5]",
                   "trainer.precision=32-true"], data_root)
    run(cfg, tmp_path / "run")
    assert spy.rho == [0.05, 0.1, 0.1, 0.5]


def test_teacher_recipes_dry_run_on_the_real_layouts(tmp_path, data_root):
    from data_gen import make_inat

    make_imagenet_lt(data_root, train_counts=[3, 2, 1], test_per_class=1)
    make_inat(data_root, train_counts=[1, 3, 2], val_per_class=1)
    for recipe in ("teacher-imagenet-lt", "teacher-inat2018"):
        cfg = compose([f"experiment={recipe}", "+benchmark.source_args.n_classes=3", "dry_run=true",
                       "data.num_workers=0", "data.persistent_workers=false"], data_root)
        stream = run(cfg, tmp_path / recipe)
        assert stream["model"] == "resnet50_ldam" and 23e6 < stream["n_params"] < 24e6
    from cl_vit.data import build_source

    src = build_source("imagenet-lt", data_root, n_classes=3, img_size=32, train_transform="torchvision",
                       test_transform="torchvision")
    assert src.train[0][0].shape == src.test[0][0].shape == (3, 32, 32)
    assert {k: src.meta["transforms"][k] for k in ("train", "test")} == {"train": "torchvision", "test": "torchvision"}
