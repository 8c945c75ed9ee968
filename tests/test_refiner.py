"""Refiner-ViT (cl_vit/models/refiner.py): official sizes, timm's model interface over every registered refiner model,
ViT -> Refiner-ViT loading with unchanged outputs, attention-map read-out, the norm options, and the configs."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import TINY_ANY_MODEL, assert_checkpointing_changes_nothing, compose
from safetensors.torch import save_file

import cl_vit  # noqa: F401  (registers the models)
from cl_vit.errors import UserError
from cl_vit.models import build_model, load_checkpoint
from cl_vit.models.refiner import RefinerViT, checkpoint_filter_fn

REFINER_MODELS = timm.list_models("refiner_vit*") + timm.list_models("vit_*_patch16_224_refined")


def small(name: str, **kw) -> RefinerViT:
    """The registered model at an interface-test size: its own layout, stem and norms; 3 blocks (attend, share,
    attend: an odd depth also covers the last block's fused path), a 2x2 token grid at 32x32 (or 8x8 for tiny)."""
    args = dict(num_classes=5)
    if name != "refiner_vit_tiny":
        args.update(depth=3, embed_dim=32, num_heads=4, img_size=32)
    return timm.create_model(name, **{**args, **kw})


def inputs(model: RefinerViT, batch: int = 2, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    size = size or model.patch_embed.img_size[0]
    return torch.randn(batch, model.in_chans, size, size, generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_every_expected_model_is_registered():
    assert set(REFINER_MODELS) >= {"refiner_vit_tiny", "refiner_vit_s", "refiner_vit_m", "refiner_vit_l",
                                   "vit_base_patch16_224_refined"}


@pytest.mark.parametrize("name,millions,depth,dim,heads", [
    ("refiner_vit_s", 25.0, 16, 384, 12), ("refiner_vit_m", 55.0, 32, 420, 12), ("refiner_vit_l", 80.6, 32, 512, 16)])
def test_official_sizes_match_the_paper(name, millions, depth, dim, heads):
    with torch.device("meta"):  # counting needs no memory or initialisation
        m = timm.create_model(name)
    assert (len(m.blocks), m.embed_dim, m.blocks[0].attn.num_heads) == (depth, dim, heads)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e6 - millions) / millions < 0.01, n
    assert m.pos_embed.shape[1] == 14 * 14 + 1  # conv stem of total stride 16 at 224
    assert [b.is_share for b in m.blocks] == [False, True] * (depth // 2)


def test_base_is_vit_b16_plus_the_refiners():
    with torch.device("meta"):
        r = timm.create_model("vit_base_patch16_224_refined")
        v = timm.create_model("vit_base_patch16_224")
    extra = sum(p.numel() for n, p in r.named_parameters() if ".attn.refiner." in n)
    assert extra > 0
    assert sum(p.numel() for p in r.parameters()) == sum(p.numel() for p in v.parameters()) + extra
    assert set(v.state_dict()) <= set(r.state_dict())


# ---- timm's interface, over every registered refiner model (as timm's tests/test_models.py) ----

@pytest.mark.parametrize("name", REFINER_MODELS)
def test_timm_interface(name):
    m = small(name).eval()
    x = inputs(m)
    n_tokens = m.patch_embed.num_patches + m.num_prefix_tokens
    feats = m.forward_features(x)
    assert feats.shape == (2, n_tokens, m.num_features)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, m.num_features)
    logits = m(x)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(m.forward_head(feats), logits)
    # pretrained_cfg names real modules
    cfg = m.pretrained_cfg
    assert isinstance(m.get_submodule(cfg["first_conv"]), nn.Conv2d)
    names = cfg["classifier"] if isinstance(cfg["classifier"], tuple) else (cfg["classifier"],)
    heads = m.get_classifier() if isinstance(m.get_classifier(), tuple) else (m.get_classifier(),)
    assert len(names) == len(heads) and all(m.get_submodule(n) is h for n, h in zip(names, heads))
    # no_weight_decay names parameters that exist
    params = dict(m.named_parameters())
    nwd = [k for k in m.no_weight_decay() if k in params]
    assert {"pos_embed", "cls_token"} <= set(nwd)
    # group_matcher covers every parameter, blocks in order
    groups = timm.models.group_parameters(m, m.group_matcher())
    assert sorted(sum(groups.values(), [])) == sorted(params)
    block_group = {n.split(".")[1]: g for g, ns in groups.items() for n in ns if n.startswith("blocks.")}
    assert [block_group[str(i)] for i in range(len(m.blocks))] == sorted(block_group.values())
    assert len(set(block_group.values())) == len(m.blocks)
    # reset_classifier(0) gives the pooled features
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), pre)
    heads = m.get_classifier() if isinstance(m.get_classifier(), tuple) else (m.get_classifier(),)
    assert all(h.__class__ is nn.Identity for h in heads)


@pytest.mark.parametrize("name", REFINER_MODELS)
def test_forward_intermediates_matches_forward_features(name):
    m = small(name).eval()
    x = inputs(m)
    final, inter = m.forward_intermediates(x)
    torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
    gh, gw = m.patch_embed.grid_size
    assert [t.shape for t in inter] == [(2, m.embed_dim, gh, gw)] * len(m.blocks)
    (spatial, prefix), = m.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True,
                                                 output_fmt="NLC", stop_early=True)
    assert prefix.shape[1] == m.num_prefix_tokens
    torch.testing.assert_close(m.norm(torch.cat([prefix, spatial], 1)), final, rtol=0, atol=0)


@pytest.mark.parametrize("name", REFINER_MODELS)
def test_grad_checkpointing_gives_the_same_outputs_gradients_and_statistics(name):
    a = small(name, drop_path_rate=0.0).train()
    b = small(name, drop_path_rate=0.0).train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    assert_checkpointing_changes_nothing(a, b, inputs(a, batch=4))


@pytest.mark.parametrize("name", REFINER_MODELS)
def test_other_input_sizes_resample_the_position_embedding(name):
    m = small(name).eval()
    size = m.patch_embed.img_size[0]
    before = m.pos_embed.detach().clone()
    m.set_input_size(img_size=2 * size)
    assert m.pos_embed.shape[1] == 4 * (before.shape[1] - 1) + 1
    torch.testing.assert_close(m.pos_embed[:, :1], before[:, :1])  # the class token's entry is kept
    assert m(inputs(m, size=2 * size)).shape == (2, 5)
    d = small(name, dynamic_img_size=True).eval()
    assert d(inputs(d, size=2 * size)).shape == (2, 5)


@pytest.mark.parametrize("name", REFINER_MODELS)
def test_state_dict_round_trip(name):
    a = small(name).train()
    a(inputs(a, batch=4))  # moves BatchNorm statistics away from their initial values
    a.eval()
    torch.manual_seed(123)
    b = small(name).eval()
    x = inputs(a)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


# ---- the architecture as the official code computes it ----

def test_blocks_chain_maps_as_the_official_code():
    m = small("refiner_vit_s", depth=4).eval()
    x = inputs(m)
    maps = m.get_attention_maps(x)
    assert [d["refined"] is None for d in maps] == [True, False, True, False]
    scale = m.blocks[0].attn.scale
    # attend blocks compute a softmax; share blocks receive the map of the attend block before them,
    # and that map carries scale * the previous attend block's map
    for d in maps[0::2]:
        torch.testing.assert_close(d["raw"].sum(-1), torch.ones_like(d["raw"][..., 0]))
    torch.testing.assert_close(maps[1]["raw"], maps[0]["raw"])
    torch.testing.assert_close(maps[3]["raw"], maps[2]["raw"] + scale * maps[0]["raw"])
    # share block: R = adapt_norm(DLA(A)) * scale, with DLA(A) = A + branch(A)
    attn = m.blocks[1].attn
    torch.testing.assert_close(maps[1]["refined"], attn.adapt_norm(attn.refiner(maps[1]["raw"])) * scale)
    # doubled residual and MLP-only LayerScale 1e-5
    blk = m.blocks[0]
    assert blk.residual_scale == 2.0 and isinstance(blk.ls1, nn.Identity)
    torch.testing.assert_close(blk.ls2.gamma, torch.full_like(blk.ls2.gamma, 1e-5))
    # the refiner: 1x1 H -> 3H, depthwise 3x3 (padding 1), 1x1 3H -> H, BatchNorm after each
    r = attn.refiner
    assert (r.expand.in_channels, r.expand.out_channels, r.dw.groups, r.dw.padding, r.reduce.out_channels) == \
        (4, 12, 12, (1, 1), 4)
    assert all(isinstance(n, nn.BatchNorm2d) for n in (r.norm1, r.norm2, r.norm3, attn.adapt_norm))
    assert not hasattr(attn, "qkv") and attn.v.out_features == m.embed_dim  # share blocks have no q or k


def test_block_output_is_the_refined_map_times_v():
    m = small("refiner_vit_s", depth=2).eval()
    x = inputs(m)
    maps = m.get_attention_maps(x)
    tokens = m._embed(x)
    h, _ = m.blocks[0](tokens, None, True)
    blk = m.blocks[1]
    a = blk.attn

    def ln(norm, t):  # the official LayerNorm(eps=1e-6), applied to x * adjust_ratio (0.5)
        return F.layer_norm(t, (t.shape[-1],), norm.weight, norm.bias, eps=1e-6)

    z = ln(blk.norm1, h * 0.5)
    v = a.v(z).reshape(2, -1, a.num_heads, a.head_dim).transpose(1, 2)
    attn_out = a.proj((maps[1]["refined"] @ v).transpose(1, 2).reshape(z.shape))
    x = h + attn_out / 0.5
    expected = x + blk.mlp(ln(blk.norm2, x * 0.5)) * blk.ls2.gamma / 0.5
    torch.testing.assert_close(blk(h, maps[1]["raw"])[0], expected)


@pytest.mark.parametrize("name,refined", [("refiner_vit_tiny", [False, True] * 2),
                                          ("vit_base_patch16_224_refined", [True] * 3)])
def test_attention_maps_api(name, refined):
    m = small(name).train()
    x = inputs(m)
    maps = m.get_attention_maps(x)
    assert m.training  # the mode is restored
    n = m.patch_embed.num_patches + m.num_prefix_tokens
    heads = m.blocks[0].attn.num_heads
    assert len(maps) == len(m.blocks)
    for d, has in zip(maps, refined):
        assert set(d) == {"raw", "refined"}
        assert d["raw"].shape == (2, heads, n, n) and not d["raw"].requires_grad
        assert (d["refined"] is not None) == has
        if has:
            assert d["refined"].shape == (2, heads, n, n)
            if m.layout == "every":  # at initialisation the refiner is an exact identity
                torch.testing.assert_close(d["refined"], d["raw"], rtol=0, atol=0)


@pytest.mark.parametrize("name,depth,fused", [
    ("refiner_vit_s", 3, 1), ("refiner_vit_s", 4, 0), ("vit_base_patch16_224_refined", 3, 0)])
def test_fused_attention_where_no_map_is_needed(monkeypatch, name, depth, fused):
    m = small(name, depth=depth).eval()
    x = inputs(m)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    y = m.forward_features(x)
    assert len(calls) == fused
    # the fused block gives what the explicit computation gives (its carried map added separately)
    monkeypatch.setattr(m, "_maps_needed", lambda: [True] * len(m.blocks))
    torch.testing.assert_close(m.forward_features(x), y, rtol=1e-5, atol=1e-5)


# ---- ViT -> Refiner-ViT with nothing lost ----

@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    """Randomly initialised timm ViTs (2 blocks, their real width and heads) saved as local files."""
    torch.manual_seed(7)
    out = {}
    for size in ("tiny", "small", "base"):
        vit = timm.create_model(f"vit_{size}_patch16_224", depth=2, img_size=64)
        with torch.no_grad():  # give the norms and biases non-trivial values too
            for p in vit.parameters():
                p.add_(0.02 * torch.randn_like(p))
        path = tmp_path_factory.mktemp("vit") / f"vit_{size}.safetensors"
        save_file(vit.state_dict(), str(path))
        out[size] = (vit.eval(), path)
    return out


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_vit_weights_load_by_timms_route_with_identical_logits(vit_files, size):
    vit, path = vit_files[size]
    r = timm.create_model(f"vit_{size}_patch16_224_refined", pretrained=True, depth=2, img_size=64,
                          pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (r.eval()(x) - vit(x)).abs().max() < 1e-5
        assert (r.train()(x) - vit.train()(x)).abs().max() < 1e-5  # BatchNorm in training mode too
    vit.eval()
    # a refiner block really refines: moving the zero-initialised norm changes the output
    with torch.no_grad():
        r.blocks[0].attn.refiner.norm3.weight.fill_(1.0)
        assert (r.eval()(x) - vit(x)).abs().max() > 1e-3


def test_vit_weights_load_by_model_checkpoint(vit_files):
    vit, path = vit_files["base"]
    cfg = {"name": "vit_base_patch16_224_refined", "checkpoint": str(path), "depth": 2}
    r = build_model(cfg, num_classes=1000, in_chans=3, img_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert (r(x) - vit(x)).abs().max() < 1e-5
    # a benchmark with other classes: the head stays at its initialisation, the features are the ViT's
    r10 = build_model(cfg, num_classes=10, in_chans=3, img_size=64).eval()
    with torch.no_grad():
        assert (r10.forward_head(r10.forward_features(x), pre_logits=True)
                - vit.forward_head(vit.forward_features(x), pre_logits=True)).abs().max() < 1e-5


def test_vit_weights_resample_to_another_input_size(vit_files):
    vit, path = vit_files["small"]
    kw = dict(pretrained=True, depth=2, img_size=96, pretrained_cfg_overlay=dict(file=str(path)))
    r = timm.create_model("vit_small_patch16_224_refined", **kw).eval()
    v = timm.create_model("vit_small_patch16_224", **kw).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert (r(x) - v(x)).abs().max() < 1e-5


def test_vit_weights_into_the_shared_layout_take_v_from_qkv(vit_files):
    vit, path = vit_files["small"]
    m = timm.create_model("refiner_vit_s", stem="patch", depth=2, embed_dim=384, num_heads=6, mlp_ratio=4.0, img_size=64,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(m.blocks[1].attn.v.weight, vit.blocks[1].attn.qkv.weight[768:])
    torch.testing.assert_close(m.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)


def test_official_checkpoint_names_load():
    """Keys as the official models/refined_transformer.py names them (DLA, adapt_bn, scale_channel, PatchEmbed_cnn
    conv1/bn1..., the share blocks' V-only `qkv`, the token-labelling aux_head)."""
    m = small("refiner_vit_s", depth=2).train()
    m(inputs(m, batch=4))
    m.eval()
    official = {}
    stem = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}
    dla = {"expand": "conv_exp", "norm1": "bn1", "dw": "depth_sep_conv", "norm2": "bn2", "reduce": "conv_pro",
           "norm3": "bn3"}
    for k, v in m.state_dict().items():
        p = k.split(".")
        if k.startswith("patch_embed.stem."):
            k = f"patch_embed.{stem[p[2]]}.{p[3]}"
        elif ".attn.refiner." in k:
            k = f"blocks.{p[1]}.attn.DLA.{dla[p[4]]}.{p[5]}"
        elif ".attn.adapt_norm." in k:
            k = k.replace("adapt_norm", "adapt_bn")
        elif k.endswith(".attn.v.weight") or k.endswith(".attn.v.bias"):
            k = k.replace(".attn.v.", ".attn.qkv.")
        elif k.endswith(".ls2.gamma"):
            k = k.replace("ls2.gamma", "mlp.scale_channel")
        official[k] = v
    assert not set(official) & {k for k in m.state_dict() if "refiner" in k}
    torch.manual_seed(5)
    other = small("refiner_vit_s", depth=2).eval()
    other.load_state_dict(checkpoint_filter_fn({"state_dict": official}, other))
    x = inputs(m)
    torch.testing.assert_close(other(x), m(x), rtol=0, atol=0)
    # a token-labelling checkpoint (return_dense): refused in one line without the aux head, evaluated as the
    # official code with it (x_cls + 0.5 x max over patches of aux_head, models/refined_transformer.py L466-468)
    official["aux_head.weight"] = torch.randn(m.num_classes, m.embed_dim)
    official["aux_head.bias"] = torch.randn(m.num_classes)
    with pytest.raises(UserError, match="load it with model.return_dense=true") as err:
        checkpoint_filter_fn({"state_dict": official}, other)
    assert "\n" not in str(err.value)
    dense = small("refiner_vit_s", depth=2, return_dense=True).eval()
    dense.load_state_dict(checkpoint_filter_fn({"state_dict": official}, dense))
    tokens = m.forward_features(x)
    aux = tokens[:, 1:] @ official["aux_head.weight"].T + official["aux_head.bias"]
    torch.testing.assert_close(dense(x), m(x) + 0.5 * aux.max(1)[0], rtol=1e-5, atol=1e-5)


# ---- normalisation inside the refiner ----

def test_batch_independent_refiner_norm():
    x = inputs(small("refiner_vit_tiny"), batch=6)
    bn = small("refiner_vit_tiny", stem="conv").train()
    inst = small("refiner_vit_tiny", stem="conv", refiner_norm="instance").train()
    assert any(isinstance(mod, nn.BatchNorm2d) for mod in bn.modules())
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in inst.modules())
    # BatchNorm: a sample's output depends on the rest of the batch; instance/layer norm: it does not, and
    # evaluation computes the same function as training
    assert not torch.allclose(bn(x)[:2], bn(x[:2]), atol=1e-4)
    for norm in ("instance", "layer"):
        m = small("refiner_vit_tiny", stem="conv", refiner_norm=norm).train()
        torch.testing.assert_close(m(x)[:2], m(x[:2]), rtol=1e-5, atol=1e-5)
        train_out = m(x)
        torch.testing.assert_close(m.eval()(x), train_out, rtol=1e-5, atol=1e-5)
    stem_bn = small("refiner_vit_tiny", stem="conv", refiner_norm="instance", stem_norm="batch")
    assert isinstance(stem_bn.patch_embed.stem[1], nn.BatchNorm2d)
    assert isinstance(stem_bn.blocks[1].attn.refiner.norm1, nn.GroupNorm)


@pytest.mark.parametrize("kw,words", [
    (dict(layout="sometimes"), "model.layout"), (dict(refiner_norm="sync"), "model.refiner_norm"),
    (dict(stem="conv", patch_size=3), "model.patch_size"), (dict(stem="hybrid"), "model.stem")])
def test_bad_options_fail_with_one_line(kw, words):
    with pytest.raises(UserError, match=words):
        timm.create_model("refiner_vit_tiny", **kw)


@pytest.mark.parametrize("kw,words", [(dict(drop_pathrate=0.1), "model.drop_pathrate is not an argument"),
                                      (dict(attn_layer="diff"), "model.attn_layer='diff' is not supported"),
                                      (dict(scale_mlp_norm=True), "model.scale_mlp_norm=true")])
def test_unknown_or_unsupported_keywords_are_refused_not_swallowed(kw, words):
    with pytest.raises(UserError, match=words) as err:
        timm.create_model("refiner_vit_tiny", **kw)
    assert "\n" not in str(err.value)


def test_the_vit_twins_cannot_be_taken_for_the_official_models():
    from cl_vit.models import build_model

    assert not any(timm.is_model(f"refiner_vit_{s}_patch16_224") for s in ("tiny", "small", "base"))
    with pytest.raises(UserError, match="now vit_small_patch16_224_refined: a ViT twin"):
        build_model({"name": "refiner_vit_small_patch16_224"}, 10, 3, 32)


# ---- the configs and the default run ----

@pytest.mark.parametrize("model", ["refiner_vit_tiny", "refiner_vit_s", "refiner_vit_m", "refiner_vit_l",
                                   "vit_base_patch16_224_refined"])
def test_model_configs_build_and_train_on_the_default_benchmark(model, data_root):
    from cl_vit.run import build

    over = [f"model={model}", *TINY_ANY_MODEL]
    if model != "refiner_vit_tiny":
        over += ["model.patch_size=2", "+model.depth=2"]  # a 4x4 token grid at 8x8; depth 2 keeps the test cheap
    cfg = compose(over, data_root)
    _, scenario, info, module, _ = build(cfg)
    net = module.net
    assert isinstance(net, RefinerViT) and net.patch_embed.grid_size == (4, 4)
    x, y = next(iter(torch.utils.data.DataLoader(scenario.train_stream[0].dataset, batch_size=8)))[:2]
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    assert math.isfinite(loss.item()) and net.blocks[-1].mlp.fc1.weight.grad.abs().sum() > 0


def test_default_run_uses_refiner_vit_tiny(data_root):
    assert compose([], data_root).model.name == "refiner_vit_tiny"


def test_large_model_on_tiny_images_names_the_fix(data_root):
    from cl_vit.run import build

    with pytest.raises(UserError, match=r"model\.patch_size"):
        build(compose(["model=refiner_vit_s", *TINY_ANY_MODEL], data_root))


def test_load_checkpoint_of_a_refiner_run(tmp_path):
    m = small("refiner_vit_tiny").train()
    m(inputs(m, batch=4))
    torch.save({"state_dict": m.state_dict()}, tmp_path / "w.pth")
    torch.manual_seed(9)
    other = small("refiner_vit_tiny")
    load_checkpoint(other, tmp_path / "w.pth")
    x = inputs(m)
    torch.testing.assert_close(other.eval()(x), m.eval()(x), rtol=0, atol=0)
