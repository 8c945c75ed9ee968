"""Golden trajectory: the suite's GCAB recipe against GCAB-CFDC's own training loop.

The numbers below were produced by the official code (OcraM17/GCAB-CFDC @ 599e44d588f2de1006d32b882c8f28f4987b2c8c,
with continuum 1.2.4) on a tiny stream, on a CPU, with

    PYTHONPATH=/tmp/gcab-deps python scripts/golden_gcab.py /path/to/GCAB-CFDC

(the script says what it changes at run time: ``.cuda()``, the data files, the transforms, the model's depth, the
run's length, its weight decay (2, so that decay shows in 24 steps), the batch order and the starting weights). The
test runs the suite's recipe (experiment=gcab-cifar100) on the same stream, from the same weights and batch order,
with the same run length and weight decay, and asserts per step the learning rate (exactly: the
per-epoch schedule as main.py steps it, drop_last's batch count) and the loss (to 1e-5 relative), and at each task's
end the correct test images per task (exactly) and the norm of the trained parameters (to 1e-5 relative).
"""

import numpy as np
import torch
from conftest import compose, script_module

import cl_vit  # noqa: F401  (registers the suite's models)
from cl_vit.data.base import TensorImageDataset
from cl_vit.models.gated import GatedNet
from cl_vit.module import ContinualModule
from cl_vit.run import run
from test_golden_coda import record_steps

golden = script_module("golden_gcab")
coda = golden.sys.modules["golden_coda"]

# -- the official numbers (python scripts/golden_gcab.py GCAB-CFDC, at the commit above) ------------------------------

OFFICIAL = {
    'lr': [1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05, 6.3e-05, 6.75e-05, 6.75e-05, 1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05,
           6.3e-05, 6.75e-05, 6.75e-05, 1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05, 6.3e-05, 6.75e-05, 6.75e-05],
    'loss': [0.8116678595542908, 0.6956659555435181, 0.7186789512634277, 0.7406632900238037, 0.7477545142173767,
             0.5102081298828125, 0.4137170612812042, 0.20800070464611053, 1.1241202354431152, 1.059867262840271,
             1.0594767332077026, 1.0660642385482788, 1.1080067157745361, 0.7908177375793457, 0.6916259527206421,
             0.5848169326782227, 0.9530738592147827, 1.01603102684021, 0.9481370449066162, 1.006158709526062,
             0.9420071840286255, 0.81705641746521, 0.7349376082420349, 0.562981128692627],
    'correct': [[10], [5, 0], [5, 0, 5]],
    'norm': [83.17491539276844, 171.14323641004862, 171.4523362683685],
}


def stream(train_transform=None):
    """The official run's images as a scenario: per task its classes' images in the stored order (continuum keeps
    it), ``ToTensor`` + the CIFAR-100 ``Normalize`` values (the script's transform); ``train_transform``: applied to
    the training images after (Avalanche's train transform group; its eval group, the test view, leaves them)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.utils import as_classification_dataset
    from avalanche.benchmarks.utils.transform_groups import TransformGroups
    from torchvision.transforms.functional import normalize

    per = golden.STREAM["n_classes"] // golden.STREAM["tasks"]

    def tasks(x, y, transform=None):
        out = []
        for t in range(golden.STREAM["tasks"]):
            idx = np.isin(y, range(per * t, per * (t + 1))).nonzero()[0]
            images = torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float().div(255)
            images = torch.stack([normalize(im, golden.CIFAR_MEAN, golden.CIFAR_STD) for im in images])
            groups = None if transform is None else TransformGroups({"train": transform, "eval": None})
            out.append(as_classification_dataset(TensorImageDataset(images, y[idx].tolist()), transform_groups=groups))
        return out

    data = coda.images()
    return with_classes_timeline(benchmark_from_datasets(train=tasks(*data["train"], train_transform),
                                                         test=tasks(*data["test"])))


@torch.no_grad()
def _set_weights(net: GatedNet) -> None:
    """``golden.initial`` for the parameters the official run sets at this task (all of them at the first)."""
    t = net.n_tasks - 1
    mine = (f"tokens.{t}", f"heads.{t}.", f"e0.{t}", f"e2.{t}", f"projectors.{t - 1}.")
    for name, p in net.named_parameters():
        if t == 0 or name.startswith(mine):
            p.copy_(golden.initial(name, p.shape))


def suite_run(tmp_path, monkeypatch, extra=()):
    m, r = golden.MODEL, golden.RUN
    over = ["experiment=gcab-cifar100", f"model.depth={m['depth']}",
            f"model.local_up_to_layer={m['local_up_to_layer']}",
            f"model.drop_path_rate={m['drop_path']}", f"trainer.max_epochs={r['epochs']}",
            f"scheduler.warmup_epochs={r['warmup_epochs']}", f"data.batch_size={r['batch']}",
            f"optimizer.weight_decay={r['weight_decay']}", "trainer.accelerator=cpu",
            "logger=none", "data.num_workers=0", "data.persistent_workers=false", "seed=0", *extra]
    cfg = compose(over, tmp_path / "data")
    add_task = GatedNet.add_task

    def add(self, classes):
        add_task(self, classes)
        _set_weights(self)

    monkeypatch.setattr(GatedNet, "add_task", add)
    steps, norms = record_steps(monkeypatch), []  # scripts/golden_coda.py's batch order, as the official run's
    trained = {}
    after_backward = ContinualModule.on_after_backward

    def on_after_backward(self):  # what the last step trained (the official norm: what has a gradient)
        after_backward(self)
        trained["params"] = [p for p in self.net.parameters() if p.grad is not None]

    monkeypatch.setattr(ContinualModule, "on_after_backward", on_after_backward)

    def norm_at_end(runner, i):
        params = trained["params"]
        norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))))

    from cl_vit.runner import ContinualRunner

    init = ContinualRunner.__init__
    monkeypatch.setattr(ContinualRunner, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "on_experience_end": norm_at_end}))
    doc = run(cfg, tmp_path / "run", scenario=stream())
    per_task = golden.STREAM["n_classes"] // golden.STREAM["tasks"] * golden.STREAM["n_test"]
    correct = [[int(round(v * per_task)) for v in row[: i + 1]] for i, row in enumerate(doc["accuracy_matrix"])]
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "correct": correct, "norm": norms}


def test_suite_recipe_follows_the_official_run(tmp_path, data_root, monkeypatch):
    ours, theirs = suite_run(tmp_path, monkeypatch), OFFICIAL
    assert ours["lr"] == theirs["lr"]  # 3 tasks x 4 epochs x 2 full batches of 8 (20 images, the last 4 dropped)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=0)
    assert ours["correct"] == theirs["correct"]
    np.testing.assert_allclose(ours["norm"], theirs["norm"], rtol=1e-5, atol=0)


def test_gcab_recipes_train_as_the_official_runs():
    from cl_vit.models.gated import GatedNet

    for name in ("cifar100", "tiny-imagenet", "imagenet100"):
        cfg = compose([f"experiment=gcab-{name}"])
        # main.py L100-108, L364, L403: timm's cosine stepped after each epoch, as DeiT's loop (DeiTCosine)
        assert (cfg.scheduler.name, cfg.scheduler.warmup_epochs) == ("deit_cosine", 5)
        assert (cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == (1e-6, 1e-5)
        assert cfg.strategy.gcab.norm_eps == 1e-5 and cfg.trainer.gradient_clip_val == 10000
        assert cfg.data.drop_last is True
        # ImageNet_GCAB_FDC.yaml L19 no_amp: false; the CIFAR and Tiny files set no_amp: true
        assert cfg.trainer.precision == ("16-mixed" if name == "imagenet100" else "32-true")
    import timm

    backbone = timm.create_model("convit_tiny", pretrained=False, num_classes=4, img_size=32, patch_size=4, depth=2,
                                 local_up_to_layer=1)
    net = GatedNet(backbone, 4, norm_eps=1e-5)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
