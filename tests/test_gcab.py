"""Gated class-attention with cascaded feature drift compensation (cl_vit/models/gated.py, cl_vit/strategies/gcab.py)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import CONFIG_DIR, TINY, compose
from omegaconf import OmegaConf

import cl_vit.runner as runner_mod
from cl_vit.errors import UserError
from cl_vit.models import build_model
from cl_vit.models.gated import DriftProjector, GatedNet, sab_features
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies import STRATEGIES, register_strategy
from cl_vit.strategies.base import Strategy
from cl_vit.strategies.gcab import GCAB

#: 3 experiences (3, 3 and 4 digits) of 2 epochs of 3 batches
FAST = [*TINY, "strategy=gcab", "benchmark.n_experiences=3", "benchmark.remainder=last", "trainer.max_epochs=2",
        "trainer.limit_train_batches=3"]


def micro_net(n_tasks: int, n_classes: int = 10, seed: int = 0) -> GatedNet:
    torch.manual_seed(seed)
    net = GatedNet(build_model({"name": "vit_micro_patch2_8"}, n_classes, 1, 8), n_classes)
    per = n_classes // n_tasks
    for t in range(n_tasks):
        net.add_task(range(t * per, (t + 1) * per))
    return net


# -- the network -----------------------------------------------------------------------------------------------------

def test_cascade_applies_exactly_the_later_projectors():
    net = micro_net(4).eval()
    x = torch.randn(5, 1, 8, 8)
    calls = []
    for j, p in enumerate(net.projectors):
        p.register_forward_hook(lambda m, i, o, j=j: calls.append(j))
    with torch.no_grad():
        out = net.forward_outputs(x)
        # each projector ran once, newest first (the cascade is shared between the tokens)
        assert calls == [2, 1, 0]
        feats = sab_features(net.backbone, x)

        def token(c, patches):
            m0, m2 = net.task_masks(c, net.s_max)
            return net.cab(net.tokens[c].expand(5, -1, -1), patches, m0, m2)[:, 0]

        T = net.n_tasks
        for c in range(T):
            patches = feats
            for j in range(T - 2, c - 1, -1):  # projectors[j] is P_{j+1}: P_T first, P_{c+1} last
                patches = net.projectors[j](patches)
            assert torch.equal(out["tokens"][c], token(c, patches)), c
            if c < T - 1:  # one projector fewer gives another token: the test can fail
                short = feats
                for j in range(T - 2, c, -1):
                    short = net.projectors[j](short)
                assert not torch.allclose(out["tokens"][c], token(c, short), atol=1e-4)
    calls.clear()
    net.train()
    net.forward_outputs(x)
    assert calls == []  # as the official code: projectors are applied at inference only


def test_inference_needs_no_task_id_and_covers_all_seen_classes():
    net = micro_net(2, n_classes=6).eval()  # tasks {0,1,2} and {3,4,5}
    assert list(inspect.signature(net.forward_outputs).parameters) == ["x", "cascade"]
    with torch.no_grad():
        out = net.forward_outputs(torch.randn(7, 1, 8, 8))
        heads = [net.heads[c](out["tokens"][c]) for c in range(2)]
    assert out["logits"].shape == (7, 6)
    assert torch.equal(out["logits"][:, :3], heads[0]) and torch.equal(out["logits"][:, 3:], heads[1])


def test_past_tasks_use_only_the_weights_their_binary_masks_claim():
    net = micro_net(3).eval()
    x = torch.randn(4, 1, 8, 8)
    m0, m2 = net.task_masks(0, net.s_max)
    assert set(m0.unique().tolist()) <= {0.0, 1.0} and 0 < m0.sum() < m0.numel()
    claimed = net.claimed(m0, m2)
    params = dict(net.named_parameters())
    with torch.no_grad():
        before = net.forward_outputs(x, cascade=False)["tokens"]
        for name, keep in claimed.items():  # scramble everything task 0 does not claim
            params[name].add_(torch.randn_like(params[name]) * (1 - keep))
        after = net.forward_outputs(x, cascade=False)["tokens"]
        assert torch.equal(before[0], after[0])
        assert not torch.allclose(before[2], after[2])  # the current task's soft masks read them
        name = "cab.mlp.fc1.weight"
        i, j = (claimed[name] == 1).nonzero()[0].tolist()
        params[name][i, j] += 1.0
        assert not torch.equal(before[0], net.forward_outputs(x, cascade=False)["tokens"][0])


def test_image_projector_norm_is_the_official_joint_layernorm():
    """projector_norm=image equals main.py's Conv2d 1x1 -> LayerNorm((D, 1, N)) -> ReLU -> Conv2d 1x1 on (B, D, 1, N)."""
    torch.manual_seed(0)
    D, N = 8, 5
    ours = DriftProjector(D, n_tokens=N)
    with torch.no_grad():  # non-trivial affine weights, so a transposed (token, channel) layout would show
        ours[1].weight.copy_(torch.rand(N, D) + 0.5)
        ours[1].bias.copy_(torch.randn(N, D))
    official = torch.nn.Sequential(torch.nn.Conv2d(D, D, 1), torch.nn.LayerNorm((D, 1, N)), torch.nn.ReLU(),
                                   torch.nn.Conv2d(D, D, 1))
    with torch.no_grad():
        for i in (0, 3):
            official[i].weight.copy_(ours[i].weight.view(D, D, 1, 1))
            official[i].bias.copy_(ours[i].bias)
        official[1].weight.copy_(ours[1].weight.t().reshape(D, 1, N))
        official[1].bias.copy_(ours[1].bias.t().reshape(D, 1, N))
    x = torch.randn(3, N, D) * torch.linspace(0.1, 3, N).view(1, N, 1)  # tokens of different norms
    with torch.no_grad():
        ref = official(x.permute(0, 2, 1).unsqueeze(2)).squeeze(2).permute(0, 2, 1)  # the official permutes
        torch.testing.assert_close(ours(x), ref)
        # the per-token default normalises each token alone: scaling one token leaves the others' outputs unchanged
        token = DriftProjector(D)
        y = x.clone()
        y[:, 0] *= 10
        assert torch.allclose(token(x)[:, 1:], token(y)[:, 1:], atol=1e-5)
        assert not torch.allclose(ours(x)[:, 1:], ours(y)[:, 1:], atol=1e-3)
    # through the strategy: the projectors of a grown GatedNet take the backbone's patch count
    net = GatedNet(build_model({"name": "vit_micro_patch2_8"}, 4, 1, 8), 4, projector_norm="image")
    net.add_task([0, 1])
    net.add_task([2, 3])
    assert net.projectors[0][1].normalized_shape == (16, net.embed_dim)
    with pytest.raises(UserError, match="strategy.gcab.projector_norm"):
        GCAB(projector_norm="channel")


def test_non_vit_backbone_and_bad_values_fail_in_one_line():
    with pytest.raises(UserError, match="needs a ViT backbone"):
        GatedNet(torch.nn.Linear(3, 3), 10)
    with pytest.raises(UserError, match="strategy.gcab.s_max"):
        GCAB(s_max=0.5)
    with pytest.raises(UserError, match="strategy.gcab.lambda_pfr"):
        GCAB(lambda_pfr=-1)


# -- a real stream: gradient masking, the projector, resume ----------------------------------------------------------

class _Probe(Strategy):
    """Composed after gcab: records s per batch and the projector P_t as initialised."""

    name = "gcab_probe"
    records: dict = {}

    def before_experience(self, module, experience):
        if experience.index == 1:
            self.records["p_init"] = {k: v.clone() for k, v in module.net.projectors[-1].state_dict().items()}

    def before_batch(self, module, batch):
        self.records.setdefault("s", []).append((module.trainer.current_epoch, module.net.s))
        return batch


@pytest.fixture(scope="module")
def gcab_run(tmp_path_factory):
    if _Probe.name not in STRATEGIES:
        register_strategy(_Probe)
    _Probe.records = {}
    root = tmp_path_factory.mktemp("gcab")
    data_root = root / "data"
    data_root.mkdir()
    cfg = compose([*FAST, "+strategy.gcab_probe={}"], data_root)
    doc = run(cfg, root / "run")
    records = {"s": list(_Probe.records["s"]), "p_init": _Probe.records["p_init"]}
    return cfg, root, doc, records


def _state(root: Path, i: int) -> dict:
    return RunDirectory(root).load_checkpoint(i)["module"]


def test_s_is_annealed_over_each_epoch(gcab_run):
    s = gcab_run[3]["s"]
    smax = 800.0
    assert len(s) == 3 * 2 * 3
    for k in range(0, len(s), 3):  # 3 batches per epoch: 1/smax, then linear towards smax
        epoch = [v for _, v in s[k:k + 3]]
        assert epoch == pytest.approx([1 / smax, (smax - 1 / smax) / 3 + 1 / smax, 2 * (smax - 1 / smax) / 3 + 1 / smax])


def test_weights_claimed_by_task_1_are_bit_identical_after_task_2(gcab_run):
    root = gcab_run[1] / "run"
    first, second, last = _state(root, 0), _state(root, 1), _state(root, 2)
    m0 = (torch.sigmoid(800 * first["net.e0.0"]) > 0.5).float()
    m2 = (torch.sigmoid(800 * first["net.e2.0"]) > 0.5).float()
    assert torch.equal(first["net.mask_pre0"], m0) and torch.equal(first["net.mask_pre2"], m2)
    views = micro_net(1).cab.gated_parameters(m0, m2)
    changed_free = 0
    for name, view in views.items():
        key = f"net.cab.{name}"
        claimed = view.bool()
        assert claimed.any()
        assert torch.equal(first[key][claimed], second[key][claimed]), key
        assert torch.equal(first[key][claimed], last[key][claimed]), key
        changed_free += int((first[key][~claimed] != second[key][~claimed]).sum())
    assert changed_free > 0  # what task 1 left free did train
    assert not torch.equal(first["net.backbone.blocks.0.attn.qkv.weight"], second["net.backbone.blocks.0.attn.qkv.weight"])
    # the old task's token and head were frozen, its SAB norms too
    assert torch.equal(first["net.tokens.0"], last["net.tokens.0"])
    assert torch.equal(first["net.heads.0.fc.weight"], last["net.heads.0.fc.weight"])
    assert torch.equal(second["net.backbone.blocks.0.norm1.weight"], last["net.backbone.blocks.0.norm1.weight"])


def test_projector_moves_new_features_towards_old_ones_on_held_out_data(gcab_run):
    cfg, root, _, records = gcab_run
    _, scenario, _, _, _ = build(cfg)
    x = torch.stack([scenario.test_stream[j].dataset[i][0] for j in (0, 1) for i in range(40)])

    def backbone(i):
        net = micro_net(1)
        prefix = "net.backbone."
        net.backbone.load_state_dict({k[len(prefix):]: v for k, v in _state(root / "run", i).items()
                                      if k.startswith(prefix)})
        return net.backbone.eval()

    with torch.no_grad():
        old, new = sab_features(backbone(0), x), sab_features(backbone(1), x)
        projector = micro_net(2).projectors[0]
        state = _state(root / "run", 1)
        projector.load_state_dict(records["p_init"])
        before = torch.linalg.vector_norm(old - projector(new))
        projector.load_state_dict({k[len("net.projectors.0."):]: v for k, v in state.items()
                                   if k.startswith("net.projectors.0.")})
        after = torch.linalg.vector_norm(old - projector(new))
    assert after < 0.9 * before
    # and it was frozen afterwards
    assert torch.equal(state["net.projectors.0.0.weight"], _state(root / "run", 2)["net.projectors.0.0.weight"])


class _Stop(Exception):
    pass


def test_masks_and_projectors_survive_resume(gcab_run, monkeypatch):
    cfg, root, doc, _ = gcab_run
    run_dir = root / "resumed"
    report = runner_mod.ContinualRunner._report

    def stop_after_second(self, i):
        report(self, i)
        if i == 1:
            raise _Stop

    monkeypatch.setattr(runner_mod.ContinualRunner, "_report", stop_after_second)
    with pytest.raises(_Stop):
        run(cfg, run_dir)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"
    monkeypatch.setattr(runner_mod.ContinualRunner, "_report", report)
    resumed = run(OmegaConf.merge(cfg, {"resume": str(run_dir)}), run_dir)
    assert resumed["accuracy_matrix"] == doc["accuracy_matrix"]
    a, b = _state(root / "run", 2), _state(run_dir, 2)
    assert a.keys() == b.keys()
    assert {"net.projectors.1.3.weight", "net.mask_pre0", "net.e0.2", "net.heads.2.fc.bias"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- every bundled benchmark and the CIFAR-100 recipe ----------------------------------------------------------------

@pytest.mark.parametrize("benchmark", ["synthetic", "digits-lt"])
def test_gcab_runs_on_the_other_bundled_benchmarks(benchmark, tmp_path, data_root):
    cfg = compose([*TINY, "strategy=gcab", f"benchmark={benchmark}", "trainer.limit_train_batches=2"], data_root)
    doc = run(cfg, tmp_path / "run")
    assert len(doc["accuracy_matrix"]) == cfg.benchmark.n_experiences
    assert cfg.loss.name == "bce"


def test_cifar100_recipe_builds_the_papers_network(data_root):
    recipe = OmegaConf.load(CONFIG_DIR / "experiment" / "gcab-cifar100.yaml")
    if (CONFIG_DIR / "benchmark" / "cifar100.yaml").exists():
        cfg = compose(["experiment=gcab-cifar100"], data_root)
        assert cfg.benchmark.class_order == "file:cifar100-dytox.yaml" and cfg.benchmark.n_experiences == 10
    else:  # the benchmark arrives with the datasets issue: compose the recipe's model and training part alone
        cfg = compose(["strategy=gcab"], data_root)
        OmegaConf.set_struct(cfg, False)
        cfg = OmegaConf.merge(cfg, {k: recipe[k] for k in ("model", "trainer", "data", "optimizer", "scheduler")})
    assert list(cfg.strategy) == ["gcab"] and cfg.loss.name == "bce"
    assert (cfg.optimizer.lr, cfg.data.batch_size, cfg.trainer.max_epochs) == (1.25e-4, 128, 500)
    net = GatedNet(build_model(OmegaConf.to_container(cfg.model), 100, 3, 32), 100)
    assert len(net.backbone.blocks) == 5 and net.embed_dim == 384 and net.hidden_dim == 1536
    assert net.cab.attn.num_heads == 12 and net.cab.attn.q.bias is None and net.cab_from_backbone
    net.add_task(range(10))
    with torch.no_grad():
        out = net.eval().forward_outputs(torch.randn(2, 3, 32, 32))
    assert out["sab"].shape == (2, 64, 384) and out["logits"].shape == (2, 100)


def test_probe_reads_the_projectors_as_the_runs_evaluation_does(gcab_run):
    from cl_vit.experiments.gcab_probe import probe

    _, root, doc, _ = gcab_run
    rows = probe(root / "run")
    local = doc["task_incremental"]["accuracy_matrix"]
    assert [r["t"] for r in rows] == [2, 3]
    for r in rows:
        t = r["t"] - 1  # 0-based experience whose projector P_t is probed, task t-1's head
        # task t-1 through P_t is what inference ran after experience t; on F_{t-1} what it ran after t-1
        assert r["acc_projected"] == pytest.approx(local[t][t - 1], abs=1e-6)
        assert r["acc_exact"] == pytest.approx(local[t - 1][t - 1], abs=1e-6)
        assert 0 < r["projector"] and 0 < r["mean"] <= 1 and r["drift"] > 0


def test_default_stream_sizes_the_projector_and_mask_losses_and_the_recipes_keep_the_official_ones(data_root):
    # split-digits: the drift projector must keep up with a backbone trained from scratch (docs/strategies.md)
    gcab = compose(["strategy=gcab"], data_root).strategy.gcab
    assert (gcab.lambda_pfr, gcab.lambda_mask) == (0.03, 0.5)
    assert compose(["strategy=gcab", "benchmark.strategy_args.gcab.lambda_pfr=0.1"]).strategy.gcab.lambda_pfr == 0.1
    for over in (["experiment=gcab-split-fmnist", "strategy=gcab"], ["strategy=gcab", "benchmark=synthetic"]):
        gcab = compose(over, data_root).strategy.gcab
        assert (gcab.lambda_pfr, gcab.lambda_mask) == (0.001, 0.05)  # options/model/cifar_GCAB_FDC.yaml
    if (CONFIG_DIR / "benchmark" / "cifar100.yaml").exists():
        assert compose(["experiment=gcab-cifar100"], data_root).strategy.gcab.lambda_pfr == 0.001
