"""DyTox (cl_vit/strategies/dytox.py, cl_vit/models/dytox.py) against the official code, and on a real stream.

The official numbers below were printed by

    python scripts/golden_dytox.py /path/to/dytox

with github.com/arthurdouillard/dytox at 4da25c13ef34e827e5361f78dcda08811a413c74 (the official ``DyTox`` model and
``engine.forward`` with ``bce_with_logits``, the CIFAR options), on the tiny case that script's ``tiny_case`` builds.
"""
from __future__ import annotations

import pytest
import torch
from conftest import compose, cut_and_resume, script_module, state_equal
from omegaconf import OmegaConf

from cl_vit.errors import ConfigError
from cl_vit.rundir import RunDirectory
from cl_vit.run import run
from cl_vit.strategies.dytox import DyTox, divergence_targets

golden = script_module("golden_dytox")

# -- the official numbers (python scripts/golden_dytox.py dytox, at the commit above) ---------------------------------
#: logits of the student, classes in the official (task) order [2, 0, 4, 1, 3]
LOGITS = [[0.628027, 0.176231, 0.110698, 1.525746, 0.378516], [-0.389868, -0.185984, 0.188919, 0.779255, -0.24245],
          [0.19262, -0.172824, 0.184953, 0.657344, 0.087692], [0.858057, 0.169631, -0.437289, 1.255954, 0.626386],
          [1.501417, 0.434084, -0.520435, 0.568786, 0.516861], [0.757652, 0.481877, -0.02856, 0.730387, 0.769319]]
#: the divergence head's logits: [old, new class 1, new class 3]
DIV = [[0.006876, 0.371602, 0.455886], [0.113787, 0.053771, 0.941231], [-0.367193, -0.16189, 0.355946],
       [-0.778152, 0.05579, 0.588188], [-0.818339, 0.062546, -0.251993], [-0.498778, -0.002623, 0.063055]]
#: engine.forward's (loss, kd_loss, div_loss): (1 - 3/5) * BCE, 3/5 * KL, 0.1 * BCE of the divergence head
TERMS = {"cls": 0.34494712948799133, "kd": 0.12155026197433472, "div": 0.07333844155073166}


def test_forward_and_loss_equal_the_official_code():
    module, strategy, x, y = golden.tiny_case()
    with torch.no_grad():
        out, terms = golden.suite_terms(module, strategy, x, y)
    order = [c for cs in golden.TASKS for c in cs]
    torch.testing.assert_close(out["logits"][:, order], torch.tensor(LOGITS), rtol=0, atol=1e-6)
    assert (out["logits"][:, 5] == 0).all()  # the class no task has yet
    torch.testing.assert_close(out["div"], torch.tensor(DIV), rtol=0, atol=1e-6)
    assert terms.keys() == TERMS.keys()
    for k, v in TERMS.items():
        assert float(terms[k]) == pytest.approx(v, rel=1e-6), k
    # the teacher's classes only are distilled, the student's old tokens and classifiers are frozen
    net = module.net
    assert strategy.cls_loss_weight == pytest.approx(1 - 3 / 5)
    assert not net.tokens[0].requires_grad and not any(p.requires_grad for p in net.heads[0].parameters())
    assert net.tokens[1].requires_grad and net.head_div.fc.weight.requires_grad and net.tab.attn.q.weight.requires_grad


def test_divergence_targets_and_bad_values():
    y = torch.tensor([7, 1, 3, 9, 3])
    assert divergence_targets(y, torch.tensor([3, 9])).tolist() == [0, 0, 1, 2, 1]
    with pytest.raises(ConfigError):
        DyTox(distillation_tau=0)
    with pytest.raises(ConfigError):
        DyTox(head_div=-1)


FAST = ["model=vit_micro", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.limit_train_batches=2",
        "logger=none", "strategy=dytox", "strategy.replay.memory_size=30", "benchmark.n_experiences=2"]


def test_resume_ends_as_the_uninterrupted_run_and_finetuning_moves_only_what_it_should(tmp_path, data_root,
                                                                                        monkeypatch):
    finetuned = []
    finetune = DyTox.balanced_finetuning

    def spy(self, module, experience):
        before = {k: v.clone() for k, v in module.net.state_dict().items()}
        finetune(self, module, experience)
        finetuned.append((experience.index, before, module.net.state_dict()))

    monkeypatch.setattr(DyTox, "balanced_finetuning", spy)
    whole = run(compose(FAST, data_root), tmp_path / "whole")
    resumed = cut_and_resume(monkeypatch, FAST, data_root, tmp_path / "cut", after=0)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    a, b = (RunDirectory(tmp_path / d).load_checkpoint(1) for d in ("whole", "cut"))
    assert state_equal(a["module"], b["module"]) and state_equal(a["strategies"], b["strategies"])
    assert set(a["strategies"]) == {"replay", "dytox"} and len(a["strategies"]["replay"]["idx"]) == 30
    assert "net.head_div.fc.weight" in a["module"]
    # the finetuning ran after the second experience only: the encoder and the divergence head stay, the old and
    # new tokens, classifiers and the task-attention block move (freeze_ft [sab])
    assert [i for i, *_ in finetuned] == [1]
    _, before, after = finetuned[0]
    for k in before:
        moved = not torch.equal(before[k], after[k])
        if k.startswith(("backbone.", "head_div.")):
            assert not moved, k
        elif k in ("tokens.0", "heads.0.fc.weight", "tokens.1", "heads.1.fc.weight", "tab.attn.q.weight"):
            assert moved, k


def test_finetuning_without_shuffle_runs_the_memory_in_its_stored_order(tmp_path, data_root, monkeypatch):
    """cifar_dytox.yaml L32 ft_no_sampling: the official finetuning loader has no sampler and no shuffle
    (continual/factory.py L62), so its batches follow the memory's order; the suite's default shuffles."""
    seen = {}
    finetune = DyTox.balanced_finetuning

    def spy(self, module, experience):
        loader = experience.train_loader

        def recorded(dataset, **kw):
            out = loader(dataset, **kw)
            seen["strategy"] = [int(v) for _, y, *_ in out for v in torch.as_tensor(y)]
            seen["shuffled"] = [int(v) for _, y, *_ in loader(dataset, seed=kw["seed"]) for v in torch.as_tensor(y)]
            return out

        experience.train_loader = recorded
        finetune(self, module, experience)
        seen["memory"] = module.strategies[0].labels.tolist()

    monkeypatch.setattr(DyTox, "balanced_finetuning", spy)
    run(compose([*FAST, "strategy.dytox.finetuning_epochs=1", "strategy.dytox.finetuning_shuffle=false"], data_root),
        tmp_path / "run")
    assert seen["strategy"] == seen["memory"] and len(set(seen["memory"])) > 1
    assert sorted(seen["shuffled"]) == sorted(seen["memory"]) and seen["shuffled"] != seen["memory"]
    assert compose(["experiment=dytox-cifar100"], data_root).strategy.dytox.finetuning_shuffle is False


def test_without_finetuning_the_first_task_stays_fixed(tmp_path, data_root):
    run(compose([*FAST, "strategy.dytox.finetuning_epochs=0"], data_root), tmp_path / "run")
    first, second = (RunDirectory(tmp_path / "run").load_checkpoint(i)["module"] for i in (0, 1))
    for k in ("net.tokens.0", "net.heads.0.fc.weight", "net.heads.0.norm.weight"):
        assert torch.equal(first[k], second[k]), k
    assert not torch.equal(first["net.tab.attn.q.weight"], second["net.tab.attn.q.weight"])


def test_cifar100_recipe_is_the_official_setting_and_builds_the_papers_network(data_root):
    from cl_vit.models import build_model
    from cl_vit.models.dytox import DyToxNet

    cfg = compose(["experiment=dytox-cifar100"], data_root)
    assert list(cfg.strategy) == ["replay", "dytox"] and cfg.loss.name == "bce"
    r, d = cfg.strategy.replay, cfg.strategy.dytox
    assert (r.memory_size, r.selection, r.mix, r.remainder) == (2000, "herding", "append", "none")
    assert (d.head_div, d.distillation_tau, d.auto_kd, d.finetuning_epochs) == (0.1, 1.0, True, 20)
    assert d.finetuning_lr == pytest.approx(5e-5 * cfg.data.batch_size * cfg.trainer.devices / 512)
    assert cfg.benchmark.class_order == "file:cifar100-dytox.yaml" and cfg.benchmark.n_experiences == 10
    # main.py L515-518: 5e-4 x 128 per GPU x 2 GPUs / 512; min_lr 1e-5
    assert cfg.optimizer.lr == pytest.approx(5e-4 * cfg.data.batch_size * cfg.trainer.devices / 512)
    # main.py L90-98 and L595: timm's cosine from warmup_lr 1e-6 to an absolute 1e-5, stepped after each epoch
    assert (cfg.scheduler.name, cfg.scheduler.warmup_epochs, cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == (
        "deit_cosine", 5, 1e-6, 1e-5)
    assert d.norm_eps == 1e-5  # continual/convit.py, continual/dytox.py: torch's nn.LayerNorm
    assert (cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.max_epochs) == (128, 2, 500)
    net = DyToxNet(build_model(OmegaConf.to_container(cfg.model), 100, 3, 32), 100, norm_eps=d.norm_eps)
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    assert len(net.backbone.blocks) == 5 and net.embed_dim == 384 and net.hidden_dim == 1536
    assert net.tab.attn.num_heads == 12 and net.tab.attn.q.bias is None and net.tab_from_backbone
    net.add_task(range(10))
    net.add_task(range(10, 20))
    with torch.no_grad():
        out = net.train().forward_outputs(torch.randn(2, 3, 32, 32))
    assert out["logits"].shape == (2, 100) and out["div"].shape == (2, 11) and out["pre_logits"].shape == (2, 768)
