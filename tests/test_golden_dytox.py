"""DyTox (cl_vit/strategies/dytox.py, cl_vit/models/dytox.py) against the official code: one step's forward and loss,
and a whole run (``OFFICIAL_RUN``, below).

The official numbers of the step (and of the exemplars iCaRL's herding picks) were printed by

    python scripts/golden_dytox.py /path/to/dytox

with github.com/arthurdouillard/dytox at 4da25c13ef34e827e5361f78dcda08811a413c74 (the official ``DyTox`` model and
``engine.forward`` with ``bce_with_logits``, the CIFAR options), on the tiny case that script's ``tiny_case`` builds.
"""
from __future__ import annotations

import numpy as np
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
LOGITS = [[0.6280275, 0.17623122, 0.11069688, 1.52574658, 0.37851584], [-0.38986897, -0.18598379, 0.1889198,
          0.77925456, -0.24244983], [0.1926197, -0.17282443, 0.1849536, 0.65734339, 0.08769248], [0.85805672,
          0.1696312, -0.43728915, 1.25595415, 0.62638533], [1.5014168, 0.43408328, -0.52043486, 0.56878585,
          0.51686132], [0.75765163, 0.48187685, -0.02856034, 0.73038799, 0.76931876]]
#: the divergence head's logits: [old, new class 1, new class 3]
DIV = [[0.00687699, 0.37160224, 0.45588601], [0.11378734, 0.05377042, 0.94123125], [-0.36719263, -0.16188911,
          0.35594591], [-0.77815217, 0.05578949, 0.58818877], [-0.81833971, 0.06254613, -0.2519924], [-0.49877781,
          -0.0026219, 0.06305439]]
#: engine.forward's (loss, kd_loss, div_loss): (1 - 3/5) * BCE, 3/5 * KL, 0.1 * BCE of the divergence head
TERMS = {"cls": 0.3449471592903137, "kd": 0.12155027687549591, "div": 0.07333844155073166}

#: continual/rehearsal.py icarl_selection on golden.herding_case()'s embeddings: the exemplars in the order picked
ICARL = [8, 24, 5, 27, 2, 21, 11, 1, 16, 29, 6, 20, 15, 25, 17, 13, 28, 10, 12, 19]


def test_forward_and_loss_equal_the_official_code():
    module, strategy, x, y = golden.tiny_case()
    with torch.no_grad():
        out, terms = golden.suite_terms(module, strategy, x, y)
    order = [c for cs in golden.TASKS for c in cs]
    # float32 kernels differ by ~1e-6 between CPUs and torch versions (the values are 0.003-1.5)
    torch.testing.assert_close(out["logits"][:, order], torch.tensor(LOGITS), rtol=0, atol=3e-6)
    assert (out["logits"][:, 5] == 0).all()  # the class no task has yet
    torch.testing.assert_close(out["div"], torch.tensor(DIV), rtol=0, atol=3e-6)
    assert terms.keys() == TERMS.keys()
    for k, v in TERMS.items():
        assert float(terms[k]) == pytest.approx(v, rel=1e-6), k
    # the teacher's classes only are distilled, the student's old tokens and classifiers are frozen
    net = module.net
    assert strategy.cls_loss_weight == pytest.approx(1 - 3 / 5)
    assert not net.tokens[0].requires_grad and not any(p.requires_grad for p in net.heads[0].parameters())
    assert net.tokens[1].requires_grad and net.head_div.fc.weight.requires_grad and net.tab.attn.q.weight.requires_grad


def test_icarl_selection_picks_the_official_exemplars_where_greedy_herding_does_not():
    from cl_vit.strategies.replay import herding_order, icarl_order

    feats, k = golden.herding_case()
    assert icarl_order(feats, k).tolist() == ICARL
    # greedy herding without repeats (Mammoth's, selection=herding) agrees on the first two picks only
    greedy = herding_order(feats / feats.norm(dim=1, keepdim=True), k).tolist()
    assert greedy[:2] == ICARL[:2] and greedy[2] != ICARL[2]
    assert compose(["strategy=dytox"]).strategy.replay.selection == "icarl"


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
        modes = [m.training for m in module.net.modules()]
        module.net.tab.eval()  # a mode of the caller's, given back as found
        finetune(self, module, experience)
        finetuned.append((experience.index, before, module.net.state_dict()))
        # the next experience's fit keeps the modes it finds: an eval-mode network would train without its
        # divergence head (the golden run's third task caught it)
        assert not module.net.tab.training
        module.net.tab.train(modes[[*module.net.modules()].index(module.net.tab)])
        assert [m.training for m in module.net.modules()] == modes

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
    assert (r.memory_size, r.selection, r.mix, r.remainder) == (2000, "icarl", "append", "none")
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


# -- the whole run against DyTox's own loop --------------------------------------------------------------------------
# The numbers below were printed by
#
#     PYTHONPATH=/tmp/dytox-deps python scripts/golden_dytox_runs.py /path/to/dytox
#
# (arthurdouillard/dytox at the commit above, continuum 1.2.4, timm 0.5.4; the script says what it changes at run
# time: .cuda(), the data files, the transforms, the model's depth, the run's length, its weight decay, memory and
# finetuning, the batch order and the starting weights). The test runs experiment=dytox-cifar100 on the same stream,
# weights and batch order and asserts per step the learning rate (1e-12) and the loss (1e-5 relative; 1.3e-7 seen at 1
# and 2 threads), which steps are finetuning steps, and at each task's end (after the finetuning) the memory (which
# training images, in its order: exactly), the correct test images per task (exactly) and the network's norm (1e-5).

OFFICIAL_RUN = {'lr': [1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05, 6.3e-05, 6.75e-05, 6.75e-05, 1e-06, 1e-06, 1e-06, 1e-06,
                       1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05, 6.3e-05, 6.3e-05, 6.3e-05, 6.75e-05, 6.75e-05, 6.75e-05,
                       6.75e-05, 0.000125, 0.000125, 1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 1e-06, 6.3e-05,
                       6.3e-05, 6.3e-05, 6.3e-05, 6.75e-05, 6.75e-05, 6.75e-05, 6.75e-05, 0.000125, 0.000125],
                'loss': [0.724324643611908, 0.7020174264907837, 0.6999374032020569, 0.7133394479751587,
                         0.712600827217102, 0.6983892917633057, 0.6745944619178772, 0.6460375189781189,
                         0.4152354598045349, 0.41291287541389465, 0.4074660539627075, 0.4208443760871887,
                         0.41515159606933594, 0.4162188470363617, 0.410449743270874, 0.4138164222240448,
                         0.41027408838272095, 0.3947460353374481, 0.3907078802585602, 0.37952810525894165,
                         0.3651335835456848, 0.36476755142211914, 0.35584408044815063, 0.3444381058216095,
                         0.5707576274871826, 0.5416330695152283, 0.2828179597854614, 0.26886704564094543,
                         0.27550020813941956, 0.2698197364807129, 0.27861979603767395, 0.2769394516944885,
                         0.26834890246391296, 0.27089977264404297, 0.2716924548149109, 0.2650701403617859,
                         0.2630271911621094, 0.24848631024360657, 0.24821707606315613, 0.24234986305236816,
                         0.2358226180076599, 0.2321721464395523, 0.523080587387085, 0.49886664748191833],
                'finetuning': [False, False, False, False, False, False, False, False, False, False, False, False,
                               False, False, False, False, False, False, False, False, False, False, False, False,
                               True, True, False, False, False, False, False, False, False, False, False, False, False,
                               False, False, False, False, False, True, True],
                'correct': [[10], [9, 5], [10, 10, 5]],
                'norm': [29.05544454358364, 30.71192883131012, 32.270631926941185],
                'memory': [[14, 29, 50, 46, 20, 52, 7, 59, 34, 42, 54, 23, 28, 16],
                           [14, 29, 50, 59, 34, 42, 33, 11, 53, 6, 48, 26],
                           [14, 29, 59, 34, 33, 11, 6, 48, 17, 47, 58, 25]]}


def suite_run(tmp_path, monkeypatch, extra=()):
    """The suite's recipe (experiment=dytox-cifar100) on the golden stream, from the same weights and batch order."""
    from test_golden_coda import record_steps
    from test_golden_gcab import stream

    import cl_vit.module
    from cl_vit.models.dytox import DyToxNet
    from cl_vit.runner import ContinualRunner
    from cl_vit.strategies.replay import Replay

    runs = script_module("golden_dytox_runs")
    m, r = runs.MODEL, runs.RUN
    scale = r["batch"] / 512  # main.py L503-508, L720: lr x batch x GPUs / 512
    over = ["experiment=dytox-cifar100", f"model.depth={m['depth']}",
            f"model.embed_dim={m['embed_dim'] // m['num_heads']}",  # timm's ConViT takes the width per head
            f"model.local_up_to_layer={m['local_up_to_layer']}",
            f"model.drop_path_rate={m['drop_path']}", f"trainer.max_epochs={r['epochs']}",
            f"scheduler.warmup_epochs={r['warmup_epochs']}", f"data.batch_size={r['batch']}",
            f"optimizer.lr={r['lr'] * scale}", f"optimizer.weight_decay={r['weight_decay']}",
            f"strategy.replay.memory_size={r['memory']}", f"strategy.dytox.finetuning_epochs={r['ft_epochs']}",
            f"strategy.dytox.finetuning_lr={r['ft_lr'] * scale}", "trainer.devices=1", "data.repeated_aug=false",
            "trainer.accelerator=cpu", "logger=none", "data.num_workers=0", "data.persistent_workers=false", "seed=0",
            *extra]
    cfg = compose(over, tmp_path / "data")
    add_task = DyToxNet.add_task

    def add(self, classes, divergence=True):
        add_task(self, classes, divergence)
        t = self.n_tasks - 1
        with torch.no_grad():
            for name, p in self.named_parameters():
                if t == 0 or name.startswith((f"tokens.{t}", f"heads.{t}.", "head_div.")):
                    p.copy_(runs.initial(name, p.shape))

    monkeypatch.setattr(DyToxNet, "add_task", add)
    steps = record_steps(monkeypatch)
    finetuning, flag = [], {"on": False}

    loss_of = cl_vit.module.classification_loss

    def classification_loss(*a, **k):
        loss = loss_of(*a, **k)
        if flag["on"]:
            finetuning.append((len(steps), float(loss.detach())))
        return loss

    monkeypatch.setattr(cl_vit.module, "classification_loss", classification_loss)
    finetune = DyTox.balanced_finetuning

    def balanced_finetuning(self, module, experience):
        flag["on"] = True
        try:
            finetune(self, module, experience)
        finally:
            flag["on"] = False

    monkeypatch.setattr(DyTox, "balanced_finetuning", balanced_finetuning)
    per = runs.STREAM["n_classes"] // runs.STREAM["tasks"]
    labels = runs.images()["train"][1]
    positions = [np.isin(labels, range(per * t, per * (t + 1))).nonzero()[0] for t in range(runs.STREAM["tasks"])]
    norms, memories = [], []

    def at_end(runner, i):
        net = runner.module.net
        norms.append(float(torch.sqrt(sum((p.detach().double() ** 2).sum() for n, p in net.named_parameters()
                                          if not n.startswith(("head_div.", "backbone.cls_token"))))))
        memory = next(s for s in runner.module.strategies if isinstance(s, Replay))
        memories.append([int(positions[e][k]) for e, k in zip(memory.exp.tolist(), memory.idx.tolist())])

    init = ContinualRunner.__init__
    monkeypatch.setattr(ContinualRunner, "__init__",
                        lambda self, *a, **k: init(self, *a, **{**k, "on_experience_end": at_end}))
    # the script's training transform mirrors every image (RandomHorizontalFlip(p=1) before Normalize: the same as
    # after), the test transform does not; the herding's view (herding_view=train) is the mirrored one
    doc = run(cfg, tmp_path / "run", scenario=stream(train_transform=lambda x: x.flip(-1)))
    # the finetuning steps in their place: after the training steps of their experience
    merged, lrs = [(lr, loss, False) for lr, loss in steps], float(cfg.strategy.dytox.finetuning_lr)
    for at, loss in reversed(finetuning):
        merged.insert(at, (lrs, loss, True))
    per_task = per * runs.STREAM["n_test"]
    correct = [[int(round(v * per_task)) for v in row[: i + 1]] for i, row in enumerate(doc["accuracy_matrix"])]
    return {"lr": [s[0] for s in merged], "loss": [s[1] for s in merged], "finetuning": [s[2] for s in merged],
            "correct": correct, "norm": norms, "memory": memories}


def test_suite_recipe_follows_the_official_run(tmp_path, data_root, monkeypatch):
    ours, theirs = suite_run(tmp_path, monkeypatch), OFFICIAL_RUN
    assert ours["finetuning"] == theirs["finetuning"]
    assert ours["memory"] == theirs["memory"]
    assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-5, atol=0)
    assert ours["correct"] == theirs["correct"]
    np.testing.assert_allclose(ours["norm"], theirs["norm"], rtol=1e-5, atol=0)
