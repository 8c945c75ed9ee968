"""Golden trajectory from DyTox's own training loop (arthurdouillard/dytox) on a tiny stream, on a CPU.

    PYTHONPATH=/tmp/dytox-deps python scripts/golden_dytox_runs.py /path/to/dytox

runs the official ``main.main`` (main.py: its task loop, teacher, freezing, rehearsal memory, balanced finetuning,
timm optimiser and scheduler), its ``train_one_epoch`` and ``forward`` (continual/engine.py: the BCE, the
``auto_kd`` distillation, the divergence head), its memory (continual/rehearsal.py ``Memory``, ``icarl_selection``
herding on the concatenated task embeddings, ``get_finetuning_dataset``), its model (continual/dytox.py, convit.py)
and its data pipeline (continuum's CIFAR100 and ClassIncremental, continual/datasets.py), with the options of
options/model/cifar_dytox.yaml, and prints what tests/test_golden_dytox.py asserts the suite reproduces: per step
the learning rate, the loss and whether it is a finetuning step, at each task's end (after the finetuning) the
correct test images per task, the norm of the network's parameters and the memory (which of the stream's training
images it holds, in its order). Nothing of the official code is copied or changed on disk; at run time this script
only

* makes ``.cuda()`` and ``.to('cuda')`` identities and ``torch.cuda.synchronize`` a no-op, and runs without
  distribution (``args.distributed = False``, device cpu): one process, whose memory (``distributed_memory``, the
  default) is then the one global memory;
* writes the stream of scripts/golden_coda.py (6 generated 32 x 32 classes, 3 tasks of 2) as CIFAR-100's python
  pickles, which continuum reads through torchvision, and skips torchvision's md5 check;
* replaces the transforms (datasets.py ``build_transform``) by ``ToTensor`` + the official CIFAR-100 ``Normalize``,
  with one deterministic augmentation in training: every training image mirrored (``RandomHorizontalFlip(p=1)``), so
  that the herding's view shows (the training transform, main.py L625: mirrored images; the test transform's would
  be the stored ones);
* shrinks the model to ``MODEL`` (the official ConViT layout, 2 GPSA blocks and the task-attention block instead of
  5 + 1, 12 heads 8 wide instead of 32; drop path 0) and the run to ``RUN`` (batch 8, 4 epochs, 2 warm-up epochs,
  the base rate scaled so that main.py L503-508 gives 1.25e-4 at batch 8, weight decay 2 so that what it reaches
  shows, a memory of 14 images, 2 finetuning epochs at the same rate);
* gives the training loaders (factory.py L55-67) the fixed order of scripts/golden_coda.py (``FixedOrder``) through
  samplers.get_sampler; the finetuning loader has no sampler (``ft_no_sampling``) and only reads the sampler's length
  (its ``drop_last``, factory.py L61);
* sets every weight from ``golden_gcab.initial``, by the suite's parameter names (``suite_name``): the network at the
  first task, each later task's token, classifier and divergence head when they are created (through
  factory.get_loaders, which main.py L497 calls after building them and before the optimiser).

Needs continuum 1.2.4 and timm 0.5.4 (the DyTox code imports timm helpers that timm 1.0 removed), e.g.
``pip install --no-deps --target /tmp/dytox-deps continuum==1.2.4 timm==0.5.4`` and ``PYTHONPATH=/tmp/dytox-deps``.
Run it from a checkout outside this repository; it writes only to a temporary folder.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import print_run  # noqa: E402
from golden_coda import STREAM, FixedOrder, images, write_cifar  # noqa: E402  (the same stream and batch order)
from golden_gcab import CIFAR_MEAN, CIFAR_STD, cpu_run, initial  # noqa: E402
from golden_gcab import MODEL as GCAB_MODEL  # noqa: E402

#: golden_gcab's ConViT (2 GPSA blocks + the task-attention block, patch 4 at 32 px, drop path 0), 96 wide: DyTox's
#: code takes any width (GCAB's hard-codes 384), and the narrower network runs the whole test in a third of the time
MODEL = {**GCAB_MODEL, "embed_dim": 96}

#: golden_gcab's run, with the memory and the finetuning: 14 images (7 per class after the first task, herding 7 of a
#: class's 10; 3 after the second and 2 after the third, 2 images unused: main.py's memory_per_class keeps no
#: remainder), 2 finetuning epochs at lr x 8 / 512 = 1.25e-4
RUN = dict(batch=8, epochs=4, warmup_epochs=2, lr=8e-3, weight_decay=2.0, memory=14, ft_epochs=2, ft_lr=8e-3)


def suite_name(name: str) -> str | None:
    """The suite's name (cl_vit/models/dytox.py DyToxNet) of official parameter ``name``."""
    for old, new in ((r"^sabs\.", "backbone.blocks."), (r"^(patch_embed|pos_embed)", r"backbone.\1"),
                     (r"^tabs\.0\.", "tab."), (r"^task_tokens\.", "tokens."),
                     (r"^head\.(\d+)\.head\.", r"heads.\1.fc."), (r"^head\.(\d+)\.norm\.", r"heads.\1.norm."),
                     (r"^head_div\.head\.", "head_div.fc."), (r"^head_div\.norm\.", "head_div.norm.")):
        if re.match(old, name):
            return re.sub(old, new, name)
    return None


@torch.no_grad()
def set_task_weights(model, task: int) -> None:
    """The weights of ``task``'s new parameters (all of them at the first task), from ``initial``."""
    new = re.compile(rf"^(task_tokens\.{task}$|head\.{task}\.|head_div\.)")
    for name, p in model.named_parameters():
        ours = suite_name(name)
        if ours is not None and (task == 0 or new.match(name)):
            p.copy_(initial(ours, p.shape))


def network_norm(named) -> float:
    """The norm of the parameters both networks hold (official names mapped to the suite's, ``suite_name``),
    divergence head excluded (each task replaces it)."""
    total = 0.0
    for name, p in named:
        if not name.startswith("head_div."):
            total += float((p.detach().double() ** 2).sum())
    return total ** 0.5


def _patch(official: Path) -> None:
    """The run-time changes listed in the module docstring."""
    import torchvision.transforms as T

    cpu_run()
    sys.path.insert(0, str(official))
    import timm

    if not timm.__version__.startswith("0."):
        raise SystemExit(f"the DyTox code needs timm < 1 (timm 0.5.4: see the docstring); found {timm.__version__}")
    import continual.datasets as ds

    ds.build_transform = lambda is_train, args: T.Compose(
        [T.ToTensor(), *([T.RandomHorizontalFlip(p=1.0)] if is_train else []), T.Normalize(CIFAR_MEAN, CIFAR_STD)])


def arguments(official: Path, work: Path) -> argparse.Namespace:
    """main.py's arguments with the official model options (options/model/cifar_dytox.yaml; the data options are the
    stream's: CIFAR, 3 tasks of 2 classes in label order) and the tiny run's changes."""
    import main

    args = main.get_args_parser().parse_args([])
    main.load_options(args, [str(official / "options/model/cifar_dytox.yaml")])
    b, n = RUN["batch"], STREAM["n_classes"] // STREAM["tasks"]
    args.__dict__.update(
        data_set="CIFAR", depth=MODEL["depth"], local_up_to_layer=MODEL["local_up_to_layer"],
        drop_path=MODEL["drop_path"], embed_dim=MODEL["embed_dim"], num_heads=MODEL["num_heads"],
        patch_size=MODEL["patch_size"], input_size=MODEL["input_size"], batch_size=b, incremental_batch_size=b,
        epochs=RUN["epochs"], base_epochs=RUN["epochs"], warmup_epochs=RUN["warmup_epochs"], lr=RUN["lr"],
        incremental_lr=RUN["lr"], memory_size=RUN["memory"], finetuning_epochs=RUN["ft_epochs"],
        finetuning_lr=RUN["ft_lr"], initial_increment=n, increment=n, class_order=None,
        data_path=str(work / "data"), eval_every=0, device="cpu", distributed=False, name="",
        output_dir=str(work / "out"), seed=0, weight_decay=RUN["weight_decay"], num_workers=0)
    return args


def memory_images(memory, train_x: np.ndarray) -> list[int]:
    """The stream's training images the memory holds, in its order (positions in ``images()['train']``)."""
    flat = train_x.reshape(len(train_x), -1)
    out = []
    for x in memory.x:
        hit = np.flatnonzero((flat == np.asarray(x).reshape(1, -1)).all(1))
        out.append(int(hit[0]))
    return out


def run(official: Path, work: Path) -> dict:
    """The official run on the stream; returns its numbers."""
    import continual.factory as factory
    import continual.samplers as samplers
    import continual.scaler as scaler
    import main

    write_cifar(work / "data")
    (work / "out").mkdir()
    args = arguments(official, work)
    train_x = images()["train"][0]
    steps, ends, state = [], {}, {"tasks": 0}

    update = factory.update_dytox

    def update_dytox(model, task_id, a):
        state["model"], state["task"] = update(model, task_id, a), task_id
        return state["model"]

    def get_sampler(dataset_train, dataset_val, a):
        # a training loader of a new task takes the next fixed order; the finetuning loader reads only its length
        if state.pop("finetuning", False):
            return FixedOrder(len(dataset_train), -1), torch.utils.data.SequentialSampler(dataset_val)
        state["tasks"] += 1
        return FixedOrder(len(dataset_train), state["tasks"] - 1), torch.utils.data.SequentialSampler(dataset_val)

    loaders = factory.get_loaders

    def get_loaders(dataset_train, dataset_val, a, finetuning=False):
        if finetuning:
            state["finetuning"] = True
        else:
            set_task_weights(state["model"], state["task"])
        return loaders(dataset_train, dataset_val, a, finetuning=finetuning)

    factory.update_dytox, factory.get_loaders, samplers.get_sampler = update_dytox, get_loaders, get_sampler
    memory_class = main.Memory

    class Memory(memory_class):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            state["memory"] = self

    main.Memory = Memory
    call = scaler.ContinualScaler.__call__

    def step(self, loss, optimizer, model_without_ddp, *a, **k):
        steps.append((optimizer.param_groups[0]["lr"], float(loss), bool(model_without_ddp.in_finetuning)))
        return call(self, loss, optimizer, model_without_ddp, *a, **k)

    scaler.ContinualScaler.__call__ = step
    eval_and_log = main.eval_and_log

    @torch.no_grad()
    def record(args_, output_dir, model, model_without_ddp, optimizer, *a, **k):
        out = eval_and_log(args_, output_dir, model, model_without_ddp, optimizer, *a, **k)
        task, loader = a[2], a[8]
        hits = [0] * (task + 1)
        model.eval()
        for x, y, _ in loader:  # the official evaluation's forward (engine.py L279-283), every seen class
            pred = model(x)["logits"].argmax(1)
            for t in range(task + 1):
                hits[t] += int(((pred == y) & (y // args.increment == t)).sum())
        named = [(ours, p) for n, p in model_without_ddp.named_parameters() if (ours := suite_name(n))]
        # the last call of a task is its end (after the finetuning, main.py L737-742)
        ends[task] = {"correct": hits, "norm": network_norm(named),
                      "memory": memory_images(state["memory"], train_x) if len(state["memory"]) else []}
        return out

    main.eval_and_log = record
    main.main(args)
    tasks = sorted(ends)
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "finetuning": [s[2] for s in steps],
            "correct": [ends[t]["correct"] for t in tasks], "norm": [ends[t]["norm"] for t in tasks],
            "memory": [ends[t]["memory"] for t in tasks]}


def main(argv=None) -> None:
    print_run(argv, __doc__, "arthurdouillard/dytox", "golden_dytox_", run, before=_patch)

if __name__ == "__main__":
    main()
