"""The closer-look miniature's configs: the pre-training recipe and each arm of the comparison compose as documented,
and a pre-trained checkpoint initialises the backbone without its classifier (model.checkpoint_head=false)."""
import pytest
import timm
import torch
from conftest import compose

import cl_vit  # noqa: F401
from cl_vit.config import check_group_choices
from cl_vit.errors import ConfigError
from cl_vit.models import build_model

ARMS = ["finetune", "ftpp", "l2", "ewc", "lwf", "lwf_l2", "joint"]


def test_pretraining_recipe_is_all_of_fashion_mnist_at_the_digits_geometry():
    cfg = compose(["experiment=pretrain-fmnist-8"])
    assert (cfg.benchmark.source, cfg.benchmark.n_experiences) == ("fashion-mnist", 1)
    assert (cfg.benchmark.source_args.img_size, cfg.benchmark.source_args.normalize) == (8, "half")
    assert (cfg.model.name, cfg.model.patch_size) == ("refiner_vit_tiny", 2)


def test_arms_differ_only_where_documented():
    cfgs = {arm: compose([f"experiment=closer-look-digits/{arm}"]) for arm in ARMS}
    for cfg in cfgs.values():
        assert cfg.benchmark.name == "split-digits" and cfg.model.checkpoint_head is False
        assert cfg.model.checkpoint.endswith("pretrain-fmnist-8/checkpoints/exp_000.pt")
    l2 = cfgs["l2"].strategy.l2
    assert list(l2.params) == ["*attn.qkv.*"] and l2.train_only_selected and cfgs["l2"].loss.mask_old_logits
    assert cfgs["ewc"].strategy.ewc.train_only_selected and list(cfgs["ewc"].strategy.ewc.params) == ["*attn.qkv.*"]
    assert cfgs["lwf"].loss.name == "bce" and cfgs["lwf"].strategy.lwf.form == "mc"
    assert set(cfgs["lwf_l2"].strategy) == {"lwf", "l2"} and cfgs["lwf_l2"].loss.name == "bce"
    assert cfgs["joint"].benchmark.joint and cfgs["ftpp"].loss.mask_old_logits
    assert not cfgs["finetune"].loss.mask_old_logits and cfgs["finetune"].loss.name == "ce"
    check_group_choices(["experiment=closer-look-digits/l2"])
    with pytest.raises(ConfigError, match="closer-look-digits/l2"):
        check_group_choices(["experiment=closer-look-digits/nope"])


def test_prompt_arms_keep_the_official_prompts_with_the_documented_changes():
    cfgs = {arm: compose([f"experiment=closer-look-digits/{arm}"]) for arm in ("l2p", "dualprompt", "coda_prompt")}
    for arm, cfg in cfgs.items():
        assert list(cfg.strategy) == [arm] and cfg.model.name == "refiner_vit_tiny"
        assert cfg.model.checkpoint.endswith("pretrain-fmnist-8/checkpoints/exp_000.pt")
        assert not cfg.model.checkpoint_head
        assert cfg.optimizer.weight_decay == 0 and cfg.loss.mask_old_logits and cfg.benchmark.name == "split-digits"
    # the checkpoint is the pre-trained backbone: no first-session training (split-digits from scratch sets it)
    assert dict(cfgs["l2p"].strategy.l2p) == {"pool_size": 30, "length": 20, "top_k": 5, "deep": False,
                                              "key_loss_shards": 1, "first_session": False}
    assert dict(cfgs["dualprompt"].strategy.dualprompt) == {"pool_size": 10, "e_length": 20, "g_length": 6,
                                                            "first_session": False}
    coda = cfgs["coda_prompt"]
    assert dict(coda.strategy.coda_prompt) == {"pool_size": 50, "length": 8, "ortho_mu": 0.0, "first_session": False}
    assert coda.strategy.coda_prompt.pool_size // coda.benchmark.n_experiences == 10  # the official 100 / 10 tasks


def test_checkpoint_head_false_keeps_the_classifier_at_its_initialisation(tmp_path):
    torch.manual_seed(1)
    ref = timm.create_model("vit_micro_patch2_8", num_classes=10)
    path = tmp_path / "exp_000.pt"
    # as cl_vit.runner writes it: the weights under "module", the run's model config under "model"
    torch.save({"experience": 0, "module": {f"net.{k}": v for k, v in ref.state_dict().items()},
                "model": {"name": "vit_micro_patch2_8", "pretrained": False}, "input_size": [1, 8, 8]}, path)
    spec = {"name": "vit_micro_patch2_8", "checkpoint": str(path)}
    assert torch.equal(build_model(spec, 10, 1, 8).head.weight, ref.head.weight)  # same size: loaded by default
    torch.manual_seed(0)
    net = build_model({**spec, "checkpoint_head": False}, 10, 1, 8)
    assert not torch.equal(net.head.weight, ref.head.weight)
    assert torch.equal(net.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)


def test_strengths_of_strategies_a_run_does_not_use_do_not_split_its_seeds():
    from pathlib import Path

    from cl_vit.runs import Run, group_runs

    def fake(seed, strategy, ewc_lam, l2_lam=1.0, matrix=((1.0,),)):
        config = {"seed": seed, "strategy": {strategy: {}}, "model": {"name": "m"},
                  "benchmark": {"name": "b", "strategy_args": {"ewc": {"lam": ewc_lam}, "l2": {"lam": l2_lam}}}}
        doc = {"status": "completed", "completed_experiences": 1, "accuracy_matrix": [list(matrix[0])],
               "eval_experiences": [[0]]}
        return Run(Path(f"/r/{strategy}-{seed}-{ewc_lam}"), config, doc, None)

    # the ewc strength changed between the seeds of finetune: one finetune setting; for ewc it is two
    groups = group_runs([fake(0, "finetune", 1.0), fake(1, "finetune", 1000.0), fake(0, "ewc", 1.0),
                         fake(1, "ewc", 1000.0), fake(2, "finetune", 1000.0, l2_lam=3.0)])
    assert [[r.seed for r in g.runs] for g in groups] == [[0, 1, 2], [0], [1]]
    assert [g.settings for g in groups[1:]] == [{"benchmark.strategy_args.ewc.lam": 1.0},
                                                {"benchmark.strategy_args.ewc.lam": 1000.0}]
    # a run whose results.json has no experience yet has an empty accuracy matrix, not an error
    assert fake(0, "finetune", 1.0, matrix=((),)).head().accuracy_matrix.size == 0
