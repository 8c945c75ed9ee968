"""APER and EASE (cl_vit/strategies/{aper,ease}.py): EASE's complement and ensemble against the official functions'
numbers, the switchable adapters, two experiences through the runner, resume, and the published recipes."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, assert_same_checkpoints, cached_runs, compose, cut_and_resume, record_steps, script_module

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit.errors import UserError
from cl_vit.module import net_outputs
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies.ease import ensemble_logits, semantic_complement

golden = script_module("golden_proto")

FAST = TINY + ["trainer.limit_train_batches=2", "benchmark.n_experiences=2"]


def over(name):
    return FAST + [f"strategy={name}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted two-experience run per strategy: ``runs(name) -> (config, data_root, folder, results)``."""
    return cached_runs(tmp_path_factory, over)


# -- EASE's math against the official functions ---------------------------------------------------------------------

#: sun-hailong/LAMDA-PILOT 2647455 (timm 0.6.13), printed by ``python scripts/golden_proto.py ease-functions
#: --official LAMDA-PILOT --timm DIR``: models/ease.py ``Learner.solve_sim_reset`` and backbone/linears.py
#: ``EaseCosineLinear.forward_reweight`` (alpha 0.1, out_dim 3) on the prototypes and features of
#: ``golden.ease_function_case`` (3 tasks of 2 classes, 3-dim subspaces), rounded to 6 decimals
OFFICIAL_COMPLETED = {  # (class, subspace) -> the synthesised prototype
    (0, 1): [0.184299, 0.102067, -0.320307], (0, 2): [0.130951, -0.627656, 0.705435],
    (1, 1): [0.001722, -0.287237, 0.381035], (1, 2): [-0.186306, -0.306095, 0.594196],
    (2, 2): [-0.714065, 0.228825, 0.409149], (3, 2): [-0.140323, -0.352702, 0.610319],
}
OFFICIAL_LOGITS = [[0.790923, 0.038405, 0.691295, -0.608693, 0.248192, -0.675892],
                   [0.423688, -0.356337, 0.442757, -0.780289, -0.127756, -0.810711],
                   [-0.383931, -0.469387, -0.184863, -0.449918, -0.406084, -0.511547],
                   [-0.760795, -0.249076, -0.688251, 0.307553, -0.448802, 0.239915]]


def test_ease_complement_and_ensemble_equal_the_official_functions():
    W, x, tasks = golden.ease_function_case()
    done = semantic_complement(W, tasks, 3)
    for (c, k), expected in OFFICIAL_COMPLETED.items():
        torch.testing.assert_close(done[c, 3 * k:3 * k + 3], torch.tensor(expected), rtol=0, atol=1e-6)
    # the real prototypes (a class's own and earlier subspaces) stay as they were
    own = torch.ones_like(W, dtype=torch.bool)
    for c, k in OFFICIAL_COMPLETED:
        own[c, 3 * k:3 * k + 3] = False
    assert torch.equal(done[own], W[own])
    task_of = torch.tensor([0, 0, 1, 1, 2, 2])
    torch.testing.assert_close(ensemble_logits(x, done, task_of, 0.1, 3), torch.tensor(OFFICIAL_LOGITS),
                               rtol=0, atol=1e-6)
    # alpha = 0: each class votes in its own subspace only
    alone = ensemble_logits(x, done, task_of, 0.0, 3)
    torch.testing.assert_close(alone[:, 4], F.cosine_similarity(x[:, 6:], done[4:5, 6:]))


def test_the_complement_follows_the_experiences_not_the_label_order():
    W, _, tasks = golden.ease_function_case()
    perm = torch.tensor([4, 0, 5, 2, 1, 3])  # stream label of each class of the contiguous case
    Wp = torch.zeros_like(W)
    Wp[perm] = W
    moved = semantic_complement(Wp, [[int(perm[c]) for c in t] for t in tasks], 3)
    torch.testing.assert_close(moved[perm], semantic_complement(W, tasks, 3))


# -- whole runs against the official code (golden trajectories, docs/recipes.md) ------------------------------------

#: printed by ``python scripts/golden_proto.py aper|ease --official LAMDA-PILOT --timm DIR`` (sun-hailong/LAMDA-PILOT
#: 2647455, timm 0.6.13; the script's docstring lists what it patches at run time): models/aper_adapter.py with
#: exps/aper_aperpter_inr.json (3 epochs) and models/ease.py with exps/ease_inr.json (2 epochs) on the golden stream of
#: 3 tasks of 2 classes, from the suite's initial weights, adapter dropout off on both sides
GOLDEN = {
    "aper": {
        "accuracy": [[1.0], [0.25, 0.75], [0.25, 0.75, 1.0]],
        # per task: the adapters, the prototypes of the seen classes (C x 2D)
        "norm": [[6.532658946432829, 13.842927927978518], [6.532658946432829, 19.58149553555142],
                 [6.532658946432829, 23.982092112944972]],
        "lr": [[0.05], [0.037500000000000006], [0.012500000000000008]],
        "loss": [0.7023442387580872, 0.7013840675354004, 0.7001879215240479],
    },
    "ease": {
        "accuracy": [[1.0], [0.25, 0.75], [0.25, 0.75, 1.0]],
        # per task: each adapter set, the prototypes of the seen classes in every subspace so far (complement included)
        "norm": [[[6.542263501058651], 9.788429232062771],
                 [[6.542263501058651, 6.5286842584530485], 19.577737646128746],
                 [[6.542263501058651, 6.5286842584530485, 6.514716044208017], 29.36261370295971]],
        "lr": [[0.05], [0.025], [0.05], [0.025], [0.05], [0.025]],
        "loss": [0.7045069932937622, 0.7036125063896179, 0.7016893029212952, 0.700072169303894, 0.6946107149124146,
                 0.6945148706436157],
    },
}


def _norm(tensors) -> float:
    return sum(float((t.double() ** 2).sum()) for t in tensors) ** 0.5


@pytest.mark.parametrize("method", ["aper", "ease"])
def test_the_whole_run_equals_lamda_pilots(method, tmp_path, monkeypatch):
    """Per step the learning rate and the loss, per task the accuracy on every seen task and the norms of the adapters
    and the prototypes: the first-session adapter training and the dual-branch prototypes of APER; EASE's adapter set
    and proxy classifier per task, its per-subspace prototypes and their semantic complement, its ensemble."""
    g = GOLDEN[method]
    base = golden.write_stream(tmp_path)
    steps = record_steps(monkeypatch)
    with golden.adapters_without_dropout():
        doc = run(compose(golden.suite_overrides(method)), tmp_path / method,
                  scenario=golden.suite_scenario(base, method))
    assert len(steps) == len(g["lr"])
    for (lrs, loss), lr, expected in zip(steps, g["lr"], g["loss"]):
        assert lrs == pytest.approx(lr, rel=1e-12, abs=0) and loss == pytest.approx(expected, rel=1e-5)
    for i, row in enumerate(g["accuracy"]):
        assert doc["accuracy_matrix"][i][: i + 1] == row
    rd = RunDirectory(tmp_path / method)
    for i, (adapters, prototypes) in enumerate(g["norm"]):
        state, seen, d = rd.load_checkpoint(i)["module"], 2 * (i + 1), golden.EMBED
        if method == "aper":
            assert _norm([v for k, v in state.items() if ".adaptmlp." in k]) == pytest.approx(adapters, rel=1e-5)
            assert _norm([state["net.head.prototypes"][:seen]]) == pytest.approx(prototypes, rel=1e-5)
        else:
            sets = [_norm([v for k, v in state.items() if f".adapters.{j}." in k]) for j in range(i + 1)]
            assert sets == pytest.approx(adapters, rel=1e-5)
            assert _norm([state["net.head.prototypes"][:seen, :(i + 1) * d]]) == pytest.approx(prototypes, rel=1e-5)


# -- the switchable modules ------------------------------------------------------------------------------------------


def _micro_vit(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_micro_patch2_8", num_classes=4).eval()


def _feats(net, x):
    return net.forward_head(net.forward_features(x), pre_logits=True)


def _randomise(net, pattern):
    with torch.no_grad():
        for n, p in net.named_parameters():
            if pattern in n:
                p.normal_(0, 0.2)


def test_modules_switch_off_to_the_pre_trained_network_and_adapter_sets_run_one_adapter():
    from cl_vit.models.petl import (add_adapter_sets, add_adaptformer, add_ssf, grow_adapters, petl_disabled,
                                    use_adapter)

    x = torch.randn(3, 1, 8, 8)
    plain = _feats(_micro_vit(), x)
    for add, pattern in ((add_ssf, ".ssf."), (add_adaptformer, ".adaptmlp.")):
        net = _micro_vit()
        add(net)
        _randomise(net, pattern)
        on = _feats(net, x)
        assert not torch.allclose(on, plain)
        with petl_disabled(net):
            assert torch.equal(_feats(net, x), plain)
        assert torch.equal(_feats(net, x), on)  # back on after the block
    # a set of adapters: adapter k runs as AdaptFormer with the same weights; none = the pre-trained network
    sets = _micro_vit()
    add_adapter_sets(sets)
    assert [grow_adapters(sets, 16) for _ in range(3)] == [0, 1, 2]
    _randomise(sets, ".adaptmlp.")
    use_adapter(sets, None)
    assert torch.equal(_feats(sets, x), plain)
    single = _micro_vit()
    add_adaptformer(single, 16)
    for k in range(3):
        with torch.no_grad():
            for b, s in zip(single.blocks, sets.blocks):
                b.adaptmlp.load_state_dict(s.adaptmlp.adapters[k].state_dict())
        use_adapter(sets, k)
        assert torch.equal(_feats(sets, x), _feats(single, x)), k
    with pytest.raises(UserError, match="already has adapters"):
        add_adaptformer(sets)
    # Refiner-ViT's blocks (residual scale 2): zero-init adapters leave the network as it was, a trained one changes it
    import timm

    torch.manual_seed(0)
    refiner = timm.create_model("refiner_vit_tiny", img_size=8, patch_size=2, in_chans=1, num_classes=4).eval()
    plain = _feats(refiner, x)
    add_adapter_sets(refiner)
    grow_adapters(refiner, 8)
    use_adapter(refiner, 0)
    assert refiner.blocks[0].residual_scale == 2 and torch.equal(_feats(refiner, x), plain)
    _randomise(refiner, ".adaptmlp.")
    assert not torch.allclose(_feats(refiner, x), plain)
    use_adapter(refiner, None)
    assert torch.equal(_feats(refiner, x), plain)


@pytest.mark.parametrize("name", ["aper", "ease"])
def test_the_frozen_backbones_batch_norms_keep_their_statistics(name):
    """Refiner-ViT's conv stem has batch norms: while the modules train they normalise with the loaded statistics
    and leave them alone, so the frozen backbone stays the pre-trained function (APER's first half of the feature,
    the stem every EASE adapter set reads)."""
    import timm

    from cl_vit.strategies import STRATEGIES
    from cl_vit.strategies.base import ExperienceInfo

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.net = timm.create_model("refiner_vit_tiny", img_size=8, patch_size=2, in_chans=1, num_classes=4)
    module.n_classes = 4
    strategy = STRATEGIES[name]()
    strategy.setup(module)
    strategy.before_experience(module, ExperienceInfo(0, 2, [0, 1], [0, 1], 4))
    norms = [m for m in module.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    stats = [m.running_mean.clone() for m in norms]
    module.net.train()
    strategy.on_fit_start(module)
    strategy.before_batch(module, {})
    assert norms and not any(m.training for m in norms)
    module.net(torch.randn(4, 1, 8, 8))
    assert all(torch.equal(m.running_mean, s) for m, s in zip(norms, stats))
    assert any(p.requires_grad for n, p in module.net.named_parameters() if ".adaptmlp." in n)


def test_bad_values_fail_in_one_line():
    from cl_vit.errors import ConfigError
    from cl_vit.strategies.aper import APER
    from cl_vit.strategies.ease import EASE

    for make in (lambda: APER(petl="vpt"), lambda: APER(adapter_bottleneck=0), lambda: EASE(alpha=-1),
                 lambda: EASE(adapter_bottleneck=1.5), lambda: EASE(statistics_transform="val")):
        with pytest.raises(ConfigError) as err:
            make()
        assert "\n" not in str(err.value)


# -- two experiences through the runner -----------------------------------------------------------------------------


def _dataset_feats(net, dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    net.eval()
    with torch.no_grad():
        parts = [(_feats(net, b[0]), b[1]) for b in loader]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_aper_adapts_in_the_first_experience_then_merges_the_two_networks(runs):
    from cl_vit.models.petl import petl_disabled

    cfg, _, root, doc = runs("aper")
    _, scenario, info, module, _ = build(cfg)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    first_cost, second_cost = doc["cost"]["per_experience"]
    trained = [p for n, p in module.net.named_parameters()
               if ".adaptmlp." in n or n in ("head.weight", "head.scale")]
    assert first_cost["params_trainable"] == sum(p.numel() for p in trained) > 0
    assert second_cost["params_trainable"] == 0  # the runner skipped the fit
    rd = RunDirectory(root / "whole")
    first, second = rd.load_checkpoint(0)["module"], rd.load_checkpoint(1)["module"]
    for k, v in init.items():  # the adapters and the first-session classifier trained, nothing else
        if k not in ("head.prototypes", "head.merged"):
            assert (not torch.equal(first[f"net.{k}"], v)) == (".adaptmlp." in k or k in ("head.weight",
                                                                                          "head.scale")), k
            assert torch.equal(second[f"net.{k}"], first[f"net.{k}"]), k
    module.load_state_dict(second)
    net, head = module.net, module.net.head
    assert bool(head.merged) and head.prototypes.shape == (info.n_classes, 2 * net.num_features)
    for i, exp in enumerate(scenario.train_stream):  # prototype = mean of cat([pre-trained, adapted])
        adapted, labels = _dataset_feats(net, exp.dataset)
        with petl_disabled(net):
            base, _ = _dataset_feats(net, exp.dataset)
        both = torch.cat([base, adapted], 1)
        for c in info.train_classes[i]:
            torch.testing.assert_close(head.prototypes[c], both[labels == c].mean(0), rtol=1e-5, atol=1e-6)
    x = scenario.test_stream[0].dataset[0][0][None]
    with torch.no_grad():
        out = net_outputs(net, x)
        with petl_disabled(net):
            base = _feats(net, x)
        torch.testing.assert_close(out["pre_logits"], torch.cat([base, _feats(net, x)], 1))
        torch.testing.assert_close(module(x), F.linear(F.normalize(out["pre_logits"]), F.normalize(head.prototypes)))


def test_ease_grows_an_adapter_set_per_experience_and_completes_old_prototypes(runs):
    from cl_vit.models.petl import use_adapter

    cfg, _, root, doc = runs("ease")
    assert cfg.loss.mask_old_logits is True  # the proxy classifier's cross-entropy over the experience's classes
    _, scenario, info, module, _ = build(cfg)
    rd = RunDirectory(root / "whole")
    first, second = rd.load_checkpoint(0), rd.load_checkpoint(1)
    assert second["strategies"]["ease"] == {"tasks": [sorted(c) for c in info.train_classes], "adapters": 2}
    module.net.ease_subspace = None
    strategy = module.strategies[0]
    strategy.load_state_dict(second["strategies"]["ease"])  # regrows the two adapter sets, then the weights load
    module.load_state_dict(second["module"])
    net, head, d = module.net, module.net.head, module.net.num_features
    one_set = sum(p.numel() for n, p in net.named_parameters() if ".adaptmlp.adapters.0." in n)
    c0, c1 = doc["cost"]["per_experience"]
    # the network grows by one adapter set; each experience trains one set and the proxy classifier
    assert c1["params_total"] - c0["params_total"] == one_set > 0
    assert c0["params_trainable"] == c1["params_trainable"] == one_set + head.weight.numel() + 1
    for k, v in first["module"].items():  # experience 2 left the pre-trained weights and adapter set 0 as they were
        if k.startswith("net.") and not k.startswith("net.head."):
            assert torch.equal(second["module"][k], v), k
    assert any(not torch.equal(v, second["module"][k.replace("adapters.1", "adapters.0")])
               for k, v in second["module"].items() if ".adapters.1." in k)
    # new classes: the mean feature under every adapter; old classes: the complement in the new subspace
    feats = {}
    for i, exp in enumerate(scenario.train_stream):
        for k in range(2):
            use_adapter(net, k)
            feats[i, k] = _dataset_feats(net, exp.dataset)
    use_adapter(net, None)
    P = torch.zeros(info.n_classes, 2 * d)
    for i, classes in enumerate(info.train_classes):
        for k in range(i + 1):
            f, labels = feats[i, k]
            for c in classes:
                P[c, k * d:(k + 1) * d] = f[labels == c].mean(0)
    expected = semantic_complement(P, [sorted(c) for c in info.train_classes], d)
    torch.testing.assert_close(head.prototypes, expected, rtol=1e-5, atol=1e-6)
    old = info.train_classes[0]
    assert head.prototypes[old, d:].abs().sum() > 0 and torch.equal(head.task_of[old], torch.zeros(len(old)).long())
    # evaluation: both adapters' features concatenated, the reweighted ensemble
    x = scenario.test_stream[1].dataset[0][0][None]
    net.eval()
    with torch.no_grad():
        cat = torch.cat([feats_of(net, x, k) for k in range(2)], 1)
        torch.testing.assert_close(module(x), ensemble_logits(cat, head.prototypes, head.task_of, 0.1, d))


def feats_of(net, x, k):
    from cl_vit.models.petl import use_adapter

    use_adapter(net, k)
    try:
        return _feats(net, x)
    finally:
        use_adapter(net, None)


@pytest.mark.parametrize("name", ["aper", "ease"])
def test_resume_reproduces_an_uninterrupted_run(name, runs, tmp_path, monkeypatch):
    _, data_root, root, whole = runs(name)
    resumed = cut_and_resume(monkeypatch, over(name), data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_checkpoints(root / "whole", tmp_path / "cut")
    torch.load(RunDirectory(tmp_path / "cut").checkpoint_path(1), weights_only=True)


# -- the published recipes -----------------------------------------------------------------------------------------

#: recipe -> (experiences, pretrained tag, lr, weight decay, batch, epochs, petl / alpha): LAMDA-PILOT exps/*.json
RECIPES = {
    "aper-cifar100": (10, "augreg_in21k_ft_in1k", 0.01, 5e-4, 48, 20),
    "aper-imagenet-r": (10, "augreg_in21k_ft_in1k", 0.05, 5e-3, 16, 10),
    "ease-cifar100": (20, "augreg_in21k_ft_in1k", 0.025, 5e-4, 48, 20),
    "ease-imagenet-r": (10, "augreg_in21k_ft_in1k", 0.05, 5e-3, 16, 20),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_carry_the_official_values(recipe):
    n_exp, tag, lr, wd, batch, epochs = RECIPES[recipe]
    cfg = compose([f"experiment={recipe}"])
    assert cfg.benchmark.n_experiences == n_exp and cfg.benchmark.class_order == "numpy:1993"
    assert (cfg.model.name, cfg.model.pretrained, cfg.model.pretrained_tag) == ("vit_base_patch16_224", True, tag)
    o = cfg.optimizer
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay, o.filter_bias_and_bn) == ("sgd", lr, 0.9, False, wd,
                                                                                           False)
    assert cfg.scheduler.name == "cosine_epoch" and cfg.scheduler.min_lr_ratio == 0 and cfg.scheduler.warmup_epochs == 0
    assert (cfg.data.batch_size, cfg.data.drop_last, cfg.trainer.max_epochs) == (batch, False, epochs)
    args = cfg.benchmark.source_args
    assert (args.backend, list(args.crop_scale), args.test_interpolation) == ("pil", [0.05, 1.0], "bicubic")
    if recipe.endswith("imagenet-r"):
        assert args.split == "pilot" and args.normalize == "coda"
    else:
        assert args.test_resize == "crop"
    if recipe.startswith("aper"):
        assert cfg.strategy.aper.petl == "adaptformer" and cfg.strategy.aper.adapter_bottleneck == 64
    else:
        assert cfg.strategy.ease.alpha == 0.1 and cfg.strategy.ease.complement and cfg.loss.mask_old_logits
