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


def test_sam_returns_to_the_stored_weights_bit_for_bit():
    """sam.py L22 / L33 (Saddle-LongTail) restore the copy of ``w`` taken before the climb; ``(w + e) - e`` would
    differ from it by rounding. With a zero learning rate the step must leave every weight as it was."""
    from cl_vit.optim.sam import SAM

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    before = [p.detach().clone() for p in net.parameters()]
    opt = SAM(torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9), rho=0.8)
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    # the subtraction the suite made before does not give w back here
    e = [torch.randn_like(b) * 0.1 for b in before]
    assert not all(torch.equal((b + d) - d, b) for b, d in zip(before, e))


def test_resnet32_cifar_pools_as_resnet_s():
    """models/resnet_cifar.py L121 pools with ``F.avg_pool2d(out, out.size()[3])``, which rounds differently from a
    mean over the two spatial axes; the suite's teacher pools the same way, bit for bit."""
    import torch.nn.functional as F

    net = timm.create_model("resnet32_cifar", num_classes=10, use_norm=True)
    torch.manual_seed(0)
    feats = torch.randn(16, 64, 8, 8) * 3 + 1
    pooled = net.forward_head(feats, pre_logits=True)
    assert torch.equal(pooled, F.avg_pool2d(feats, feats.size()[3]).view(16, -1))
    assert not torch.equal(pooled, feats.mean((2, 3)))
