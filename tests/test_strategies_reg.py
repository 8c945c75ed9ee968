"""Rehearsal-free regularisers: L2, EWC, LwF, feature distillation (cl_vit/strategies/{l2,ewc,lwf,featkd}.py)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY, compose, interrupt_after, run_cli, state_equal

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit.errors import ConfigError, UserError
from cl_vit.module import ContinualModule, classification_loss, coda_cosine, coda_cosine_as_run
from cl_vit.rundir import RunDirectory
from cl_vit.runs import load_run
from cl_vit.run import build, run
from cl_vit.strategies import build_strategies
from cl_vit.strategies.ewc import EWC
from cl_vit.strategies.featkd import FeatKD
from cl_vit.strategies.l2 import L2
from cl_vit.strategies.lwf import LwF
from cl_vit.strategies.base import ExperienceInfo
from cl_vit.strategies.ewc import diagonal_fisher
from cl_vit.strategies.l2 import l2_penalty
from cl_vit.strategies.lwf import kd_distillation, lwf_mc_terms
from cl_vit.strategies.selection import QKV, classifier_names, select_parameters

# 2 training batches per experience: every hook runs, in seconds
FAST = TINY + ["trainer.limit_train_batches=2"]


def micro(n_classes=10, **kw):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch2_8", num_classes=n_classes, **kw)


def experience(index, classes, seen, loader=None, n_classes=10):
    return ExperienceInfo(index=index, n_experiences=5, classes=classes, seen_classes=seen, n_classes=n_classes,
                          train_loader=loader)


# -- the math ------------------------------------------------------------------------------------------------------


def test_l2_penalty_is_zero_at_the_anchor_and_its_gradient_is_2_lambda_delta():
    torch.manual_seed(0)
    params = {"a": nn.Parameter(torch.randn(4, 3)), "b": nn.Parameter(torch.randn(5))}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    assert l2_penalty(params, anchor, 0.3).item() == 0.0
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p))
    lam = 0.3
    loss = l2_penalty(params, anchor, lam)
    loss.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - anchor[n]))
    expected = lam * sum(((p.detach() - anchor[n]) ** 2).sum() for n, p in params.items())
    torch.testing.assert_close(loss.detach(), expected)


def test_ewc_penalty_weights_each_parameter_by_its_fisher():
    torch.manual_seed(1)
    p = {"w": nn.Parameter(torch.randn(6))}
    anchor = {"w": torch.zeros(6)}
    fisher = {"w": torch.tensor([0.0, 1.0, 2.0, 0.0, 0.5, 3.0])}
    loss = l2_penalty(p, anchor, 2.0, fisher)
    loss.backward()
    torch.testing.assert_close(p["w"].grad, 2 * 2.0 * fisher["w"] * p["w"].detach())
    assert p["w"].grad[0] == 0 and p["w"].grad[3] == 0


def test_fisher_is_non_negative_and_zero_for_untouched_parameters():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(5, 3)
            self.unused = nn.Linear(5, 3)

        def forward(self, x):
            return self.used(x)

    net = Net()
    params = dict(net.named_parameters())
    batches = [(torch.randn(8, 5), torch.randint(0, 3, (8,))) for _ in range(4)]
    fisher = diagonal_fisher(net, batches, params, F.cross_entropy)
    assert all((f >= 0).all() for f in fisher.values())
    assert fisher["unused.weight"].abs().sum() == 0 and fisher["unused.bias"].abs().sum() == 0
    assert fisher["used.weight"].sum() > 0
    # the authors' weighting: mean over batches of grad^2 * batch size
    manual = torch.zeros_like(net.used.bias)
    for x, y in batches:
        g, = torch.autograd.grad(F.cross_entropy(net(x), y), [net.used.bias])
        manual += g ** 2 * len(x) / len(batches)
    torch.testing.assert_close(fisher["used.bias"], manual)


def test_lwf_mc_terms_sum_to_the_authors_bce_with_sigmoid_targets():
    torch.manual_seed(0)
    logits, old_logits = torch.randn(6, 10), torch.randn(6, 10)
    y = torch.tensor([4, 5, 4, 5, 4, 5])
    seen = torch.zeros(10, dtype=torch.bool)
    seen[:6] = True
    old = torch.zeros(10, dtype=torch.bool)
    old[:4] = True
    cls, kd = lwf_mc_terms(logits, old_logits, y, seen, old)
    # LWF_MC.update_model: target = one_hot over the seen classes, old columns <- sigmoid(old logits); BCELoss(mean)
    target = F.one_hot(y, 10).float()[:, :6]
    target[:, :4] = torch.sigmoid(old_logits[:, :4])
    authors = nn.BCELoss()(torch.sigmoid(logits[:, :6]), target)
    torch.testing.assert_close(cls + kd, authors)
    # the distillation part alone is the old columns' share
    per = F.binary_cross_entropy_with_logits(logits[:, :4], torch.sigmoid(old_logits[:, :4]), reduction="sum")
    torch.testing.assert_close(kd, per / 36)


def test_softmax_kd_is_zero_gradient_when_the_student_matches_the_teacher():
    logits = torch.randn(4, 6, requires_grad=True)
    old = torch.tensor([True, True, True, False, False, False])
    kd_distillation(logits, logits.detach(), old, 2.0).backward()
    assert logits.grad.abs().max() < 1e-6
    other = torch.randn(4, 6)
    assert kd_distillation(logits.detach(), other, old) > kd_distillation(other, other, old)


def test_coda_cosine_matches_coda_prompt_schedule():
    assert coda_cosine(0, 50) == 1.0
    assert math.isclose(coda_cosine(49, 50), math.cos(99 * math.pi / 200))
    assert coda_cosine(25, 50) > coda_cosine(26, 50)
    # as the runs step it (utils/schedulers.py L19-20): the first two epochs at the base rate, then one epoch behind;
    # at 20 epochs the formula's summed rate is 7.2% lower and its last one 6x lower (issue 22)
    run, formula = [coda_cosine_as_run(e, 20) for e in range(20)], [coda_cosine(e, 20) for e in range(20)]
    assert run[:3] == [1.0, 1.0, coda_cosine(1, 20)] and run[19] == coda_cosine(18, 20)
    assert round(1 - sum(formula) / sum(run), 3) == 0.072 and round(run[19] / formula[19]) == 6


# -- selection and hooks ---------------------------------------------------------------------------------------------


def test_qkv_selection_covers_every_attention_block_and_never_the_head():
    net = micro()
    sel = select_parameters(net, QKV)
    assert sorted(sel) == sorted(f"blocks.{i}.attn.qkv.{k}" for i in range(4) for k in ("weight", "bias"))
    everything = select_parameters(net, ["*"])
    assert not set(everything) & classifier_names(net) and classifier_names(net) == {"head.weight", "head.bias"}
    with pytest.raises(ConfigError) as e:
        select_parameters(net, ["*nope*"], key="strategy.l2.params")
    assert "strategy.l2.params" in str(e.value) and "\n" not in str(e.value)


def test_bad_strategy_values_fail_in_one_line():
    for cfg in ({"l2": {"lam": -1}}, {"ewc": {"decay": 2}}, {"lwf": {"form": "soft"}}, {"l2": {"nope": 1}}):
        with pytest.raises(UserError) as e:
            build_strategies(cfg)
        assert "\n" not in str(e.value) and "strategy" in str(e.value)


def test_anchor_is_the_pretrained_weights_only_when_the_model_was_loaded(tmp_path, data_root):
    # a random initialisation: no anchor, hence no penalty, in the first experience
    _, _, _, module, _ = build(compose(FAST + ["strategy=l2"], data_root))
    l2 = module.strategies[0]
    l2.before_experience(module, experience(0, [0, 1], [0, 1]))
    assert l2.anchor is None and l2.training_loss(module, {}, {}) == {}
    # weights from a checkpoint: the anchor is those weights from the first experience on
    ckpt = tmp_path / "w.pth"
    torch.save(micro().state_dict(), ckpt)
    _, _, _, module, _ = build(compose(FAST + ["strategy=l2", f"model.checkpoint={ckpt}"], data_root))
    l2 = module.strategies[0]
    l2.before_experience(module, experience(0, [0, 1], [0, 1]))
    loaded = torch.load(ckpt)
    assert l2.anchor is not None and all(torch.equal(l2.anchor[n], loaded[n]) for n in l2.anchor)
    assert l2.training_loss(module, {}, {})["l2"].item() == 0.0
    with torch.no_grad():
        module.net.blocks[0].attn.qkv.weight.add_(0.1)
    assert l2.training_loss(module, {}, {})["l2"].item() > 0


def test_ewc_fisher_is_sharded_and_reduced_across_processes():
    torch.manual_seed(0)
    net = micro(4)
    module = ContinualModule(net, 4, [EWC(params=["*"])])
    module.strategies[0].setup(module)
    module.start_experience(experience(0, [0, 1], [0, 1], n_classes=4))
    data = [(torch.randn(5, 1, 8, 8), torch.randint(0, 2, (5,))) for _ in range(4)]
    calls = []

    def reduce(t, reduce_op):
        calls.append(reduce_op)
        return t * 0 + 7.0

    module._trainer = SimpleNamespace(world_size=2, global_rank=1,
                                      strategy=SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce))
    exp = experience(0, [0, 1], [0, 1], loader=lambda **kw: data, n_classes=4)
    fisher = module.strategies[0].compute_fisher(module, exp)
    assert calls and set(calls) == {"mean"} and all((f == 7.0).all() for f in fisher.values())
    # rank 1 of 2 uses batches 1 and 3 only
    module._trainer.strategy.reduce = lambda t, reduce_op: t
    mine = module.strategies[0].compute_fisher(module, exp)
    mask = module.current_mask
    expected = diagonal_fisher(lambda x: net(x), data[1::2], dict(module.strategies[0]._params),
                               lambda z, y: classification_loss(z, y, mask, "ce"))
    assert all(torch.allclose(mine[n], expected[n]) for n in mine)
    module._trainer = None


def test_composition_adds_every_term_and_logs_each(data_root):
    # the softmax CE over the seen classes (split-digits gives l2 and ewc FT++'s head)
    _, _, _, module, _ = build(compose(FAST + ["strategy=[l2,ewc,lwf,featkd]", "loss.mask_old_logits=false"], data_root))
    names = [s.name for s in module.strategies]
    assert names == ["l2", "ewc", "lwf", "featkd"]
    l2, ewc, lwf, featkd = module.strategies
    torch.manual_seed(0)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([2, 3, 2, 3, 2, 3])
    # state after a first experience on classes 0, 1, then a perturbed network
    first = experience(0, [0, 1], [0, 1])
    for s in (l2, lwf, featkd):
        s.after_experience(module, first)
    ewc.anchor = {n: p.detach().clone() for n, p in ewc._params.items()}
    ewc.fisher = {n: torch.rand_like(p) for n, p in ewc._params.items()}
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = experience(1, [2, 3], [0, 1, 2, 3])
    module.start_experience(second)
    for s in module.strategies:
        s.before_experience(module, second)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    loss = module.training_step((x, y), 0)
    outputs = module.forward_outputs(x)
    expected = {
        "train/loss/cls": classification_loss(outputs["logits"], y, module.seen_mask, "ce"),
        "train/loss/l2": l2.penalty(),
        "train/loss/ewc": ewc.penalty(),
        "train/loss/lwf/kd": lwf.training_loss(module, {"x": x, "y": y}, outputs)["kd"],
        "train/loss/featkd": featkd.training_loss(module, {"x": x, "y": y}, outputs)["featkd"],
    }
    for k, v in expected.items():
        assert v.item() > 0, k
        torch.testing.assert_close(logged[k], v.detach(), msg=k)
    torch.testing.assert_close(loss.detach(), sum(v.detach() for v in expected.values()))
    torch.testing.assert_close(logged["train/loss"], loss.detach())


def test_lwf_mc_with_bce_replaces_the_classification_loss(data_root):
    _, _, _, module, _ = build(compose(FAST + ["strategy=lwf", "loss.name=bce"], data_root))
    lwf = module.strategies[0]
    lwf.after_experience(module, experience(0, [0, 1], [0, 1]))
    second = experience(1, [2, 3], [0, 1, 2, 3])
    module.start_experience(second)
    lwf.before_experience(module, second)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([2, 3, 3, 2])
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, value)
    loss = module.training_step((x, y), 0)
    assert lwf.cls_loss_weight == 0.0 and logged["train/loss/cls"] == 0
    logits = module.forward_outputs(x)["logits"][:, :4]
    target = F.one_hot(y, 4).float()
    target[:, :2] = torch.sigmoid(lwf.old_net(x)[:, :2])
    torch.testing.assert_close(loss.detach(), nn.BCELoss()(torch.sigmoid(logits), target).detach())
    assert {"train/loss/lwf/cls", "train/loss/lwf/kd"} <= set(logged)


# -- through the runner ----------------------------------------------------------------------------------------------


def test_train_only_selected_keeps_every_other_backbone_parameter_bit_identical(tmp_path, data_root):
    over = FAST + ["strategy=l2", "strategy.l2.train_only_selected=true", 'strategy.l2.params=["*attn.qkv.*"]',
                   "benchmark.n_experiences=2"]
    cfg = compose(over, data_root)
    _, _, _, module, _ = build(cfg)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    run(cfg, tmp_path / "run")
    after = RunDirectory(tmp_path / "run").load_checkpoint(1)["module"]
    trained = {n for n in before if ".attn.qkv." in n or n.startswith("head.")}
    assert len(trained) == 10
    for n, v in before.items():
        if n in trained:
            assert not torch.equal(after[f"net.{n}"], v), n
        else:
            assert torch.equal(after[f"net.{n}"], v), n


def test_resume_restores_anchors_fisher_and_old_model_exactly(tmp_path, data_root, monkeypatch):
    # LwF.MC with BCE replaces the classification loss: the loss.name=bce path of every strategy runs here
    over = FAST + ["strategy=[l2,ewc,lwf,featkd]", "loss.name=bce", "benchmark.n_experiences=2"]
    whole = run(compose(over, data_root), tmp_path / "whole")
    Stop = interrupt_after(monkeypatch, 0)
    with pytest.raises(Stop):
        run(compose(over, data_root), tmp_path / "cut")
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["completed_experiences"] == 1
    resumed = run(compose(over + [f"resume={tmp_path / 'cut'}"], data_root), tmp_path / "cut")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    for i in (0, 1):
        a = RunDirectory(tmp_path / "whole").load_checkpoint(i)
        b = RunDirectory(tmp_path / "cut").load_checkpoint(i)
        assert state_equal(a["module"], b["module"])
        for name in ("l2", "ewc", "lwf", "featkd"):
            assert state_equal(a["strategies"][name], b["strategies"][name]), (i, name)
    state = RunDirectory(tmp_path / "whole").load_checkpoint(1)["strategies"]
    fisher = state["ewc"]["fisher"]
    assert all((f >= 0).all() for f in fisher.values()) and any(f.sum() > 0 for f in fisher.values())
    assert state["lwf"]["old_net"] is not None and state["l2"]["anchor"] is not None


def test_every_strategy_trains_with_softmax_ce_too_from_loaded_weights(tmp_path, data_root):
    ckpt = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(micro().state_dict(), ckpt)
    over = FAST + ["strategy=[l2,ewc,lwf,featkd]", "loss.name=ce", "benchmark.n_experiences=2",
                   f"model.checkpoint={ckpt}"]
    doc = run(compose(over, data_root), tmp_path / "ce")
    assert doc["strategy"] == ["l2", "ewc", "lwf", "featkd"] and doc["weights"] == f"checkpoint:{ckpt}"
    assert doc["metrics"]["final_average_accuracy"] is not None
    assert load_run(tmp_path / "ce").config["loss"]["name"] == "ce"


# -- configs and the command line ------------------------------------------------------------------------------------


def test_strategy_configs_compose_and_keep_the_papers_defaults():
    cfg = compose(["strategy=[l2,lwf]", "benchmark=synthetic"])
    assert list(cfg.strategy) == ["l2", "lwf"]
    assert cfg.strategy.l2.params == ["*attn.qkv.*"] and cfg.strategy.l2.lam == 1e-3
    assert cfg.strategy.lwf.form == "mc" and cfg.strategy.lwf.temperature == 2.0 and cfg.strategy.lwf.lam == 1.0
    assert compose(["strategy=[ewc,featkd]", "benchmark=synthetic"]).strategy.ewc.lam == 10.0
    # split-digits sizes the strengths for its model, l2, ewc, lwf and featkd in the paper's ViT setting with FT++'s
    # head; the command line still wins
    digits = compose(["strategy=[l2,ewc,featkd]"]).strategy
    assert (digits.l2.lam, list(digits.l2.params), digits.ewc.lam, digits.featkd.lam) == (1.0, ["*attn.qkv.*"],
                                                                                          1e4, 1.0)
    assert digits.l2.train_only_selected and digits.ewc.train_only_selected
    assert list(digits.featkd.train_only) == list(compose(["strategy=lwf"]).strategy.lwf.train_only) == ["*attn.qkv.*"]
    for name in ("l2", "ewc", "lwf", "featkd"):
        assert compose([f"strategy={name}"]).loss.mask_old_logits, name
        assert not compose([f"strategy={name}", "benchmark=synthetic"]).loss.mask_old_logits, name
    assert compose(["strategy=lwf", "benchmark=synthetic"]).strategy.lwf.train_only is None
    assert not compose([]).loss.mask_old_logits and not compose(["strategy=finetune"]).loss.mask_old_logits
    assert not compose(["strategy=l2", "loss.mask_old_logits=false"]).loss.mask_old_logits
    assert compose(["strategy=l2", "strategy.l2.lam=0.5"]).strategy.l2.lam == 0.5


def test_closer_look_recipe_composes_and_dry_runs(tmp_path, data_root):
    over = ["experiment=closer-look-imagenet-r", "benchmark=split-digits", "benchmark.n_experiences=5",
            "model.name=vit_micro_patch2_8", "model.pretrained=false", "model.drop_path_rate=null", "dry_run=true",
            "logger=none"]
    cfg = compose(over, data_root)
    # the recipe is benchmark=imagenet-r's own setting: with another benchmark only the strategy stays
    recipe = compose(["experiment=closer-look-imagenet-r"], data_root)
    assert recipe.model.name == "vit_base_patch16_224" and recipe.model.pretrained
    assert recipe.model.pretrained_tag == "augreg_in21k_ft_in1k"
    assert dict(recipe.strategy.l2) == {"lam": 1e-3, "params": ["*attn.qkv.*"], "exclude": [],
                                        "train_only_selected": True}
    assert (recipe.optimizer.name, recipe.optimizer.lr, recipe.optimizer.weight_decay) == ("adam", 1e-3, 0.0)
    assert (recipe.data.batch_size, recipe.trainer.max_epochs, recipe.scheduler.name) == (128, 50, "coda_cosine")
    doc = run(cfg, tmp_path / "dry")
    assert len(doc["experiences"]) == 5


def test_multirun_over_strategies_and_a_composition_leaves_one_run_directory_per_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "strategy=l2,[l2,lwf]", "seed=0", *FAST, "benchmark.n_experiences=1",
                   f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.override_dirname}",
                   data_root=data_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(runs) == 2
    assert sorted(tuple(load_run(r).results["strategy"]) for r in runs) == [("l2",), ("l2", "lwf")]
    assert all(load_run(r).finished for r in runs)
    assert np.isfinite([load_run(r).metrics["final_average_accuracy"] for r in runs]).all()


def test_group_choices_accept_lists_and_sweeps_of_lists_and_name_a_bad_member():
    from cl_vit.config import check_group_choices

    for ok in (["strategy=[l2,lwf]"], ["strategy=[lwf,l2],[lwf,ewc]"], ["strategy=l2,lwf"], ["strategy=featkd"]):
        check_group_choices(ok)
    for bad in (["strategy=[l2,nope]"], ["strategy=nope"]):
        with pytest.raises(ConfigError, match="strategy='nope' is not allowed"):
            check_group_choices(bad)
