"""Prompt prefixes in Refiner-ViT's attention (docs/models.md "Prompt prefixes"): the joint softmax over prefix and
token keys, prefix columns that are neither refined nor carried, the share block's value rule, and the prompt
methods through the runner on refiner_vit_tiny."""
import pytest
import timm
import torch
from conftest import TINY_ANY_MODEL, compose, cut_and_resume, state_equal
from test_prompts import block_outputs

import cl_vit  # noqa: F401  (registers refiner_vit_tiny)
from cl_vit.errors import UserError
from cl_vit.models.refiner import RefinerAttention
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run
from cl_vit.strategies.prompting import enable_prefixes, set_prefixes

B, N, C, H, L = 2, 5, 8, 2, 3


def tiny(layout):
    torch.manual_seed(0)
    # a refiner that is not the identity (instance norm, last norm not zeroed), so that refining shows
    return timm.create_model("refiner_vit_tiny", layout=layout, num_classes=4, refiner_norm="instance",
                             zero_init_refiner=False).eval()


def heads(t):
    return t.reshape(B, -1, H, C // H).transpose(1, 2)


def prefix(length=L):
    return torch.randn(B, length, C), torch.randn(B, length, C)


def refined(attn_mod, tokens):
    return attn_mod.adapt_norm(attn_mod.refiner(tokens))


def attention_outputs(net, x, prefixes):
    """Each block's attention output on the plain model's block inputs, with ``prefixes`` set and the maps chained
    as RefinerViT._run_blocks chains them: what a prefix changes besides the residual stream."""
    inputs = []
    hooks = [b.attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in net.blocks]
    set_prefixes(net, [None] * len(net.blocks))
    try:
        net.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    set_prefixes(net, prefixes)
    outs, attn = [], None
    for blk, need, y in zip(net.blocks, net._maps_needed(), inputs):
        out, nxt = blk.attn(y, attn, need)
        outs.append(out.detach())
        if not blk.is_share:
            attn = nxt
    set_prefixes(net, [None] * len(net.blocks))
    return outs


# -- no prefix: today's model, bit for bit --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["shared", "every"])
def test_absent_or_zero_length_prefixes_leave_the_refiner_unchanged(layout):
    net, x = tiny(layout), torch.randn(3, 1, 8, 8)
    keys = list(net.state_dict())
    plain = block_outputs(net, x)
    enable_prefixes(net)
    assert list(net.state_dict()) == keys
    d = net.embed_dim
    for prefixes in ([None] * 4, [(torch.zeros(3, 0, d), torch.zeros(3, 0, d))] * 4):
        set_prefixes(net, prefixes)
        for a, b in zip(block_outputs(net, x), plain):
            assert torch.equal(a, b)


# -- the design on one attention module, by hand -----------------------------------------------------------------------


def test_attend_block_softmax_is_joint_and_only_the_token_columns_are_carried():
    torch.manual_seed(0)
    a = RefinerAttention(C, H, carry=True).eval()
    x, (pk, pv) = torch.randn(B, N, C), prefix()
    prev = torch.rand(B, H, N, 4 + N)  # an earlier map with 4 prefix columns: only its last N are carried
    a.prefix = (pk, pv)
    q, k, v = a.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    raw = torch.softmax(q @ torch.cat((heads(pk), k), 2).transpose(-2, -1) * a.scale, dim=-1)
    expected_map = torch.cat((raw[..., :L], raw[..., L:] + a.scale * prev[..., 4:]), dim=-1)
    expected = a.proj((expected_map @ torch.cat((heads(pv), v), 2)).transpose(1, 2).reshape(B, N, C))
    maps = []
    out, passed = a(x, prev, need_map=True, maps=maps)
    torch.testing.assert_close(maps[0]["raw"], raw)
    torch.testing.assert_close(maps[0]["raw"].sum(-1), torch.ones(B, H, N))  # one softmax over L + N keys
    torch.testing.assert_close(passed, expected_map)  # passed on: N x (L + N), prefix columns first
    torch.testing.assert_close(out, expected)
    fused, none = a(x, prev)  # the fused kernel when no map is needed: the same output
    assert none is None
    torch.testing.assert_close(fused, expected)


def test_refining_block_leaves_the_prefix_columns_unrefined():
    torch.manual_seed(0)
    a = RefinerAttention(C, H, refine=True, norm="instance", adapt_norm=True).eval()
    x, (pk, pv) = torch.randn(B, N, C), prefix()
    a.prefix = (pk, pv)
    maps = []
    out, _ = a(x, maps=maps)
    raw, got = maps[0]["raw"], maps[0]["refined"]
    assert raw.shape == got.shape == (B, H, N, L + N)
    assert torch.equal(got[..., :L], raw[..., :L])
    # the refiner convolves the N x N token part alone (with the prefix columns in its grid the result differs)
    torch.testing.assert_close(got[..., L:], refined(a, raw[..., L:]))
    assert not torch.allclose(refined(a, raw)[..., L:], got[..., L:], atol=1e-3)
    v = a.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)[2]
    expected = a.proj((got @ torch.cat((heads(pv), v), 2)).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(out, expected)


def test_share_block_uses_its_values_for_the_prefix_columns_or_drops_them():
    torch.manual_seed(0)
    a = RefinerAttention(C, H, share=True, norm="instance").eval()
    x, (pk, pv) = torch.randn(B, N, C), prefix()
    prev = torch.rand(B, H, N, L + N)
    v = heads(a.v(x))
    R = refined(a, prev[..., L:])
    a.prefix = (pk, pv)
    out, passed = a(x, prev)
    expected = a.scale * (prev[..., :L] @ heads(pv) + R @ v)
    torch.testing.assert_close(out, a.proj(expected.transpose(1, 2).reshape(B, N, C)))
    assert passed is prev  # the received map goes on unchanged
    a.prefix = (torch.randn(B, L, C), pv)  # P_k is unused: a share block has no keys
    torch.testing.assert_close(a(x, prev)[0], out)
    a.prefix = None  # no prefix of its own: only the token part applies
    expected = a.scale * (R @ v)
    torch.testing.assert_close(a(x, prev)[0], a.proj(expected.transpose(1, 2).reshape(B, N, C)))
    for bad, cols in ((prefix(L + 1), L), (prefix(2), 0)):
        a.prefix = bad
        with pytest.raises(UserError, match=f"has {cols} prefix columns") as e:
            a(x, prev if cols else prev[..., L:])
        assert "\n" not in str(e.value)


# -- the whole network ---------------------------------------------------------------------------------------------


def test_every_layout_a_prefix_changes_exactly_its_block():
    net, x = tiny("every"), torch.randn(3, 1, 8, 8)
    enable_prefixes(net)
    plain = attention_outputs(net, x, [None] * 4)
    whole = block_outputs(net, x)
    for layer in range(4):
        prefixes = [None] * 4
        prefixes[layer] = (torch.randn(3, 2, 64), torch.randn(3, 2, 64))
        outs = attention_outputs(net, x, prefixes)
        for j in range(4):  # nothing is carried between blocks: only the prompted block's attention changes
            assert torch.equal(outs[j], plain[j]) == (j != layer), (layer, j)
        set_prefixes(net, prefixes)
        blocks = block_outputs(net, x)
        assert all(torch.equal(blocks[j], whole[j]) for j in range(layer))  # earlier blocks: bit-identical
        assert not torch.allclose(blocks[layer], whole[layer], atol=1e-4)


def test_shared_layout_a_prefix_changes_its_block_and_those_reusing_its_map():
    """Blocks 0/2 attend, 1/3 share; block 0's map is carried into block 2, whose map block 3 refines."""
    net, x = tiny("shared"), torch.randn(3, 1, 8, 8)
    enable_prefixes(net)
    plain = attention_outputs(net, x, [None] * 4)

    def changed(prefixes):
        return [not torch.equal(a, b) for a, b in zip(attention_outputs(net, x, prefixes), plain)]

    p = (torch.randn(3, 2, 64), torch.randn(3, 2, 64))
    # attend block 2: itself and its share partner 3 (the joint softmax renormalised the token part it refines)
    assert changed([None, None, p, None]) == [False, False, True, True]
    # attend block 0: its partner 1, and through the carried map block 2 and block 2's partner 3
    assert changed([p, None, None, None]) == [True, True, True, True]
    # a prefix on the partner as well adds its values for the map's prefix columns: block 3 alone changes
    one = attention_outputs(net, x, [None, None, p, None])
    q = (torch.randn(3, 2, 64), torch.randn(3, 2, 64))
    both = attention_outputs(net, x, [None, None, p, q])
    assert [not torch.equal(a, b) for a, b in zip(both, one)] == [False, False, False, True]
    q_other_keys = (torch.randn(3, 2, 64), q[1])
    assert all(torch.equal(a, b) for a, b in zip(attention_outputs(net, x, [None, None, p, q_other_keys]), both))
    # a share block's prefix whose length differs from its partner's map: refused in one line
    set_prefixes(net, [None, (torch.randn(3, 2, 64), torch.randn(3, 2, 64)), None, None])
    with pytest.raises(UserError, match="0 prefix columns"):
        net.forward_features(x)


@pytest.mark.parametrize("name,small", [
    ("coda_prompt", ["strategy.coda_prompt.pool_size=4"]),
    ("dualprompt", ["strategy.dualprompt.pool_size=2"]),
    ("l2p", ["strategy.l2p.pool_size=6", "strategy.l2p.top_k=2", "strategy.l2p.deep=true"]),
])
def test_prompt_methods_run_two_experiences_on_refiner_vit(name, small, tmp_path, data_root, monkeypatch, recwarn):
    over = ["model=refiner_vit_tiny", *TINY_ANY_MODEL, "trainer.limit_train_batches=2", "benchmark.n_experiences=2",
            f"strategy={name}", *small, f"strategy.{name}.first_session=false"]
    cfg = compose(over, data_root)
    init = {k: v.clone() for k, v in build(cfg)[3].net.state_dict().items()}
    result = run(cfg, tmp_path / name)
    assert len(result["accuracy_matrix"]) == 2
    # the frozen norms are back in training mode when each fit starts (frozen again per batch): no Lightning note
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
    after = RunDirectory(tmp_path / name).load_checkpoint(1)["module"]
    assert any(".refiner.norm" in k and "running_mean" in k for k in init)
    changed = {k for k, v in init.items() if not torch.equal(after[f"net.{k}"], v)}
    # the backbone is frozen, its batch-norm statistics included (they are part of the query's function)
    assert all(k.startswith(("prompt.", "head.")) for k in changed), changed
    assert any(k.startswith("prompt.") for k in changed)

    # resume after the first experience reproduces the uninterrupted run (prompts, keys and the frozen statistics)
    resumed = cut_and_resume(monkeypatch, over, data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == result["accuracy_matrix"]
    whole, cut = RunDirectory(tmp_path / name).load_checkpoint(1), RunDirectory(tmp_path / "cut").load_checkpoint(1)
    assert state_equal(whole["module"], cut["module"])


@pytest.mark.parametrize("name,small", [
    ("l2p", ["strategy.l2p.pool_size=6", "strategy.l2p.top_k=2"]),
    ("coda_prompt", ["strategy.coda_prompt.pool_size=4"]),
])
def test_first_session_trains_the_whole_network_in_the_first_experience_only(name, small, tmp_path, data_root,
                                                                             monkeypatch):
    over = ["model=refiner_vit_tiny", *TINY_ANY_MODEL, "trainer.limit_train_batches=2", "benchmark.n_experiences=2",
            f"strategy={name}", *small, f"strategy.{name}.first_session=true"]
    cfg = compose(over, data_root)
    module = build(cfg)[3]
    init = {k: v.clone() for k, v in module.net.state_dict().items()}
    result = run(cfg, tmp_path / name)
    first, last = (RunDirectory(tmp_path / name).load_checkpoint(i)["module"] for i in (0, 1))
    backbone = [k for k in init if not k.startswith(("prompt.", "head."))]
    # the first experience trains the backbone (weights and the refiner's batch-norm statistics) ...
    assert any(not torch.equal(first[f"net.{k}"], init[k]) for k in backbone if "running_mean" in k)
    assert any(not torch.equal(first[f"net.{k}"], init[k]) for k in backbone if k.startswith("blocks."))
    # ... the second leaves all of it as the first left it, and trains the prompts and the classifier
    assert [k for k in backbone if not torch.equal(last[f"net.{k}"], first[f"net.{k}"])] == []
    assert any(not torch.equal(last[f"net.{k}"], first[f"net.{k}"]) for k in init if k.startswith("prompt."))
    costs = result["cost"]["per_experience"]
    assert costs[0]["params_trainable"] == sum(p.numel() for p in module.net.parameters())
    assert costs[1]["params_trainable"] < costs[0]["params_trainable"]

    # resuming after the first experience freezes what the uninterrupted run froze
    resumed = cut_and_resume(monkeypatch, over, data_root, tmp_path / "cut")
    assert resumed["accuracy_matrix"] == result["accuracy_matrix"]
    assert state_equal(last, RunDirectory(tmp_path / "cut").load_checkpoint(1)["module"])
