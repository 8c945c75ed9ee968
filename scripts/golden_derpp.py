"""Golden trajectories of DER++, ER and iCaRL from Mammoth's own code (aimagelab/mammoth) on a tiny stream, on a CPU.

    PYTHONPATH=DIR python scripts/golden_derpp.py /path/to/mammoth [--method derpp|er|icarl|all]

runs the official DER++ (models/derpp.py ``Derpp``), ER (models/er.py ``Er``) and iCaRL (models/icarl.py ``ICarl``):
their ``observe``, the ``Buffer`` of utils/buffer.py (reservoir for DER++ and ER; for iCaRL ``icarl_replay`` at each
task's start and the herding of ``fill_buffer`` at its end), the SGD optimiser that ContinualModel ``get_optimizer``
builds and ``meta_begin_task`` rebuilds at every task, through Mammoth's training epoch (utils/training.py
``train_single_epoch``, ``meta_observe``) and its evaluation (utils/evaluate.py ``evaluate``; iCaRL's nearest mean of
exemplars, icarl.py ``forward`` and ``compute_class_means``), task after task in the order of utils/training.py
``train`` L197-307. It prints what tests/test_golden_derpp.py asserts the suite's ``strategy=derpp`` / ``er`` /
``icarl`` reproduces: per step the loss (DER++: also its two replay terms, alpha * MSE to the stored logits and beta *
CE of the second draw; iCaRL: ``get_loss``, without the weight decay term), at each task's end the memory (which
sample of which task sits in each slot, its label), the correct test images per task (the accuracy matrix), and for
DER++ the norm of the stored logits after each task and the stored logits after the last. Nothing of the official
code is copied or changed on disk; the script drives the loop itself instead of main.py / ``train`` (which add wandb,
loggers, system statistics and a data set registry that imports every data set module, some needing open_clip /
pandas) and at run time only

* imports no official data set module (``os.listdir`` of the datasets folder reads empty while ``models`` loads)
  and feeds ``train_single_epoch`` a loader of (image, label, image) triples of the stream (``STREAM``: 6 classes of
  generated 32 x 32 images, 3 tasks of 2, ``ToTensor`` values, no augmentation: ``transform=None``, so that the
  replayed images are the stored ones on both sides), in the order of ``golden_coda.FixedOrder`` (the test gives the
  suite the same) over the data set's length at each pass (``LiveOrder``: iCaRL's exemplars join after the loader is
  made, as with torch's shuffling sampler);
* draws the reservoir's random numbers from the suite's generators instead of numpy's global state (the only random
  calls on the DER++ and ER paths): the sampling of ``Buffer.get_data`` (``np.random.choice(n, size,
  replace=False)``, buffer.py L529) returns ``torch.randperm(n)[:size]`` of ``cl_vit.strategies.replay.generator(seed,
  BATCH, task, draw, 0)``, and the reservoir's draw (``np.random.randint(0, t + 1)`` of ``ReservoirSampling``,
  buffer.py L129) ``floor(u * (t + 1))`` with u the sample's ``torch.rand`` (float64) of ``generator(seed, RESERVOIR,
  task, draw)``. ``draw`` counts the memory's draws in the task from 0, in the order of the calls: per step the
  ``get_data`` draws (two for DER++, one for ER), then the ``add_data`` draw, as the suite orders them
  (cl_vit/strategies/derpp.py ``training_loss``, replay.py ``before_batch``). What is drawn is Mammoth's (a uniform
  choice without replacement; slot t while the memory fills, then the draw when below the size); only the source of
  the numbers is aligned, as the batch order is. iCaRL draws nothing that matters (``icarl_replay``'s validation
  split is empty);
* gives iCaRL the ViT as a Mammoth backbone (``Features``: ``returnt='features'`` the pre-logit embedding,
  ``classifier`` the head);
* records DER++'s terms by wrapping the model's ``loss`` and models/derpp.py's ``F.mse_loss`` (L44, L50), iCaRL's loss
  by wrapping ``get_loss``, and the memory by matching ``Buffer.examples`` against the stream's images.

The backbone is a timm ViT (``BACKBONE``, seeded 0) with its head over the 6 classes. Mammoth's cross-entropy covers
every output (models/derpp.py L38 and L50, models/er.py L60, with the data sets' ``F.cross_entropy``), the classes of
later tasks included; the suite matches it with ``loss.mask_unseen=false`` (its default masks them). Hyper-parameters:
alpha 0.3, beta 0.5, lr 0.03 (DER++, models/config/derpp.yaml L3-6), 0.1 (ER, models/config/er.yaml L3; iCaRL, whose
seq-cifar100 rate 2 is for its ResNet), SGD without momentum, Nesterov or weight decay (utils/args.py L314-318
defaults), memory ``MEMORY``, minibatch = batch size (main.py L436); iCaRL with its parser's defaults
(``compute_theoretical_best=0``: class means over the exemplars; ``use_original_icarl_transform=0``) and ``opt_wd``
raised to ``ICARL_WD``. Needs, besides the suite's packages, ``kornia`` and ``onedrivedownloader``, which Mammoth's
modules import (``pip install --target DIR --no-deps kornia kornia_rs onedrivedownloader``, then PYTHONPATH=DIR). Run
it from a checkout outside this repository; it writes nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # cl_vit: the suite's draws
from _official import in_checkout  # noqa: E402
from golden_coda import FixedOrder, fixed_order, images  # noqa: E402, F401  (stream and batch order; fixed_order: the test's)

#: the stream: classes, images per class, image size, tasks, batch size, epochs per task
STREAM = dict(n_classes=6, n_train=10, n_test=5, size=32, tasks=3, batch=8, epochs=2)
#: a small timm ViT (the suite's model=vit_micro with these geometry overrides)
BACKBONE = dict(img_size=32, patch_size=16, in_chans=3, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
#: iCaRL's weight decay, added to its loss as ICARL_WD * sum theta^2 (models/icarl.py L98-102, L120): raised from
#: its default 1e-5 (L57) so that the term moves the loss beyond the test's tolerance
ICARL_WD = 5e-3
#: DER++'s weights: Mammoth models/config/derpp.yaml L3-6 (seq-cifar100, buffer 500)
ALPHA, BETA = 0.3, 0.5
#: Mammoth's module, class and learning rate of each method (models/config/derpp.yaml L6, models/config/er.yaml L3)
METHODS = {"derpp": ("derpp", "Derpp", 0.03), "er": ("er", "Er", 0.1), "icarl": ("icarl", "ICarl", 0.1)}
MEMORY = 12
SEED = 0


def initial_backbone() -> dict:
    """The starting weights of both runs: a timm ViT of ``BACKBONE`` seeded 0, its head over the stream's classes."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(**BACKBONE, num_classes=STREAM["n_classes"])
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def task_data(split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per task its images (``ToTensor`` values, N x 3 x 32 x 32) and labels, in the stored order."""
    x, y = images(STREAM)[split]
    out = []
    for t in range(STREAM["tasks"]):
        idx = np.isin(y, [2 * t, 2 * t + 1]).nonzero()[0]
        out.append((torch.from_numpy(x[idx]).permute(0, 3, 1, 2).float().div(255), torch.from_numpy(y[idx]).long()))
    return out


class Triples(torch.utils.data.Dataset):
    """Mammoth's training items: (augmented image, label, not-augmented image), here the same image twice; ``data``
    and ``targets`` as its data sets keep them (iCaRL's ``icarl_replay`` and ``fill_buffer`` replace both)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.data, self.targets = x, y.numpy()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], int(self.targets[i]), self.data[i]


class LiveOrder(FixedOrder):
    """``FixedOrder`` over the data set's length at each pass (as torch's shuffling sampler reads it): iCaRL's task
    data grows by the exemplars after the loader is made."""

    def __init__(self, dataset, task: int):
        super().__init__(len(dataset), task)
        self.dataset = dataset

    def __iter__(self):
        self.n = len(self.dataset)
        return super().__iter__()


class Features(torch.nn.Module):
    """A timm ViT as a Mammoth backbone (backbone/__init__.py MammothBackbone): ``returnt='features'`` gives the
    pre-logit embedding, ``classifier`` the head (what models/icarl.py and buffer.py ``fill_buffer`` call)."""

    def __init__(self, vit):
        super().__init__()
        self.vit, self.classifier, self.device = vit, vit.head, torch.device("cpu")

    def forward(self, x, returnt="out"):
        if returnt == "features":
            return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return self.vit(x)


class SuiteDraws:
    """The ``np.random`` of utils/buffer.py: ``choice`` and ``randint`` from the suite's seeded generators (module
    docstring), everything else numpy's."""

    def __init__(self, seed: int):
        from cl_vit.strategies.replay import BATCH, RESERVOIR, generator

        self.seed, self.task, self.draw, self.u, self.first = seed, 0, 0, None, 0
        self._batch, self._reservoir, self._generator = BATCH, RESERVOIR, generator
        self.random = types.SimpleNamespace(choice=self.choice, randint=self.randint)

    def __getattr__(self, name):
        return getattr(np, name)

    def start_task(self, task: int) -> None:
        self.task, self.draw = task, 0

    def choice(self, n, size=None, replace=True):
        assert not replace and isinstance(n, int), "only get_data's draw is expected"
        gen = self._generator(self.seed, self._batch, self.task, self.draw, 0)
        self.draw += 1
        return torch.randperm(n, generator=gen)[:size].numpy()

    def before_add(self, n_seen: int, n_new: int) -> None:
        gen = self._generator(self.seed, self._reservoir, self.task, self.draw)
        self.draw += 1
        self.u, self.first = torch.rand(n_new, generator=gen, dtype=torch.float64), n_seen

    def randint(self, low, high):
        assert low == 0
        return int(torch.floor(self.u[high - 1 - self.first] * high))


def _patch(official: Path) -> tuple[types.SimpleNamespace, SuiteDraws]:
    """Mammoth's modules, imported without its data set modules, their memory drawing from the suite's generators
    (module docstring)."""
    sys.path.insert(0, str(official))
    listdir, folder = os.listdir, str(official / "datasets")
    os.listdir = lambda p=".": [] if os.path.abspath(p) == folder else listdir(p)
    try:
        import models.derpp as derpp
        import models.er as er
        import models.icarl as icarl
        import utils.buffer as buffer
        import utils.evaluate as evaluate
        import utils.training as training
        from datasets.utils.continual_dataset import ContinualDataset
    finally:
        os.listdir = listdir
    draws = SuiteDraws(SEED)
    buffer.np = draws
    add_data = buffer.Buffer.add_data

    def add(self, examples, *a, **k):
        draws.before_add(self.num_seen_examples, len(examples))
        return add_data(self, examples, *a, **k)

    buffer.Buffer.add_data = add
    return types.SimpleNamespace(derpp=derpp, er=er, icarl=icarl, evaluate=evaluate, training=training,
                                 ContinualDataset=ContinualDataset), draws


def run(mammoth: types.SimpleNamespace, draws: SuiteDraws, method: str) -> dict:
    """The official run of ``method`` (a key of METHODS) on the stream; returns its numbers."""
    import torch.nn.functional as F
    from timm.models.vision_transformer import VisionTransformer
    from tqdm import tqdm

    module, name, lr = METHODS[method]
    n = STREAM["n_classes"]
    per_task = n // STREAM["tasks"]
    train, test = task_data("train"), task_data("test")

    class Stream:  # what the models, meta_begin_task and evaluate read of a ContinualDataset
        SETTING, N_CLASSES, N_TASKS, N_CLASSES_PER_TASK = "class-il", n, STREAM["tasks"], per_task
        get_offsets = mammoth.ContinualDataset.get_offsets
        c_task, test_loaders, train_loader = -1, [], None

        @staticmethod
        def get_loss():
            return F.cross_entropy

        @staticmethod
        def get_normalization_transform():
            return None

    args = argparse.Namespace(
        buffer_size=MEMORY, minibatch_size=STREAM["batch"], alpha=ALPHA, beta=BETA, lr=lr, optimizer="sgd",
        optim_wd=0.0, optim_mom=0.0, optim_nesterov=False, label_perc=1, nowand=True, non_verbose=True,
        debug_mode=0, eval_future=False, fitting_mode="epochs", n_epochs=STREAM["epochs"], scheduler_mode="epoch",
        code_optimization=0, device="cpu", lr_scheduler=None, batch_size=STREAM["batch"], opt_wd=ICARL_WD,
        use_original_icarl_transform=0, compute_theoretical_best=0)
    net = VisionTransformer(**BACKBONE, num_classes=n)
    net.load_state_dict(initial_backbone())
    if method == "icarl":
        net = Features(net)
    stream = Stream()
    stream.args = args
    model = getattr(getattr(mammoth, module), name)(net, F.cross_entropy, args, None, dataset=stream)
    model.device = torch.device("cpu")

    steps, terms = [], {"mse": [], "ce": []}
    loss_fn = model.loss

    def loss(out, y):
        value = loss_fn(out, y)
        terms["ce"].append(float(value.detach()))
        return value

    def mse_loss(a, b):
        value = F.mse_loss(a, b)
        terms["mse"].append(float(value.detach()))
        return value

    model.loss = loss
    if method == "icarl":  # its loss without the weight decay term (the suite's optimiser decays): get_loss L131-158
        get_loss = model.get_loss

        def icarl_loss(*a):
            value = get_loss(*a)
            terms["ce"].append(float(value.detach()))
            return value

        model.get_loss = icarl_loss
    mammoth.derpp.F = types.SimpleNamespace(mse_loss=mse_loss)  # the only F of models/derpp.py
    observe = model.observe

    def recording(*a, **k):
        terms["ce"].clear(), terms["mse"].clear()
        total = observe(*a, **k)
        replay = len(terms["mse"]) == 1
        if method == "icarl":
            total = terms["ce"][0]
        steps.append((total, ALPHA * terms["mse"][0] if replay else 0.0, BETA * terms["ce"][1] if replay else 0.0))
        return total

    model.observe = recording
    memory, norms, correct = [], [], []
    for t in range(STREAM["tasks"]):  # utils/training.py train L197-307, without its logging
        draws.start_task(t)
        model.net.train()
        stream.c_task += 1
        stream.test_loaders.append(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test[t]), batch_size=64))
        data = Triples(*train[t])
        loader = torch.utils.data.DataLoader(data, batch_size=STREAM["batch"], sampler=LiveOrder(data, t))
        stream.train_loader = loader
        model.meta_begin_task(stream)
        scheduler = mammoth.training.get_scheduler(model, args, reload_optim=True)
        with contextlib.redirect_stdout(io.StringIO()):  # train_single_epoch prints "STOP ITERATION" per epoch
            for epoch in range(STREAM["epochs"]):
                model.meta_begin_epoch(epoch, stream)
                mammoth.training.train_single_epoch(model, loader, args, epoch, tqdm(disable=True), lambda: None,
                                                    scheduler)
                model.meta_end_epoch(epoch, stream)
        model.meta_end_task(stream)
        accs, _ = mammoth.evaluate.evaluate(model, stream)
        correct.append([int(round(a * len(test[k][1]) / 100)) for k, a in enumerate(accs)])
        buf = model.buffer
        slots = []
        for e in buf.examples[: len(buf)].cpu():
            slots.append(next((k, i) for k in range(t + 1) for i in range(len(train[k][1]))
                              if torch.equal(train[k][0][i], e)))
        memory.append({"task": [k for k, _ in slots], "index": [i for _, i in slots],
                       "label": buf.labels[: len(buf)].tolist()})
        if hasattr(buf, "logits"):
            norms.append(float(buf.logits[: len(buf)].double().norm()))
    numbers = {"loss": [s[0] for s in steps], "memory": memory, "correct": correct}
    if method == "derpp":
        numbers.update({"logits": [s[1] for s in steps], "labels": [s[2] for s in steps], "logit_norm": norms,
                        "stored_logits": model.buffer.logits[: len(model.buffer)].tolist()})
    return numbers


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("official", type=Path, help="a checkout of aimagelab/mammoth")
    p.add_argument("--method", default="all", choices=[*METHODS, "all"])
    a = p.parse_args(argv)
    official = a.official.resolve()
    torch.set_num_threads(1)
    with in_checkout(official, "golden_derpp_"):
        mammoth, draws = _patch(official)
        for method in METHODS if a.method == "all" else [a.method]:
            print(f"{method!r}: {run(mammoth, draws, method)!r},")


if __name__ == "__main__":
    main()
