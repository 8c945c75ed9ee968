#!/usr/bin/env python
"""Golden trajectories of SimpleCIL, RanPAC, SLCA, APER and EASE from their official code (issues 22 and 28).

Runs the official training loop of a method on CPU, on a tiny deterministic ImageNet-R-shaped stream, starting from the
suite's own initial weights, and prints what tests/test_golden_proto.py asserts of the suite's run on the same stream:
per step the learning rate(s) and the loss, at each task's end the accuracy on every seen task and the norm of the
parameters the method trains (or of its classifier statistics).

    python scripts/golden_proto.py simplecil --official PATH/RevisitingCIL --timm PATH/timm-0.6.13
    python scripts/golden_proto.py simplecil --official PATH/LAMDA-PILOT --timm PATH/timm-0.6.13
    python scripts/golden_proto.py ranpac --official PATH/RanPAC --timm PATH/timm-0.6.13
    python scripts/golden_proto.py slca --official PATH/SLCA --timm PATH/timm-0.6.13
    python scripts/golden_proto.py aper --official PATH/LAMDA-PILOT --timm PATH/timm-0.6.13
    python scripts/golden_proto.py ease --official PATH/LAMDA-PILOT --timm PATH/timm-0.6.13
    python scripts/golden_proto.py ease-functions --official PATH/LAMDA-PILOT --timm PATH/timm-0.6.13

PATH/... are checkouts of the official repositories (docs/recipes.md names the commits) and a directory holding timm
0.6.13 (``pip install --target DIR --no-deps timm==0.6.13 easydict``): the official model files import timm 0.6's
module layout, which timm 1.0 removed, and 0.6.12 (RanPAC's pin) does not import on Python 3.11. The official code
runs in a subprocess with those on its path, from a scratch directory holding the stream in its loader's layout
(``./data/imagenet-r/{train,test,val}/<wnid>/*.png``); nothing of it is copied into this repository. At run time only:
``.cuda()`` and ``device='cuda'`` become CPU no-ops, the training transform is the test transform (augmentation off),
DataLoaders run without workers and in a fixed order (RanPAC's ridge split in the order the suite draws), the model
constructor returns a small ViT of the same layout (2 blocks, width 48, patch 16 at 224 px) holding the suite's initial
weights, and the classifier the official code draws at random is set to the suite's. APER and EASE (LAMDA-PILOT): the
adapters' dropout is off on both sides, the official adapter ViTs get the suite's weights with q/k/v split, EASE's
adapter set and proxy classifier of each task start from the suite's draws (recorded from the suite's run of the
stream), and ``EaseCosineLinear.forward_reweight`` is given the small ViT's width (768 is its default, which
inc_net.py L1035 never overrides). RanPAC runs in float64 (the suite with ``trainer.precision=64-true``): the default
dtype is float64 on the official side, the images are made in float32 as its loader makes them and cast at the
network's input, the suite's W_rand is cast up; in float32 the ridge search on this tiny stream followed rounding
(docs/recipes.md).

``ease-functions`` runs no stream: it prints what LAMDA-PILOT's EASE functions (models/ease.py ``solve_sim_reset``,
backbone/linears.py ``EaseCosineLinear.forward_reweight``) make of the small prototypes and features of
:func:`ease_function_case` (tests/test_aper_ease.py holds the numbers).

The stream: 6 of ImageNet-R's wnids, 4 training and 2 test images each (256 x 256 PNGs, so that Resize(256) is exact
in both pipelines), 3 tasks of 2 classes in the official seed-1993 order (np.random.seed(1993); permutation), one
batch per epoch (its order then changes only the rounding of the batch mean).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's cl_vit, whatever the environment installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _official import float32_to_tensor, float64_input  # noqa: E402  (the scripts' shared helpers)
#: the official repositories and the commits the numbers in tests/test_golden_proto.py come from
OFFICIAL = {"simplecil": ("zhoudw-zdw/RevisitingCIL", "a2e6b71"), "ranpac": ("RanPAC/RanPAC", "012927f"),
            "slca": ("GengDavid/SLCA", "169d4e6"), "aper": ("sun-hailong/LAMDA-PILOT", "2647455"),
            "ease": ("sun-hailong/LAMDA-PILOT", "2647455"), "ease-functions": ("sun-hailong/LAMDA-PILOT", "2647455")}
N_TASKS, PER_TASK, N_TRAIN, N_TEST, SIZE, SEED = 3, 2, 4, 2, 256, 1993
EMBED, DEPTH, HEADS, M = 48, 2, 3, 16
EPOCHS = {"simplecil": 1, "ranpac": 3, "slca": 2, "aper": 3, "ease": 2}
#: the suite's run: the method's ImageNet-R recipe, the small ViT, this stream's size
SUITE = {
    "simplecil": ["experiment=simplecil-imagenet-r"],
    "ranpac": ["experiment=ranpac-imagenet-r", f"strategy.ranpac.M={M}", f"trainer.max_epochs={EPOCHS['ranpac']}",
               "trainer.precision=64-true"],
    "slca": ["experiment=slca-imagenet-r", "strategy.slca.ca_epochs=0", f"trainer.max_epochs={EPOCHS['slca']}",
             "scheduler.milestones=[1]"],
    "aper": ["experiment=aper-imagenet-r", f"trainer.max_epochs={EPOCHS['aper']}"],
    "ease": ["experiment=ease-imagenet-r", f"trainer.max_epochs={EPOCHS['ease']}"],
}
COMMON = ["model.name=vit_base_patch16_224", "model.pretrained=false", "model.pretrained_tag=null",
          f"+model.embed_dim={EMBED}", f"+model.depth={DEPTH}", f"+model.num_heads={HEADS}", f"seed={SEED}",
          "trainer.accelerator=cpu", "logger=none", "data.num_workers=0", "data.persistent_workers=false",
          f"data.batch_size={PER_TASK * N_TRAIN}"]


# -- the stream and the suite's side (also imported by tests/test_golden_proto.py) ----------------------------------


def wnids() -> list[str]:
    from cl_vit.data.imagenet_r import imagenet_r_wnids

    return imagenet_r_wnids()[: N_TASKS * PER_TASK]


def write_stream(root: Path) -> Path:
    """``root/data/imagenet-r/{train,test}/<wnid>/<i>.png`` (and ``val`` -> ``test``, SLCA's name): smooth class-
    coloured images with per-image noise; returns ``root/data/imagenet-r``."""
    import cv2

    rng = np.random.default_rng(0)
    base = root / "data" / "imagenet-r"
    for label, wnid in enumerate(wnids()):
        # classes close in colour, images noisy: the tiny random network confuses some (a matrix below 1 tells more)
        colour = 128 + 0.2 * (np.array([(label * 67) % 256, (label * 131 + 60) % 256, (label * 29 + 120) % 256],
                                       np.float32) - 128)
        for part, n in (("train", N_TRAIN), ("test", N_TEST)):
            (base / part / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                coarse = colour + rng.normal(0, 60, (8, 8, 3))
                img = cv2.resize(np.clip(coarse, 0, 255).astype(np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
                cv2.imwrite(str(base / part / wnid / f"{part}_{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not (base / "val").exists():
        (base / "val").symlink_to("test")
    return base


def suite_source(base: Path, method: str):
    """The folders as the suite reads LAMDA-PILOT's split, every image through the test transform (augmentation off);
    SLCA's ImageNet mean/std, [0, 1] pixels otherwise (as the recipes)."""
    from cl_vit.data.base import ImageFileDataset, Source, scan_image_folder
    from cl_vit.data.transforms import NORMALIZATIONS, imagenet_transforms

    mean, std = NORMALIZATIONS["imagenet" if method == "slca" else "coda"]
    decode, tf = imagenet_transforms(224, mean, std, False, "crop")
    classes = wnids()
    train, _ = scan_image_folder(base / "train", classes)
    test, _ = scan_image_folder(base / "test", classes)
    return Source("golden", ImageFileDataset(train, tf, decode=decode), ImageFileDataset(test, tf, decode=decode),
                  classes, in_chans=3, img_size=224)


def suite_stream(base: Path, method: str):
    """(scenario, StreamInfo): the source in N_TASKS experiences, classes in the official seed-1993 order."""
    from cl_vit.streams import build_stream

    return build_stream(suite_source(base, method), n_experiences=N_TASKS, class_order=f"numpy:{SEED}")


def suite_scenario(base: Path, method: str):
    return suite_stream(base, method)[0]


def suite_overrides(method: str) -> list[str]:
    return [*SUITE[method], *COMMON]


def suite_module(base: Path, method: str):
    """The suite's module as its run builds it (the initial weights both sides start from)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose

    from cl_vit.builder import build

    return build(compose(suite_overrides(method)), suite_scenario(base, method))[3]


def ridge_orders(base: Path, module) -> tuple[torch.Tensor, list[list[str]]]:
    """RanPAC: the suite's W_rand and, per experience, the training images (``wnid/file``) in the order its ridge
    search splits them 80/20 (strategies/ranpac.py after_experience: the statistics view in dataset order, permuted
    by ``randperm`` from the generator seeded with the experience's seed, after W_rand on the first)."""
    from cl_vit.runner import experience_seed
    from cl_vit.streams import statistics_dataset

    scenario = suite_scenario(base, "ranpac")
    source = suite_source(base, "ranpac")
    by_tensor = [(source.train[k][0], "/".join(Path(p).parts[-2:])) for k, (p, _) in enumerate(source.train.samples)]
    d, w_rand, orders = module.net.head.in_features, None, []
    for i in range(N_TASKS):
        view = statistics_dataset(scenario, i)
        names = [next(n for t, n in by_tensor if torch.equal(t, view[k][0])) for k in range(len(view))]
        gen = torch.Generator().manual_seed(experience_seed(SEED, i) % (2**63 - 1))
        if i == 0:
            w_rand = torch.randn(d, M, generator=gen)
        orders.append([names[k] for k in torch.randperm(len(names), generator=gen).tolist()])
    return w_rand, orders


def ease_function_case() -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(prototypes 6 x 9, features 4 x 9, tasks): 3 tasks of 2 classes, 3-dim subspaces; a class of task i has
    prototypes in subspaces 0..i only (the official ``update_fc`` zero-fills the rest), fixed by formula."""
    dim, tasks = 3, [[0, 1], [2, 3], [4, 5]]
    W = torch.sin(torch.arange(6 * 9, dtype=torch.float32).reshape(6, 9) * 2.3 + 0.3)
    for i, task in enumerate(tasks):
        W[task, (i + 1) * dim:] = 0
    x = torch.cos(torch.arange(4 * 9, dtype=torch.float32).reshape(4, 9) * 1.3 - 0.2)
    return W, x, tasks


@contextlib.contextmanager
def adapters_without_dropout():
    """Every AdaptFormer adapter the suite builds in the block runs without its dropout (its masks come from
    another generator on the official side, where it is switched off too)."""
    from cl_vit.models import petl

    init = petl.Adapter.__init__

    def no_dropout(self, dim, bottleneck=64, scale=0.1, dropout=0.1):
        init(self, dim, bottleneck, scale, 0.0)

    petl.Adapter.__init__ = no_dropout
    try:
        yield
    finally:
        petl.Adapter.__init__ = init


def ease_inits(base: Path, work: Path) -> dict:
    """EASE: the suite's initial adapters (per task, per block) and proxy-classifier rows (per task, in class order),
    drawn in each experience's ``before_experience``: recorded from the suite's own run of the golden stream."""
    from cl_vit.run import run
    from cl_vit.strategies.ease import EASE

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose

    adapters, proxies = [], []
    original = EASE.before_experience

    def recording(self, module, experience):
        original(self, module, experience)
        blocks = [b.adaptmlp.adapters[experience.index] for b in module.net.blocks]
        adapters.append([{k: v.detach().clone() for k, v in a.state_dict().items()} for a in blocks])
        proxies.append(self.head.weight.detach()[sorted(experience.classes)].clone())

    EASE.before_experience = recording
    try:
        with adapters_without_dropout():
            run(compose(suite_overrides("ease")), work / "suite-ease", scenario=suite_scenario(base, "ease"))
    finally:
        EASE.before_experience = original
    return {"adapters": adapters, "proxies": proxies}


# -- the official side (a subprocess with the official checkout and timm 0.6.13 on its path) --------------------------


def _is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or (isinstance(device, torch.device)
                                                                        and device.type == "cuda")


def _cpu_only() -> None:
    """``.cuda()`` and ``.to('cuda')`` as no-ops on tensors and modules."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    for cls in (torch.Tensor, torch.nn.Module):
        original = cls.to

        def to(self, *args, _original=original, **kwargs):
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            return _original(self, *args, **kwargs)

        cls.to = to


class Recorder:
    """Per step of an ``optimizer`` the learning rates of its groups, per loss call the loss (wrapped around the
    official module's ``F``)."""

    def __init__(self, optimizer=torch.optim.SGD):
        self.lr, self.loss = [], []
        original_step = optimizer.step
        recorder = self

        def step(opt, *a, **k):
            recorder.lr.append([g["lr"] for g in opt.param_groups])
            return original_step(opt, *a, **k)

        optimizer.step = step

    def functional(self, F):
        recorder = self

        class Recording:
            def __getattr__(self, name):
                return getattr(F, name)

            @staticmethod
            def cross_entropy(*a, **k):
                loss = F.cross_entropy(*a, **k)
                recorder.loss.append(loss.item())
                return loss

        return Recording()


def _fixed_loaders(module, orders: dict) -> None:
    """``module.DataLoader``: no workers, dataset order, or the order ``orders[id(dataset)]`` names (paths)."""
    from torch.utils.data import DataLoader

    def loader(dataset, batch_size=1, shuffle=False, num_workers=0, **kwargs):
        order = orders.get(id(dataset))
        if order is not None:
            index = {"/".join(Path(p).parts[-2:]): k for k, p in enumerate(dataset.images)}
            order = [index[name] for name in order]
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=order, num_workers=0)

    module.DataLoader = loader


def _accuracies(y_pred, y_true, n_seen_tasks: int) -> list[float]:
    return [float((y_pred[(y_true // PER_TASK) == j] == y_true[(y_true // PER_TASK) == j]).mean())
            for j in range(n_seen_tasks)]


def _norm(tensors) -> float:
    return float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors)))


def _run_tasks(learner, manager, norms, **extra) -> dict:
    """The official task loop the drivers share: each task trained, evaluated (top-1 correct per task) and measured
    (``norms(learner, task)``: what each method's test compares), then closed with ``after_task``."""
    out = {"class_order": manager._class_order, "accuracy": [], "norm": [], **extra}
    for task in range(manager.nb_tasks):
        learner.incremental_train(manager)
        y_pred, y_true = learner._eval_cnn(learner.test_loader)
        out["accuracy"].append(_accuracies(y_pred[:, 0], y_true, task + 1))
        out["norm"].append(norms(learner, task))
        learner.after_task()
    return out


def _vit_state(init: dict) -> dict:
    return {k: v for k, v in init.items() if not k.startswith("head.")}


def official_simplecil(official: Path, init: dict, meta: dict) -> dict:
    """RevisitingCIL's SimpleCIL, or LAMDA-PILOT's copy of it (``--official`` a LAMDA-PILOT checkout)."""
    import models.simplecil as learner_module
    import utils.data as data
    import utils.inc_net as inc_net
    from timm.models.vision_transformer import VisionTransformer
    from utils.data_manager import DataManager

    pilot = hasattr(inc_net, "get_backbone")
    if pilot:  # transforms built per instance from build_transform(is_train, args)
        build = data.build_transform
        data.build_transform = lambda is_train, args: build(False, args)
    else:
        data.iImageNetR.train_trsf = data.iImageNetR.test_trsf  # augmentation off

    def small_vit(args, pretrained=False):  # the pre-trained ViT-B/16 of the json, small
        model = VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0)
        model.load_state_dict(_vit_state(init))
        model.out_dim = EMBED
        return model.eval()

    setattr(inc_net, "get_backbone" if pilot else "get_convnet", small_vit)
    _fixed_loaders(learner_module, {})
    exp = "exps/simplecil_inr.json" if pilot else "exps/simplecil/imagenetr_5_5_vit-b_simplecil.json"
    args = json.loads((official / exp).read_text())
    args.update(init_cls=PER_TASK, increment=PER_TASK, device=["cpu"], seed=SEED)
    extra = (args,) if pilot else ()
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK, *extra)
    learner = learner_module.Learner(args)
    learner.topk = 1
    return _run_tasks(learner, manager, lambda lr, task: _norm([lr._network.fc.weight]))  # the prototypes


def _ssf_name(suite_name: str) -> str:
    """The suite's SSF parameter (``<layer>.ssf.scale``) as RanPAC's SSF ViT names it (``<owner>.ssf_scale_<k>``,
    petl/vision_transformer_ssf.py)."""
    layer, kind = suite_name.split(".ssf.")
    if layer in ("patch_embed.proj", "norm"):
        owner, k = ("patch_embed." if layer == "patch_embed.proj" else ""), 1
    else:
        parent, child = layer.rsplit(".", 1)
        owner = parent + "."
        k = {"norm1": 1, "norm2": 2, "qkv": 1, "proj": 2, "fc1": 1, "fc2": 2}[child]
    return f"{owner}ssf_{kind}_{k}"


def official_ranpac(official: Path, init: dict, meta: dict) -> dict:
    import RanPAC as learner_module
    import inc_net
    import petl.vision_transformer_ssf as ssf
    import utils.data as data
    from utils.data_manager import DataManager
    from functools import partial

    recorder = Recorder()
    learner_module.F = recorder.functional(learner_module.F)
    # float64 (the suite: trainer.precision=64-true): the images made in float32 as the loader makes them, cast at
    # the network's input (module docstring)
    to_tensor = float32_to_tensor()
    data.iImageNetR.train_trsf = data.iImageNetR.test_trsf = [
        to_tensor() if type(t).__name__ == "ToTensor" else t for t in data.iImageNetR.test_trsf]
    torch.set_default_dtype(torch.float64)

    def small_ssf_vit(args, pretrained=False):  # get_convnet's pretrained_vit_b16_224_ssf, small
        model = ssf.VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), tuning_mode="ssf")
        state = {(_ssf_name(k) if ".ssf." in k else k): v for k, v in _vit_state(init).items()}
        model.load_state_dict(state)
        model.out_dim = EMBED
        return float64_input(model).eval()

    inc_net.get_convnet = small_ssf_vit
    orders: dict = {}
    _fixed_loaders(learner_module, orders)
    original_get = DataManager.get_dataset
    learner_box = {}

    def get_dataset(self, indices, source, mode, *a, **k):
        dataset = original_get(self, indices, source, mode, *a, **k)
        if source == "train" and mode == "test":  # train_loader_for_CPs: the suite's ridge order
            orders[id(dataset)] = meta["ridge_orders"][learner_box["learner"]._cur_task]
        return dataset

    DataManager.get_dataset = get_dataset
    original_update = inc_net.SimpleVitNet.update_fc

    def update_fc(self, nb_classes):
        original_update(self, nb_classes)
        if learner_box["learner"]._cur_task == 0:  # the first session's cosine classifier: the suite's
            with torch.no_grad():
                self.fc.weight.copy_(init["head.weight"][:nb_classes])
                self.fc.sigma.copy_(init["head.sigma"])

    inc_net.SimpleVitNet.update_fc = update_fc
    original_setup = learner_module.Learner.setup_RP

    def setup_rp(self):
        original_setup(self)
        self._network.fc.W_rand = meta["w_rand"].to(torch.get_default_dtype())  # the suite's random projection
        self.W_rand = meta["w_rand"].to(torch.get_default_dtype())

    learner_module.Learner.setup_RP = setup_rp
    original_ridge = learner_module.Learner.optimise_ridge_parameter
    ridges = []

    def optimise_ridge(self, features, y):  # recorded, not changed
        ridges.append(float(original_ridge(self, features, y)))
        return ridges[-1]

    learner_module.Learner.optimise_ridge_parameter = optimise_ridge
    rows = list(csv.DictReader((official / "args/imagenetr_publish.csv").read_text().splitlines()))
    args = {k: v for k, v in rows[7].items()}
    for key in ("init_cls", "increment", "seed", "batch_size", "tuned_epoch", "M"):
        args[key] = int(args[key])
    for key in ("body_lr", "head_lr", "weight_decay", "min_lr"):
        args[key] = float(args[key])
    for key in ("shuffle", "use_RP", "use_input_norm"):
        args[key] = args[key] == "True"
    args.update(init_cls=PER_TASK, increment=PER_TASK, device=["cpu"], seed=SEED, batch_size=PER_TASK * N_TRAIN,
                tuned_epoch=EPOCHS["ranpac"], M=M, do_not_save=True)
    torch.manual_seed(1)  # trainer.py L152 _set_random
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK,
                          use_input_norm=args["use_input_norm"])
    learner = learner_module.Learner(args)
    learner_box["learner"] = learner
    learner.dil_init, learner.is_dil = False, False  # trainer.py L55, L74

    def norms(lr, task):
        params = dict(lr._network.convnet.named_parameters())
        return [_norm([p for n, p in params.items() if "ssf_" in n]), _norm([lr._network.fc.weight]), _norm([lr.G]),
                _norm([lr.Q])]

    out = _run_tasks(learner, manager, norms, ridge=ridges)
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


def _pilot_vit_state(init: dict) -> dict:
    """The suite's ViT weights under the names of LAMDA-PILOT's adapter ViTs (backbone/vit_adapter.py L366-388,
    vit_ease.py L419-444: qkv split into q/k/v projections, ``mlp.fc*`` as ``fc*``)."""
    out = {}
    for k, v in _vit_state(init).items():
        if ".adaptmlp." in k:
            continue
        if ".attn.qkv." in k:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[k.replace("qkv", name)] = part.clone()
        else:
            out[k.replace("mlp.", "")] = v
    return out


def _lamda_pilot_args(official: Path, exp: str, **overrides) -> dict:
    args = json.loads((official / exp).read_text())
    args.update(init_cls=PER_TASK, increment=PER_TASK, device=["cpu"], seed=SEED, batch_size=PER_TASK * N_TRAIN,
                **overrides)
    return args


def _small_plain_vit(init: dict):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0)
    model.load_state_dict(_vit_state({k: v for k, v in init.items() if ".adaptmlp." not in k}))
    model.out_dim = EMBED
    return model.eval()


def _tuning_config(args: dict):
    from easydict import EasyDict

    return EasyDict(ffn_adapt=True, ffn_option="parallel", ffn_adapter_layernorm_option="none",
                    ffn_adapter_init_option="lora", ffn_adapter_scalar="0.1", ffn_num=args["ffn_num"], d_model=EMBED,
                    vpt_on=False, vpt_num=0, _device="cpu")


def _small_pilot_vit(module, init: dict, args: dict):
    """LAMDA-PILOT's adapter / EASE ViT (``vit_base_patch16_224_adapter`` / ``_ease`` L357-410), small, with the
    suite's weights, every pre-trained weight frozen (L404-410)."""
    from functools import partial

    model = module.VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0,
                                     qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                     global_pool=False, drop_path_rate=0.0, tuning_config=_tuning_config(args))
    missing = model.load_state_dict(_pilot_vit_state(init), strict=False).missing_keys
    for name, p in model.named_parameters():
        p.requires_grad = name in missing
    # APER: the suite's initial adapters (EASE's come per task: official_ease)
    model.load_state_dict({k: v for k, v in init.items() if ".adaptmlp." in k}, strict=False)
    for m in model.modules():  # dropout off (its masks come from another generator in the suite)
        if type(m).__name__ == "Adapter":
            m.dropout = 0.0
    model.out_dim = EMBED
    return model.eval()


def official_aper(official: Path, init: dict, meta: dict) -> dict:
    import backbone.vit_adapter as vit_adapter
    import models.aper_adapter as learner_module
    import utils.data as data
    import utils.inc_net as inc_net
    from utils.data_manager import DataManager

    recorder = Recorder()
    learner_module.F = recorder.functional(learner_module.F)
    build = data.build_transform
    data.build_transform = lambda is_train, args: build(False, args)  # augmentation off
    args = _lamda_pilot_args(official, "exps/aper_aperpter_inr.json", tuned_epoch=EPOCHS["aper"])

    def get_backbone(a, pretrained=False):  # the adapter ViT, or the plain one of the dual branch (inc_net L706-710)
        if "_adapter" in a["backbone_type"]:
            return _small_pilot_vit(vit_adapter, init, a)
        return _small_plain_vit(init)

    inc_net.get_backbone = get_backbone
    _fixed_loaders(learner_module, {})
    original_update = inc_net.SimpleVitNet.update_fc

    def update_fc(self, nb_classes, nextperiod_initialization=None):  # the first session's classifier: the suite's
        original_update(self, nb_classes, nextperiod_initialization)
        with torch.no_grad():
            self.fc.weight.copy_(init["head.weight"][:nb_classes])
            self.fc.sigma.copy_(init["head.scale"])

    inc_net.SimpleVitNet.update_fc = update_fc
    torch.manual_seed(1)
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK, args)
    learner = learner_module.Learner(args)
    learner.topk = 1

    def norms(lr, task):  # the adapters, the prototypes (C x 2D)
        adapted = lr._network.backbones[1]
        return [_norm([p for n, p in adapted.named_parameters() if "adaptmlp" in n]), _norm([lr._network.fc.weight])]

    out = _run_tasks(learner, manager, norms)
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


def official_ease(official: Path, init: dict, meta: dict) -> dict:
    import backbone.linears as linears
    import backbone.vit_ease as vit_ease
    import models.ease as learner_module
    import utils.data as data
    import utils.inc_net as inc_net
    from utils.data_manager import DataManager

    recorder = Recorder()
    learner_module.F = recorder.functional(learner_module.F)
    build = data.build_transform
    data.build_transform = lambda is_train, args: build(False, args)
    args = _lamda_pilot_args(official, "exps/ease_inr.json", init_epochs=EPOCHS["ease"], later_epochs=EPOCHS["ease"])
    inc_net.get_backbone = lambda a, pretrained=False: _small_pilot_vit(vit_ease, init, a)
    original_new = vit_ease.VisionTransformer.get_new_adapter

    def get_new_adapter(self):  # task k's adapters: the suite's initial ones, dropout off
        original_new(self)
        k = len(self.adapter_list)
        for j, adapter in enumerate(self.cur_adapter):
            adapter.dropout = 0.0
            if k < len(meta["adapters"]):
                adapter.load_state_dict(meta["adapters"][k][j])

    vit_ease.VisionTransformer.get_new_adapter = get_new_adapter
    original_update = inc_net.EaseNet.update_fc

    def update_fc(self, nb_classes):  # task k's proxy classifier: the suite's rows
        original_update(self, nb_classes)
        with torch.no_grad():
            self.proxy_fc.weight.copy_(meta["proxies"][self._cur_task])

    inc_net.EaseNet.update_fc = update_fc
    reweight = linears.EaseCosineLinear.forward_reweight

    def forward_reweight(self, x, cur_task, alpha=0.1, beta=0.0, init_cls=10, inc=10, out_dim=768,
                         use_init_ptm=False):  # out_dim: 768 is a default there, never passed (inc_net.py L1035)
        return reweight(self, x, cur_task, alpha, beta, init_cls, inc, EMBED, use_init_ptm)

    linears.EaseCosineLinear.forward_reweight = forward_reweight
    _fixed_loaders(learner_module, {})
    torch.manual_seed(1)
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK, args)
    learner = learner_module.Learner(args)
    learner.topk = 1

    def norms(lr, task):  # each adapter set, the prototypes in every subspace
        vit = lr._network.backbone
        return [[_norm(a.parameters()) for a in [*vit.adapter_list, vit.cur_adapter]], _norm([lr._network.fc.weight])]

    out = _run_tasks(learner, manager, norms)
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


def official_ease_functions(official: Path, init: dict, meta: dict) -> dict:
    from types import SimpleNamespace

    from backbone.linears import EaseCosineLinear
    from models.ease import Learner

    W, x, tasks = ease_function_case()
    fc = EaseCosineLinear(W.shape[1], W.shape[0])
    fc.weight.data.copy_(W)
    learner = SimpleNamespace(_network=SimpleNamespace(fc=fc, out_dim=3), _cur_task=len(tasks) - 1, moni_adam=False,
                              use_init_ptm=False, init_cls=2, inc=2, _total_classes=6, _device="cpu")
    learner.get_cls_range = lambda task_id: Learner.get_cls_range(learner, task_id)
    Learner.solve_sim_reset(learner)
    logits = fc.forward_reweight(x, cur_task=len(tasks) - 1, alpha=0.1, beta=0.0, init_cls=2, inc=2, out_dim=3,
                                 use_init_ptm=False)["logits"]
    return {"completed": fc.weight.data.tolist(), "logits": logits.tolist()}


def official_main(method: str, work: Path) -> None:
    _cpu_only()
    init = torch.load(work / "init.pt", weights_only=True)
    meta = torch.load(work / "meta.pt", weights_only=True)
    sys.path.insert(0, os.environ["GOLDEN_OFFICIAL"])
    os.chdir(work)  # the official loaders read ./data/imagenet-r/; their logs go here too
    run = {"simplecil": official_simplecil, "ranpac": official_ranpac, "slca": official_slca,
           "aper": official_aper, "ease": official_ease, "ease-functions": official_ease_functions}[method]
    (work / "official.json").write_text(json.dumps(run(Path(os.environ["GOLDEN_OFFICIAL"]), init, meta)))


def official_slca(official: Path, init: dict, meta: dict) -> dict:
    from functools import partial

    import convs.vits as vits
    import models.base as base_module
    import models.slca as learner_module
    import utils.data as data
    import utils.inc_net as inc_net
    from utils.data_manager import DataManager

    recorder = Recorder()
    learner_module.F = recorder.functional(learner_module.F)
    data.iImageNetR.train_trsf = data.iImageNetR.test_trsf

    def small_vit(cfg, pretrained=False):  # get_convnet's vit-b-p16 (convs/vits.py L700-711: fresh final norm), small
        model = vits.VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS,
                                       norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
        del model.head
        del model.norm
        model.norm = torch.nn.LayerNorm(EMBED)
        model.load_state_dict(_vit_state(init))
        model.out_dim = EMBED
        return model

    inc_net.get_convnet = small_vit
    _fixed_loaders(learner_module, {})
    _fixed_loaders(base_module, {})
    learner_box = {}
    original_update = inc_net.FinetuneIncrementalNet.update_fc

    def update_fc(self, nb_classes, freeze_old=True):  # the new task's head: the suite's rows of its classes
        original_update(self, nb_classes, freeze_old)
        start = learner_box["learner"]._known_classes
        head = self.fc.heads[-1][-1]
        with torch.no_grad():
            head.weight.copy_(init["head.weight"][start:start + nb_classes])
            head.bias.copy_(init["head.bias"][start:start + nb_classes])

    inc_net.FinetuneIncrementalNet.update_fc = update_fc
    args = json.loads((official / "exps/slca/slca_imgnetr.json").read_text())
    args.update(init_cls=PER_TASK, increment=PER_TASK, device=["cpu"], seed=SEED, run_id=0, epochs=EPOCHS["slca"],
                milestones=[1], ca_epochs=0)
    torch.manual_seed(1)  # trainer.py L106 _set_random
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK)
    os.makedirs(f"logs/{args['model_name']}_{args['model_postfix']}", exist_ok=True)  # its checkpoints
    learner = learner_module.SLCA(args)
    learner_box["learner"] = learner
    learner.topk = 1

    def norms(lr, task):
        means = torch.from_numpy(lr._class_means[: (task + 1) * PER_TASK])
        return [_norm(lr._network.convnet.parameters()), _norm(lr._network.fc.parameters()), _norm([means])]

    out = _run_tasks(learner, manager, norms)
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


# -- driver -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(OFFICIAL))
    parser.add_argument("--official", required=True, help="checkout of the official repository")
    parser.add_argument("--timm", required=True, help="directory holding timm 0.6.13 (pip install --target)")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--official-side", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.official_side:
        return official_main(a.method, Path(a.work))
    work = Path(a.work or tempfile.mkdtemp(prefix=f"golden-{a.method}-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.method == "ease-functions":  # no stream, no suite module
        torch.save({}, work / "init.pt")
        torch.save({}, work / "meta.pt")
        return _official_side(a, work)
    base = write_stream(work)
    with adapters_without_dropout():
        module = suite_module(base, a.method)
    torch.save({k: v.detach().clone() for k, v in module.net.state_dict().items()}, work / "init.pt")
    meta = {}
    if a.method == "ranpac":
        meta["w_rand"], meta["ridge_orders"] = ridge_orders(base, module)
    if a.method == "ease":
        meta.update(ease_inits(base, work))
    torch.save(meta, work / "meta.pt")
    _official_side(a, work)


def _official_side(a, work: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(a.timm).resolve()), str(Path(a.official).resolve())]),
           "GOLDEN_OFFICIAL": str(Path(a.official).resolve()), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, a.method, "--official", a.official, "--timm", a.timm, "--work",
                    str(work), "--official-side"], env=env, check=True)
    print(json.dumps(json.loads((work / "official.json").read_text())))


if __name__ == "__main__":
    main()
