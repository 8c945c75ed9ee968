#!/usr/bin/env python
"""Golden trajectories of InfLoRA and SD-LoRA from their official training loops (issue 28).

Runs the official task loop of a method on CPU, on the tiny ImageNet-R-shaped stream of scripts/golden_proto.py (6
classes in 3 tasks of 2, 4 training and 2 test PNGs per class at 256 px, one batch per epoch), starting from the
suite's initial weights, and prints what tests/test_golden_lora.py asserts of the suite's run of the same recipe on
the same stream: per step the learning rate and the loss, at each task's end the accuracy on every seen task and the
norms of what the method trains or builds.

    python scripts/golden_lora_runs.py inflora --official PATH/InfLoRA --timm PATH/timm-0.6.13
    python scripts/golden_lora_runs.py sdlora --official PATH/SD-Lora-CL

PATH/... are checkouts of liangyanshuo/InfLoRA e08b00e and WuYichen-97/SD-Lora-CL 8bacded; InfLoRA's model file
imports timm 0.6's module layout (``pip install --target DIR --no-deps timm==0.6.13``; its environment pins 0.6.7),
SD-LoRA runs on the suite's timm 1.0 (it pins 1.0.9). The official code runs in a subprocess from a scratch directory
holding the stream in its loaders' layout (``./data/imagenet-r/{train,test}/<wnid>/*.png``); nothing of it is copied
into this repository. Patched at run time, besides what golden_proto.py's docstring lists (CPU for ``.cuda()``,
augmentation off, loaders without workers in dataset order, the small ViT of width 48 and 2 blocks with the suite's
weights, the classifier rows the official code draws set to the suite's):

* InfLoRA (methods/inflora.py, models/sinet_inflora.py, configs/mimg10_inflora.json): ``ipdb`` (imported, unused)
  is a stand-in module; ``_create_vision_transformer`` returns the small ``ViT_lora_co`` (its own
  ``Attention_LoRA``); ImageNet-R's 200-class order (utils/data.py L180-185) is cut to the stream's 3 tasks
  (``_increments``); ``total_sessions`` is 3, so the DualGPM threshold rises over the 3 tasks as the suite's;
  ``update_DualGPM`` gets its input matrices as numpy arrays, as ``np.linalg.svd`` returned its factors under the
  pinned torch 1.10 (a newer torch wraps them back into tensors, whose ``transpose()`` L205 cannot call).
* SD-LoRA (models/sdlora.py, backbone/lora.py, exps/sdlora_inr.json): ``einops`` (imported, unused) is a stand-in;
  ``timm.create_model`` returns the small timm ViT with the suite's weights (the rebuilt backbone of every task too,
  models/sdlora.py L68-90); each task's new A_q, A_v (kaiming draws there and here) are the suite's draws, recorded
  from the suite's own run of the stream; the backbone's ``out_dim``, which the code sets to 768 after building it,
  is the small ViT's width; ``torch.load`` reads the files the run itself wrote (whole modules) with
  ``weights_only=False``; the LoRA files go to the scratch directory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
_spec = importlib.util.spec_from_file_location("golden_proto", REPO / "scripts" / "golden_proto.py")
proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto)

#: the official repositories and the commits the numbers in tests/test_golden_lora.py come from
OFFICIAL = {"inflora": ("liangyanshuo/InfLoRA", "e08b00e"), "sdlora": ("WuYichen-97/SD-Lora-CL", "8bacded")}
N_TASKS, PER_TASK, SEED = proto.N_TASKS, proto.PER_TASK, proto.SEED
EMBED, DEPTH, HEADS = proto.EMBED, proto.DEPTH, proto.HEADS
EPOCHS = {"inflora": 3, "sdlora": 2}
#: the suite's run: the method's ImageNet-R recipe on the small ViT and this stream
SUITE = {"inflora": ["experiment=inflora-imagenet-r", f"trainer.max_epochs={EPOCHS['inflora']}"],
         "sdlora": ["experiment=sdlora-imagenet-r", f"trainer.max_epochs={EPOCHS['sdlora']}"]}
#: InfLoRA's json has shuffle false (the folder's sorted order); SD-LoRA's shuffles with the run's seed
CLASS_ORDER = {"inflora": "identity", "sdlora": f"numpy:{SEED}"}


# -- the suite's side (also imported by tests/test_golden_lora.py) ----------------------------------------------------


def suite_overrides(method: str) -> list[str]:
    return [*SUITE[method], *proto.COMMON]


def suite_scenario(base: Path, method: str):
    from cl_vit.streams import build_stream

    return build_stream(proto.suite_source(base, method), n_experiences=N_TASKS,
                        class_order=CLASS_ORDER[method])[0]


def suite_module(base: Path, method: str):
    """The suite's module as its run builds it (the initial weights both sides start from)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose

    from cl_vit.builder import build

    return build(compose(suite_overrides(method)), suite_scenario(base, method))[3]


def lora_products(state: dict, task: int, prefix: str = "net.lora.layers") -> float:
    """sqrt(sum over blocks and slices of ||B_task A_task||^2) from a suite state dict: A's sign (a singular vector's
    in InfLoRA) drops out."""
    total, i = 0.0, 0
    while f"{prefix}.{i}.{task}.A_v" in state:
        for s in "qkv":
            if f"{prefix}.{i}.{task}.A_{s}" in state:
                BA = state[f"{prefix}.{i}.{task}.B_{s}"].double() @ state[f"{prefix}.{i}.{task}.A_{s}"].double()
                total += float((BA ** 2).sum())
        i += 1
    return total ** 0.5


def projector_checksum(basis: torch.Tensor) -> float:
    """sum(M M^T * W) for a basis M (d x k) and fixed weights W: the subspace, whatever basis spans it (W is not of
    the form a_i + b_j, which the attention inputs, centred by LayerNorm, would cancel)."""
    M = torch.as_tensor(np.asarray(basis)).double()
    i = torch.arange(M.shape[0], dtype=torch.float64)
    return float((M @ M.T * torch.cos(1.3 * i[:, None] + 0.7 * i[None, :])).sum())


def sdlora_inits(base: Path, work: Path) -> list[dict]:
    """SD-LoRA: per task, the suite's initial A of every block and slice (kaiming draws of ``add_task`` in the
    experience's ``before_experience``), recorded from the suite's own run of the golden stream."""
    from cl_vit.run import run
    from cl_vit.strategies.sdlora import SDLoRA

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import compose

    inits = []
    original = SDLoRA.before_experience

    def recording(self, module, experience):
        original(self, module, experience)
        t = experience.index
        inits.append({f"{i}.{s}": layer[t][f"A_{s}"].detach().clone()
                      for i, layer in enumerate(self.lora.layers) for s in ("q", "v")})

    SDLoRA.before_experience = recording
    try:
        run(compose(suite_overrides("sdlora")), work / "suite-sdlora", scenario=suite_scenario(base, "sdlora"))
    finally:
        SDLoRA.before_experience = original
    return inits


# -- the official side (a subprocess with the official checkout, and for InfLoRA timm 0.6.13, on its path) ----------


def _stand_in(name: str, **attrs) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules.setdefault(name, module)


def _vit_state(init: dict) -> dict:
    return {k: v for k, v in init.items() if not k.startswith(("head.", "lora."))}


def official_inflora(official: Path, init: dict, meta: dict) -> dict:
    _stand_in("ipdb", set_trace=lambda: None)
    import methods.inflora as learner_module
    import models.sinet_inflora as sinet
    import utils.data as data
    from models.vit_inflora import Attention_LoRA
    from utils.data_manager import DataManager

    recorder = proto.Recorder(torch.optim.Adam)
    learner_module.F = recorder.functional(learner_module.F)
    data.iIMAGENET_R.train_trsf = data.iIMAGENET_R.test_trsf  # augmentation off

    def small_vit(variant, pretrained=False, n_tasks=10, rank=10, **kwargs):  # sinet_inflora.py L67-68, small
        model = sinet.ViT_lora_co(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, n_tasks=n_tasks,
                                  rank=rank)
        missing = model.load_state_dict(_vit_state(init), strict=False).missing_keys
        assert all(k.startswith(("head.", "cls_token_grow", "pos_embed_grow")) or ".lora_" in k for k in missing)
        model.out_dim = EMBED
        return model

    sinet._create_vision_transformer = small_vit
    update = learner_module.InfLoRA.update_DualGPM

    def update_dual_gpm(self, mat_list):  # numpy arrays, as np.linalg.svd returned them under torch 1.10
        return update(self, [np.asarray(m) for m in mat_list])

    learner_module.InfLoRA.update_DualGPM = update_dual_gpm
    proto._fixed_loaders(learner_module, {})
    args = json.loads((official / "configs/mimg10_inflora.json").read_text())
    args.update(init_cls=PER_TASK, increment=PER_TASK, total_sessions=N_TASKS, embd_dim=EMBED, num_heads=HEADS,
                init_epoch=EPOCHS["inflora"], epochs=EPOCHS["inflora"], batch_size=PER_TASK * proto.N_TRAIN,
                num_workers=0, device=["cpu"], seed=SEED)
    torch.manual_seed(SEED)  # trainer.py L50, L100
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK, args)
    manager._increments = [PER_TASK] * N_TASKS
    learner = learner_module.InfLoRA(args)
    with torch.no_grad():  # each task's classifier (sinet_inflora.py L74-77): the suite's rows of its classes
        for t, fc in enumerate(learner._network.classifier_pool[:N_TASKS]):
            fc.weight.copy_(init["head.weight"][t * PER_TASK:(t + 1) * PER_TASK])
            fc.bias.copy_(init["head.bias"][t * PER_TASK:(t + 1) * PER_TASK])
    attns = [m for m in learner._network.modules() if isinstance(m, Attention_LoRA)]
    out = {"accuracy": [], "norm": [], "gpm": []}
    for task in range(N_TASKS):
        learner.incremental_train(manager)  # A designed, B and the classifier trained, DualGPM updated
        y_pred, _, y_true, _, _ = learner._eval_cnn(learner.test_loader)
        out["accuracy"].append(proto._accuracies(y_pred, y_true, task + 1))
        products = []
        for k in range(task + 1):
            products.append(float(sum(((a.lora_B_k[k].weight @ a.lora_A_k[k].weight).double() ** 2).sum()
                                      + ((a.lora_B_v[k].weight @ a.lora_A_v[k].weight).double() ** 2).sum()
                                      for a in attns)) ** 0.5)
        out["norm"].append([proto._norm(learner._network.classifier_pool[:task + 1].parameters()), products])
        out["gpm"].append([[kind, int(np.asarray(f).shape[1]), projector_checksum(f)]
                           for kind, f in zip(learner.project_type, learner.feature_list)])
        learner.after_task()
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


def official_sdlora(official: Path, init: dict, meta: dict) -> dict:
    _stand_in("einops", rearrange=None)
    import timm

    import models.sdlora as learner_module
    import utils.data as data
    import utils.inc_net as inc_net
    from backbone.lora import LoRA_ViT_timm
    from timm.models.vision_transformer import VisionTransformer
    from utils.data_manager import DataManager

    recorder = proto.Recorder()
    learner_module.F = recorder.functional(learner_module.F)
    build = data.build_transform
    data.build_transform = lambda is_train, args: build(False, args)  # augmentation off
    load = torch.load
    torch.load = lambda *a, **k: load(*a, **{"weights_only": False, **k})  # the run's own LoRA files

    def small_vit(name, pretrained=False, num_classes=0, **kwargs):  # inc_net.py L14 / sdlora.py L70, small
        model = VisionTransformer(patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, num_classes=0)
        model.load_state_dict(_vit_state(init))
        return model

    timm.create_model = small_vit
    reset = LoRA_ViT_timm.reset_parameters
    learner_box = {}

    def reset_parameters(self):  # the new task's A: the suite's draws (B is zero on both sides)
        reset(self)
        task = learner_box["learner"]._cur_task if "learner" in learner_box else 0
        with torch.no_grad():
            for i in range(DEPTH):
                self.w_As[2 * i].weight.copy_(meta["A"][task][f"{i}.q"])
                self.w_As[2 * i + 1].weight.copy_(meta["A"][task][f"{i}.v"])

    LoRA_ViT_timm.reset_parameters = reset_parameters
    # the feature width the code writes after building it (inc_net.py L17, sdlora.py L89: 768) is the small ViT's
    LoRA_ViT_timm.out_dim = property(lambda self: EMBED, lambda self, value: None)
    original_update = inc_net.IncrementalNet.update_fc

    def update_fc(self, nb_classes):  # the new classes' rows: the suite's
        known = self.fc.out_features if self.fc is not None else 0
        original_update(self, nb_classes)
        with torch.no_grad():  # both sides label a class by its position in the class order
            self.fc.weight[known:nb_classes] = init["head.weight"][known:nb_classes]
            self.fc.bias[known:nb_classes] = init["head.bias"][known:nb_classes]

    inc_net.IncrementalNet.update_fc = update_fc
    proto._fixed_loaders(learner_module, {})
    learner_module.num_workers = 0
    args = json.loads((official / "exps/sdlora_inr.json").read_text())
    args.update(init_cls=PER_TASK, increment=PER_TASK, device=["cpu"], seed=SEED, init_epoch=EPOCHS["sdlora"],
                epochs=EPOCHS["sdlora"], batch_size=PER_TASK * proto.N_TRAIN, filepath="./lora/")
    torch.manual_seed(SEED)  # trainer.py L48, L165-166
    manager = DataManager(args["dataset"], args["shuffle"], SEED, PER_TASK, PER_TASK, args)
    learner = learner_module.Learner(args)
    learner_box["learner"] = learner
    learner.topk = 1

    def norms(lr, task):  # the classifier's seen rows, the current A and B, every magnitude in use
        vit = lr._network.backbone
        seen = (task + 1) * PER_TASK
        return [proto._norm([lr._network.fc.weight[:seen], lr._network.fc.bias[:seen]]),
                proto._norm([m.weight for m in vit.w_As]), proto._norm([m.weight for m in vit.w_Bs]),
                [float(w.param) for w in vit.wrapped_param_prev[:task]] + [float(vit.wrapped_param[0].param)]]

    out = proto._run_tasks(learner, manager, norms)
    out.update(lr=recorder.lr, loss=recorder.loss)
    return out


def official_main(method: str, work: Path) -> None:
    proto._cpu_only()
    init = torch.load(work / "init.pt", weights_only=True)
    meta = torch.load(work / "meta.pt", weights_only=True)
    sys.path.insert(0, os.environ["GOLDEN_OFFICIAL"])
    os.chdir(work)
    run = {"inflora": official_inflora, "sdlora": official_sdlora}[method]
    (work / "official.json").write_text(json.dumps(run(Path(os.environ["GOLDEN_OFFICIAL"]), init, meta)))


# -- driver -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(OFFICIAL))
    parser.add_argument("--official", required=True, help="checkout of the official repository")
    parser.add_argument("--timm", help="directory holding timm 0.6.13 (InfLoRA; pip install --target)")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--official-side", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.official_side:
        return official_main(a.method, Path(a.work))
    if a.method == "inflora" and not a.timm:
        parser.error("inflora needs --timm (its model file imports timm 0.6's layout)")
    work = Path(a.work or tempfile.mkdtemp(prefix=f"golden-{a.method}-"))
    work.mkdir(parents=True, exist_ok=True)
    base = proto.write_stream(work)
    module = suite_module(base, a.method)
    torch.save({k: v.detach().clone() for k, v in module.net.state_dict().items()}, work / "init.pt")
    meta = {"A": sdlora_inits(base, work)} if a.method == "sdlora" else {}
    torch.save(meta, work / "meta.pt")
    path = [str(Path(a.timm).resolve())] if a.timm and a.method == "inflora" else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(Path(a.official).resolve())]),
           "GOLDEN_OFFICIAL": str(Path(a.official).resolve()), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, __file__, a.method, "--official", a.official, "--work", str(work),
                    "--official-side"], env=env, check=True)
    print(json.dumps(json.loads((work / "official.json").read_text())))


if __name__ == "__main__":
    main()
