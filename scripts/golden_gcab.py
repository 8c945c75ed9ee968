"""Golden trajectory from GCAB-CFDC's own training loop (OcraM17/GCAB-CFDC, built on DyTox) on a tiny stream, on a CPU.

    python scripts/golden_gcab.py /path/to/GCAB-CFDC

runs the official ``main.main`` (main.py: its task loop, freezing, teacher, projectors, masks, timm optimiser and
scheduler), its ``train_one_epoch`` and losses (continual/engine_GCAB.py: the BCE, the mask regulariser, the
projector loss), its gradient masking, embedding compensation, gradient clipping and embedding clamp
(continual/scaler.py), its model (continual/GCAB.py, convit.py, dytox.py) and its data pipeline (continuum's
CIFAR100 and ClassIncremental, continual/datasets.py), with the options of options/model/cifar_GCAB_FDC.yaml, and
prints what tests/test_golden_gcab.py asserts the suite reproduces: per step the learning rate and the loss, at each
task's end the correct test images per task (the accuracy matrix) and the norm of the trained parameters. Nothing of
the official code is copied or changed on disk; at run time this script only

* makes ``.cuda()`` and ``.to('cuda')`` identities and ``torch.cuda.synchronize`` a no-op, runs without
  distribution (``args.distributed = False``, device cpu) and switches autograd's anomaly mode (main.py L31) off;
* writes the stream of scripts/golden_coda.py (6 generated 32 x 32 classes, 3 tasks of 2) as CIFAR-100's python
  pickles, which continuum reads through torchvision, and skips torchvision's md5 check;
* replaces the transforms (datasets.py ``build_transform``) by ``ToTensor`` + the official CIFAR-100 ``Normalize``
  (datasets.py L145-147; augmentation off) for training and test;
* shrinks the model to ``MODEL`` (the official ConViT layout, 2 GPSA blocks and the class-attention block instead
  of 5 + 1; width 384, MLP 1536 and 64 tokens, which GCAB.py L36-37 and main.py L350 hard-code; drop path 0) and
  the run to ``RUN`` (batch 8, 4 epochs, 2 warm-up epochs, the base rate scaled so that main.py L357-360 gives the
  recipe's 1.25e-4 at batch 8, weight decay 2 so that what it reaches shows);
* gives the training loader (factory.py L30-36, ``drop_last=True``) the fixed order of scripts/golden_coda.py
  (``FixedOrder``) through samplers.get_sampler;
* sets every weight from ``initial``, by the suite's parameter names (``suite_name``): the network at the first task,
  each later task's token, head, gate embedding rows and drift projector when they are created (through
  factory.get_loaders, which main.py L353 calls after building them and before the optimiser).

The stubs for continuum's optional imports (h5py, pandas, scikit-image, imagehash, datasets: data sets this run
does not use) are empty modules. Needs continuum 1.2.4 (requirements.txt), e.g.
``pip install --no-deps --target /tmp/gcab-deps continuum==1.2.4`` and ``PYTHONPATH=/tmp/gcab-deps``. Run it from
a checkout outside this repository; it writes only to a temporary folder.
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import re
import sys
import types
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import print_run  # noqa: E402
from golden_coda import STREAM, FixedOrder, write_cifar  # noqa: E402  (the same stream and batch order)

#: the official ConViT + GCAB layout, small (options/model/cifar_GCAB_FDC.yaml: depth 6, local_up_to_layer 5)
MODEL = dict(embed_dim=384, depth=3, num_heads=12, patch_size=4, input_size=32, local_up_to_layer=2, drop_path=0.0)
#: batch, epochs, warm-up epochs; ``lr`` x batch / 512 (main.py L357-360) = 1.25e-4, the recipes' rate; a weight
#: decay that 24 steps show (cifar_GCAB_FDC.yaml's 1e-6 would move a weight by less than 1e-9 of itself)
RUN = dict(batch=8, epochs=4, warmup_epochs=2, lr=8e-3, weight_decay=2.0)
#: datasets.py L145-147: the CIFAR-100 normalisation at 32 px
CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
OPTIONAL = ("h5py", "pandas", "skimage", "imagehash", "datasets")


def initial(name: str, shape) -> torch.Tensor:
    """The starting value of the suite's parameter ``name``: its own generator per name (so that the order in which
    the two runs create parameters does not matter); gate embeddings N(0, 1) as nn.Embedding, norm weights and
    ConViT's gating parameters near 1, everything else N(0, 0.02^2)."""
    z = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    if re.match(r"e[02]\.", name):
        return z
    norm = name.endswith(".weight") and re.search(r"norm\d?\.|projectors\.\d+\.1\.", name)
    if norm or name.endswith("gating_param"):
        return 1 + 0.1 * z
    return 0.02 * z


def suite_name(name: str) -> str | None:
    """The suite's name (cl_vit/models/gated.py GatedNet) of official parameter ``name``; None for the gate
    embedding matrices, which the suite keeps per task (``e0.<t>``, ``e2.<t>``: one row each)."""
    for old, new in ((r"^sabs\.", "backbone.blocks."), (r"^(patch_embed|pos_embed)", r"backbone.\1"),
                     (r"^tabs\.0\.", "cab."), (r"^(class|task)_tokens\.", "tokens."),
                     (r"^head\.(\d+)\.head\.", r"heads.\1.fc."), (r"^head\.(\d+)\.norm\.", r"heads.\1.norm.")):
        if re.match(old, name):
            return re.sub(old, new, name)
    if name.startswith("projectors."):
        return name
    return None


def to_official(name: str, value: torch.Tensor, shape) -> torch.Tensor:
    """A suite value in the official layout: the projector's 1x1 convolutions (D, D, 1, 1) and its joint LayerNorm
    over (D, 1, N) where the suite has Linear (D, D) and LayerNorm((N, D))."""
    if name.startswith("projectors.") and len(shape) == 4:
        return value[:, :, None, None]
    if name.startswith("projectors.") and len(shape) == 3:
        return value.t()[:, None, :]
    return value.reshape(shape)


def suite_shape(name: str, shape) -> tuple:
    if name.startswith("projectors.") and len(shape) == 4:
        return tuple(shape[:2])
    if name.startswith("projectors.") and len(shape) == 3:
        return (shape[2], shape[0])
    return tuple(shape)


@torch.no_grad()
def set_task_weights(model, task: int) -> None:
    """The weights of ``task``'s new parameters (all of them at the first task), from ``initial``."""
    new = re.compile(rf"^(class_tokens\.{task}|head\.{task}\.|projectors\.{task - 1}\.)")
    # DyTox's task_tokens and GCAB's class_tokens hold the first token both; named_parameters() names it task_tokens.0
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in ("embs_0.weight", "embs_2.weight"):
            p[task] = initial(f"e{name[5]}.{task}", p.shape[1:])
            continue
        ours = suite_name(name)
        if ours is None or not (task == 0 or new.match(name)):
            continue
        p.copy_(to_official(name, initial(ours, suite_shape(name, p.shape)), p.shape))


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for continuum's imports of packages this run does not use."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = types.ModuleType(spec.name)

        def attr(a):
            if a.startswith("__"):
                raise AttributeError(a)
            return type(a, (), {})

        mod.__getattr__ = attr
        return mod

    def exec_module(self, module):
        module.__path__ = []


def cpu_run() -> None:
    """What a DyTox-based official loop needs to run on a CPU from generated CIFAR files: continuum's optional imports
    stubbed (``OPTIONAL``), ``.cuda()`` and ``.to('cuda')`` identities, ``torch.cuda.synchronize`` a no-op and
    torchvision's md5 check of the CIFAR-100 files skipped (golden_dytox_runs.py shares it)."""
    import torchvision

    missing = []
    for m in OPTIONAL:
        try:
            __import__(m)
        except ImportError:
            missing.append(m)
    sys.meta_path.append(_Stubs(missing))
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    module_to = torch.nn.Module.to

    def to(self, *a, **k):
        where = a[0] if a else k.get("device")
        return self if str(where).startswith("cuda") else module_to(self, *a, **k)

    torch.nn.Module.to = to
    torch.cuda.synchronize = lambda *a, **k: None
    torchvision.datasets.CIFAR100._check_integrity = lambda self: True
    torchvision.datasets.cifar.check_integrity = lambda *a, **k: True


def _patch(official: Path) -> None:
    """The run-time changes listed in the module docstring."""
    import torchvision.transforms as T

    cpu_run()
    sys.path.insert(0, str(official))
    import continual.datasets as ds
    import continual.samplers as samplers

    import main  # noqa: F401  (turns anomaly mode on at import, main.py L31)

    torch.autograd.set_detect_anomaly(False)
    ds.build_transform = lambda is_train, args: T.Compose([T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)])
    tasks = {"n": 0}

    def get_sampler(dataset_train, dataset_val, args):
        tasks["n"] += 1
        return FixedOrder(len(dataset_train), tasks["n"] - 1), torch.utils.data.SequentialSampler(dataset_val)

    samplers.get_sampler = get_sampler


def arguments(official: Path, work: Path) -> argparse.Namespace:
    """main.py's arguments with the official option files (README: options/data/<scenario>,
    options/model/cifar_GCAB_FDC.yaml) and the tiny run's changes."""
    import main

    args = main.get_args_parser().parse_args([])
    main.load_options(args, [str(official / "options/data/cifar100_10splits.yaml"),
                             str(official / "options/model/cifar_GCAB_FDC.yaml")])
    b, n = RUN["batch"], STREAM["n_classes"] // STREAM["tasks"]
    args.__dict__.update(
        depth=MODEL["depth"], local_up_to_layer=MODEL["local_up_to_layer"], drop_path=MODEL["drop_path"],
        embed_dim=MODEL["embed_dim"], num_heads=MODEL["num_heads"], patch_size=MODEL["patch_size"],
        input_size=MODEL["input_size"], batch_size=b, incremental_batch_size=b, epochs=RUN["epochs"],
        base_epochs=RUN["epochs"], warmup_epochs=RUN["warmup_epochs"], lr=RUN["lr"], incremental_lr=RUN["lr"],
        initial_increment=n, increment=n, data_path=str(work / "data"), eval_every=0, device="cpu",
        distributed=False, name="", output_dir="", compress=str(work / "compress.txt"), report=str(work / "report"),
        trial_id=1, seed=0, weight_decay=RUN["weight_decay"])
    return args


def run(official: Path, work: Path) -> dict:
    """The official run on the stream; returns its numbers."""
    import continual.factory as factory
    import continual.scaler as scaler
    import main

    write_cifar(work / "data")
    args = arguments(official, work)
    steps, correct, norms, state = [], [], [], {}

    update = factory.update_gcab

    def update_gcab(model, task_id, num_tasks, a):
        state["model"], state["task"] = update(model, task_id, num_tasks, a), task_id
        return state["model"]

    loaders = factory.get_loaders

    def get_loaders(dataset_train, dataset_val, a):
        set_task_weights(state["model"], state["task"])
        return loaders(dataset_train, dataset_val, a)

    factory.update_gcab, factory.get_loaders = update_gcab, get_loaders
    call = scaler.ContinualScaler.__call__

    def step(self, loss, optimizer, *a, **k):
        steps.append((optimizer.param_groups[0]["lr"], float(loss)))
        return call(self, loss, optimizer, *a, **k)

    scaler.ContinualScaler.__call__ = step
    eval_and_log = main.eval_and_log

    @torch.no_grad()
    def record(args_, output_dir, model, model_without_ddp, optimizer, *a, **k):
        out = eval_and_log(args_, output_dir, model, model_without_ddp, optimizer, *a, **k)
        task, loader = a[2], a[8]
        hits = [0] * (task + 1)
        for x, y, _ in loader:  # the official evaluation's forward (engine_GCAB.py L127), every seen class
            pred = model(x, s=model.smax, inference=True)[0].argmax(1)
            for t in range(task + 1):
                hits[t] += int(((pred == y) & (y // args.increment == t)).sum())
        correct.append(hits)
        names = {id(p): n for n, p in model_without_ddp.named_parameters()}
        total = 0.0
        for p in (p for g in optimizer.param_groups for p in g["params"] if p.grad is not None):
            v = p[task] if names[id(p)].startswith("embs_") else p  # the task's own embedding row
            total += float((v.detach().double() ** 2).sum())
        norms.append(total ** 0.5)
        return out

    main.eval_and_log = record
    main.main(args)
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "correct": correct, "norm": norms}


def main(argv=None) -> None:
    print_run(argv, __doc__, "OcraM17/GCAB-CFDC", "golden_gcab_", run, before=_patch)

if __name__ == "__main__":
    main()
