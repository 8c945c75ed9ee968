"""Golden trajectory from DeiT-LT's own training loop (val-iisc/DeiT-LT) on a tiny long-tailed set, on a CPU.

    python scripts/golden_deit_lt.py /path/to/DeiT-LT

runs the official ``main.main`` (main.py: its optimiser from timm's ``create_optimizer``, its scheduler from timm's
``create_scheduler``, the DRW switch of the criterion, the per-epoch ``evaluate``) with the official
``engine.train_one_epoch`` (gradient accumulation and per-update scheduler steps under ``--accum-iter 4``, Mixup /
CutMix before ``--drw``), losses
(losses.py ``DistillationLoss``: CLS cross-entropy plus hard distillation from the teacher, class-weighted from the DRW
epoch on), student (deit_models/deit.py ``DistilledVisionTransformer``), teacher (teacher_models/resnet_cifar.py
``resnet32``) and data set (datasets.py ``KD_IMBALANCECIFAR10``, the CIFAR-10 pickles subsampled to an exponential
profile), with the arguments of sh/train_c10_if100.sh where they apply (hard distillation, ``--drw``,
``--no-mixup-drw``, ``--weighted-distillation``, ``--accum-iter 4``, teacher size = input size), and prints what
tests/test_golden_deit_lt.py asserts the suite reproduces: per step the learning rate, the loss and its two terms
(``cls``: (1 - alpha) CE of the CLS head, ``dist``: alpha x distillation of the DIST head), after each epoch the
correct test images of the averaged, CLS and DIST heads and the norm of the trained parameters. Three runs
(``RUNS``): ``accum4`` (the scripts' accumulation), ``accum1`` (neither accumulation nor ``--drw``, arguments.py's
defaults) and ``mixup`` (``accum4`` with arguments.py's Mixup / CutMix and ``--drop-last``).

Nothing of the official code is copied or changed on disk; at run time this script only

* makes ``.cuda()`` an identity and ``torch.cuda.set_device`` / ``torch.cuda.synchronize`` no-ops (the amp autocast
  and GradScaler of engine.py disable themselves without CUDA), runs with ``--device cpu`` and without distributed
  environment variables (``utils.init_distributed_mode``: one process, world size 1);
* provides ``xformers.ops`` (deit_models/vision_transformer.py L63 imports it; its ``memory_efficient_attention`` is
  exact softmax attention over ``[B, N, heads, dim]`` with scale dim^-0.5, given here by torch's
  ``scaled_dot_product_attention``; xformers needs CUDA);
* gives ``timm.models._pretrained`` the ``generate_default_cfgs`` that vision_transformer.py L61 imports from there
  (timm 0.8.15.dev0 of environment.yml L199 had it there; timm 1.0 moved it): the run uses the installed timm's
  ``create_scheduler`` and ``create_optimizer``, as the suite does;
* sizes the student down (``STUDENT``: the official ``DistilledVisionTransformer`` with 2 blocks 48 wide at 32 px,
  patch 8; ``PatchEmbedCustom`` is built with these sizes, vision_transformer.py L484 builds it with its 224 / 16 /
  768 defaults) under the name ``golden_tiny_distilled`` in ``deit_models``, and loads ``initial_student()`` into it;
* writes a tiny CIFAR-10 in torchvision's pickle format (``STREAM``: 10 classes of 16 generated 32 x 32 images, cut
  by ``--imb_factor 0.1`` to 16, 12, 9, 7, 5, 4, 3, 2, 2, 1 = 61 images; 5 test images per class) and skips
  torchvision's md5 check of the real files;
* turns the random augmentation off: the training transform is datasets.py's evaluation transform (``ToTensor`` +
  ImageNet normalisation at 32 px), ``--drop-path 0``, no repeated augmentation (``--no-repeated-aug``: RASampler
  keeps ``floor(N / 256) * 256`` images, none of 61), ``--mixup 0 --cutmix 0`` but in the ``mixup`` run, where
  numpy, from which timm's ``Mixup`` draws, is seeded ``mixing_seed(epoch)`` before each epoch (main's
  ``train_one_epoch`` wrapped; the test seeds the suite's at the same point);
* gives the training loader the fixed order of golden_coda.py's ``FixedOrder`` (epoch e: ``randperm(61)`` from a
  generator seeded e), the one tests/test_golden_deit_lt.py gives the suite's loader, in place of the
  ``DistributedSampler`` of main.py L123;
* writes the teacher (``initial_teacher()``, ``{"model": state_dict}`` as main.py L306-313 reads it) to a temporary
  file.

The numbers depend on nothing else; tests/test_golden_deit_lt.py builds the same images, weights and order. The
official code needs nothing the suite does not install beyond xformers (replaced above) and wandb, which it imports but
does not call here (the suite's ``loggers`` extra installs it; an empty module stands in where it is missing). Run it
from a checkout outside this repository; it writes only to a temporary folder.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import print_runs, sibling  # noqa: E402  (the scripts' shared helpers)

#: the tiny set: classes (CIFAR-10's, KD_IMBALANCECIFAR10.cls_num), images per class before the long-tail cut, test
#: images per class, image size, --imb_factor, batch size, epochs, --warmup-epochs, --drw
STREAM = dict(n_classes=10, n_train=16, n_test=5, size=32, imb_factor=0.1, batch=6, epochs=6, warmup=2, drw=4)
#: the runs: "accum4" with --accum-iter 4 as every sh/train_*.sh (the scheduler set per accumulation window,
#: engine.py L77-80); "accum1" with arguments.py's defaults --accum-iter 1 (the scheduler stepped after each epoch,
#: main.py L504-505) and no --drw (the distillation class-weighted from the start, main.py L331-332); "mixup" as
#: "accum4" with Mixup / CutMix on (arguments.py's --mixup 0.8 --cutmix 1.0 --smoothing 0.1, off from --drw on as
#: --no-mixup-drw) and --drop-last (timm's Mixup refuses the odd last batch, 61 = 10 x 6 + 1)
RUNS = {"accum4": dict(accum=4, mixup=False, drw=True), "accum1": dict(accum=1, mixup=False, drw=False),
        "mixup": dict(accum=4, mixup=True, drw=True)}


def mixing_seed(epoch: int) -> int:
    """numpy's seed at the start of each epoch of the "mixup" runs: timm's Mixup draws its mixing (np.random) from
    there in both runs."""
    return 500 + epoch
#: the student: DeiT's distilled ViT layout (qkv bias, LayerNorm eps 1e-6, CLS + DIST tokens with their own
#: position-embedding rows), 2 blocks 48 wide at 32 px with patch 8
STUDENT = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0)
#: --lr before main.py L219-221 scales it by batch x world size / 512
BASE_LR = 0.2
ALPHA = 0.5  # --distillation-alpha (arguments.py default)
SEED = 0
#: ImageNet mean / std of datasets.py build_transform_deit (timm's IMAGENET_DEFAULT_MEAN / _STD)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scaled_lr() -> float:
    """The learning rate main.py L219-221 trains with (one process): ``lr * batch_size * world_size / 512``."""
    return BASE_LR * STREAM["batch"] * 1 / 512.0


def _golden_coda():
    """scripts/golden_coda.py, whose generated images and fixed batch order this run shares."""
    return sibling("golden_coda")


def images() -> dict:
    """Train and test images (uint8, N x 32 x 32 x 3) and labels, in a shuffled order (as CIFAR's files hold them):
    golden_coda.py's per-class colour and pattern plus noise, ``STREAM``'s classes and counts."""
    return _golden_coda().images(STREAM)


def class_counts() -> list[int]:
    """The exponential profile of datasets.py ``get_img_num_per_cls``: ``int(n_max * imb_factor ** (c / (C - 1)))``."""
    n, c = STREAM["n_train"], STREAM["n_classes"]
    return [int(n * STREAM["imb_factor"] ** (i / (c - 1.0))) for i in range(c)]


def long_tailed_train() -> tuple[np.ndarray, np.ndarray]:
    """The training set as ``KD_IMBALANCECIFAR10`` keeps it: numpy seeded 0, then per class in label order its
    indices shuffled and the first ``count`` kept, classes one after another (datasets.py ``gen_imbalanced_data``)."""
    x, y = images()["train"]
    np.random.seed(0)
    keep = []
    for label, count in enumerate(class_counts()):
        idx = np.where(y == label)[0]
        np.random.shuffle(idx)
        keep.append(idx[:count])
    keep = np.concatenate(keep)
    return x[keep], y[keep]


def to_input(x: np.ndarray) -> torch.Tensor:
    """uint8 images as both runs feed them: ``ToTensor`` then ``Normalize`` with the ImageNet statistics."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float().div(255)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return t.sub(mean).div(std)


def initial_student() -> dict:
    """The starting weights of both students: timm's ``VisionTransformerDistilled`` of ``STUDENT`` seeded 0 (the
    state-dict layout of the official ``DistilledVisionTransformer``)."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(SEED)
    net = VisionTransformerDistilled(**STUDENT, qkv_bias=True, num_classes=STREAM["n_classes"])
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def initial_teacher() -> dict:
    """The teacher of both runs: LDAM-DRW's ResNet-32 (teacher_models/resnet_cifar.py; the suite's ``resnet32_cifar``
    has its state-dict layout) seeded 1, its linear classifier fitted by ridge regression to the one-hot labels of
    the long-tailed training images, so that its predictions vary as a trained teacher's do."""
    from cl_vit.models.teachers import ResNetCifar

    torch.manual_seed(1)
    net = ResNetCifar(num_classes=STREAM["n_classes"]).eval()
    x, y = long_tailed_train()
    with torch.no_grad():
        feats = net.forward_head(net.forward_features(to_input(x)), pre_logits=True).double()
        target = torch.nn.functional.one_hot(torch.from_numpy(y), STREAM["n_classes"]).double()
        f = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.double)], 1)
        w = torch.linalg.solve(f.T @ f + 100.0 * torch.eye(f.shape[1], dtype=torch.double), f.T @ target)
        net.linear.weight.copy_(w[:-1].T.float()), net.linear.bias.copy_(w[-1].float())
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def write_cifar10(root: Path) -> None:
    """The images as torchvision's CIFAR-10 pickles (``data`` rows C x H x W, ``labels``), the training images in
    five batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    data = images()
    x, y = data["train"]
    for i, part in enumerate(np.array_split(np.arange(len(y)), 5)):
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": x[part].transpose(0, 3, 1, 2).reshape(len(part), -1), "labels": y[part].tolist()}, f)
    x, y = data["test"]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(y), -1), "labels": y.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(STREAM["n_classes"])]}, f)


def fixed_order(loader_class):
    """``loader_class`` whose shuffled loaders follow golden_coda.py's ``FixedOrder`` of task 0 (epoch e:
    ``randperm(n)`` from a generator seeded e) instead: the suite's side of the fixed batch order."""
    return _golden_coda().fixed_order(loader_class)


def trained_norm(params) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params)))


def _xformers_stub() -> None:
    import torch.nn.functional as F

    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert attn_bias is None
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention, ops.unbind, ops.fmha = memory_efficient_attention, torch.unbind, None
    package = types.ModuleType("xformers")
    package.ops = ops
    sys.modules.setdefault("xformers", package), sys.modules.setdefault("xformers.ops", ops)


def _patch(official: Path):
    """The run-time changes listed in the module docstring (once per process); returns the official ``main``."""
    if "golden_tiny_distilled" in getattr(sys.modules.get("deit_models"), "__dict__", {}):
        return sys.modules["main"]
    import functools

    import torchvision

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.synchronize = lambda *a, **k: None
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
        os.environ.pop(var, None)
    _xformers_stub()
    try:
        import wandb  # noqa: F401  (main.py L13, engine.py L19; called only under --log-results)
    except ImportError:
        sys.modules["wandb"] = types.ModuleType("wandb")
    import timm.models
    import timm.models._pretrained

    # vision_transformer.py L61 imports it from where timm 0.8 (environment.yml L199) kept it
    timm.models._pretrained.generate_default_cfgs = timm.models.generate_default_cfgs
    sys.path.insert(0, str(official))
    import datasets as ds
    import deit_models
    import deit_models.deit
    import deit_models.vision_transformer as vt
    import main as official_main

    torchvision.datasets.CIFAR10._check_integrity = lambda self: True
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True
    build = ds.build_transform_deit
    ds.build_transform_deit = lambda is_train, args: build(False, args)
    patch_embed = vt.PatchEmbedCustom
    vt.PatchEmbedCustom = lambda: patch_embed(img_size=STUDENT["img_size"], patch_size=STUDENT["patch_size"],
                                              embed_dim=STUDENT["embed_dim"])
    start = initial_student()

    def golden_tiny_distilled(pretrained=False, **kwargs):
        model = deit_models.deit.DistilledVisionTransformer(
            **STUDENT, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kwargs)
        model.load_state_dict(start)
        return model

    deit_models.golden_tiny_distilled = golden_tiny_distilled
    torch.utils.data.DistributedSampler = lambda dataset, **k: _golden_coda().FixedOrder(len(dataset), 0)
    return official_main


def run(official: Path, work: Path, name: str) -> dict:
    """The official run ``name`` (a key of ``RUNS``) on the tiny set; returns its numbers."""
    main = _patch(official)
    import engine
    import losses
    from arguments import get_args_parser
    from timm.optim import create_optimizer

    teacher_file = work / "teacher.pth"
    torch.save({"model": initial_teacher()}, teacher_file)
    write_cifar10(work / "data")

    s, accum, mixup = STREAM, RUNS[name]["accum"], RUNS[name]["mixup"]
    mixing = ["--drop-last"] if mixup else ["--mixup", "0", "--cutmix", "0"]
    drw = ["--drw", str(s["drw"])] if RUNS[name]["drw"] else []
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args([
        "--model", "golden_tiny_distilled", "--batch-size", str(s["batch"]), "--epochs", str(s["epochs"]),
        "--data-set", "CIFAR10LT", "--data-path", str(work / "data"), "--imb_factor", str(s["imb_factor"]),
        "--input-size", str(s["size"]), "--teacher-model", "resnet32", "--teacher-path", str(teacher_file),
        "--teacher-size", str(s["size"]), "--distillation-type", "hard", "--distillation-alpha", str(ALPHA),
        *drw, "--no-mixup-drw", "--weighted-distillation", "--accum-iter", str(accum),
        "--student-transform", "0", "--teacher-transform", "0", "--custom_model", "--no-repeated-aug",
        *mixing, "--drop-path", "0", "--warmup-epochs", str(s["warmup"]),
        "--lr", str(BASE_LR), "--device", "cpu", "--num_workers", "0", "--seed", str(SEED)])
    args.name_exp = "golden"

    steps, epochs = [], []
    state = {}

    def remember_optimizer(a, model):
        state["optimizer"] = create_optimizer(a, model)
        return state["optimizer"]

    class Recorded(losses.DistillationLoss):  # the criterion of both phases (main.py builds it before and at --drw)
        def forward(self, inputs, outputs, labels):
            loss, cls, dist = super().forward(inputs, outputs, labels)
            steps.append((state["optimizer"].param_groups[0]["lr"], float(loss), float(cls), float(dist)))
            return loss, cls, dist

    def recorded_evaluate(loader, model, device, a):
        stats = engine.evaluate(loader, model, device, a)
        n = len(loader.dataset)
        correct = [int(round(stats[f"acc1_{h}"] * n / 100)) for h in ("avg", "cls", "dist")]
        params = [p for g in state["optimizer"].param_groups for p in g["params"]]
        epochs.append((correct, trained_norm(params)))
        return stats

    def seeded_epoch(*a, epoch, **k):
        np.random.seed(mixing_seed(epoch))
        return engine.train_one_epoch(*a, epoch=epoch, **k)

    main.create_optimizer, main.DistillationLoss, main.evaluate = remember_optimizer, Recorded, recorded_evaluate
    main.train_one_epoch = seeded_epoch
    main.main(args)
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "cls": [s[2] for s in steps],
            "dist": [s[3] for s in steps], "correct": [e[0] for e in epochs], "norm": [e[1] for e in epochs]}


def main(argv=None) -> None:
    print_runs(argv, __doc__, "val-iisc/DeiT-LT", "golden_deit_lt_", RUNS, run)


if __name__ == "__main__":
    main()
