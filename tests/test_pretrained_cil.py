"""Classifier-statistics methods for pre-trained ViTs: SimpleCIL, RanPAC, SLCA (cl_vit/strategies/{simplecil,ranpac,
slca}.py): their math on hand-computed cases, two experiences through the runner, resume, and the embeddings that
every process of a DDP run shares."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose, cut_and_resume, state_equal

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
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            (root / "data").mkdir()
            cfg = compose(over(name), root / "data")
            cache[name] = (cfg, root / "data", root, run(cfg, root / "whole"))
        return cache[name]

    return get


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
    # cost: the first session trains every parameter, later experiences none; G and Q are strategy state
    first_cost, second_cost = doc["cost"]["per_experience"]
    assert first_cost["params_trainable"] == first_cost["params_total"] and second_cost["params_trainable"] == 0
    d = module.net.num_features
    assert second_cost["state_numel"] >= 16 * 16 + 16 * info.n_classes + d * 16
    rd = RunDirectory(root / "whole")
    first, second = rd.load_checkpoint(0), rd.load_checkpoint(1)
    # the first session trained the backbone; the second trained nothing
    assert not torch.equal(first["module"]["net.blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
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
    for i in (0, 1):
        a, b = RunDirectory(root / "whole").load_checkpoint(i), RunDirectory(tmp_path / "cut").load_checkpoint(i)
        assert state_equal(a["module"], b["module"]) and state_equal(a["strategies"], b["strategies"]), i
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
    import subprocess
    import sys

    from conftest import REPO_ROOT, cli_env

    args = [*over(name), *(["strategy.ranpac.first_session=false"] if name == "ranpac" else [])]
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "data.num_workers=0", "data.pin_memory=false"]
    proc = subprocess.run([sys.executable, "-m", "cl_vit.run", *args, *ddp, f"hydra.run.dir={tmp_path / 'ddp'}",
                           f"data_root={data_root}"], cwd=str(REPO_ROOT), env={**cli_env(), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Distributed run: 2 processes" in (tmp_path / "ddp" / "run.log").read_text()
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
