"""Golden trajectories from CODA-Prompt's own training loop (GT-RIPL/CODA-Prompt) on a tiny stream, on a CPU.

    python scripts/golden_coda.py /path/to/CODA-Prompt [--method coda|dual|l2p|l2p4|ftpp|er|all]

runs the official ``Trainer.train`` (trainer.py) with the official learners (learners/prompt.py CODAPrompt, DualPrompt,
L2P; learners/default.py FinetunePlus, the FT++ of the paper and of "A Closer Look at Rehearsal-Free Continual
Learning", and NormalNN with a coreset, ``--memory`` > 0: ER), models (models/zoo.py, models/vit.py), data set class
(dataloaders/dataloader.py iCIFAR100) and scheduler (utils/schedulers.py), and prints what tests/test_golden_coda.py
asserts the suite reproduces: per step the learning rate and the loss, at each task's end the correct test images per
task (the accuracy matrix), the norm of the trained parameters and, for ER, the coreset (which of the stream's
training images it holds, in its order). Nothing of the official code is copied or changed on disk; at run time this
script only

* makes ``.cuda()`` an identity (a copy, as a device move is: vit.py L186 adds into the tensor it returns) and
  ``torch.cuda.set_device`` a no-op, and runs with ``gpuid = [-1]`` (one process, no DataParallel), or for ``l2p4``
  with 4 entries and the learner's model in ``DataParallelOnOneDevice`` (the 4-GPU runs' forward, on one device);
* writes a tiny CIFAR-100 in the official pickle format (``STREAM``: 6 classes of generated 32 x 32 images, 3 tasks
  of 2) and skips the md5 check of the real files (dataloader.py L212, L260);
* replaces the training and test transforms by ``ToTensor()`` (augmentation off; dataloaders/utils.py
  ``get_transform``) and the backbone by a small ViT of the same layout (``BACKBONE``: 768 wide as zoo.py's prompt
  modules require, 5 blocks as its prompt layers 0-4, 32 px, patch 16), whose weights (``initial_backbone``) are the
  "pre-trained" ones zoo.py L368-371 loads;
* gives the training loader (trainer.py L185, ``shuffle=True, drop_last=True``) a fixed order (``FixedOrder``), the
  one tests/test_golden_coda.py gives the suite's runner: the same shuffling generator would not do, since torch's
  loop runs a shuffling sampler to its end, whose last (empty) draw advances the generator, and Lightning stops after
  the last full batch;
* seeds torch right before each task's prompt initialisation (``prompt_seed``): CODA-Prompt's Gram-Schmidt draws
  (zoo.py L34-36 at the start, ``process_task_count`` L51-71 at each later task; the start draws are redone after
  construction so that the uniform draws of ``tensor_prompt`` do not shift them); L2P / DualPrompt prompts start from
  ``initial_prompts``;
* for ER, replaces the random numbers of the coreset code (dataloaders/dataloader.py) by the suite's
  (cl_vit/strategies/replay.py ``generator``), so that both runs replay the same images: ``append_coreset``'s
  ``np.random.choice(len_core, len_data)`` (L135, with replacement, numpy's global generator) returns the suite's
  ``torch.randint(len_core, (len_data,))`` of the task (``mix=resample``), and ``update_coreset``'s
  ``np.random.choice(len(locs), num_data_k, replace=False)`` (L157, numpy reseeded with the run's seed at every
  rebuild, L147-148) the suite's ``torch.randperm(len(locs))[:num_data_k]`` of that class (``rebuild=draws``): the
  same law (numpy's choice without replacement is ``permutation(n)[:k]``), other numbers. The suite draws per class
  in the order of the classes, the official loop asks for the latest class first (L149), so each rebuild runs twice:
  once to read what it asks (lengths and counts; its coreset discarded), once answered in the suite's order. Nothing
  else of the official run draws from numpy.

The numbers depend on nothing else; tests/test_golden_coda.py builds the same stream, weights and seeds. The official
code needs nothing the suite does not install (torch, torchvision, timm, whose old module paths it imports still
resolve, numpy, Pillow, PyYAML). Run it from a checkout outside this repository; it writes only to a temporary folder.
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import print_runs  # noqa: E402  (the scripts' shared helpers)

#: the tiny stream: classes, images per class, image size, tasks, batch size, epochs
STREAM = dict(n_classes=6, n_train=10, n_test=5, size=32, tasks=3, batch=8, epochs=6)
#: the small ViT of the official layout (models/vit.py VisionTransformer: qkv bias, LayerNorm eps 1e-6, [CLS] token)
BACKBONE = dict(img_size=32, patch_size=16, embed_dim=768, depth=5, num_heads=12, mlp_ratio=1.0)
#: the official head is 100 wide (CIFAR-100, trainer.py L36-39); the suite's covers the stream's classes
OFFICIAL_CLASSES = 100
#: learner (learners/<module>.py <class>), --prompt_param (small pools for a CPU; experiments/cifar-100.sh uses
#: 100 8 0.0, 10 20 6, 30 20 -1), devices and learning rate of each run: "l2p4" is L2P++ as published, DataParallel
#: over 4 GPUs (experiments/cifar-100.sh L10); "ftpp" is FT++, every weight trained at configs/cifar-100_ft.yaml's rate
METHODS = {
    "coda": ("prompt", "CODAPrompt", [6, 8, 0.0], 1, 1e-3),
    "dual": ("prompt", "DualPrompt", [3, 4, 2], 1, 1e-3),
    "l2p": ("prompt", "L2P", [6, 4, -1], 1, 1e-3),
    "l2p4": ("prompt", "L2P", [6, 4, -1], 4, 1e-3),
    "ftpp": ("default", "FinetunePlus", [1, 1, 1], 1, 5e-5),
    "er": ("default", "NormalNN", [1, 1, 1], 1, 5e-5),
}
#: --memory of the runs with a coreset (ER): 10 images over 6 classes, so that the quota shrinks from 5 a class to 3
#: or 2 and then 2 or 1 (the remainder to the latest classes, L140-153) and past classes keep some of their draws twice
MEMORY = {"er": 10}
SEED = 0


def prompt_seed(task: int) -> int:
    return 1000 + task


def images(stream: dict = STREAM) -> dict:
    """Train and test images (uint8, N x 32 x 32 x 3) and labels: a per-class colour and pattern plus noise, stored
    in a class-interleaved order (the order the official data set keeps within a task, dataloader.py L93-96).
    ``stream``: n_classes, n_train and n_test per class, size (scripts/golden_deit_lt.py gives its own)."""
    rs = np.random.RandomState(0)
    n, size = stream["n_classes"], stream["size"]
    patterns = 0.5 * rs.uniform(0, 255, size=(n, 1, 1, 3)) + 0.5 * rs.uniform(0, 255, size=(n, size, size, 3))
    out = {}
    for split, per in (("train", stream["n_train"]), ("test", stream["n_test"])):
        labels = np.repeat(np.arange(n), per)
        x = 0.7 * patterns[labels] + 0.3 * rs.uniform(0, 255, size=(len(labels), size, size, 3))
        order = rs.permutation(len(labels))
        out[split] = (np.clip(x, 0, 255).astype(np.uint8)[order], labels[order])
    return out


def initial_backbone(depth: int = BACKBONE["depth"]) -> dict:
    """The "pre-trained" weights of both runs: a timm ViT of ``BACKBONE`` (``depth`` blocks) seeded 0 (head over
    OFFICIAL_CLASSES)."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(**{**BACKBONE, "depth": depth}, qkv_bias=True, num_classes=OFFICIAL_CLASSES)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def initial_prompts(shapes: dict) -> dict:
    """Starting values of the L2P / DualPrompt prompts and keys (zoo.py tensor_prompt: uniform [0, 1))."""
    gen = torch.Generator().manual_seed(7)
    return {k: torch.rand(shape, generator=gen) for k, shape in sorted(shapes.items())}


def write_cifar(root: Path) -> None:
    """The stream as CIFAR-100's python pickles (dataloader.py iCIFAR100: 'data' rows C x H x W, 'fine_labels')."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in images().items():
        with open(folder / split, "wb") as f:
            pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "fine_labels": y.tolist()}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(OFFICIAL_CLASSES)]}, f)


class DataParallelOnOneDevice(torch.nn.Module):
    """What torch's DataParallel computes, on one device: the batch scattered in ``n`` chunks (``Tensor.chunk``, as
    its scatter), the module run on each, the outputs gathered along dim 0 (each chunk's (1,) prompt loss into an
    (n,) tensor, which learners/prompt.py L37 sums). The learner sees ``.module`` as under DataParallel."""

    def __init__(self, module: torch.nn.Module, n: int):
        super().__init__()
        self.module, self.n = module, n

    def forward(self, x, *args, **kwargs):
        outs = [self.module(chunk, *args, **kwargs) for chunk in x.chunk(self.n)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)


class FixedOrder(torch.utils.data.Sampler):
    """The training order of both runs: epoch e of task t visits the task's images in ``randperm(n)`` drawn from a
    generator seeded ``100 t + e``."""

    def __init__(self, n: int, task: int):
        self.n, self.task, self.epoch = n, task, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(100 * self.task + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.n, generator=gen).tolist())


def fixed_order(loader_class):
    """``loader_class`` whose shuffled loaders (one per task, in task order) follow ``FixedOrder`` instead."""
    tasks = {"n": 0}

    def make(dataset, *args, **kwargs):
        if kwargs.pop("shuffle", False):
            kwargs["sampler"] = FixedOrder(len(dataset), tasks["n"])
            tasks["n"] += 1
        return loader_class(dataset, *args, **kwargs)

    return make


def suite_coreset_draws(dataset) -> callable:
    """Makes the coreset code of ``dataset`` (the official training set) draw the suite's numbers (the module's
    docstring); returns what undoes it."""
    from cl_vit.strategies.replay import CORESET, RESAMPLE, generator

    base_choice, base_update = np.random.choice, dataset.update_coreset
    asked, answers = [], []

    def choice(a, size=None, replace=True, p=None):
        if replace:  # append_coreset L135: the memory positions resampled into task t's training set
            return torch.randint(a, (size,), generator=generator(SEED, RESAMPLE, dataset.t)).numpy()
        if answers:  # update_coreset L157, answered: the latest class first, as the loop asks
            return answers.pop()
        asked.append((a, size))  # the reading pass: any valid choice
        return np.arange(size)

    def update_coreset(coreset_size, seen):
        asked.clear()
        base_update(coreset_size, seen)
        gen = generator(SEED, CORESET, dataset.t)
        answers.extend(torch.randperm(n, generator=gen)[:k].numpy() for n, k in reversed(asked))  # in class order
        base_update(coreset_size, seen)
        assert not answers

    np.random.choice, dataset.update_coreset = choice, update_coreset

    def undo():
        np.random.choice = base_choice
        del dataset.update_coreset

    return undo


def _patch(official: Path, depth: int = BACKBONE["depth"]) -> None:
    """The run-time changes listed in the module docstring (a backbone of ``depth`` blocks)."""
    import torchvision.transforms as T

    torch.Tensor.cuda = lambda self, *a, **k: self.clone()
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    sys.path.insert(0, str(official))
    import dataloaders.dataloader as dl
    import dataloaders.utils as du
    import models.zoo as zoo
    import timm.models
    import trainer as tr

    dl.check_integrity = lambda *a, **k: True
    du.get_transform = lambda **k: T.ToTensor()
    base_vit = zoo.VisionTransformer
    zoo.VisionTransformer = lambda **k: base_vit(**{**k, **BACKBONE, "depth": depth})
    state = initial_backbone(depth)

    def pretrained(pretrained=True, **k):
        class Loaded:
            def state_dict(self):
                return {k: v.clone() for k, v in state.items()}
        return Loaded()

    timm.models.vit_base_patch16_224 = pretrained
    tr.DataLoader_ = tr.DataLoader  # run() orders each run's loaders from its first task on


def run(official: Path, method: str, work: Path) -> dict:
    """The official run of ``method`` (a key of METHODS) on the stream; returns its numbers."""
    import importlib

    import trainer as tr

    kind, name, prompt_param, devices, lr = METHODS[method]
    memory = MEMORY.get(method, 0)
    tr.DataLoader = fixed_order(tr.DataLoader_)
    learner_class = getattr(importlib.import_module(f"learners.{kind}"), name)
    create = learner_class.__dict__.get("create_model_", learner_class.create_model)
    learner_class.create_model_ = create
    learner_class.create_model = (lambda self: DataParallelOnOneDevice(create(self), devices)) if devices > 1 else create
    write_cifar(work / "data")
    args = argparse.Namespace(
        dataset="CIFAR100", first_split_size=2, other_split_size=2, max_task=STREAM["tasks"], rand_split=True,
        batch_size=STREAM["batch"], workers=0, schedule=[STREAM["epochs"]], schedule_type="cosine",
        optimizer="Adam", lr=lr, momentum=0.9, weight_decay=0.0, model_type="zoo", model_name="vit_pt_imnet",
        gpuid=[-1] * devices, memory=memory, temp=2.0, DW=False, upper_bound_flag=False, oracle_flag=False,
        learner_type=kind, learner_name=name, prompt_param=prompt_param, overwrite=1, debug_mode=0,
        log_dir=str(work / "log"), dataroot=str(work / "data"), validation=False, train_aug=False, repeat=1)
    import random

    random.seed(SEED), np.random.seed(SEED), torch.manual_seed(SEED)  # run.py L140-144
    trainer = tr.Trainer(args, SEED, ["acc", "time"], ["global", "pt", "pt-local"])
    learner = trainer.learner
    undo = suite_coreset_draws(trainer.train_dataset) if memory else lambda: None
    model = getattr(learner.model, "module", learner.model)  # the network itself (under DataParallel: .module)
    prompt = model.prompt
    start = initial_backbone()
    with torch.no_grad():  # the head: the stream's rows as the suite starts them, the rest never used
        model.last.weight.copy_(start["head.weight"]), model.last.bias.copy_(start["head.bias"])
    if prompt is None:  # FT++: the backbone and head as loaded
        pass
    elif method == "coda":  # the start draws (zoo.py L31-39), without the uniform draws between them
        torch.manual_seed(prompt_seed(0))
        for e in prompt.e_layers:
            for n in ("p", "k", "a"):
                setattr(prompt, f"e_{n}_{e}", prompt.gram_schmidt(getattr(prompt, f"e_{n}_{e}")))
        base_count = prompt.process_task_count

        def process_task_count():
            torch.manual_seed(prompt_seed(prompt.task_count + 1))
            base_count()

        prompt.process_task_count = process_task_count
    else:
        start = initial_prompts({n: tuple(p.shape) for n, p in prompt.named_parameters()})
        with torch.no_grad():
            for n, p in prompt.named_parameters():
                p.copy_(start[n])
    learner.init_optimizer()  # over the parameters as they now are (learn_batch rebuilds it at every task anyway)

    steps, counts, norms, kept = [], [], [], []
    image_ids = {x.tobytes(): i for i, x in enumerate(images()["train"][0])}
    update = learner.update_model

    def update_model(x, y):
        lr = learner.optimizer.param_groups[0]["lr"]
        loss, out = update(x, y)
        steps.append((lr, float(loss)))
        return loss, out

    learner.update_model = update_model
    evaluated = []
    task_eval = trainer.task_eval

    def record_eval(t_index, local=False, task="acc"):
        acc = task_eval(t_index, local, task)
        evaluated.append(int(round(acc * STREAM["n_test"] * 2 / 100)))  # 2 classes per task
        if t_index == trainer.current_t_index:  # the row is complete
            counts.append(evaluated.copy())
            evaluated.clear()
            head = {id(model.last.weight), id(model.last.bias)}
            params = [p[:STREAM["n_classes"]] if id(p) in head else p  # the stream's rows of the head
                      for g in learner.optimizer.param_groups for p in g["params"]]
            norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))))
            if memory:  # the coreset the task's end rebuilt (learners/default.py L137-138), as training image ids
                kept.append([image_ids[x.tobytes()] for x in trainer.train_dataset.coreset[0]])
        return acc

    trainer.task_eval = record_eval
    metrics = {"acc": {}, "time": {"global": np.zeros((trainer.max_task, 1))}}
    try:
        trainer.train(metrics)
    finally:
        undo()
    out = {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "correct": counts, "norm": norms}
    return {**out, "memory": kept} if memory else out


def main(argv=None) -> None:
    print_runs(argv, __doc__, "GT-RIPL/CODA-Prompt", "golden_coda_", METHODS,
               lambda official, tmp, method: run(official, method, tmp), flag="--method", before=_patch)


if __name__ == "__main__":
    main()
