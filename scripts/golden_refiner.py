"""Golden trajectory from Refiner-ViT's own training loop (zhoudaquan/Refiner_ViT) on a tiny stream, on a CPU.

    python scripts/golden_refiner.py /path/to/Refiner_ViT [--run no_prefetcher|prefetcher|dense|all]

runs (three times, ``RUNS``: without and with main.py's default prefetcher loader, and ``dense`` with that loader and
scripts/refiner_l.yaml's loss settings) the official ``main.main`` of main.py (a
timm 0.4.8 train.py, with the timm it bundles in its ``timm/`` folder) with the arguments of scripts/refiner_s.yaml
(``-c``) and a few overrides that size the run down: its optimiser
(bundled ``timm.optim.create_optimizer``: AdamW, no weight decay on biases, 1-D tensors and the model's
``no_weight_decay()``), its scheduler (bundled ``timm.scheduler.create_scheduler``: per-epoch cosine with warm-up from
``warmup_lr`` and ``cooldown_epochs`` at ``min_lr``, stepped ``step(epoch + 1)`` after each epoch, main.py L646), its
``ModelEmaV2`` (updated after every step, main.py L762, evaluated after every epoch beside the model, L635-642), its
loss (``SoftTargetCrossEntropyCosReg``, which main.py L581-582 picks when ``cos_reg_component > 0``: soft-target CE
plus the attention-map cosine term over its default ``n_comn=2`` pairs; ``dense``: ``RelabelCrossEntropy``, which
main.py L570-580 picks with ``relabel`` and ``relabel_size`` 24: soft-target CE of the class token plus 0.5 x that of
the dense head ``aux_head`` on every patch token against its image's target, no cosine term), Mixup with label
smoothing (bundled timm, scripts/refiner_s.yaml's 0.8 / 0.1; ``no_prefetcher``: ``Mixup`` in ``train_one_epoch``,
CutMix off; ``prefetcher`` and ``dense``: ``FastCollateMixup`` in the loader's collate with the yaml's CutMix 1.0,
then data/loader.py's ``PrefetchLoader`` normalising the mixed uint8 batch and erasing it with the yaml's reprob
0.25) and its ``train_one_epoch`` and
``validate``. It prints what tests/test_golden_refiner.py asserts the suite reproduces: per step the learning rate and
the loss, after each epoch the correct test images and the mean test loss of the model and of its EMA, and the norm
of the model's and the EMA's parameters.

Nothing of the official code is copied or changed on disk; at run time this script only

* answers utils/utils.py's ``os.popen('stty size')`` (run at import, it fails without a terminal) with "24 80";
* makes ``.cuda()`` an identity, ``torch.cuda.synchronize`` a no-op and ``torch.cuda.Stream`` / ``stream`` /
  ``current_stream`` (the PrefetchLoader's side stream) stand-ins without effect (scripts/refiner_s.yaml's
  ``amp: true`` picks native AMP, whose autocast and GradScaler disable themselves without CUDA: the run is fp32);
  apex and tensorflow are absent, which main.py allows; Mixup's soft targets are built on the CPU
  (timm/data/mixup.py L22 defaults ``mixup_target`` to ``device='cuda'``);
* registers ``golden_tiny_Refiner`` with the bundled timm (timm/models/factory.py L52-60 passes ``return_dense`` and
  ``mix_token`` only to names containing "Refiner"): the official ``Refiner_ViT`` built as ``Refiner_ViT_S``
  (models/refined_transformer.py L480-487: attend / share block pairs, MLP ratio 3, qkv bias, LayerNorm eps 1e-6,
  ``head_expand`` 6, Refiner_ViT_L's 3: read only with ``apply_transform``, false in every block, L133-134) with
  ``MODEL``'s depth, width, heads and patch size; ``--initial-checkpoint`` loads
  ``initial_official()`` into it (written to a temporary file by a child process, which builds it with the suite);
* replaces main.py's data (``create_dataset``, ``create_relabel_loader``, ``create_loader``) by ``STREAM``'s images,
  without random per-image augmentation: test images (and ``no_prefetcher``'s training images) as tensors normalised
  with the model's mean / std (0.5); the training loader keeps main.py's batch size and data/loader.py L220's
  ``drop_last=is_training`` and takes golden_coda.py's ``FixedOrder`` (epoch e: ``randperm(n)`` from a generator
  seeded e) in place of shuffling. ``prefetcher``: main.py's call of data/loader.py's own ``create_relabel_loader``
  with its arguments, on the uint8 images (channels first, as the prefetcher transform's ``ToNumpy`` gives them; the
  per-image transform it installs is bypassed), its inner DataLoader swapped for one in that order with the same
  collate, its ``RandomErasing`` on the CPU (timm 0.4.8's default device ``'cuda'``), its float32 batches handed
  on in float64 (below);
* computes in float64 (``torch.set_default_dtype``: the model, Mixup's soft targets and the loss; the images as
  float64 tensors), as the test runs the suite (``trainer.precision=64-true``): in float32 Adam turns rounding noise
  in gradients near zero into whole steps of opposite sign (its update is ``lr * m / (sqrt(v) + 1e-8)``), and the two
  implementations (the suite's fused refiner product, the official autograd) part within a few steps of the
  recipe's rate; in float64 they agree to rounding;
* seeds numpy, from which Mixup draws, ``mixing_seed(epoch)`` before each epoch (``train_one_epoch`` wrapped; the
  test seeds the suite's at the same point); ``prefetcher``: numpy, Python's ``random`` and torch (the erasing) at
  each epoch's first collate (the test: at each epoch's first training step, before the batch is mixed);
* wraps the loss, ``create_optimizer`` and ``validate`` to record the numbers.

main.py takes most values only from its ``-c`` file, so the run reads a copy of scripts/refiner_s.yaml (in the
temporary folder) with these changed: the model (above), ``img_size`` 32, ``num_classes``, ``batch_size``,
``epochs``, ``warmup_epochs``, ``cooldown_epochs`` (``RUN``), ``model_ema_decay`` (an average that moves within 20
steps), ``drop_path`` 0, ``workers`` 0, ``initial_checkpoint``, ``output`` (the temporary folder), ``seed``, and
per run ``no_prefetcher`` and ``cutmix`` (``RUNS``; ``dense`` reads scripts/refiner_l.yaml instead, ``CONFIG``,
and also empties its ``resume`` and turns its ``eval_first`` off). Everything else is the file's (AdamW at lr 5e-4,
weight decay 0.05, ``warmup_lr`` 1e-6, ``min_lr`` 1e-5, Mixup 0.8 / smoothing 0.1, CutMix 1.0, reprob 0.25 in pixel
mode, ``cos_reg_component`` 12, EMA on, ``amp``; refiner_l.yaml differs in ``cos_reg_component`` 0, ``relabel`` /
``return_dense`` true, ``relabel_size`` 24, the model, ``drop_path``, ``img_size``, ``batch_size``, all overridden
or sized down but the first four).
The official code needs nothing the suite does not install. Run it from a checkout outside this repository; it
writes only to temporary folders.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import cuda_streams_off, print_runs, sibling  # noqa: E402  (the scripts' shared helpers)

#: the tiny set: classes (at least 5: validate() counts top-5), training and test images per class (42 training
#: images: 5 batches of 8 and 2 dropped), image size
STREAM = dict(n_classes=6, n_train=7, n_test=4, size=32)
#: the run: batch size, epochs of the cosine, warm-up epochs, cool-down epochs after the cosine (4 epochs in all),
#: EMA decay
RUN = dict(batch=8, epochs=3, warmup=1, cooldown=1, ema=0.9)
#: the runs and the values of scripts/refiner_s.yaml each changes besides ``RUN``'s. ``no_prefetcher``: the batch
#: mixed in train_one_epoch (``mixup_fn``), CutMix off (the suite's normalised-batch path cuts timm 1.0's box, one
#: pixel larger than the bundled timm 0.4.8's for odd sizes), random erasing off (it would be per image in the
#: transform, which the script's tensors bypass). ``prefetcher``: main.py's default loader, the yaml's CutMix 1.0 and
#: random erasing 0.25 (mixed in the collate, erased by the PrefetchLoader on the mixed batch). ``dense``: the same
#: loader with scripts/refiner_l.yaml's values (``CONFIG``): cos_reg_component 0, relabel / return_dense true,
#: relabel_size 24, dense_weight 0.5, mix_token false (L13, L97-101: RelabelCrossEntropy on the class token and the
#: dense head); its ``resume`` (L73) emptied, and ``eval_first`` (L103) off: it only evaluates before each epoch too
RUNS = {"no_prefetcher": dict(no_prefetcher=True, cutmix=0.0), "prefetcher": dict(no_prefetcher=False),
        "dense": dict(no_prefetcher=False, resume="", eval_first=False)}
#: the official file each run reads (``-c``), scripts/refiner_s.yaml unless named here
CONFIG = {"dense": "scripts/refiner_l.yaml"}
#: the model: Refiner_ViT_S's layout with 4 blocks (2 attend / share pairs), 48 wide, 4 heads, patch 8 at 32 px
MODEL = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=4)
SEED = 0
#: the model's mean / std (models/refined_transformer.py default_cfgs; timm's resolve_data_config takes them)
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def mixing_seed(epoch: int) -> int:
    """numpy's seed at the start of each epoch: timm's Mixup draws its mixing (np.random) from there in both runs
    (``prefetcher``: numpy's, Python's and torch's, at the epoch's first batch, before it is mixed)."""
    return 700 + epoch


def seed_all(seed: int) -> None:
    """The generators of the prefetcher run: numpy (the collate's mixing), Python's ``random`` and torch (erasing)."""
    import random

    np.random.seed(seed)
    random.seed(seed)
    torch.manual_seed(seed)


def to_uint8(x: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 images as timm's prefetcher transform hands them on: uint8, channels first."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _golden_coda():
    """scripts/golden_coda.py, whose generated images and fixed batch order this run shares."""
    return sibling("golden_coda")


def images() -> dict:
    """Train and test images (uint8, N x 32 x 32 x 3) and labels: golden_coda.py's per-class colour and pattern plus
    noise, ``STREAM``'s classes and counts."""
    return _golden_coda().images(STREAM)


def to_input(x: np.ndarray) -> torch.Tensor:
    """uint8 images as both runs feed them: ``ToTensor`` then ``Normalize`` with the model's mean / std."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().float().div(255)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return t.sub(mean).div(std)


def fixed_order(loader_class):
    """``loader_class`` whose shuffled loaders follow golden_coda.py's ``FixedOrder`` (epoch e: ``randperm(n)`` from
    a generator seeded e): the suite's side of the fixed batch order."""
    return _golden_coda().fixed_order(loader_class)


def trained_norm(params) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in params)))


def initial_suite(dense: bool = False) -> dict:
    """The starting weights in the suite's names: cl_vit's ``refiner_vit_s`` of ``MODEL`` seeded 0 (the official
    initialisation: truncated normal 0.02, LayerScale 1e-5 on the MLP); ``dense``: with the dense head ``aux_head``
    (``return_dense``)."""
    import timm

    import cl_vit  # noqa: F401  (registers the suite's models)

    torch.manual_seed(SEED)
    net = timm.create_model("refiner_vit_s", **MODEL, num_classes=STREAM["n_classes"], drop_path_rate=0.0,
                            return_dense=dense)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def initial_official(dense: bool = False) -> dict:
    """``initial_suite()`` under the official module names (cl_vit.models.refiner's mapping read backwards; a share
    block's V projection is the official ``qkv`` of width dim), as ``--initial-checkpoint`` loads it."""
    from cl_vit.models.refiner import _OFFICIAL_RENAMES

    out = {}
    for k, v in initial_suite(dense).items():
        for old, new in _OFFICIAL_RENAMES:
            k = k.replace(new, old)
        out[k.replace(".attn.v.", ".attn.qkv.")] = v
    return out


def _write_initial(path: Path, dense: bool) -> None:
    """``initial_official()`` written by a child process: the suite needs the installed timm, the official code its
    own, and one process can import only one of them as ``timm``."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import golden_refiner as g; "
            "torch.save(g.initial_official(sys.argv[3] == 'True'), sys.argv[2])")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(path), str(dense)],
                   check=True,
                   cwd=tempfile.gettempdir(), env=env)


#: main.py's functions the runs wrap, as imported (each run wraps these, not the previous run's wrappers)
ORIGINAL: dict = {}


def _patch(official: Path):
    """The run-time changes listed in the module docstring (once per process); returns the official ``main``."""
    if "main" in sys.modules and hasattr(sys.modules["main"], "train_one_epoch"):
        return sys.modules["main"]
    import functools

    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    cuda_streams_off()  # the PrefetchLoader's side stream, data/loader.py L84-103
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(var, None)
    sys.path.insert(0, str(official))
    popen = os.popen
    os.popen = lambda cmd, *a, **k: io.StringIO("24 80") if cmd == "stty size" else popen(cmd, *a, **k)
    try:
        import main as official_main
    finally:
        os.popen = popen
    import models.refined_transformer as rt
    import timm.data.mixup

    # the soft targets are built on device "cuda" by default (timm/data/mixup.py L22, called without a device)
    timm.data.mixup.mixup_target = functools.partial(timm.data.mixup.mixup_target, device="cpu")
    from timm.models.registry import register_model

    def golden_tiny_Refiner(pretrained=False, **kwargs):
        pairs = MODEL["depth"] // 2
        model = rt.Refiner_ViT(
            patch_size=MODEL["patch_size"], embed_dim=MODEL["embed_dim"], depth=[False, True] * pairs,
            apply_transform=[False] * 2 * pairs, num_heads=MODEL["num_heads"], mlp_ratio=3, qkv_bias=True,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), share_atten=True, head_expand=6, **kwargs)
        model.default_cfg = rt.default_cfgs["Refined_vit_small_patch16_224"]
        return model

    golden_tiny_Refiner.__module__ = rt.__name__
    register_model(golden_tiny_Refiner)
    ORIGINAL.update(create_optimizer=official_main.create_optimizer, validate=official_main.validate,
                    train_one_epoch=official_main.train_one_epoch, loss=official_main.SoftTargetCrossEntropyCosReg,
                    relabel_loss=official_main.RelabelCrossEntropy,
                    create_relabel_loader=official_main.create_relabel_loader)
    return official_main


def _data(main, name: str) -> None:
    """main.py's data set and loader factories replaced by the generated tensors (module docstring)."""
    from torch.utils.data import DataLoader, TensorDataset

    data = images()
    sets = {split: TensorDataset(to_input(x).double(), torch.from_numpy(y)) for split, (x, y) in data.items()}
    x, y = data["train"]

    class Uint8Images:  # the training images as the prefetcher's transform gives them (uint8 CHW arrays)
        transform = None  # create_relabel_loader installs the per-image transform here; the fixed arrays bypass it

        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return to_uint8(x[i:i + 1])[0].numpy(), int(y[i])

    def create_dataset(name, root, split="validation", is_training=False, batch_size=None, **kwargs):
        return sets["train" if is_training else "test"]

    def create_loader(dataset, batch_size=1, is_training=False, use_prefetcher=True, **kwargs):
        assert not use_prefetcher or not is_training
        order = _golden_coda().FixedOrder(len(dataset), 0) if is_training else None
        return DataLoader(dataset, batch_size=batch_size, sampler=order, drop_last=is_training)

    def create_prefetching_loader(dataset, batch_size=1, is_training=False, use_prefetcher=True, collate_fn=None,
                                  **kwargs):
        """main.py's own create_relabel_loader with its arguments (the PrefetchLoader with its normalisation and
        erasing, FastCollateMixup as the collate) on the uint8 images; its inner DataLoader swapped for one in the
        fixed order, and the generators seeded at each epoch's first collate."""
        assert use_prefetcher and is_training
        calls = {"n": 0}
        per_epoch = len(y) // batch_size

        def seeded(batch):
            if calls["n"] % per_epoch == 0:
                seed_all(mixing_seed(calls["n"] // per_epoch))
            calls["n"] += 1
            return collate_fn(batch)

        images_ = Uint8Images()
        loader = ORIGINAL["create_relabel_loader"](images_, batch_size=batch_size, is_training=True,
                                                   use_prefetcher=True, collate_fn=seeded, **kwargs)
        loader.loader = DataLoader(images_, batch_size=batch_size, sampler=_golden_coda().FixedOrder(len(y), 0),
                                   collate_fn=seeded, drop_last=True)
        loader.random_erasing.device = "cpu"  # timm 0.4.8's default 'cuda', which data/loader.py L78 keeps

        class Float64:  # the normalised float32 batch in the model's float64 (module docstring)
            def __len__(self):
                return len(loader)

            def __iter__(self):
                return ((inp.double(), target) for inp, target in loader)

        return Float64()

    main.create_dataset, main.create_loader = create_dataset, create_loader
    main.create_relabel_loader = create_loader if RUNS[name].get("no_prefetcher") else create_prefetching_loader


def run(official: Path, work: Path, name: str) -> dict:
    """The official run ``name`` (``RUNS``) on the tiny stream; returns its numbers."""
    main = sys.modules["main"]
    _data(main, name)
    torch.set_default_dtype(torch.float64)  # the model, the soft targets, the loss (module docstring)
    import yaml

    config = yaml.safe_load(Path(CONFIG.get(name, "scripts/refiner_s.yaml")).read_text())
    init = work / "init.pth"
    _write_initial(init, dense=bool(config.get("return_dense")))
    r = RUN
    config.update(model="golden_tiny_Refiner", img_size=MODEL["img_size"], num_classes=STREAM["n_classes"],
                  batch_size=r["batch"], epochs=r["epochs"], warmup_epochs=r["warmup"], cooldown_epochs=r["cooldown"],
                  model_ema_decay=r["ema"], drop_path=0.0, workers=0, initial_checkpoint=str(init),
                  output=str(work / "out"), seed=SEED, **RUNS[name])
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    sys.argv = ["main.py", "-c", str(work / "config.yaml"), str(work)]
    steps, epochs, state = [], [], {}
    create_optimizer, validate, train_one_epoch = (ORIGINAL[k] for k in ("create_optimizer", "validate",
                                                                        "train_one_epoch"))

    def remember_optimizer(a, model):
        state["optimizer"] = create_optimizer(a, model)
        return state["optimizer"]

    def recorded(loss_class):  # main.py L570-582 picks the loss (RelabelCrossEntropy with relabel)
        class Recorded(loss_class):
            def forward(self, x, target, atten=None):
                loss = super().forward(x, target, atten=atten)
                steps.append((state["optimizer"].param_groups[0]["lr"], float(loss)))
                return loss
        return Recorded

    def recorded_validate(model, loader, loss_fn, args, amp_autocast=None, log_suffix=""):
        metrics = validate(model, loader, loss_fn, args, amp_autocast=amp_autocast, log_suffix=log_suffix)
        n = len(loader.dataset)
        epochs.append((int(round(metrics["top1"] * n / 100)), float(metrics["loss"]),
                       trained_norm(model.parameters())))
        return metrics

    def seeded_epoch(epoch, *a, **k):
        if RUNS[name].get("no_prefetcher"):  # the prefetcher runs seed at their collate
            np.random.seed(mixing_seed(epoch))
        return train_one_epoch(epoch, *a, **k)

    main.create_optimizer = remember_optimizer
    main.SoftTargetCrossEntropyCosReg = recorded(ORIGINAL["loss"])
    main.RelabelCrossEntropy = recorded(ORIGINAL["relabel_loss"])
    main.validate, main.train_one_epoch = recorded_validate, seeded_epoch
    try:
        main.main()
    finally:  # the next run starts as a run of its own: its data made in float32, as the test makes them
        torch.set_default_dtype(torch.float32)
    model, ema = epochs[0::2], epochs[1::2]  # main.py validates the model, then its EMA, after every epoch
    return {"lr": [s[0] for s in steps], "loss": [s[1] for s in steps],
            "correct": [e[0] for e in model], "eval_loss": [e[1] for e in model], "norm": [e[2] for e in model],
            "ema_correct": [e[0] for e in ema], "ema_eval_loss": [e[1] for e in ema], "ema_norm": [e[2] for e in ema]}


def main(argv=None) -> None:
    print_runs(argv, __doc__, "zhoudaquan/Refiner_ViT", "golden_refiner_", RUNS, run, before=_patch)


if __name__ == "__main__":
    main()
