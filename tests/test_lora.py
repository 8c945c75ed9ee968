"""InfLoRA and SD-LoRA (cl_vit/models/lora.py, cl_vit/strategies/inflora.py, sdlora.py): the official code's numbers
on tiny tensors, the subspace design, two experiences through the runner (frozen parts bit-identical, growing
parameter counts, exact resume), Refiner-ViT, bad values.

The official numbers below were printed by

    python scripts/golden_lora.py /path/to/InfLoRA /path/to/SD-Lora-CL

with liangyanshuo/InfLoRA @ e08b00edd54f2f10cf2f9826eae7d44fdcb6354b and WuYichen-97/SD-Lora-CL @
8bacded6eb44786db071f66fb90a87dd660d94ea (torch 2, CPU); the script runs the official ``Attention_LoRA``,
``InfLoRA.update_DualGPM`` and ``_LoRA_qkv_timm_train`` unchanged on the inputs its ``*_case`` functions build, which
the tests below build the same way.
"""
import math

import pytest
import torch
import torch.nn as nn
from conftest import TINY, assert_same_checkpoints, compose, cut_and_resume, run_ddp, script_module

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit.errors import UserError
from cl_vit.models.lora import add_lora
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies import build_strategies
from cl_vit.strategies.inflora import REMOVE, RETAIN, design_down_projection, dual_gpm_update

golden = script_module("golden_lora")

# -- the official numbers (python scripts/golden_lora.py InfLoRA SD-Lora-CL, at the commits above) -------------------

INFLORA_ATTENTION = [49.45728224515915, 7849.464965063027, 4297.578564405441]
INFLORA_DUAL_GPM = [[('remove', 1, 0.04539398580355909), ('remove', 1, -0.011836201438572749)],
                    [('remove', 3, 0.9725368851999977), ('remove', 3, 1.3072882218422244)],
                    [('retain', 3, 1.6029239094000107), ('retain', 3, 0.5232326845458299)],
                    [('retain', 1, 0.1938406209638523), ('retain', 2, 0.26797290790938977)]]
SDLORA_QKV = [-94.14716222882271, 7965.390855554273, -13618.032898157835]
SDLORA_MAGNITUDE_GRADS = [0.9502288699150085, -1.877135992050171, 79.27156829833984]

FAST = TINY + ["trainer.limit_train_batches=2", "benchmark.n_experiences=2"]
BACKBONE = ("blocks.", "patch_embed.", "cls_token", "pos_embed", "norm.")


def one_block(targets, decoupled=False):
    """A timm Attention of the cases' geometry inside a one-block 'network', with LoRA terms."""
    from timm.models.vision_transformer import Attention

    net = nn.Module()
    blk = nn.Module()
    blk.attn = Attention(golden.DIM, num_heads=golden.HEADS, qkv_bias=True)
    net.blocks = nn.ModuleList([blk])
    return blk.attn, add_lora(net, targets, golden.RANK, decoupled=decoupled)


def set_terms(lora, terms):
    with torch.no_grad():
        for t, tt in enumerate(terms):
            lora.add_task()
            for n, v in tt.items():
                lora.layers[0][t][n].copy_(v)


# -- equal to the official code ----------------------------------------------------------------------------------------


def test_inflora_attention_sums_the_tasks_key_and_value_terms_as_the_official():
    w, terms, x = golden.inflora_attention_case()
    attn, lora = one_block(("k", "v"))
    attn.load_state_dict(w)
    set_terms(lora, terms)
    with torch.no_grad():
        got = golden.checksums(attn(x))
    assert got == pytest.approx(INFLORA_ATTENTION, rel=1e-5)
    with torch.no_grad():  # and the query is untouched: without the terms the plain attention differs
        lora.layers[0][1]["B_k"].zero_()
        assert golden.checksums(attn(x)) != pytest.approx(INFLORA_ATTENTION, rel=1e-5)


def test_sdlora_normalised_directions_and_magnitude_gradients_as_the_official():
    w, terms, alphas, x, g = golden.sdlora_case()
    attn, lora = one_block(("q", "v"), decoupled=True)
    attn.qkv.load_state_dict(w)
    set_terms(lora, terms)
    with torch.no_grad():
        for m, a in zip(lora.magnitude, alphas):
            m.fill_(a)
    out = attn.qkv(x)
    (out * g).sum().backward()
    assert golden.checksums(out) == pytest.approx(SDLORA_QKV, rel=1e-5)
    assert [m.grad.item() for m in lora.magnitude] == pytest.approx(SDLORA_MAGNITUDE_GRADS, rel=1e-5)


def test_dual_gpm_bases_as_the_official():
    lamb, lame, total = golden.GPM
    W = golden.projector_weights()
    bases, kinds = [], []
    for t, (mats, expected) in enumerate(zip(golden.dual_gpm_case(), INFLORA_DUAL_GPM)):
        bases, kinds = dual_gpm_update(bases, kinds, mats, (lame - lamb) * t / total + lamb)
        got = [(k, b.shape[1], float((b.double() @ b.double().T * W).sum())) for k, b in zip(kinds, bases)]
        assert [g[:2] for g in got] == [e[:2] for e in expected], t
        assert [g[2] for g in got] == pytest.approx([e[2] for e in expected], rel=1e-4, abs=1e-5), t


def test_the_down_projection_avoids_the_old_subspace_or_stays_in_the_free_space():
    torch.manual_seed(0)
    z = torch.randn(50, 8)
    cov = z.T @ z / 50
    first = design_down_projection(cov, None, None, 3)
    U = torch.linalg.svd(cov)[0]
    torch.testing.assert_close((first @ U[:, :3]).abs(), torch.eye(3) / math.sqrt(3), atol=1e-5, rtol=0)
    old = torch.linalg.qr(torch.randn(8, 2))[0]
    a = design_down_projection(cov, old, REMOVE, 3)
    torch.testing.assert_close(a @ a.T, torch.eye(3) / 3, atol=1e-5, rtol=0)
    assert (a @ old).abs().max() < 1e-5  # no component in the old tasks' subspace
    free = torch.linalg.qr(torch.randn(8, 4))[0]
    b = design_down_projection(cov, free, RETAIN, 3)
    torch.testing.assert_close(b @ free @ free.T, b, atol=1e-5, rtol=0)  # entirely in the free space


# -- through the runner ----------------------------------------------------------------------------------------------


def _backbone(state):
    return [k for k in state if k.startswith(tuple(f"net.{p}" for p in BACKBONE))]


@pytest.mark.parametrize("name", ["inflora", "sdlora"])
def test_two_experiences_keep_the_backbone_and_past_terms_and_resume_exactly(name, tmp_path, data_root, monkeypatch):
    # AdamW with strong decay on every parameter: whatever reaches the optimiser moves
    over = FAST + [f"strategy={name}", "optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.weight_decay=0.5",
                   "+optimizer.filter_bias_and_bn=false"]
    cfg = compose(over, data_root)
    _, _, _, module, _ = build(cfg)
    init = {f"net.{k}": v.clone() for k, v in module.net.state_dict().items()}
    whole = run(cfg, tmp_path / "whole")
    rd = RunDirectory(tmp_path / "whole")
    m0, m1 = rd.load_checkpoint(0)["module"], rd.load_checkpoint(1)["module"]
    backbone = _backbone(init)
    assert all(torch.equal(init[k], m1[k]) for k in backbone)
    task = lambda state, t: [k for k in state if k.startswith("net.lora.layers.") and k.split(".")[4] == t]  # noqa
    assert not task(m0, "1") and task(m1, "1")  # net.lora.layers.<block>.<task>.<A|B>_<slice>
    past = task(m0, "0")
    assert past and all(torch.equal(m0[k], m1[k]) for k in past)  # task 0's terms stay through task 1
    assert all(torch.equal(m0[k][:5], m1[k][:5]) for k in ("net.head.weight", "net.head.bias"))
    new_b = [k for k in task(m1, "1") if ".B_" in k]
    assert new_b and all(m1[k].abs().sum() > 0 for k in new_b)  # the new task's B trained
    depth, dim, r = 4, 64, 10
    terms = depth * 2 * (2 * dim * r)  # A and B of two slices per block: what each experience adds
    head = dim * 10 + 10
    costs = whole["cost"]["per_experience"]
    if name == "inflora":  # B trains, A is designed
        assert [c["params_trainable"] for c in costs] == [terms // 2 + head] * 2
        assert costs[1]["params_total"] - costs[0]["params_total"] == terms
        # A of task 1 is designed: orthonormal rows / sqrt(3), the same for keys and values
        state = rd.load_checkpoint(1)["strategies"]["inflora"]
        assert len(state["bases"]) == depth and set(state["kinds"]) <= {REMOVE, RETAIN}
        a = m1["net.lora.layers.0.1.A_k"]
        torch.testing.assert_close(a, m1["net.lora.layers.0.1.A_v"])
        torch.testing.assert_close(a @ a.T, torch.eye(r) / 3, atol=1e-5, rtol=0)
    else:  # the new task's A and B, every magnitude so far, the head
        assert [c["params_trainable"] for c in costs] == [terms + 1 + head, terms + 2 + head]
        assert costs[1]["params_total"] - costs[0]["params_total"] == terms + 1
        assert not torch.equal(m0["net.lora.magnitude.0"], m1["net.lora.magnitude.0"])
    resumed = cut_and_resume(monkeypatch, over, data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize("name", ["inflora", "sdlora"])
def test_refiner_vit_attention_takes_the_terms_and_its_backbone_stays_bit_identical(name, tmp_path, data_root):
    over = ["model=refiner_vit_tiny", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none",
            "trainer.limit_train_batches=2", "benchmark.n_experiences=2", f"strategy={name}"]
    cfg = compose(over, data_root)
    _, _, _, module, _ = build(cfg)
    init = {f"net.{k}": v.clone() for k, v in module.net.state_dict().items()}
    run(cfg, tmp_path / "run")
    m1 = RunDirectory(tmp_path / "run").load_checkpoint(1)["module"]
    frozen = [k for k in init if not k.startswith(("net.lora.", "net.head."))]
    assert frozen and all(torch.equal(init[k], m1[k]) for k in frozen), name  # batch-norm statistics included
    lora = module.net.lora
    share = [i for i, n in enumerate(lora.names) if n.endswith("attn.v")]
    assert share and all(set(lora.slices[i]) == {"v"} for i in share)  # a share block has values only
    assert all(m1[f"net.lora.layers.{i}.1.B_v"].abs().sum() > 0 for i in range(len(lora.names)))



@pytest.mark.slow
def test_ddp_runs_and_inflora_designs_the_first_task_from_every_shard(tmp_path, data_root):
    """trainer=ddp on 2 CPU processes (gloo): the run completes (the runner checks that both ranks hold the same
    state; SD-LoRA has no code of its own under DDP, so InfLoRA's run, which sums statistics across processes,
    stands for both); InfLoRA's first down-projection, designed from the input statistics of both processes' shares
    added together before anything trains, spans what one process designs from all the images (its projector A^T A,
    free of the singular vectors' signs)."""
    args = [*FAST, "strategy=inflora", "strategy.inflora.statistics_transform=test"]
    run_ddp(args, tmp_path / "ddp", data_root)
    run(compose(args, data_root), tmp_path / "one")
    a = RunDirectory(tmp_path / "ddp").load_checkpoint(0)["module"]
    b = RunDirectory(tmp_path / "one").load_checkpoint(0)["module"]
    for k in [k for k in a if k.startswith("net.lora.layers.") and ".A_" in k]:
        # float32 sums in another order: 4e-5 apart measured, entries up to 0.11
        torch.testing.assert_close(a[k].T @ a[k], b[k].T @ b[k], rtol=0, atol=2e-4, msg=k)

def test_bad_values_fail_in_one_line():
    for name, kwargs in (("inflora", {"rank": 0}), ("inflora", {"lamb": 1.5}), ("sdlora", {"direction_norm": "x"}),
                         ("sdlora", {"magnitude_init": "big"})):
        with pytest.raises(UserError) as e:
            build_strategies({name: kwargs})
        assert "\n" not in str(e.value) and f"strategy.{name}." in str(e.value)
    with pytest.raises(UserError, match="LoRA adapts the attention"):
        add_lora(nn.Sequential(nn.Linear(2, 2)), ("q",), 2)


# (recipe, lr, epochs, class order, pretrained tag, lamb): InfLoRA configs/{mimg10,cifar100}_inflora.json,
# SD-LoRA exps/sdlora_{inr,c100}.json with models/sdlora.py L95-121 (SGD, momentum 0.9, no decay, constant rate)
RECIPES = [("inflora-imagenet-r", 5e-4, 50, "identity", "augreg_in21k", 0.98),
           ("inflora-cifar100", 5e-4, 20, "identity", "augreg_in21k", 0.95),
           ("sdlora-imagenet-r", 1e-2, 20, "numpy:1995", "augreg2_in21k_ft_in1k", None),
           ("sdlora-cifar100", 8e-3, 20, "numpy:1993", "augreg2_in21k_ft_in1k", None)]


@pytest.mark.parametrize("recipe,lr,epochs,order,tag,lamb", RECIPES)
def test_recipes_compose_with_the_official_values(recipe, lr, epochs, order, tag, lamb):
    cfg = compose([f"experiment={recipe}"])
    name = recipe.split("-")[0]
    assert list(cfg.strategy) == [name] and cfg.strategy[name].rank == 10 and cfg.benchmark.n_experiences == 10
    assert (cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.data.batch_size) == (lr, epochs, 128)
    assert cfg.data.drop_last is False
    assert (cfg.benchmark.class_order, cfg.model.pretrained_tag, cfg.optimizer.weight_decay) == (order, tag, 0.0)
    assert cfg.loss.mask_old_logits is True and cfg.benchmark.source_args.normalize == "coda"
    if name == "inflora":
        assert (cfg.optimizer.name, cfg.scheduler.name, cfg.strategy.inflora.lamb) == ("adam", "coda_cosine", lamb)
        if recipe == "inflora-imagenet-r":  # InfLoRA's random split, made under the first seed of the json's list
            args = cfg.benchmark.source_args
            assert (args.split, args.split_seed, args.train_fraction) == ("inflora", 0, 0.8)
    else:
        assert (cfg.optimizer.name, cfg.optimizer.momentum, cfg.optimizer.nesterov, cfg.scheduler.name) == (
            "sgd", 0.9, False, "constant")
        assert cfg.benchmark.source_args.crop_scale == [0.05, 1.0]
