"""Golden trajectories from the closer-look learners' own training loop (shaunak27/data-free-continual-learning) on a
tiny stream, on a CPU.

    git clone https://github.com/shaunak27/data-free-continual-learning /tmp/closer/official
    git -C /tmp/closer/official checkout 644a7a9e012a27ec010bd5cc608e8d9a0b0025ce
    python scripts/golden_closer.py /tmp/closer/official [--method lwf|l2|ewc|featkd|lwf_kd|ft|all]

runs the official ``Trainer.train`` (trainer.py) with the learners of "A Closer Look at Rehearsal-Free Continual
Learning" (learners/kd.py LWF_MC, EWC_MC, LWF_MC_FEATKD, LWF; learners/default.py NormalNN), model (models/zoo.py ``vit_pt_imnet``, models/vit.py),
data set class (dataloaders/dataloader.py iCIFAR100) and scheduler (utils/schedulers.py), and prints what
tests/test_golden_closer.py asserts the suite reproduces: per step the learning rate and the loss, at each task's end
the correct test images per task (the accuracy matrix) and the norm of the trained parameters.

Which commit: 644a7a9 (2022-10-13, "Merge pull request #3 from RIPL/l2p") is the repository as its ViT / ImageNet-R
work stood before the federated rework of 2023. The later branches keep the learners' math (``central`` @ 904dc21
differs in kd.py only by the teacher's class list) but do not run a ViT as committed: learners/default.py L596 passes
``template_style`` to ``zoo.vit_pt_imnet``, which takes no such argument (TypeError), and trainer.py L79-85 builds a
three-client class order (a federated leftover that leaves ImageNet-R's tenth task empty). No commit trains only the
qkv projections (the paper's ImageNet-R setting): every learner trains the whole ViT and the head.

Methods (learner, --mu, --eps): ``lwf`` LwF.MC (LWF_MC); ``l2`` the authors' L2 (EWC_MC with eps > 0, mu = 0: LwF.MC
targets plus eps * sum (theta - theta*)^2 over the backbone, anchored at the pre-trained weights from the first task);
``ewc`` EWC_MC with mu > 0, eps = 0 (LwF.MC targets plus mu * Fisher-weighted L2); ``featkd`` LWF_MC_FEATKD (LwF.MC
plus mu * MSE of the pre-logit features); ``lwf_kd`` LWF (softmax CE plus mu * KD at T = 2); ``ft`` NormalNN
(learners/default.py: softmax CE over the seen classes, the fine-tuning baseline).

Nothing of the official code is copied or changed on disk; at run time this script only

* does what scripts/golden_coda.py does (``_patch``: ``.cuda()`` an identity, ``gpuid = [-1]``; the stream written as
  CIFAR-100's pickles; ``ToTensor()`` for both transforms; the fixed batch order of ``FixedOrder``) with a backbone of
  ``DEPTH`` block(s) of that script's ``BACKBONE`` (768 wide, as zoo.py's head L194 requires), without qkv
  biases (``QKV_BIAS``, why there);
* hands zoo.py L189-193 (the DeiT-B download) the weights ``initial_backbone(DEPTH)`` instead, and checks that every
  backbone weight loaded (zoo.py loads with ``strict=False``);
* registers empty stand-ins for modules the training path imports but never calls, where they are not installed:
  fairscale (models/vit.py L21, for gradient checkpointing, off), seaborn and pandas (utils/visualization.py, plots);
* makes the learner's logits (learners/default.py L592-593, a slice of the 100 outputs) contiguous: on a strided
  slice ``torch.sigmoid`` takes another kernel than on the teacher's contiguous copy (default.py L681), and the two
  differ by an ulp. At a task's first step the student is the teacher, so the old classes' exact gradient is zero
  and Adam's normalisation turns that ulp into up to half a learning-rate step on their head rows (seen: 5e-5 on
  row 0 at task 3's first step, losses apart by 1e-4 two steps later). No value changes beyond rounding;
* copies the stream's rows of the starting head into zoo.py's fresh ``nn.Linear(768, 100)`` (the other rows never
  receive a gradient, logits being cut to the seen classes, learners/default.py L592-593).

The batch order also covers EWC_MC's Fisher pass, which iterates the task's training loader once more after its last
epoch (learners/kd.py L356). The accuracy matrix is the trainer's own ``task_eval(j)`` (trainer.py L317-318: task j's
test images, argmax over every seen class).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import in_checkout  # noqa: E402  (the scripts' shared helpers)

# the stream, data files, weights and batch order of the CODA-Prompt golden runs
_spec = importlib.util.spec_from_file_location("golden_coda", Path(__file__).resolve().with_name("golden_coda.py"))
coda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coda)

COMMIT = "644a7a9e012a27ec010bd5cc608e8d9a0b0025ce"
#: blocks of the small ViT (golden_coda.BACKBONE otherwise): one keeps the five runs within seconds on one core
DEPTH = 1
#: no qkv bias: the key bias is the one weight whose exact gradient is always zero (softmax over keys ignores a shift
#: shared by all of them), so Adam turns its rounding-level gradient into steps of up to the learning rate that
#: differ between any two implementations; it changes no function, but L2 and EWC weigh its drift (seen: losses
#: 5e-4 apart with eps 0.1). Without it every weight has a gradient well above rounding.
QKV_BIAS = False
#: epochs per task and batch size (golden_coda.STREAM otherwise): 4 x 1 full batch of 16 per task (20 images, the last
#: 4 dropped), 12 steps over 3 tasks. 16 images x an even number of classes keeps every sigmoid / exp of the losses
#: on whole vectors of the CPU's kernels (32 floats a loop under AVX-512, 16 under AVX2): their scalar tails round
#: differently, and at a task's first step, where student and teacher agree, that difference is the whole gradient
#: of the old classes' head rows, which Adam normalises into up to half a learning-rate step.
EPOCHS = 4
BATCH = 16
#: Adam's rate for all runs: the authors' L2 sweep (_outputs/sep_1b/CIFAR100/10-task/vit/l2-mc-sweep/1e-3/args.yaml)
LR = 1e-4
#: learner (learners/<module>.py class), mu, eps; lwf and featkd at the suite's weights (configs/strategy/*.yaml),
#: eps and mu raised above the recipes' 1e-3 and 10 so that each term moves the loss far beyond rounding
METHODS = {
    "lwf": ("kd", "LWF_MC", 0.0, 0.0),
    "l2": ("kd", "EWC_MC", 0.0, 0.1),
    "ewc": ("kd", "EWC_MC", 1000.0, 0.0),
    "featkd": ("kd", "LWF_MC_FEATKD", 1.0, 0.0),
    "lwf_kd": ("kd", "LWF", 1.0, 0.0),
    "ft": ("default", "NormalNN", 0.0, 0.0),
}


def backbone_state() -> dict:
    """golden_coda's starting weights with ``DEPTH`` blocks and without qkv biases (``QKV_BIAS``)."""
    return {k: v for k, v in coda.initial_backbone(DEPTH).items() if not k.endswith("attn.qkv.bias")}


def _stand_ins() -> None:
    """Empty modules for imports the training path never calls (listed in the module docstring)."""
    import torch._dynamo  # noqa: F401  (it looks modules up when first imported: before the stand-ins)

    def unused(*a, **k):
        raise RuntimeError("golden_closer: a stand-in module was called")

    for name in ("fairscale", "seaborn", "pandas"):
        if importlib.util.find_spec(name) is not None:
            continue
        parts = ["fairscale", "fairscale.nn", "fairscale.nn.checkpoint",
                 "fairscale.nn.checkpoint.checkpoint_activations"] if name == "fairscale" else [name]
        for part in parts:
            sys.modules[part] = types.ModuleType(part)
            sys.modules[part].__spec__ = importlib.machinery.ModuleSpec(part, None)
        sys.modules[parts[-1]].checkpoint_wrapper = unused


def _patch(official: Path) -> None:
    _stand_ins()
    coda._patch(official, depth=DEPTH)
    import models.zoo as zoo

    small = zoo.VisionTransformer
    zoo.VisionTransformer = lambda **k: small(**k, qkv_bias=QKV_BIAS)
    state = backbone_state()
    torch.hub.load_state_dict_from_url = lambda *a, **k: {"model": {k: v.clone() for k, v in state.items()}}
    import learners.default as default

    forward = default.NormalNN.forward
    default.NormalNN.forward = lambda self, x: forward(self, x).contiguous()


def run(method: str, work: Path) -> dict:
    """The official run of ``method`` (a key of METHODS) on the stream; returns its numbers."""
    import trainer as tr

    kind, name, mu, eps = METHODS[method]
    tr.DataLoader = coda.fixed_order(tr.DataLoader_)
    coda.write_cifar(work / "data")
    stream = coda.STREAM
    args = argparse.Namespace(
        dataset="CIFAR100", first_split_size=2, other_split_size=2, max_task=stream["tasks"], rand_split=True,
        batch_size=BATCH, workers=0, schedule=[EPOCHS], schedule_type="cosine", optimizer="Adam", lr=LR,
        momentum=0.9, weight_decay=0.0, model_type="zoo", model_name="vit_pt_imnet", gpuid=[-1], memory=0, temp=2.0,
        mu=mu, eps=eps, beta=0.0, DW=False, upper_bound_flag=False, oracle_flag=False, learner_type=kind,
        learner_name=name, prompt_param=[1, 1, 1], overwrite=1, debug_mode=0, vis_flag=0, log_dir=str(work / "log"),
        dataroot=str(work / "data"), validation=False, train_aug=False, repeat=1)
    import random

    random.seed(coda.SEED), np.random.seed(coda.SEED), torch.manual_seed(coda.SEED)  # run.py
    keys = ["acc", "mem", "time", "plastic", "til", "cka"]
    trainer = tr.Trainer(args, coda.SEED, keys, ["global", "pt", "pt-local"])
    learner = trainer.learner
    model = learner.model
    start = backbone_state()
    loaded = model.feat.state_dict()
    assert all(torch.equal(loaded[k], start[k]) for k in loaded) and len(loaded) == len(start) - 2, "weights"
    with torch.no_grad():  # the stream's rows as the suite starts them, the rest never used
        model.last.weight.copy_(start["head.weight"]), model.last.bias.copy_(start["head.bias"])
    learner.init_optimizer()

    steps, counts, norms, row = [], [], [], []
    update = learner.update_model

    def update_model(*a, **k):
        lr = learner.optimizer.param_groups[0]["lr"]
        out = update(*a, **k)
        steps.append((lr, float(out[0])))
        return out

    learner.update_model = update_model
    task_eval = trainer.task_eval

    def record_eval(t_index, local=False, task="acc", all_tasks=False):
        acc = task_eval(t_index, local, task, all_tasks)
        if local or all_tasks:
            return acc
        row.append(int(round(acc * stream["n_test"] * 2 / 100)))  # 2 classes per task
        if t_index == trainer.current_t_index:  # the row is complete
            counts.append(row.copy())
            row.clear()
            n = stream["n_classes"]
            head = {id(model.last.weight), id(model.last.bias)}
            params = [p[:n] if id(p) in head else p for g in learner.optimizer.param_groups for p in g["params"]]
            norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params))))
        return acc

    trainer.task_eval = record_eval
    metrics = {k: {"global": np.zeros((trainer.max_task, 1))} for k in keys}
    trainer.train(metrics)
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps], "correct": counts, "norm": norms}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("official", type=Path, help=f"a checkout of shaunak27/data-free-continual-learning at {COMMIT[:7]}")
    p.add_argument("--method", default="all", choices=[*METHODS, "all"])
    a = p.parse_args(argv)
    official = a.official.resolve()
    torch.set_num_threads(1)
    _patch(official)
    importlib.import_module("learners.kd")  # after _patch: the official packages resolve from the checkout
    for method in METHODS if a.method == "all" else [a.method]:
        with in_checkout(official, "golden_closer_") as tmp, contextlib.redirect_stdout(sys.stderr):  # its prints
            numbers = run(method, tmp)
        print(f"{method!r}: {numbers!r},")


if __name__ == "__main__":
    main()
