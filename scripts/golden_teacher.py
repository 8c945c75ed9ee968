"""Golden trajectory from Saddle-LongTail's own teacher training (val-iisc/Saddle-LongTail) on a tiny CIFAR-10-LT, on
a CPU.

    python scripts/golden_teacher.py /path/to/Saddle-LongTail

runs the official ``cifar_train_sam.main`` with the arguments of run.sh "CIFAR10-LT (SAM)" for LDAM
(``--loss_type LDAM --train_rule DRW --rho 0.8 --rho_schedule none --seed 0``, ``--gpu 0``): its ``main_worker`` (the
per-epoch ``adjust_learning_rate`` with its warm-up and ``adjust_rho``, the DRW class weights ``idx = epoch // 160``,
a fresh ``LDAMLoss(max_m=0.5, s=30)`` each epoch, SAM around SGD with momentum 0.9 and weight decay 2e-4, the per-epoch
``validate``), its ``train`` (SAM's two forward / backward passes per batch), losses.py ``LDAMLoss``, sam.py ``SAM``,
models/resnet_cifar.py ``resnet32`` with the cosine classifier and imbalance_cifar.py ``IMBALANCECIFAR10``, and prints
what tests/test_golden_teacher.py asserts the suite's ``experiment=teacher-cifar10-lt`` reproduces: per step the
learning rate, SAM's radius and the LDAM loss of both passes (at ``w`` and at ``w + e(w)``), after each epoch the
correct test images, the norm of the trained parameters and that of the BatchNorm running statistics.

The official epoch constants stay as they are (5 warm-up epochs, the rate x0.01 after epoch 160 and x0.0001 after
180, DRW from epoch 160 of 200): each run visits a few of the 200 official epochs (``RUNS``), so that the warm-up, the
DRW switch and both rate steps are reached in a handful of epochs; the suite runs as many epochs with its epoch
settings moved to match (``suite_schedule``).

Nothing of the official code is copied or changed on disk; at run time this script only

* makes ``.cuda()`` an identity, ``torch.cuda.set_device`` a no-op and ``torch.cuda.FloatTensor`` the CPU
  ``torch.FloatTensor`` (losses.py L49 and L59 build the margins and the one-hot mask with it);
* provides ``tensorboardX`` (cifar_train_sam.py L18; its ``SummaryWriter`` only logs) as a module whose writer drops
  what it is given, where it is not installed;
* replaces the module's ``range`` so that the epoch loop (cifar_train_sam.py L206, ``range(start_epoch, epochs)``)
  visits the run's official epochs (``RUNS``) instead of all 200; every other ``range`` is the built-in one;
* builds ``resnet32`` (``models.__dict__[args.arch]``, cifar_train_sam.py L126) as the official ``ResNet_s`` with
  ``DEPTHS`` blocks per stage and loads ``initial_weights()`` into it;
* writes a tiny CIFAR-10 in torchvision's pickle format (scripts/golden_deit_lt.py's: 10 classes of 16 generated
  32 x 32 images, cut by ``--imb_factor 0.1`` to 16, 12, 9, 7, 5, 4, 3, 2, 2, 1 = 61 images; 5 test images per class)
  under ``./data`` of a temporary working directory, and skips torchvision's md5 check of the real files;
* turns the random augmentation off: ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip`` of transform_train
  (cifar_train_sam.py L164-169) become identities, so both transforms are ``ToTensor`` + the CIFAR normalisation;
* gives the training loader (``shuffle=True``) the fixed order of golden_coda.py's ``FixedOrder`` (epoch e:
  ``randperm(61)`` from a generator seeded e), the one tests/test_golden_teacher.py gives the suite's loader;
* writes its logs and checkpoints (``--root_log``, ``--root_model``) to the temporary directory;
* computes in float64 (``torch.set_default_dtype``: the network, SAM's state, the losses), as the test runs the suite
  (``trainer.precision=64-true``): the images are made in float32 as the loaders make them (``ToTensor`` and
  ``Normalize``) and cast to float64 at the network's input, as Lightning's double precision casts the batch; the
  LDAM margins and the DRW class weights stay the float32 tensors the code builds (losses.py L49,
  cifar_train_sam.py L235), the weights cast to the loss's dtype for ``F.cross_entropy``. In float32 these tiny
  networks (BatchNorm over a few images, LDAM's scale 30) magnify rounding: the numbers held only on the kernels and
  the thread count that made them (two threads instead of one: 32 of 40 losses off by up to 0.3 %).

The numbers depend on nothing else; tests/test_golden_teacher.py builds the same images, weights and order.
"""
from __future__ import annotations

import builtins
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import float32_to_tensor, float64_input, print_runs, sibling  # noqa: E402  (shared helpers)

#: blocks per stage of the official ResNet_s (resnet32 has 5, 5, 5; one each keeps the test at seconds)
DEPTHS = (1, 1, 1)
N_CLASSES = 10
IMB_FACTOR = 0.1  # --imb_factor: benchmark.imbalance_ratio=10
SEED = 0
#: the runs: the official epochs (0-based, as the loop counts them) visited in order, and the batch size.
#: "drw": past the warm-up at the full rate (epochs 5, 6), then the DRW weights with the rate x0.01 (160, 161), then
#: x0.0001 (180); 61 images in batches of 8, the last of 5 kept (no drop_last). "warmup": one batch of all 61 images
#: per epoch through the 5 warm-up epochs (0.1 x (e + 1) / 5), then the full rate (5) and DRW (160).
#: "warmup_batches": the first two warm-up epochs in batches of 8, where the official rate is set once per epoch
RUNS = {"drw": dict(epochs=(5, 6, 160, 161, 180), batch=8),
        "warmup": dict(epochs=(0, 1, 2, 3, 4, 5, 160), batch=64),
        "warmup_batches": dict(epochs=(0, 1), batch=8)}
#: the official loop's epoch constants: warm-up epochs, rate steps, DRW epoch (cifar_train_sam.py L426-431, L230)
WARMUP, RATE_STEPS, DRW = 5, (160, 180), 160
#: CIFAR normalisation of cifar_train_sam.py L168, L173
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def write_cifar10(root: Path) -> None:
    """golden_deit_lt.py's tiny CIFAR-10 (torchvision's pickles) under ``root``; its ``--imb_factor 0.1`` cut is this
    run's too."""
    deit = sibling("golden_deit_lt")
    assert deit.STREAM["imb_factor"] == IMB_FACTOR and deit.STREAM["n_classes"] == N_CLASSES
    deit.write_cifar10(root)


def training_images() -> tuple[torch.Tensor, np.ndarray]:
    """The long-tailed training images in ``IMBALANCECIFAR10``'s order (``ToTensor`` + the CIFAR normalisation) and
    their labels."""
    x, y = sibling("golden_deit_lt").long_tailed_train()
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), y


def suite_schedule(name: str) -> dict:
    """The suite's epoch settings that train suite epoch i as the run ``name`` trains its i-th visited official epoch:
    ``trainer.max_epochs``, ``scheduler.warmup_epochs`` (the official warm-up when the run starts at epoch 0),
    ``scheduler.milestones`` (the positions where the visited epochs pass 160 and 180) and
    ``strategy.ldam_drw.drw_start_epoch`` (the first visited epoch from 160 on)."""
    epochs = RUNS[name]["epochs"]
    first = lambda bound: next((i for i, e in enumerate(epochs) if e >= bound), len(epochs))  # noqa: E731
    warm = [e for e in epochs if e < WARMUP]
    assert warm == list(range(len(warm))), "a run visits the warm-up epochs from 0 on, or none of them"
    return {"max_epochs": len(epochs), "warmup_epochs": WARMUP if warm else 0,
            "milestones": [first(m) for m in RATE_STEPS], "drw_start_epoch": first(DRW)}


def initial_weights() -> dict:
    """The starting weights of both runs: the suite's ``ResNetCifar`` (the official ``ResNet_s`` state-dict layout)
    with ``DEPTHS`` and the cosine classifier, seeded ``SEED``."""
    from cl_vit.models.teachers import ResNetCifar

    torch.manual_seed(SEED)
    net = ResNetCifar(depths=DEPTHS, num_classes=N_CLASSES, use_norm=True)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def norms(model: torch.nn.Module) -> tuple[float, float]:
    """L2 norms of the trainable parameters and of the BatchNorm running means and variances."""
    params = [p.detach().double() for p in model.parameters()]
    stats = [b.detach().double() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    return (float(torch.sqrt(sum((p ** 2).sum() for p in params))),
            float(torch.sqrt(sum((b ** 2).sum() for b in stats))))


def patch_cuda() -> None:
    """The official scripts on a CPU: ``.cuda()`` an identity, ``torch.cuda.set_device`` a no-op,
    ``torch.cuda.FloatTensor`` the CPU one (losses.py L49, L59), and a ``tensorboardX`` whose writer drops what it is
    given where the package is missing (its ``SummaryWriter`` only logs)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.FloatTensor = torch.FloatTensor
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        class SummaryWriter:
            def __init__(self, *a, **k):
                pass

            def __getattr__(self, name):
                return lambda *a, **k: None

        sys.modules["tensorboardX"] = types.SimpleNamespace(SummaryWriter=SummaryWriter)


def float32_images() -> None:
    """``transforms.ToTensor`` makes float32 images whatever the default dtype (_official.float32_to_tensor), so that
    the float64 runs read the images the suite's loader makes."""
    import torchvision.transforms as transforms

    transforms.ToTensor = float32_to_tensor()


def float64_loss(script) -> None:
    """``script.LDAMLoss`` casting its class weights (the code's float32 ``torch.FloatTensor``) to the logits' dtype,
    which ``F.cross_entropy`` needs."""
    base = script.LDAMLoss

    class LDAMLoss(base):
        def forward(self, x, target):
            if self.weight is not None:
                self.weight = self.weight.to(x.dtype)
            return super().forward(x, target)

    script.LDAMLoss = LDAMLoss


def identity(*a, **k):
    """A random transform turned off: it returns the image it is given."""
    return lambda img: img


def fixed_shuffle() -> None:
    """Every ``DataLoader(shuffle=True)`` visits its data in golden_coda.py's ``FixedOrder`` (epoch e:
    ``randperm(n)`` from a generator seeded e), the order the tests give the suite's loader."""
    order = sibling("golden_coda").FixedOrder
    torch.utils.data.dataloader.RandomSampler = lambda data, **k: order(len(data), 0)


def _patch(official: Path):
    """The run-time changes listed in the module docstring (once per process); returns ``cifar_train_sam``."""
    if "cifar_train_sam" in sys.modules:
        return sys.modules["cifar_train_sam"]
    import torchvision
    import torchvision.transforms as transforms

    patch_cuda()
    torchvision.datasets.CIFAR10._check_integrity = lambda self: True
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    transforms.RandomCrop = transforms.RandomHorizontalFlip = identity
    float32_images()
    fixed_shuffle()
    sys.path.insert(0, str(official))
    import models
    import models.resnet_cifar as rc

    weights = initial_weights()  # made here, in float32: the float64 default of trace would draw other numbers

    def resnet32(num_classes=10, use_norm=False):
        net = rc.ResNet_s(rc.BasicBlock, list(DEPTHS), num_classes=num_classes, use_norm=use_norm)
        net.load_state_dict(weights)
        return float64_input(net)

    models.resnet32 = resnet32
    import cifar_train_sam

    float64_loss(cifar_train_sam)
    return cifar_train_sam


def trace(script, argv: list[str], visited, loop: tuple[int, int]) -> dict:
    """``script.main()`` in float64 with the command line ``argv``, its epoch loop (``range(*loop)``) visiting the
    official epochs ``visited`` instead; returns per step the rate, SAM's radius and the LDAM loss of both passes,
    after each epoch the correct test images and the norms (:func:`norms`)."""
    steps, epochs, state = [], [], {}

    def epoch_range(*a):
        return list(visited) if a == loop else builtins.range(*a)

    class Recorded(script.LDAMLoss):  # built afresh each epoch
        def forward(self, x, target):
            loss = super().forward(x, target)
            if torch.is_grad_enabled():  # train(); validate() runs under no_grad
                group = state["optimizer"].param_groups[0]
                steps.append((group["lr"], group["rho"], float(loss)))
            return loss

    sam = script.SAM

    def remembered_sam(*a, **k):
        state["optimizer"] = sam(*a, **k)
        return state["optimizer"]

    validate = script.validate

    def recorded_validate(val_loader, model, *a, **k):
        top1 = validate(val_loader, model, *a, **k)
        epochs.append((int(round(float(top1) * len(val_loader.dataset) / 100)), *norms(model)))
        return top1

    script.range, script.LDAMLoss = epoch_range, Recorded
    script.SAM, script.validate = remembered_sam, recorded_validate
    sys.argv = argv
    script.best_acc1 = 0
    torch.set_default_dtype(torch.float64)  # the network, SAM's state, the losses (module docstring)
    try:
        script.main()
    finally:
        torch.set_default_dtype(torch.float32)
        script.range, script.LDAMLoss, script.SAM, script.validate = builtins.range, Recorded.__base__, sam, validate
    first, second = steps[0::2], steps[1::2]
    assert [s[:2] for s in first] == [s[:2] for s in second]
    return {"lr": [s[0] for s in first], "rho": [s[1] for s in first], "loss": [s[2] for s in first],
            "loss_perturbed": [s[2] for s in second], "correct": [e[0] for e in epochs],
            "norm": [e[1] for e in epochs], "bn_norm": [e[2] for e in epochs]}


def run(official: Path, work: Path, name: str) -> dict:
    """The official run ``name`` (a key of ``RUNS``) on the tiny set; returns its numbers."""
    script = _patch(official)
    write_cifar10(work / "data")
    os.chdir(work)  # cifar_train_sam.py reads './data' (in_checkout restores the directory)
    argv = ["cifar_train_sam.py", "--gpu", "0", "--imb_type", "exp", "--imb_factor", str(IMB_FACTOR),
            "--loss_type", "LDAM", "--train_rule", "DRW", "--rho", "0.8", "--rho_schedule", "none",
            "--dataset", "cifar10", "--seed", str(SEED), "-b", str(RUNS[name]["batch"]), "-j", "0",
            "--root_log", str(work / "log"), "--root_model", str(work / "checkpoint")]
    # the epoch loop, cifar_train_sam.py L206: range(start_epoch, epochs) of 200; the LDAMLoss of L242
    return trace(script, argv, RUNS[name]["epochs"], (0, 200))


def main(argv=None) -> None:
    print_runs(argv, __doc__, "val-iisc/Saddle-LongTail", "golden_teacher_", RUNS, run)


if __name__ == "__main__":
    main()
