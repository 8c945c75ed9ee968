"""Prompt methods (L2P++, DualPrompt, CODA-Prompt as GT-RIPL/CODA-Prompt implements them): prefix insertion into
attention, prompt selection, Gram-Schmidt components, two experiences through the runner, resume."""
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose, cut_and_resume, state_equal

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit.errors import UserError
from cl_vit.module import net_outputs
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies import build_strategies
from cl_vit.strategies.coda_prompt import CodaPromptPool, gram_schmidt
from cl_vit.strategies.dualprompt import PromptPool
from cl_vit.strategies.prompting import enable_prefixes, set_prefixes

FAST = TINY + ["trainer.limit_train_batches=2", "benchmark.n_experiences=2"]
SMALL = {"coda_prompt": ["strategy.coda_prompt.pool_size=4", "strategy.coda_prompt.ortho_mu=0.1"],
         "dualprompt": ["strategy.dualprompt.pool_size=2"],
         "l2p": ["strategy.l2p.pool_size=6", "strategy.l2p.top_k=2", "strategy.l2p.deep=true"]}


def micro():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_micro_patch2_8", num_classes=4).eval()


def block_outputs(net, x):
    outs = []
    def keep(m, i, o):
        outs.append((o[0] if isinstance(o, tuple) else o).detach().clone())  # a Refiner-ViT block returns (x, map)

    hooks = [b.register_forward_hook(keep) for b in net.blocks]
    try:
        net.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return outs


# -- prefix insertion ------------------------------------------------------------------------------------------------


def test_empty_prefixes_leave_the_model_unchanged_and_a_prefix_changes_exactly_its_block():
    net, x = micro(), torch.randn(3, 1, 8, 8)
    plain = block_outputs(net, x)
    enable_prefixes(net)
    d = net.embed_dim
    set_prefixes(net, [(torch.zeros(3, 0, d), torch.zeros(3, 0, d))] * len(net.blocks))
    for a, b in zip(block_outputs(net, x), plain):
        torch.testing.assert_close(a, b)
    for layer in range(len(net.blocks)):
        prefixes = [None] * len(net.blocks)
        prefixes[layer] = (torch.randn(3, 2, d), torch.randn(3, 2, d))
        set_prefixes(net, prefixes)
        outs = block_outputs(net, x)
        for j in range(layer):  # blocks before it: bit-identical
            assert torch.equal(outs[j], plain[j]), (layer, j)
        assert not torch.allclose(outs[layer], plain[layer], atol=1e-4)


def test_prefix_attention_is_softmax_over_prefix_and_token_keys():
    net, x = micro(), torch.randn(2, 5, 64)
    attn = enable_prefixes(net)[1]
    pk, pv = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    attn.prefix = (pk, pv)
    got = attn(x)
    H, hd = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(2, 5, 3, H, hd).permute(2, 0, 3, 1, 4)
    heads = lambda t: t.reshape(2, -1, H, hd).permute(0, 2, 1, 3)  # noqa: E731
    k, v = torch.cat((heads(pk), k), 2), torch.cat((heads(pv), v), 2)
    weights = torch.softmax(q @ k.transpose(-2, -1) * hd ** -0.5, dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    attn.prefix = None
    torch.testing.assert_close(attn(x), type(attn).forward(attn, x))


# -- prompt selection ------------------------------------------------------------------------------------------------


def _unit(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_dualprompt_trains_its_task_prompt_and_picks_the_nearest_key_at_evaluation():
    pool = PromptPool(2, pool_size=3, e_length=4, g_length=2, e_layers=(2,), g_layers=(0, 2), top_k=1,
                      task_id_bootstrap=True)
    with torch.no_grad():
        pool.e_k_2.copy_(_unit([1, 0], [0, 1], [-1, 0]))
        pool.e_p_2.copy_(torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3, 4, 2))
    q = _unit([0.1, 2.0], [-3.0, 0.2])  # nearest keys: 1 and 2
    pool.start_task(0, 3)
    (pk, pv), loss = pool(q, 2, train=True)  # training: task 0's prompt for every image, whatever the query
    cos = F.normalize(q, dim=1) @ pool.e_k_2.detach().T
    torch.testing.assert_close(loss, (1 - cos[:, 0]).sum())
    g = pool.g_p_2.detach()
    torch.testing.assert_close(pk, torch.cat((pool.e_p_2[0, :2].expand(2, -1, -1), g[:1].expand(2, -1, -1)), 1))
    torch.testing.assert_close(pv, torch.cat((pool.e_p_2[0, 2:].expand(2, -1, -1), g[1:].expand(2, -1, -1)), 1))
    (pk, pv), loss = pool(q, 2, train=False)
    assert loss.item() == 0
    torch.testing.assert_close(pk[:, :2], torch.stack((pool.e_p_2[1, :2], pool.e_p_2[2, :2])))
    assert pool(q, 1, train=True)[0] is None  # no prompt in that block
    (gk, gv), gloss = pool(q, 0, train=True)  # G only: shared, no matching loss
    assert gk.shape == (2, 1, 2) and gloss.item() == 0


def test_l2p_takes_the_top_k_keys():
    pool = PromptPool(2, pool_size=4, e_length=2, g_length=0, e_layers=(0,), g_layers=(), top_k=2,
                      task_id_bootstrap=False)
    with torch.no_grad():
        pool.e_k_0.copy_(_unit([1, 0], [0.9, 0.1], [0, 1], [-1, 0]))
    q = _unit([1.0, 0.05])
    (pk, pv), loss = pool(q, 0, train=True)
    torch.testing.assert_close(pk, torch.stack((pool.e_p_0[0, :1], pool.e_p_0[1, :1])).reshape(1, 2, 2))
    torch.testing.assert_close(pv, torch.stack((pool.e_p_0[0, 1:], pool.e_p_0[1, 1:])).reshape(1, 2, 2))
    cos = F.normalize(q, dim=1) @ F.normalize(pool.e_k_0.detach(), dim=1).T
    torch.testing.assert_close(loss, (1 - cos[:, [0, 1]]).sum())


def test_coda_prompt_is_the_attention_weighted_sum_of_components():
    pool = CodaPromptPool(2, pool_size=4, length=2, ortho_mu=0.0, layers=(0,))
    torch.manual_seed(0)
    pool.start_task(0, 2)  # components 0-1 for experience 1
    pool.start_task(1, 2)  # components 2-3 for experience 2
    q = torch.randn(3, 2)
    K, A, P = pool.e_k_0.detach(), pool.e_a_0.detach(), pool.e_p_0.detach()
    (pk, pv), _ = pool(q, 0, train=False)
    w = torch.stack([F.cosine_similarity(q * A[m], K[m].expand(3, -1), dim=1) for m in range(4)], 1)
    torch.testing.assert_close(pk, (w[:, :, None] * P[None, :, 0]).sum(1, keepdim=True))
    torch.testing.assert_close(pv, (w[:, :, None] * P[None, :, 1]).sum(1, keepdim=True))
    # training in experience 2: components 0-1 are used but receive no gradient
    (pk, pv), _ = pool(q, 0, train=True)
    (pk.sum() + pv.sum()).backward()
    assert (pool.e_p_0.grad[:2] == 0).all() and (pool.e_p_0.grad[2:] != 0).any()
    assert (pool.e_k_0.grad[:2] == 0).all() and (pool.e_a_0.grad[2:] != 0).any()


def test_gram_schmidt_keeps_earlier_components_and_adds_orthonormal_ones():
    torch.manual_seed(0)
    first = gram_schmidt(torch.zeros(6, 2, 3), 0, 2)
    flat = first.reshape(6, -1)
    torch.testing.assert_close(flat[:2] @ flat[:2].T, torch.eye(2))
    assert (flat[2:] == 0).all()
    second = gram_schmidt(first, 2, 4).reshape(6, -1)
    assert torch.equal(second[:2], flat[:2])
    torch.testing.assert_close(second[:4] @ second[:4].T, torch.eye(4), atol=1e-5, rtol=0)
    assert (second[4:] == 0).all()


def test_bad_values_fail_in_one_line():
    for cfg in ({"coda_prompt": {"pool_size": 0}}, {"dualprompt": {"e_length": "x"}}, {"l2p": {"top_k": 40}},
                {"coda_prompt": {"ortho_mu": -1}}, {"l2p": {"key_loss_shards": 0}},
                {"dualprompt": {"first_session": "yes"}}):
        with pytest.raises(UserError) as e:
            build_strategies(cfg)
        assert "\n" not in str(e.value) and "strategy" in str(e.value)
    with pytest.raises(UserError, match="pool_size=5"):
        PromptPool(2, 2, 2, 2, (0,), (), 1, True).start_task(0, 5)


def test_l2p_key_loss_per_shard_is_the_sum_over_the_chunks_of_the_batch():
    pool = PromptPool(4, pool_size=6, e_length=2, g_length=0, e_layers=(0,), g_layers=(), top_k=2,
                      task_id_bootstrap=False)
    q = torch.randn(8, 4)
    whole = pool(q, 0, train=True)[1]
    pool.key_loss_shards = 4  # DataParallel on 4 devices: chunks of 2 (torch.chunk, as its scatter)
    sharded = pool(q, 0, train=True)[1]
    pool.key_loss_shards = 1
    torch.testing.assert_close(sharded, sum(pool(c, 0, train=True)[1] for c in q.chunk(4)))
    assert 3 < float(whole / sharded) < 5  # B x B x k against 4 x (B/4) x (B/4) x k terms


def test_coda_prompt_warns_when_its_keys_cannot_all_be_orthogonal(caplog):
    from cl_vit.strategies.coda_prompt import CodaPrompt

    CodaPrompt(pool_size=8, length=2).make_prompt(8, 5)
    assert "pool_size <= 8" not in caplog.text
    pool = CodaPrompt(pool_size=12, length=2).make_prompt(8, 5)
    assert "pool_size <= 8" in caplog.text
    pool.start_task(0, 1)
    K = pool.e_k_0.detach()
    assert (K @ K.T - torch.eye(12)).abs()[8:].max() > 0.1  # components past the key width are not orthogonal


# -- through the runner ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["coda_prompt", "dualprompt", "l2p"])
def test_two_experiences_train_only_prompts_and_classifier_and_resume_exactly(name, tmp_path, data_root,
                                                                              monkeypatch):
    # the methods' frozen backbone (the default stream trains it in the first experience: first_session)
    over = FAST + [f"strategy={name}", *SMALL[name], f"strategy.{name}.first_session=false"]
    cfg = compose(over, data_root)
    _, _, _, module, _ = build(cfg)
    assert cfg.loss.mask_old_logits is True
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    whole = run(cfg, tmp_path / "whole")
    after = RunDirectory(tmp_path / "whole").load_checkpoint(1)["module"]
    for k, v in init.items():
        changed = not torch.equal(after[f"net.{k}"], v)
        if k.startswith(("blocks.", "patch_embed.", "cls_token", "pos_embed", "norm.")):
            assert not changed, k  # the backbone is frozen
    assert any(not torch.equal(after[f"net.{k}"], v) for k, v in init.items() if k.startswith("prompt."))
    costs = whole["cost"]["per_experience"]
    n_prompt = sum(v.numel() for k, v in init.items() if k.startswith("prompt.") and v.is_floating_point())
    n_head = sum(p.numel() for p in module.net.get_classifier().parameters())
    assert costs[0]["params_trainable"] == n_prompt + n_head
    # the prompted logits are what the module evaluates: prompts change them
    module.load_state_dict(after)
    module.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        prompted = net_outputs(module.net, x)["logits"]
        plain = module.net.get_classifier()(module.net.forward_head(module.net.forward_features(x), pre_logits=True))
    assert not torch.allclose(prompted, plain)

    resumed = cut_and_resume(monkeypatch, over, data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    for i in (0, 1):
        a, b = RunDirectory(tmp_path / "whole").load_checkpoint(i), RunDirectory(tmp_path / "cut").load_checkpoint(i)
        assert state_equal(a["module"], b["module"]), i


def test_imagenet_r_recipes_compose_with_the_published_settings():
    for name, strategy in (("coda-prompt", "coda_prompt"), ("dualprompt", "dualprompt"), ("l2p", "l2p")):
        cfg = compose([f"experiment={name}-imagenet-r"])
        assert list(cfg.strategy) == [strategy] and cfg.benchmark.n_experiences == 10
        assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.data.batch_size) == \
            ("adam", 1e-3, 50, 128)
        assert cfg.loss.mask_old_logits and cfg.model.pretrained_tag == "augreg_in21k_ft_in1k"
    assert dict(compose(["experiment=coda-prompt-imagenet-r"]).strategy.coda_prompt) == \
        {"pool_size": 100, "length": 8, "ortho_mu": 0.0, "first_session": False}
    for name, strategy in (("coda-prompt", "coda_prompt"), ("dualprompt", "dualprompt"), ("l2p", "l2p")):
        # the frozen pre-trained backbone of the methods (the default stream gives the shipped one: no first session)
        assert compose([f"experiment={name}-imagenet-r"]).strategy[strategy].first_session is False
        assert compose([f"strategy={strategy}"]).strategy[strategy].first_session is False
        assert compose([f"strategy={strategy}", f"+benchmark.strategy_args.{strategy}.first_session=true"]
                       ).strategy[strategy].first_session is True
    assert compose(["experiment=ranpac-imagenet-r"]).strategy.ranpac.M == 10000
    slca = compose(["experiment=slca-imagenet-r"])
    assert list(slca.scheduler.milestones) == [40] and slca.strategy.slca.backbone_lr_scale == 0.01
    assert list(compose(["experiment=simplecil-imagenet-r"]).strategy) == ["simplecil"]


def test_cifar100_recipes_compose_under_the_coda_prompt_protocol_with_each_methods_settings():
    for name, strategy in (("coda-prompt", "coda_prompt"), ("dualprompt", "dualprompt"), ("l2p", "l2p")):
        cfg = compose([f"experiment={name}-cifar100"])
        assert list(cfg.strategy) == [strategy] and cfg.benchmark.name == "cifar100-coda"
        assert (cfg.benchmark.n_experiences, cfg.optimizer.name, cfg.optimizer.lr, cfg.trainer.max_epochs,
                cfg.data.batch_size) == (10, "adam", 1e-3, 20, 128)  # configs/cifar-100_prompt.yaml
        assert cfg.loss.mask_old_logits and cfg.model.pretrained_tag == "augreg_in21k_ft_in1k"
    slca = compose(["experiment=slca-cifar100"])
    assert (slca.optimizer.name, slca.optimizer.lr, slca.trainer.max_epochs, list(slca.scheduler.milestones)) == \
        ("sgd", 0.01, 20, [18])  # exps/slca/slca_cifar.json
    ranpac = compose(["experiment=ranpac-cifar100"])
    assert (ranpac.strategy.ranpac.M, ranpac.data.batch_size, ranpac.trainer.max_epochs) == (10000, 48, 20)
    for cfg in (slca, ranpac, compose(["experiment=simplecil-cifar100"])):  # ImageNet-21k weights, as published
        assert cfg.model.pretrained_tag == "augreg_in21k" and cfg.benchmark.name == "cifar100-coda"
