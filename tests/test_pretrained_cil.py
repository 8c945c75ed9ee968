"""Classifier-statistics methods for pre-trained ViTs: SimpleCIL, RanPAC, SLCA (cl_vit/strategies/{simplecil,ranpac,
slca}.py): their math on hand-computed cases, two experiences through the runner, resume, and the embeddings that
every process of a DDP run shares."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_ANY_MODEL, assert_same_checkpoints, cached_runs, compose, cut_and_resume

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit import distributed
from cl_vit.errors import UserError
from cl_vit.module import net_outputs
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies import build_strategies
from cl_vit.strategies.base import ExperienceInfo
from cl_vit.strategies.embeddings import experience_embeddings, interleave
from cl_vit.strategies.ranpac import RIDGES, choose_ridge, ridge_solution
from cl_vit.strategies.simplecil import CosinePrototypeHead, class_means
from cl_vit.strategies.slca import class_gaussians, normalised_logits

FAST = TINY + ["trainer.limit_train_batches=2", "benchmark.n_experiences=2"]
SMALL = {"simplecil": [], "ranpac": ["strategy.ranpac.M=16"], "slca": ["strategy.slca.samples_per_class=8"]}


def over(name):
    return FAST + [f"strategy={name}", *SMALL[name]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted two-experience run per strategy, shared by the tests that read it and the resume test:
    ``runs(name) -> (config, data_root, folder, results)``."""
    return cached_runs(tmp_path_factory, over)


# -- the math on hand-computed cases ---------------------------------------------------------------------------------


def test_prototypes_are_class_means_and_the_classifier_is_cosine():
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    means = class_means(feats, labels, [0, 1, 3])
    assert sorted(means) == [0, 1]  # class 3 has no images: no prototype
    torch.testing.assert_close(means[0], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(means[1], torch.tensor([0.0, 3.0]))
    head = CosinePrototypeHead(2, 3)
    head.prototypes[0], head.prototypes[1] = means[0], means[1]
    logits = head(torch.tensor([[2.0, 1.0], [-1.0, 0.0]]))
    s5 = 5 ** 0.5
    torch.testing.assert_close(logits, torch.tensor([[2 / s5, 1 / s5, 0.0], [-1.0, 0.0, 0.0]]))


def test_ridge_solution_hand_case_and_normal_equations():
    G = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    Q = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    # (G + I)^-1 Q = diag(2/3, 4/5), and W is its transpose
    torch.testing.assert_close(ridge_solution(G, Q, 1.0), torch.tensor([[2 / 3, 0.0], [0.0, 0.8]]))
    torch.manual_seed(0)
    H, Y = torch.randn(30, 5, dtype=torch.float64), F.one_hot(torch.randint(0, 3, (30,)), 3).double()
    W = ridge_solution(H.T @ H, H.T @ Y, 0.5)
    # the minimiser of ||H W^T - Y||^2 + 0.5 ||W||^2: its gradient vanishes
    torch.testing.assert_close(H.T @ (H @ W.T - Y) + 0.5 * W.T, torch.zeros(5, 3, dtype=torch.float64))


def test_ridge_choice_is_the_least_validation_mse_on_an_80_20_split():
    gen = torch.Generator().manual_seed(0)
    H = torch.randn(50, 6, generator=gen)
    A = torch.randn(6, 4, generator=gen)
    # labels independent of the features: shrinking to zero predicts best, so the largest ridges win
    noise = F.one_hot(torch.randint(0, 4, (50,), generator=gen), 4).float()
    assert choose_ridge(H, noise) >= 1.0
    # an exact linear map: the smallest ridge fits it best
    assert choose_ridge(H, H @ A) <= 1e-4
    # against a direct computation of every candidate
    for Y in (noise, H @ A + 0.3 * torch.randn(50, 4, generator=gen)):
        n = int(50 * 0.8)
        errors = []
        for r in RIDGES:
            W = np.linalg.solve(H[:n].T.numpy() @ H[:n].numpy() + r * np.eye(6), H[:n].T.numpy() @ Y[:n].numpy())
            errors.append(np.mean((H[n:].numpy() @ W - Y[n:].numpy()) ** 2))
        assert choose_ridge(H, Y) == RIDGES[int(np.argmin(errors))]


def test_slca_gaussians_and_logit_normalisation():
    torch.manual_seed(0)
    feats, labels = torch.randn(20, 3), torch.tensor([0] * 8 + [1] * 12)
    stats = class_gaussians(feats, labels, [0, 1], eps=1e-4)
    for c in (0, 1):
        v = feats[labels == c].double().numpy()
        np.testing.assert_allclose(stats[c][0].numpy(), v.mean(0))
        np.testing.assert_allclose(stats[c][1].numpy(), np.cov(v.T) + 1e-4 * np.eye(3), rtol=1e-6)
    with pytest.raises(UserError, match="at least 2 training images of class 2"):
        class_gaussians(feats, torch.tensor([2] + [0] * 19), [2])
    logits = torch.tensor([[3.0, 4.0, 0.0, 1.0]])
    # groups {0,1} and {2,3}: norms 5 and 1, mean 3; then / 0.1
    torch.testing.assert_close(normalised_logits(logits, [[0, 1], [2, 3]], 0.1),
                               logits / (3 + 1e-7) / 0.1)


def test_interleave_restores_dataset_order_from_ranked_shares():
    rows = np.arange(7)[:, None] * np.ones((1, 2))
    shares = [rows[r::3] for r in range(3)]  # Lightning's unrepeated sampler: rank r gets r, r + 3, ...
    np.testing.assert_array_equal(interleave(shares), rows)
    with pytest.raises(RuntimeError, match="process 0 embedded 4 of 5 images; expected 3"):
        interleave([rows[0::2], rows[1:2]])  # a share that does not come from that sampler


def test_bad_values_fail_in_one_line():
    for cfg in ({"ranpac": {"M": -1}}, {"ranpac": {"ridges": []}}, {"slca": {"ca_epochs": 1.5}},
                {"slca": {"logit_norm": 0}}, {"ranpac": {"nope": 1}}):
        with pytest.raises(UserError) as e:
            build_strategies(cfg)
        assert "\n" not in str(e.value) and "strategy" in str(e.value)


# -- through the runner ----------------------------------------------------------------------------------------------


def _embeddings(module, dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    module.net.eval()
    with torch.no_grad():
        parts = [(net_outputs(module.net, b[0])["pre_logits"], b[1]) for b in loader]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_simplecil_trains_nothing_and_its_prototypes_are_the_class_means(runs):
    cfg, _, root, doc = runs("simplecil")
    _, scenario, info, module, _ = build(cfg)
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    # cost: nothing trainable, every parameter counted, the prototypes counted as state
    n_params = sum(p.numel() for p in module.parameters())
    for c in doc["cost"]["per_experience"]:
        assert c["params_trainable"] == 0 and c["params_total"] == n_params
        assert c["state_numel"] >= module.net.head.prototypes.numel() and c["host_peak_rss_bytes"] > 0
    assert doc["cost"]["params_trainable"] == 0 and doc["cost"]["peak_memory"] > 0
    from cl_vit.report import markdown_table

    table = markdown_table([root / "whole"]).splitlines()
    assert table[0].endswith("| trainable | params | peak mem. |")
    assert table[2].split("|")[-4:-2] == [" 0 ", f" {n_params / 1e3:.1f}k "]
    after = RunDirectory(root / "whole").load_checkpoint(1)["module"]
    for k, v in before.items():
        if k != "head.prototypes":
            assert torch.equal(after[f"net.{k}"], v), k
    module.net.load_state_dict({k[4:]: v for k, v in after.items() if k.startswith("net.")})
    for i, exp in enumerate(scenario.train_stream):
        feats, labels = _embeddings(module, exp.dataset)
        for c in info.train_classes[i]:
            torch.testing.assert_close(after["net.head.prototypes"][c], feats[labels == c].mean(0))


def test_ranpac_accumulates_the_gram_matrix_and_solves_the_ridge(runs):
    cfg, _, root, doc = runs("ranpac")
    _, scenario, info, module, _ = build(cfg)
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    # cost: the first session trains the SSF modules and the cosine classifier, later experiences nothing; G and Q
    # are strategy state
    first_cost, second_cost = doc["cost"]["per_experience"]
    trained = {n: p for n, p in module.net.named_parameters() if ".ssf." in n or n.startswith("head.")}
    assert first_cost["params_trainable"] == sum(p.numel() for p in trained.values()) > 0
    assert second_cost["params_trainable"] == 0
    d = module.net.num_features
    assert second_cost["state_numel"] >= 16 * 16 + 16 * info.n_classes + d * 16
    rd = RunDirectory(root / "whole")
    first, second = rd.load_checkpoint(0), rd.load_checkpoint(1)
    # the first session trained the SSF modules and nothing else of the backbone; the second trained nothing
    for k, v in init.items():
        if not k.startswith("head."):
            changed = not torch.equal(first["module"][f"net.{k}"], v)
            assert changed == (".ssf." in k), k
    for k, v in first["module"].items():
        if k.startswith("net.") and k != "net.head.rp_weight":  # the network (the class masks grow)
            assert torch.equal(second["module"][k], v), k
    module.load_state_dict(second["module"])
    head = module.net.head
    H, Y = [], []
    for exp in scenario.train_stream:
        feats, labels = _embeddings(module, exp.dataset)
        H.append(F.relu(feats @ head.W_rand))
        Y.append(F.one_hot(labels, info.n_classes).float())
    state = second["strategies"]["ranpac"]
    H1, Y1 = H[0], Y[0]
    torch.testing.assert_close(first["strategies"]["ranpac"]["G"], H1.T @ H1, rtol=1e-4, atol=1e-3)
    H, Y = torch.cat(H), torch.cat(Y)
    torch.testing.assert_close(state["G"], H.T @ H, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(state["Q"], H.T @ Y, rtol=1e-4, atol=1e-3)
    assert len(state["ridges"]) == 2 and all(r in RIDGES for r in state["ridges"])
    torch.testing.assert_close(head.rp_weight, ridge_solution(state["G"], state["Q"], state["ridges"][1]))
    # the evaluated logits are ReLU(f W_rand) W^T
    x = scenario.test_stream[0].dataset[0][0][None]
    with torch.no_grad():
        f = net_outputs(module.net, x)["pre_logits"]
        torch.testing.assert_close(module(x), F.relu(f @ head.W_rand) @ head.rp_weight.T)


def test_slca_slow_backbone_frozen_old_rows_and_alignment(runs):
    cfg, _, root, doc = runs("slca")
    _, _, info, module, _ = build(cfg)
    module.scheduler_cfg = {"name": "constant"}
    opt = module.configure_optimizers()
    lr = module.optimizer_cfg["lr"]
    head_ids = {id(p) for p in module.net.head.parameters()}
    for g in opt.param_groups:
        expected = lr if all(id(p) in head_ids for p in g["params"]) else 0.01 * lr
        assert not any(id(p) in head_ids for p in g["params"]) or expected == lr
        assert g["lr"] == pytest.approx(expected)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.net.parameters()))
    assert cfg.loss.mask_old_logits is True

    costs = doc["cost"]["per_experience"]
    d = module.net.num_features
    # the class Gaussians grow the state by d + d^2 per new class
    assert costs[1]["state_numel"] - costs[0]["state_numel"] >= len(info.train_classes[1]) * (d + d * d)
    rd = RunDirectory(root / "whole")
    first, second = rd.load_checkpoint(0)["strategies"]["slca"], rd.load_checkpoint(1)
    old = info.train_classes[0]
    state = second["strategies"]["slca"]
    # the old classes' rows were frozen while experience 2 trained (from the classifier before alignment)
    for k in ("weight", "bias"):
        assert torch.equal(state["head_before_ca"][k][old], first["head_before_ca"][k][old])
        assert not torch.equal(state["head_before_ca"][k][info.train_classes[1]],
                               first["head_before_ca"][k][info.train_classes[1]])
    # alignment moved the evaluated classifier away from the backup; the first experience has no alignment
    assert not torch.equal(second["module"]["net.head.weight"], state["head_before_ca"]["weight"])
    assert torch.equal(rd.load_checkpoint(0)["module"]["net.head.weight"], first["head_before_ca"]["weight"])
    assert sorted(state["means"]) == sorted(info.train_classes[0] + info.train_classes[1])
    assert state["tasks"] == [sorted(c) for c in info.train_classes]
    assert all(c.shape == (d, d) and c.dtype == torch.float32 for c in state["covs"].values())


@pytest.mark.parametrize("name", ["simplecil", "ranpac", "slca"])
def test_resume_reproduces_an_uninterrupted_run(name, runs, tmp_path, monkeypatch):
    _, data_root, root, whole = runs(name)
    resumed = cut_and_resume(monkeypatch, over(name), data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_checkpoints(root / "whole", tmp_path / "cut")
    # the strategy state is plain tensors and types: loadable without running code
    torch.load(RunDirectory(tmp_path / "cut").checkpoint_path(1), weights_only=True)
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["completed_experiences"] == 2


def test_embeddings_are_gathered_in_dataset_order_across_processes(monkeypatch):
    """Two ranks' shares, as Lightning's unrepeated sampler deals them, give every rank the one-process matrix."""
    torch.manual_seed(0)
    import timm

    net = timm.create_model("vit_micro_patch2_8", num_classes=4)
    module = torch.nn.Module()
    module.net = net
    data = torch.utils.data.TensorDataset(torch.randn(7, 1, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    whole = torch.utils.data.DataLoader(data, batch_size=3)

    def loader(rank, world):
        return lambda **kw: torch.utils.data.DataLoader(torch.utils.data.Subset(data, range(rank, 7, world)),
                                                        batch_size=2)

    exp = ExperienceInfo(0, 1, [0, 1, 2, 3], [0, 1, 2, 3], 4, train_loader=lambda **kw: whole)
    single = experience_embeddings(module, exp)
    shares = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "all_gather_object", lambda v: shares.append(v) or [v])
        exp.train_loader = loader(rank, 2)
        experience_embeddings(module, exp)
    monkeypatch.setattr(distributed, "all_gather_object", lambda v: shares)
    gathered = experience_embeddings(module, exp)
    torch.testing.assert_close(gathered[0], single[0])
    assert torch.equal(gathered[1], single[1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ranpac", "simplecil"])
def test_ddp_statistics_equal_a_one_process_run(name, tmp_path, data_root):
    """trainer=ddp on 2 CPU processes (gloo): RanPAC's Gram matrix, ridge choice and classifier, and SimpleCIL's
    prototypes, computed from the gathered embeddings, equal those of one process (the runner also checks that both
    ranks hold the same state). Neither trains its backbone here, so one process sees the same network."""
    from conftest import run_ddp

    args = [*over(name), *(["strategy.ranpac.first_session=false"] if name == "ranpac" else [])]
    run_ddp(args, tmp_path / "ddp", data_root)
    run(compose(args, data_root), tmp_path / "one")
    for i in (0, 1):
        a, b = RunDirectory(tmp_path / "ddp").load_checkpoint(i), RunDirectory(tmp_path / "one").load_checkpoint(i)
        if name == "simplecil":  # every class mean of the seen classes, and the untouched backbone
            assert a["module"].keys() == b["module"].keys()
            for k in a["module"]:
                torch.testing.assert_close(a["module"][k], b["module"][k], rtol=1e-5, atol=1e-6, msg=k)
            assert a["module"]["net.head.prototypes"].abs().sum() > 0
            continue
        sa, sb = a["strategies"]["ranpac"], b["strategies"]["ranpac"]
        assert sa["ridges"] == sb["ridges"]
        torch.testing.assert_close(sa["G"], sb["G"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sa["Q"], sb["Q"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a["module"]["net.head.rp_weight"], b["module"]["net.head.rp_weight"],
                                   rtol=1e-4, atol=1e-4)


# -- statistics from the test transform (statistics_transform) -------------------------------------------------------


def _flip_source():
    """A digits-sized source whose training transform flips the image, which the test transform does not: the two
    views of the same training images embed differently."""
    from cl_vit.data.base import Source, TensorImageDataset

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(48, 1, 8, 8, generator=gen)
    y = [i % 4 for i in range(48)]
    train = TensorImageDataset(images, y, transform=lambda x: x.flip(-1))
    test = TensorImageDataset(images[:16], y[:16])
    return Source("flip", train, test, [str(c) for c in range(4)], in_chans=1, img_size=8), images, torch.tensor(y)


def test_the_statistics_view_is_the_training_images_under_the_test_transform_in_training_order():
    from cl_vit.streams import build_stream, statistics_dataset

    source, images, _ = _flip_source()
    scenario, _ = build_stream(source, n_experiences=2, class_order=[3, 1, 0, 2])
    for i, exp in enumerate(scenario.train_stream):
        view = statistics_dataset(scenario, i)
        assert list(view.targets) == list(exp.dataset.targets) and len(view) == len(exp.dataset) == 24
        for k in (0, 5, 23):
            (a, ya), (b, yb) = exp.dataset[k][:2], view[k][:2]  # Avalanche adds the task label
            assert ya == yb and torch.equal(a, b.flip(-1)) and not torch.equal(a, b)


@pytest.mark.parametrize("name", ["simplecil", "ranpac", "slca"])
def test_statistics_come_from_the_test_transform_unless_told_otherwise(name, tmp_path):
    from cl_vit.streams import build_stream

    source, images, y = _flip_source()
    extra = {"ranpac": ["strategy.ranpac.first_session=false"], "slca": ["strategy.slca.ca_epochs=0"]}.get(name, [])
    stats = {}
    for transform in ("test", "train"):
        scenario, _ = build_stream(source, n_experiences=2)
        cfg = compose([*over(name), *extra, f"strategy.{name}.statistics_transform={transform}"])
        run(cfg, tmp_path / transform, scenario=scenario)
        stats[transform] = RunDirectory(tmp_path / transform).load_checkpoint(1)
    _, _, _, module, _ = build(compose([*over(name), *extra]), scenario=build_stream(source, n_experiences=2)[0])
    for transform, x in (("test", images), ("train", images.flip(-1))):
        ckpt = stats[transform]
        module.net.load_state_dict({k[4:]: v for k, v in ckpt["module"].items() if k.startswith("net.")}, strict=False)
        feats, labels = _embeddings(module, torch.utils.data.TensorDataset(x, y))
        if name == "simplecil":
            for c in range(4):
                torch.testing.assert_close(ckpt["module"]["net.head.prototypes"][c], feats[labels == c].mean(0))
        elif name == "ranpac":
            H = F.relu(feats @ module.net.head.W_rand)
            torch.testing.assert_close(ckpt["strategies"]["ranpac"]["G"], H.T @ H, rtol=1e-4, atol=1e-3)
        else:  # the second experience's classes, embedded by the network that experience trained
            for c in (2, 3):
                torch.testing.assert_close(ckpt["strategies"]["slca"]["means"][c], feats[labels == c].double().mean(0))
    key = {"simplecil": ("module", "net.head.prototypes"), "ranpac": ("strategies", "ranpac", "G"),
           "slca": ("strategies", "slca", "means", 0)}[name]
    a, b = stats["test"], stats["train"]
    for k in key:
        a, b = a[k], b[k]
    assert (a - b).abs().max() > 1e-3  # the two transforms give measurably different statistics


def test_statistics_transform_is_checked():
    for name in ("simplecil", "ranpac", "slca"):
        with pytest.raises(UserError, match=f"strategy.{name}.statistics_transform='eval' is not allowed"):
            build_strategies({name: {"statistics_transform": "eval"}})


# -- RanPAC's first-session modules (cl_vit/models/petl.py) against the official equations ----------------------------


def _micro_vit(seed=0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_micro_patch2_8", num_classes=4).eval()


def _ref_block_attention(x, blk, ssf):
    """Multi-head self-attention written out (RanPAC petl/vision_transformer_ssf.py Attention.forward L196-213):
    ``ssf(name, t)`` is the SSF after the named layer (identity when none)."""
    B, N, C = x.shape
    a = blk.attn
    qkv = ssf("qkv", F.linear(x, a.qkv.weight, a.qkv.bias))
    q, k, v = qkv.reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
    att = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
    return ssf("proj", F.linear((att @ v).transpose(1, 2).reshape(B, N, C), a.proj.weight, a.proj.bias))


def _ref_forward(net, x, ssf_on: bool, adapter_on: bool):
    """The pre-logits features of RanPAC's SSF ViT (vision_transformer_ssf.py PatchEmbed L358-371, Block L252-256,
    Mlp L157-170, forward_features L522-537) or adapter ViT (vision_transformer_adapter.py Block L165-183, Adapter
    L70-90 in eval mode), from ``net``'s parameters with functional ops (no module hooks run)."""
    def ssf_of(m):
        return (lambda t: t * m.ssf.scale + m.ssf.shift) if ssf_on else (lambda t: t)

    pe = net.patch_embed
    t = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).flatten(2).transpose(1, 2)
    t = ssf_of(pe.proj)(t)
    t = torch.cat([net.cls_token.expand(len(t), -1, -1), t], 1) + net.pos_embed

    def ln(m, u):
        return ssf_of(m)(F.layer_norm(u, m.normalized_shape, m.weight, m.bias, m.eps))

    for blk in net.blocks:
        t = t + _ref_block_attention(ln(blk.norm1, t), blk, lambda name, u: ssf_of(getattr(blk.attn, name))(u))
        m = blk.mlp
        h = ssf_of(m.fc1)(F.linear(ln(blk.norm2, t), m.fc1.weight, m.fc1.bias))
        h = ssf_of(m.fc2)(F.linear(F.gelu(h), m.fc2.weight, m.fc2.bias))
        if adapter_on:
            ad = blk.adaptmlp
            h = h + F.linear(F.relu(F.linear(t, ad.down_proj.weight, ad.down_proj.bias)), ad.up_proj.weight,
                             ad.up_proj.bias) * 0.1
        t = t + h
    return ln(net.norm, t)[:, 0]


def test_ssf_is_the_official_scale_and_shift_after_every_layer():
    from cl_vit.models.petl import add_ssf

    net = _micro_vit()
    x = torch.randn(3, 1, 8, 8)
    plain = net.forward_head(net.forward_features(x), pre_logits=True)
    names = add_ssf(net)
    # patch projection, 2 norms + qkv + proj + fc1 + fc2 per block, the final norm; never the classifier
    assert len(names) == 1 + 6 * len(net.blocks) + 1 and "head" not in names
    for n, p in net.named_parameters():
        if ".ssf." in n:
            assert p.shape == (192,) if "qkv" in n else p.shape in ((64,), (128,))
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True),
                               _ref_forward(net, x, ssf_on=True, adapter_on=False), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # identity SSF: the pre-trained network's features
        for n, p in net.named_parameters():
            if ".ssf." in n:
                p.fill_(1.0 if n.endswith("scale") else 0.0)
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True), plain)
    with pytest.raises(UserError, match="already has SSF parameters"):
        add_ssf(net)


def test_adaptformer_is_the_official_parallel_adapter():
    from cl_vit.models.petl import add_adaptformer

    net = _micro_vit()
    x = torch.randn(3, 1, 8, 8)
    plain = net.forward_head(net.forward_features(x), pre_logits=True)
    before = dict(net.state_dict())
    assert add_adaptformer(net, bottleneck=16) == len(net.blocks)
    # lora init (Adapter L63-68): the up projection is zero, so the adapted network starts as the pre-trained one
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True), plain)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())  # pre-trained names unchanged
    ad = net.blocks[0].adaptmlp
    assert (ad.down_proj.weight.shape, ad.up_proj.weight.shape, ad.scale, ad.dropout) == ((16, 64), (64, 16), 0.1, 0.1)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".adaptmlp." in n:
                p.normal_(0, 0.2)
    torch.testing.assert_close(net.forward_head(net.forward_features(x), pre_logits=True),
                               _ref_forward(net, x, ssf_on=False, adapter_on=True), rtol=1e-5, atol=1e-5)
    net.train()  # dropout 0.1 on the bottleneck in training (Adapter L77)
    torch.manual_seed(0)
    assert not torch.allclose(net.forward_features(x), net.eval().forward_features(x))


@pytest.mark.parametrize("petl, trained", [("ssf", ".ssf."), ("adaptformer", ".adaptmlp."), (None, "")])
def test_ranpac_first_session_trains_its_modules_and_the_classifier_only(petl, trained):
    from cl_vit.strategies.ranpac import RanPAC

    module = torch.nn.Module()
    module.net, module.n_classes = _micro_vit(), 4
    strategy = RanPAC(M=8, petl=petl, params=None if petl else ["*norm*", "*.bias"])
    strategy.setup(module)
    strategy.before_experience(module, ExperienceInfo(0, 2, [0, 1], [0, 1], 4))
    train = {n for n, p in module.net.named_parameters() if p.requires_grad}
    head = {"head.weight", "head.sigma"}
    if petl:
        assert train == head | {n for n, _ in module.net.named_parameters() if trained in n} and len(train) > 2
    else:  # the suite's earlier stand-in: LayerNorm affine parameters and biases
        assert train == head | {n for n, _ in module.net.named_parameters() if "norm" in n or n.endswith(".bias")}
    # no first session: nothing added (the plain pre-trained features, the official "ncm" rows)
    bare = torch.nn.Module()
    bare.net, bare.n_classes = _micro_vit(), 4
    RanPAC(M=8, petl=petl, first_session=False).setup(bare)
    assert not any(".ssf." in n or ".adaptmlp." in n for n, _ in bare.net.named_parameters())
    with pytest.raises(UserError, match="strategy.ranpac.params"):
        RanPAC(petl="ssf", params=["*"])


# -- the recipes: weight decay on every parameter, SLCA's fresh final norm and input normalisation ---------------------

MICRO_RECIPE = ["model=vit_micro", "model.name=vit_micro_patch2_8", "model.pretrained=false",
                "model.pretrained_tag=null", *TINY_ANY_MODEL[1:]]


def _recipe_module(experiment, *extra):
    from cl_vit.builder import build as build_parts

    cfg = compose([f"experiment={experiment}", *MICRO_RECIPE, *extra])
    scenario = _flip_stream()
    module = build_parts(cfg, scenario=scenario)[3]
    module.scheduler_cfg = {"name": "constant"}
    return cfg, module


def _flip_stream():
    from cl_vit.streams import build_stream

    return build_stream(_flip_source()[0], n_experiences=2)[0]


@pytest.mark.parametrize("experiment", ["ranpac-imagenet-r", "ranpac-cifar100", "slca-imagenet-r", "slca-cifar100"])
def test_recipes_decay_every_parameter_biases_and_norms_too(experiment):
    """RanPAC.py L231 and SLCA models/slca.py L158-165 hand every parameter to SGD with weight decay 5e-4; timm's
    create_optimizer_v2 exempts 1-D parameters unless filter_bias_and_bn=false reaches it."""
    cfg, module = _recipe_module(experiment)
    assert cfg.optimizer.filter_bias_and_bn is False and cfg.optimizer.weight_decay == 5e-4
    for s in module.strategies:
        s.before_experience(module, ExperienceInfo(0, 2, [0, 1], [0, 1], 4))
    opt = module.configure_optimizers()
    # plain momentum SGD as torch's optim.SGD(momentum=0.9) there: timm's "sgd" would be Nesterov
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in opt.param_groups)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    names = dict(module.net.named_parameters())
    trained = {n for n, p in names.items() if p.requires_grad}
    one_d = {n for n in trained if names[n].ndim <= 1}
    assert one_d and all(decay.get(id(names[n])) == 5e-4 for n in trained)
    if experiment.startswith("slca"):  # the whole backbone trains: timm's no_weight_decay() list decays too
        assert {"cls_token", "pos_embed"} <= trained
    # a step with zero gradients: SGD shrinks each trained parameter by lr * weight decay, 1-D ones included
    with torch.no_grad():  # non-zero everywhere (adapter biases start at zero)
        for n in one_d:
            names[n].uniform_(0.5, 1.5)
    before = {n: names[n].detach().clone() for n in one_d}
    for p in module.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for n in one_d:
        g = next(g for g in opt.param_groups if any(p is names[n] for p in g["params"]))
        torch.testing.assert_close(names[n].detach(), before[n] * (1 - g["lr"] * 5e-4), rtol=1e-6, atol=1e-9)
        assert not torch.equal(names[n].detach(), before[n]), n
    # the suite's default exempts them: the switch is what reaches timm
    _, plain = _recipe_module(experiment, "optimizer.filter_bias_and_bn=true")
    for s in plain.strategies:
        s.before_experience(plain, ExperienceInfo(0, 2, [0, 1], [0, 1], 4))
    exempt = {id(p) for g in plain.configure_optimizers().param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {n for n, p in plain.net.named_parameters() if id(p) in exempt} >= {n for n in one_d if "norm" in n}


def test_slca_recipes_replace_the_final_norm_and_normalise_inputs():
    """convs/vits.py L709-711: a fresh nn.LayerNorm(768) (weight 1, bias 0, eps 1e-5) in place of the pre-trained
    final norm, trained at the backbone's slow rate; utils/data.py L134-137 / L43-46: ImageNet / CIFAR-100 mean, std."""
    from cl_vit.data.transforms import NORMALIZATIONS

    for experiment, norm in (("slca-imagenet-r", "imagenet"), ("slca-cifar100", "cifar100")):
        cfg, module = _recipe_module(experiment)
        assert cfg.benchmark.source_args.normalize == norm and cfg.strategy.slca.fresh_final_norm
        assert NORMALIZATIONS[norm][0][0] == {"imagenet": 0.485, "cifar100": 0.5071}[norm]
        ln = module.net.norm
        assert type(ln) is torch.nn.LayerNorm and ln.eps == 1e-5
        assert torch.equal(ln.weight, torch.ones(64)) and torch.equal(ln.bias, torch.zeros(64))
        scales = module.strategies[0].lr_scales(module)
        assert scales["norm.weight"] == scales["norm.bias"] == 0.01
    _, plain = _recipe_module("slca-imagenet-r", "strategy.slca.fresh_final_norm=false")
    assert plain.net.norm.eps == 1e-6  # timm's ViT norm, kept
    net = torch.nn.Sequential()
    with pytest.raises(UserError, match="fresh_final_norm"):
        from cl_vit.strategies.slca import replace_final_norm

        replace_final_norm(net)


# -- protocols: each recipe's split, class order and experiences, counted on generated data -------------------------


def _official_order(seed: int, n: int) -> list[int]:
    """utils/data_manager.py of RanPAC (L89-92), SLCA (L124-126), RevisitingCIL (L151-155): np.random.seed(seed);
    np.random.permutation(n), on the labels of the sorted class folders (ImageFolder)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return np.random.permutation(n).tolist()
    finally:
        np.random.set_state(state)


@pytest.fixture(scope="module")
def protocol_data(tmp_path_factory):
    """All 200 ImageNet-R classes as the LAMDA-PILOT folders (2 train + 1 test images each) and as CODA-Prompt split
    files (1 + 1; with CODA-Prompt's own labels when ../shared/reference holds its files), and CIFAR-100 (2 + 1)."""
    from cl_vit.data.imagenet_r import _yaml_load, imagenet_r_wnids
    from conftest import SHARED_REFERENCE
    from data_gen import make_cifar, make_imagenet_r, make_pilot_split, write_coda_split

    root = tmp_path_factory.mktemp("protocols")
    wnids = imagenet_r_wnids()
    make_pilot_split(root, wnids=wnids, train=2, test=1)
    images = make_imagenet_r(root, wnids=wnids, per_class=2, size=(20, 16))
    labels = {w: k for k, w in enumerate(wnids)}
    reference = SHARED_REFERENCE / "imagenet-r_train.yaml"
    if reference.exists():  # CODA-Prompt's label of every wnid, from its own split file
        doc = _yaml_load(reference)
        labels = {d.split("imagenet-r/", 1)[1].split("/")[0]: int(t) for d, t in zip(doc["data"], doc["targets"])}
    write_coda_split(root / "imagenet-r-splits" / "coda", images, labels, test_fraction=0.5)
    make_cifar(root, "cifar100", train_counts=[2] * 100, test_per_class=1)
    return root, wnids, reference.exists()


#: recipe -> (split, experiences, classes per experience, train / test images per class, class-order rule)
PROTOCOLS = {
    "ranpac-imagenet-r": ("pilot", 10, 20, (2, 1), 1993),
    "simplecil-imagenet-r": ("pilot", 40, 5, (2, 1), 1993),
    "slca-imagenet-r": ("coda", 10, 20, (1, 1), 1993),
    "ranpac-imagenet-r-coda": ("coda", 10, 20, (1, 1), "coda"),
    "simplecil-imagenet-r-coda": ("coda", 10, 20, (1, 1), "coda"),
    "slca-imagenet-r-coda": ("coda", 10, 20, (1, 1), "coda"),
    "ranpac-cifar100": (None, 10, 10, (2, 1), 1993),
    "simplecil-cifar100": (None, 20, 5, (2, 1), 1993),
    "slca-cifar100": (None, 10, 10, (2, 1), 1993),
}


@pytest.mark.parametrize("experiment", sorted(PROTOCOLS))
def test_recipe_protocols_count_images_and_follow_the_official_class_order(experiment, protocol_data, tmp_path):
    data_root, wnids, with_reference = protocol_data
    split, n_exp, per_exp, (n_train, n_test), order_rule = PROTOCOLS[experiment]
    cfg = compose([f"experiment={experiment}", "model.name=vit_micro_patch2_8", "model.pretrained=false",
                   "model.pretrained_tag=null", "data.num_workers=0", "data.persistent_workers=false",
                   "dry_run=true", "logger=none"], data_root)
    stream = run(cfg, tmp_path / "dry")
    n_classes = n_exp * per_exp
    assert cfg.benchmark.source_args.get("split") == split
    assert [len(e["classes"]) for e in stream["experiences"]] == [per_exp] * n_exp
    sizes = [(e["n_train"], e["n_test"]) for e in stream["experiences"]]
    assert sizes == [(per_exp * n_train, per_exp * n_test)] * n_exp
    expected = list(range(n_classes)) if order_rule == "coda" else _official_order(order_rule, n_classes)
    assert stream["class_order"] == expected
    assert json.loads((tmp_path / "dry" / "stream.json").read_text())["class_order"] == expected
    if split == "pilot":  # torchvision ImageFolder labels: the sorted wnids
        assert build(cfg)[0].classes == sorted(wnids)
    if split == "coda" and with_reference:  # CODA-Prompt's own label order: label 0 is n02165456
        source = build(cfg)[0]
        assert source.classes[0] == "n02165456" and sorted(source.classes) == wnids


@pytest.mark.parametrize("experiment", ["slca-imagenet-r", "slca-cifar100"])
def test_slca_recipes_run_the_three_official_seeds_as_one_multirun(experiment):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from conftest import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert str(cfg.hydra.sweeper.params.seed) == "1993,1996,1997" and cfg.seed == 1993
    for seed in (1993, 1996, 1997):  # each run's class order follows its seed, as exps/slca/*.json's seed list
        assert compose([f"experiment={experiment}", f"seed={seed}"]).benchmark.class_order == f"numpy:{seed}"


def test_ranpac_recipes_step_the_cosine_once_per_epoch_as_torch_cosine_annealing():
    """RanPAC.py L232, L279: CosineAnnealingLR(T_max=tuned_epoch, eta_min=0) stepped after every epoch, so every batch
    of an epoch trains at that epoch's rate; ``scheduler.name=cosine_epoch`` is that, ``cosine`` decays per batch."""
    from types import SimpleNamespace

    for experiment in ("ranpac-imagenet-r", "ranpac-cifar100", "ltcil-ranpac"):
        assert compose([f"experiment={experiment}"]).scheduler.name == "cosine_epoch"
    epochs, per_epoch = 4, 3
    _, module = _recipe_module("ranpac-imagenet-r")
    module.scheduler_cfg = {"name": "cosine_epoch", "warmup_epochs": 0, "min_lr_ratio": 0.0}
    module._trainer = SimpleNamespace(estimated_stepping_batches=epochs * per_epoch, max_epochs=epochs)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=epochs, eta_min=0.0)
    for epoch in range(epochs):
        for _ in range(per_epoch):
            assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-18)
            sched.optimizer.step()
            sched.step()
        ref_opt.step()
        ref.step()
    module.scheduler_cfg = {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.0}
    per_step = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    per_step.optimizer.step()
    per_step.step()
    assert per_step.get_last_lr()[0] < 0.01  # the per-batch cosine has moved within the first epoch


def test_the_statistics_view_of_an_image_folder_source_decodes_as_the_test_split(tmp_path):
    """ImageNet-R's training images crop at random when decoded (DecodeRandomResizedCrop); the statistics view reads
    the same files with the test split's decode and transform (shorter side 256, centre crop), image for image."""
    from cl_vit.data import build_source
    from cl_vit.data.base import ImageFileDataset
    from cl_vit.streams import under_test_transform
    from data_gen import WNIDS, make_imagenet_r

    make_imagenet_r(tmp_path, per_class=4, size=(60, 50))
    source = build_source("imagenet-r", str(tmp_path), split="own", wnids=WNIDS, img_size=32)
    view = under_test_transform(source.train, source.test)
    assert view.samples == source.train.samples and view.decode is source.test.decode
    assert source.train.decode is not source.test.decode  # the training decode is another (random) crop
    for k in (0, len(view) - 1):
        expected = ImageFileDataset([view.samples[k]], source.test.transform, decode=source.test.decode)[0]
        assert torch.equal(view[k][0], expected[0]) and view[k][1] == expected[1]
        assert torch.equal(view[k][0], view[k][0])  # deterministic, unlike the training read
