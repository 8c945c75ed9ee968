"""Published-setting recipes build end to end (dry run) on generated data in the real on-disk layouts.

The real runs need GPUs, the datasets and pretrained weights; a dry run proves that the recipe composes, the
source reads the real layout, the stream follows the protocol and the model is the paper's.
"""
import json

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf
from conftest import REPO_ROOT, compose
from data_gen import WNIDS, make_cifar, make_imagenet_r, write_coda_split

from cl_vit.data.imagenet_r import imagenet_r_wnids
from cl_vit.run import run


def test_closer_look_imagenet_r_dry_run(tmp_path, data_root):
    wnids = imagenet_r_wnids()
    root = make_imagenet_r(data_root, wnids=wnids, per_class=3, size=(24, 20))
    # the default split: CODA-Prompt's files where python -m cl_vit.data.download imagenet-r puts them
    write_coda_split(data_root / "imagenet-r-splits" / "coda", root, {w: k for k, w in enumerate(wnids)})
    # offline: the recipe's pretrained ViT-B/16 cannot be fetched, the architecture is what is checked here
    cfg = compose(["experiment=closer-look-imagenet-r", "model.pretrained=false", "data.num_workers=0",
                   "data.persistent_workers=false", "dry_run=true"], data_root)
    stream = run(cfg, tmp_path / "run")
    assert len(stream["experiences"]) == 10
    assert [len(e["classes"]) for e in stream["experiences"]] == [20] * 10
    assert sum(e["n_train"] + e["n_test"] for e in stream["experiences"]) == 200 * 3
    assert 85e6 < stream["n_params"] < 87e6  # ViT-B/16 with a 200-class head
    assert stream["class_order"] == list(range(200))  # CODA-Prompt's first trial: identity


def test_gcab_cifar100_dry_run_uses_the_dytox_order(tmp_path, data_root):
    make_cifar(data_root, "cifar100", train_counts=[2] * 100, test_per_class=1)
    cfg = compose(["experiment=gcab-cifar100", "dry_run=true", "data.num_workers=0",
                   "data.persistent_workers=false"], data_root)
    stream = run(cfg, tmp_path / "run")
    order = yaml.safe_load((REPO_ROOT / "tasks" / "cifar100-dytox.yaml").read_text())["class_order"]
    assert stream["class_order"] == order and sorted(order) == list(range(100))
    assert [len(e["classes"]) for e in stream["experiences"]] == [10] * 10
    assert json.loads((tmp_path / "run" / "stream.json").read_text())["model"] == cfg.model.name


@pytest.mark.parametrize("choice", ["benchmark=imagenet-r", "experiment=closer-look-imagenet-r", "strategy=l2",
                                    "strategy=ewc", "strategy=[lwf,l2]"])
def test_every_config_resolves_in_place(choice):
    # what `python -m cl_vit.run ... --cfg job --resolve` does: a list default of oc.select once broke it
    cfg = compose([choice])
    OmegaConf.resolve(cfg)
    for name in ("l2", "ewc"):
        if name in cfg.strategy:
            # ImageNet-R's recipe and split-digits' sized setting alike: the paper's ViT setting, the qkv projections
            assert list(cfg.strategy[name].params) == ["*attn.qkv.*"]


# -- ImageNet-R: the closer-look recipe ---------------------------------------------------------------------------

TINY_R = ["model=vit_micro", "model.patch_size=8", "benchmark.source_args.img_size=32", "data.num_workers=0",
          "data.batch_size=8", "data.persistent_workers=false", "trainer.max_epochs=1", "trainer.accelerator=cpu",
          "logger=none"]


def _resolved(overrides):
    cfg = compose(overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def test_imagenet_r_benchmark_is_the_closer_look_l2_recipe():
    cfg = _resolved(["benchmark=imagenet-r"])
    # configs/benchmark/imagenet-r.yaml cites each: CODA-Prompt configs/imnet-r_prompt.yaml, learners/prompt.py,
    # dataloaders/utils.py, trainer.py; the paper's qkv-only L2
    assert cfg["loss"] == {"name": "ce", "mask_old_logits": True, "mask_unseen": True}
    assert cfg["benchmark"]["source_args"]["normalize"] == "coda"
    assert cfg["benchmark"]["source_args"]["test_resize"] == "crop"
    assert (cfg["optimizer"]["name"], cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"]) == ("adam", 1e-3, 0.0)
    assert (cfg["scheduler"]["name"], cfg["trainer"]["max_epochs"], cfg["data"]["batch_size"]) == ("coda_cosine", 50, 128)
    assert (cfg["benchmark"]["n_experiences"], cfg["benchmark"]["class_order"]) == (10, "coda")
    assert (cfg["model"]["name"], cfg["model"]["pretrained_tag"]) == ("vit_base_patch16_224", "augreg_in21k_ft_in1k")
    assert cfg["strategy"] == {"l2": {"lam": 1e-3, "params": ["*attn.qkv.*"], "exclude": [],
                                      "train_only_selected": True}}
    # one defines, the other reuses: the experiment is the benchmark, with the official loaders' drop_last
    # (CODA-Prompt trainer.py L185), which the benchmark leaves to each recipe
    experiment = _resolved(["experiment=closer-look-imagenet-r"])
    assert experiment["data"].pop("drop_last") is True and cfg["data"]["drop_last"] is False
    assert experiment == {**cfg, "data": {k: v for k, v in cfg["data"].items() if k != "drop_last"}}
    for name, n in (("imagenet-r-5", 5), ("imagenet-r-20", 20)):
        other = _resolved([f"benchmark={name}"])
        assert (other["benchmark"].pop("name"), other["benchmark"].pop("n_experiences")) == (name, n)
        assert {k: v for k, v in cfg["benchmark"].items() if k not in ("name", "n_experiences")} == other["benchmark"]
        assert {k: v for k, v in cfg.items() if k != "benchmark"} == {k: v for k, v in other.items() if k != "benchmark"}


def test_imagenet_r_strategies_train_what_l2_trains_and_keep_their_own_loss():
    for name, key in (("ewc", "train_only_selected"), ("lwf", "train_only"), ("featkd", "train_only")):
        args = _resolved(["benchmark=imagenet-r", f"strategy={name}"])["strategy"][name]
        assert args[key] in (True, ["*attn.qkv.*"]) and args.get("params", ["*attn.qkv.*"]) == ["*attn.qkv.*"]
        # outside ImageNet-R: split-digits' own sized setting (as l2: qkv + classifier), the synthetic stream's none
        assert _resolved([f"strategy={name}"])["strategy"][name][key] in (True, ["*attn.qkv.*"])
        assert _resolved(["benchmark=synthetic", f"strategy={name}"])["strategy"][name][key] in (False, None)
    # a strategy that needs its loss keeps it; the command line beats both
    assert _resolved(["benchmark=imagenet-r", "strategy=gcab"])["loss"] == {"name": "bce", "mask_old_logits": False,
                                                                             "mask_unseen": True}
    assert _resolved(["benchmark=imagenet-r", "loss.name=bce"])["loss"]["name"] == "bce"
    assert _resolved([])["loss"] == {"name": "ce", "mask_old_logits": False, "mask_unseen": True}


def test_predkd_recipe_is_ewc_mc_with_eps(tmp_path, data_root):
    import timm
    import torch

    from cl_vit.data.download import sha256_of

    cfg = _resolved(["experiment=closer-look-imagenet-r-predkd"])
    # shaunak27/data-free-continual-learning learners/kd.py EWC_MC: BCE with LwF.MC targets + eps L2, mu = 0
    assert list(cfg["strategy"]) == ["lwf", "l2"]
    assert cfg["loss"] == {"name": "bce", "mask_old_logits": False, "mask_unseen": True}
    assert cfg["strategy"]["lwf"]["form"] == "mc" and cfg["strategy"]["lwf"]["lam"] == 1.0
    assert cfg["strategy"]["l2"]["lam"] == 1e-3 and cfg["optimizer"]["lr"] == 1e-3
    # a tiny run on ImageNet-R-shaped data, from a weights file (the L2 anchor of the first experience)
    make_imagenet_r(data_root, wnids=WNIDS[:4], per_class=4, size=(36, 36))
    weights = tmp_path / "init.pth"
    torch.save(timm.create_model("vit_micro_patch2_8", patch_size=8, img_size=32, in_chans=3, num_classes=4)
               .state_dict(), weights)
    run_cfg = compose(["experiment=closer-look-imagenet-r-predkd", *TINY_R, f"model.checkpoint={weights}",
                       "benchmark.source_args.split=own",
                       f"benchmark.source_args.wnids=[{','.join(WNIDS[:4])}]", "benchmark.n_experiences=2"],
                      data_root)
    doc = run(run_cfg, tmp_path / "run")
    assert doc["strategy"] == ["lwf", "l2"] and doc["completed_experiences"] == 2
    assert doc["weights_file"] == {"origin": f"checkpoint:{weights}", "tag": None, "file": str(weights),
                                   "sha256": sha256_of(weights)}


def test_train_only_freezes_all_but_qkv_and_head():
    import timm

    from cl_vit.module import ContinualModule
    from cl_vit.strategies import build_strategies
    from cl_vit.strategies.base import ExperienceInfo

    for name, args in (("lwf", {"train_only": ["*attn.qkv.*"]}), ("featkd", {"train_only": ["*attn.qkv.*"]}),
                       ("ewc", {"train_only_selected": True})):
        net = timm.create_model("vit_micro_patch2_8", num_classes=4)
        strategy = build_strategies({name: args})[0]
        module = ContinualModule(net, 4, [strategy])
        strategy.setup(module)
        strategy.before_experience(module, ExperienceInfo(index=0, n_experiences=2, classes=[0, 1],
                                                          seen_classes=[0, 1], n_classes=4,
                                                          train_loader=lambda **kw: []))
        trained = {n for n, p in net.named_parameters() if p.requires_grad}
        assert trained and all(".attn.qkv." in n or n.startswith("head.") for n in trained), (name, trained)
        assert {"head.weight", "blocks.0.attn.qkv.weight"} <= trained


def test_a_sweep_of_lr_and_seeds_reports_mean_and_std_per_setting(tmp_path, data_root):
    # the documented multirun (docs/recipes.md) is a grid of these runs; the report groups them by setting
    from cl_vit.report import markdown_table

    for lr in (1e-3, 3e-3):
        for seed in (0, 1):
            cfg = compose(["model=vit_micro", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none",
                           "strategy=l2", "benchmark.n_experiences=2", "trainer.limit_train_batches=2",
                           f"optimizer.lr={lr}", f"seed={seed}"],
                          data_root)
            run(cfg, tmp_path / "sweep" / f"lr={lr},seed={seed}")
    table = markdown_table(tmp_path / "sweep")
    rows = [line for line in table.splitlines() if line.startswith("| split-digits")]
    assert len(rows) == 2 and all("optimizer.lr=" in r and " ± " in r and "| 0,1 | 2 |" in r for r in rows)


# -- CIFAR-100 under the CODA-Prompt protocol ---------------------------------------------------------------------


def test_cifar100_coda_protocol_values_and_dry_run(tmp_path, data_root):
    cfg = _resolved(["benchmark=cifar100-coda"])
    # GT-RIPL/CODA-Prompt configs/cifar-100_prompt.yaml, dataloaders/utils.py, learners/prompt.py, trainer.py
    args = cfg["benchmark"]["source_args"]
    assert (args["img_size"], args["normalize"], args["train_transform"], args["test_transform"]) == \
        (224, "coda", "coda", "coda")
    assert (cfg["optimizer"]["name"], cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"]) == ("adam", 1e-3, 0.0)
    assert (cfg["trainer"]["max_epochs"], cfg["data"]["batch_size"], cfg["scheduler"]["name"]) == (20, 128, "coda_cosine")
    assert (cfg["benchmark"]["n_experiences"], cfg["benchmark"]["class_order"]) == (10, "coda")
    assert cfg["loss"] == {"name": "ce", "mask_old_logits": True, "mask_unseen": True}
    assert (cfg["model"]["name"], cfg["model"]["pretrained_tag"]) == ("vit_base_patch16_224", "augreg_in21k_ft_in1k")
    make_cifar(data_root, "cifar100", train_counts=[2] * 100, test_per_class=1)
    stream = run(compose(["benchmark=cifar100-coda", "model.pretrained=false", "dry_run=true"], data_root),
                 tmp_path / "run")
    assert [len(e["classes"]) for e in stream["experiences"]] == [10] * 10 and stream["class_order"] == list(range(100))
    assert 85e6 < stream["n_params"] < 87e6
    # a prompt method's recipe on the same protocol builds its prompts into the network (5 blocks of CODA's pool)
    coda = run(compose(["experiment=coda-prompt-cifar100", "model.pretrained=false", "dry_run=true"], data_root),
               tmp_path / "coda")
    assert coda["experiences"] == stream["experiences"] and coda["n_params"] - stream["n_params"] == \
        5 * (100 * 8 * 768 + 2 * 100 * 768)


def test_coda_cifar_transforms_give_224_px_in_unit_range(data_root):
    import torch

    from cl_vit.data import build_source

    make_cifar(data_root, "cifar100", train_counts=[1] * 100, test_per_class=1)
    src = build_source("cifar100", data_root, img_size=224, normalize="coda", train_transform="coda",
                       test_transform="coda")
    assert src.meta["transforms"]["train"] == src.meta["transforms"]["test"] == "coda"
    test = torch.stack([src.test[i][0] for i in range(4)])
    train = torch.stack([src.train[i][0] for i in range(4)])
    assert test.shape == train.shape == (4, 3, 224, 224)
    assert 0.0 <= min(test.min(), train.min()) and max(test.max(), train.max()) <= 1.0
    # the test resize is deterministic and keeps the whole image: its mean matches the 32 px original's
    x32 = torch.as_tensor(np.asarray(src.test.images[0]), dtype=torch.float32) / 255
    assert x32.shape == (32, 32, 3) and abs(float(test[0].mean() - x32.mean())) < 0.02


# -- GCAB on CIFAR-100 as the official code runs it ---------------------------------------------------------------


def test_gcab_cifar100_recipe_is_the_official_pipeline_and_convit(tmp_path, data_root):
    from torchvision import transforms as T

    from cl_vit.data import build_source
    from cl_vit.data.transforms import NORMALIZATIONS
    from cl_vit.models import build_model
    from cl_vit.models.gated import GatedNet

    cfg = compose(["experiment=gcab-cifar100"], data_root)
    c = OmegaConf.to_container(cfg, resolve=True)
    # OcraM17/GCAB-CFDC options/model/cifar_GCAB_FDC.yaml, main.py, continual/datasets.py, continual/factory.py
    assert c["benchmark"]["source_args"]["normalize"] == "cifar100" and c["data"]["drop_last"] is True
    assert NORMALIZATIONS["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    assert c["strategy"]["gcab"]["projector_norm"] == "image" and c["loss"]["name"] == "bce"
    assert (c["optimizer"]["name"], c["optimizer"]["lr"], c["optimizer"]["weight_decay"]) == ("adamw", 1.25e-4, 1e-6)
    assert (c["trainer"]["max_epochs"], c["data"]["batch_size"]) == (500, 128)
    net = build_model(c["model"], 100, 3, 32)
    assert (net.embed_dim, len(net.blocks), net.blocks[0].attn.num_heads, net.patch_embed.num_patches) == (384, 6, 12, 64)
    assert [type(b.attn).__name__ for b in net.blocks] == ["GPSA"] * 5 + ["MHSA"]
    assert net.blocks[0].attn.qk.bias is None and net.blocks[-1].mlp.fc1.out_features == 1536
    gated = GatedNet(net, 100, init_from_last_block=True, projector_norm="image")
    assert [type(b.attn).__name__ for b in gated.backbone.blocks] == ["GPSA"] * 5  # the SABs; block 6 is the CAB
    gated.backbone_no_decay, gated.decay_gated_weights = False, True  # the recipe's weight decay
    assert gated.no_weight_decay() == set()  # timm's rule alone: 1-D parameters and biases, as the official optimiser
    # the training pipeline: RandomCrop(32, pad 4), flip, RandAugment filling with the ImageNet mean, CIFAR-100 norm
    make_cifar(data_root, "cifar100", train_counts=[3] * 100, test_per_class=1)
    args = c["benchmark"]["source_args"]
    src = build_source("cifar100", data_root, **args)
    steps = src.train.transform.transform.transforms
    assert isinstance(steps[0], T.RandomCrop) and steps[0].size == (32, 32) and steps[0].padding == 4
    assert type(steps[2]).__name__ == "RandAugment" and steps[2].ops[0].hparams["img_mean"] == (124, 116, 104)
    assert [round(m, 4) for m in steps[-1].mean] == [0.5071, 0.4867, 0.4408] and not any(
        type(t).__name__ == "RandomErasing" for t in steps)
    assert src.test[0][0].shape == (3, 32, 32)
    # the gated ConViT learns: a BCE step reaches the GPSA blocks' gating and locality parameters
    import torch

    gated.add_task(list(range(10)))
    x = torch.stack([src.train[i][0] for i in range(4)])
    logits = gated.forward_outputs(x)["logits"][:, :10]
    torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.eye(10)[:4]).backward()
    assert all(b.attn.gating_param.grad is not None for b in gated.backbone.blocks)


def test_drop_last_drops_the_incomplete_training_batch_unless_it_is_the_only_one():
    import torch

    from cl_vit.runner import ContinualRunner, LoaderConfig

    runner = ContinualRunner.__new__(ContinualRunner)
    runner.loader = LoaderConfig(batch_size=4, drop_last=True)
    data = torch.utils.data.TensorDataset(torch.zeros(10, 1))
    assert len(runner._loader(data, train=True)) == 2 and len(runner._loader(data, train=False)) == 1
    assert len(runner._loader(torch.utils.data.TensorDataset(torch.zeros(3, 1)), train=True)) == 1
    runner.loader = LoaderConfig(batch_size=4)
    assert len(runner._loader(data, train=True)) == 3


# -- ER: the rehearsal rows of CODA-Prompt's tables ---------------------------------------------------------------


@pytest.mark.parametrize("benchmark,epochs", [("cifar100-coda", 20), ("imagenet-r", 50)])
def test_er_recipes_are_normalnn_with_coda_prompts_coreset(benchmark, epochs):
    name = {"cifar100-coda": "er-cifar100", "imagenet-r": "er-imagenet-r"}[benchmark]
    cfg = _resolved([f"experiment={name}"])
    assert cfg["benchmark"]["name"] == benchmark and cfg["trainer"]["max_epochs"] == epochs
    # the paper's 5,000-image coreset, as CODA-Prompt's dataloader.py builds and replays it
    assert cfg["strategy"] == {"replay": {"memory_size": 5000, "policy": "coreset", "selection": "random",
                                          "mix": "resample", "batch_size": 128, "remainder": "latest",
                                          "rebuild": "draws", "herding_view": "test"}}
    # NormalNN: CE over every seen class, the whole network trained (no strategy restricts it), cifar-100_ft.yaml
    assert cfg["loss"] == {"name": "ce", "mask_old_logits": False, "mask_unseen": True}
    assert (cfg["optimizer"]["name"], cfg["optimizer"]["lr"], cfg["optimizer"]["weight_decay"]) == ("adam", 5e-5, 0.0)
    assert (cfg["data"]["batch_size"], cfg["data"]["drop_last"], cfg["scheduler"]["name"]) == (128, True, "coda_cosine")
    assert (cfg["model"]["name"], cfg["model"]["pretrained_tag"]) == ("vit_base_patch16_224", "augreg_in21k_ft_in1k")
    # composed with another strategy, the memory keeps the recipe's size
    assert _resolved([f"experiment={name}", "strategy=[replay,l2]"])["strategy"]["replay"]["memory_size"] == 5000


# trainer.eval_autocast: the recipes whose official evaluate runs under torch.cuda.amp.autocast() whatever the
# training precision (DyTox continual/engine.py L279; GCAB-CFDC continual/engine_GCAB.py L126). DeiT-LT (engine.py
# L163 / L310) and Refiner-ViT (main.py L421, L734 / L835) evaluate under the autocast they train in (16-mixed here);
# CODA-Prompt, LAMDA-PILOT, RanPAC, SLCA, InfLoRA, SD-LoRA and the long-tailed codes use no autocast
EVAL_AUTOCAST = {"dytox-cifar100": "float16", "gcab-cifar100": "float16", "gcab-tiny-imagenet": "float16",
                 "gcab-imagenet100": "float16"}


def test_the_recipes_evaluating_under_fp16_autocast_set_eval_autocast_and_no_other():
    recipes = sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml"))
    assert set(EVAL_AUTOCAST) <= set(recipes)
    assert {r: compose([f"experiment={r}"]).trainer.eval_autocast for r in recipes} == {
        r: EVAL_AUTOCAST.get(r) for r in recipes}
