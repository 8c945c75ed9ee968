"""Every model the suite registers with timm behaves as timm's own models do (issue 25).

The checks run over timm's registry (every entry point defined under ``cl_vit.``), so a model registered later is
covered without touching this file. Large models are built through their own entry point at a reduced depth, width
and input size (``SMALL``); a model without an entry there is checked as registered.

``PYTHONPATH=. python tests/test_timm_contract.py`` runs the same checks and prints the yes/no table of docs/models.md.
"""
from __future__ import annotations

import fnmatch
import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from conftest import assert_checkpointing_changes_nothing
from timm.models import _registry

from cl_vit.errors import UserError
from cl_vit.models import build_model

DOCS = Path(__file__).resolve().parent.parent / "docs" / "models.md"

#: every model the suite registers
SUITE = sorted(n for n, fn in _registry._model_entrypoints.items() if fn.__module__.startswith("cl_vit."))

#: reduced geometry for the big models, by name pattern (first match wins): (keyword arguments, input height/width)
SMALL = (
    ("refiner_vit_tiny*", {}, None),
    ("refiner_vit_*", dict(img_size=32, embed_dim=32, depth=4, num_heads=4), None),
    ("vit_*_patch16_224_refined*", dict(img_size=32, embed_dim=32, depth=2, num_heads=4), None),
    ("resnet32_cifar", dict(depths=(1, 1, 1)), None),
    ("resnet50_ldam", dict(layers=(1, 1, 1, 1)), 32),
)
BATCH = 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _small(name: str) -> tuple[dict, int | None]:
    for pattern, kwargs, size in SMALL:
        if fnmatch.fnmatchcase(name, pattern):
            return dict(kwargs), size
    return {}, None


def make(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """``timm.create_model(name)`` at the reduced size, seeded (two calls give the same weights)."""
    small, _ = _small(name)
    torch.manual_seed(seed)
    return timm.create_model(name, **{**small, **kwargs})


def batch(name: str, model: nn.Module, dtype=torch.float32) -> torch.Tensor:
    _, size = _small(name)
    cfg = model.pretrained_cfg
    chans = getattr(model, "in_chans", None) or cfg["input_size"][0]
    hw = (size, size) if size else (getattr(model, "_traits", {}).get("img_size") or cfg["input_size"][1:])
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, chans, *hw, generator=g).to(dtype)


def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _feature_maps(model: nn.Module, x: torch.Tensor, indices) -> list[torch.Tensor]:
    return model.forward_intermediates(x, indices=indices, intermediates_only=True)


# -- the contract points ----------------------------------------------------------------------------------------------


def check_device_dtype(name):
    """device= and dtype= at creation: every parameter and buffer made there, and a float64 forward."""
    m = make(name, device="cpu", dtype=torch.float64).eval()
    wrong = [n for n, t in _tensors(m) if t.is_floating_point() and t.dtype != torch.float64]
    assert not wrong, f"not float64: {wrong[:3]}"
    assert m(batch(name, m, torch.float64)).dtype == torch.float64


def check_meta_device(name):
    """device='meta' builds the registered (full-size) model without allocating any tensor."""
    torch.manual_seed(0)
    m = timm.create_model(name, device="meta")
    off = [n for n, t in _tensors(m) if t.device.type != "meta"]
    assert not off, f"not on meta: {off[:3]}"


def check_pretrained_cfg(name):
    """The registered name resolves to a pretrained cfg with the fields timm's factory reads, naming real modules."""
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg is not None, f"no pretrained cfg registered for {name}"
    cfg = cfg.to_dict()
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "first_conv", "classifier"):
        assert cfg.get(key) is not None, f"pretrained cfg of {name} has no {key}"
    m = make(name)
    assert m.pretrained_cfg["architecture"] == name
    first = m.get_submodule(m.pretrained_cfg["first_conv"])
    assert isinstance(first, nn.Conv2d)
    assert first.in_channels == batch(name, m).shape[1]
    heads = m.get_classifier()
    heads = heads if isinstance(heads, tuple) else (heads,)
    names = m.pretrained_cfg["classifier"]
    names = tuple(names) if isinstance(names, (tuple, list)) else (names,)
    assert len(names) == len(heads) and all(m.get_submodule(n) is h for n, h in zip(names, heads))


def check_reset_classifier(name):
    """reset_classifier keeps the model's device and dtype; 0 classes gives the pre-logits features."""
    m = make(name, dtype=torch.float64).eval()
    x = batch(name, m, torch.float64)
    pre = m.forward_head(m.forward_features(x), pre_logits=True)
    m.reset_classifier(7)
    wrong = [n for n, t in _tensors(m) if t.is_floating_point() and t.dtype != torch.float64]
    assert not wrong, f"not float64 after reset_classifier: {wrong[:3]}"
    assert m(x).shape == (BATCH, 7) and m.num_classes == 7
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), pre, rtol=0, atol=0)
    meta = timm.create_model(name, device="meta", **_small(name)[0])
    meta.reset_classifier(3)
    off = [n for n, t in _tensors(meta) if t.device.type != "meta"]
    assert not off, f"reset_classifier left the meta device: {off[:3]}"


def check_forward_features_head(name):
    """forward = forward_head(forward_features); pre_logits has num_features channels."""
    m = make(name).eval()
    x = batch(name, m)
    feats = m.forward_features(x)
    torch.testing.assert_close(m.forward_head(feats), m(x), rtol=0, atol=0)
    pre = m.forward_head(feats, pre_logits=True)
    assert pre.shape == (BATCH, m.num_features) and m.num_features == m.head_hidden_size


def check_forward_intermediates(name):
    """forward_intermediates: the same final features, one NCHW map per feature_info entry, as feature_info says."""
    m = make(name).eval()
    x = batch(name, m)
    final, inter = m.forward_intermediates(x)
    torch.testing.assert_close(final, m.forward_features(x), rtol=0, atol=0)
    info = m.feature_info
    assert len(inter) == len(info)
    for t, entry in zip(inter, info):
        assert t.shape == (BATCH, entry["num_chs"], x.shape[2] // entry["reduction"], x.shape[3] // entry["reduction"])
    last = _feature_maps(m, x, indices=1)
    torch.testing.assert_close(last[0], inter[-1], rtol=0, atol=0)


def _out_indices(name: str) -> tuple[int, ...]:
    n = len(make(name).feature_info)
    return (n - 2, n - 1) if n > 1 else (0,)


def check_features_getter(name):
    """features_only=True (the model's default feature class): the feature maps and feature_info of forward_intermediates."""
    idx = _out_indices(name)
    plain = make(name).eval()
    feat = make(name, features_only=True, out_indices=idx).eval()
    x = batch(name, plain)
    want = _feature_maps(plain, x, list(idx))
    got = feat(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert feat.feature_info.channels() == [t.shape[1] for t in want]
    assert feat.feature_info.reduction() == [x.shape[-1] // t.shape[-1] for t in want]


def _to_nchw(model: nn.Module, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if t.ndim == 3:  # tokens: drop the prefix tokens, fold the grid
        t = t[:, getattr(model, "num_prefix_tokens", 0):]
        t = t.transpose(1, 2).reshape(like.shape)
    return t


def check_features_fx(name):
    """features_only=True, feature_cls='fx' (torch.fx through timm's create_feature_extractor): the same maps."""
    idx = _out_indices(name)
    plain = make(name).eval()
    feat = make(name, features_only=True, out_indices=idx, feature_cls="fx").eval()
    x = batch(name, plain)
    want = _feature_maps(plain, x, list(idx))
    got = feat(x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(_to_nchw(plain, g, w), w, **TOL)
    assert feat.feature_info.channels() == [t.shape[1] for t in want]


def check_fx(name):
    """The whole model traced by timm's create_feature_extractor (torch.fx) computes what eager does."""
    from timm.models import create_feature_extractor, get_graph_node_names

    m = make(name).eval()
    x = batch(name, m)
    _, eval_nodes = get_graph_node_names(m)
    traced = create_feature_extractor(m, return_nodes={eval_nodes[-1]: "out"})
    torch.testing.assert_close(traced(x)["out"], m(x), **TOL)


def check_torchscript(name):
    """torch.jit.script of the model built with scriptable=True computes what eager does."""
    m = make(name, scriptable=True).eval()
    x = batch(name, m)
    scripted = torch.jit.script(m)
    torch.testing.assert_close(scripted(x), m(x), **TOL)


def check_export(name):
    """torch.export of the model computes what eager does."""
    m = make(name).eval()
    x = batch(name, m)
    exported = torch.export.export(m, (x,))
    torch.testing.assert_close(exported.module()(x), m(x), **TOL)


def check_grad_checkpointing(name):
    """set_grad_checkpointing: the same outputs, gradients and BatchNorm statistics as without."""
    a, b = make(name).train(), make(name).train()
    b.set_grad_checkpointing(True)
    assert_checkpointing_changes_nothing(a, b, batch(name, a))
    b.set_grad_checkpointing(False)


def check_no_weight_decay(name):
    """no_weight_decay names only parameters the model has (or token slots it lacks), and every top-level
    embedding parameter (tokens, position embedding)."""
    m = make(name)
    nwd = m.no_weight_decay()
    assert isinstance(nwd, set) and all(isinstance(k, str) for k in nwd)
    params = dict(m.named_parameters())
    for k in nwd:
        assert k in params or getattr(m, k, None) is None, f"no_weight_decay names {k}, which is not a parameter"
    top = {k for k in params if "." not in k}
    assert top <= nwd, f"embeddings left to weight decay: {top - nwd}"


def check_group_matcher(name):
    """group_matcher puts every parameter in one group: the stem first, blocks in order, the classifier last."""
    m = make(name)
    first = m.pretrained_cfg["first_conv"]
    heads = m.pretrained_cfg["classifier"]
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    for coarse in (False, True):
        layer = timm.models.group_parameters(m, m.group_matcher(coarse=coarse), reverse=True)
        assert sorted(layer) == sorted(n for n, _ in m.named_parameters())
        assert layer[f"{first}.weight"] == 0, "the first conv is not in the stem group"
        last = max(layer.values())
        assert all(layer[n] == last for n in layer if n.startswith(tuple(f"{h}." for h in heads)))
        assert len(set(layer.values())) > 2


def check_prune_intermediate_layers(name):
    """prune_intermediate_layers drops what the kept features do not need, and they stay as they were."""
    m = make(name).eval()
    x = batch(name, m)
    n = len(m.feature_info)
    idx = [max(n - 3, 0)]
    want = _feature_maps(m, x, idx)
    before = sum(p.numel() for p in m.parameters())
    kept = m.prune_intermediate_layers(idx, prune_head=True, prune_norm=True)
    assert list(kept) == idx
    assert sum(p.numel() for p in m.parameters()) < before
    torch.testing.assert_close(_feature_maps(m, x, idx)[0], want[0], rtol=0, atol=0)


def check_unknown_keyword(name):
    """An unknown keyword is refused with a TypeError (what timm's callers catch); through the suite's config
    (``model.not_an_argument=1``) with one line naming it."""
    with pytest.raises(TypeError, match="not_an_argument"):
        make(name, not_an_argument=1)
    with pytest.raises(UserError, match="not_an_argument") as e:
        build_model({"name": name, "not_an_argument": 1, **_small(name)[0]}, 3, in_chans=3, img_size=32)
    assert "\n" not in str(e.value)


CHECKS = {
    "device/dtype": check_device_dtype,
    "meta device": check_meta_device,
    "pretrained_cfg": check_pretrained_cfg,
    "reset_classifier": check_reset_classifier,
    "forward_features/head": check_forward_features_head,
    "forward_intermediates": check_forward_intermediates,
    "features_only getter": check_features_getter,
    "features_only fx": check_features_fx,
    "grad checkpointing": check_grad_checkpointing,
    "no_weight_decay": check_no_weight_decay,
    "group_matcher": check_group_matcher,
    "prune_intermediate_layers": check_prune_intermediate_layers,
    "unknown keyword TypeError": check_unknown_keyword,
    "TorchScript": check_torchscript,
    "FX": check_fx,
    "torch.export": check_export,
}


def test_the_registry_holds_the_suite_models():
    assert {"refiner_vit_tiny", "refiner_vit_l", "vit_base_patch16_224_refined", "vit_micro_patch2_8",
            "resnet32_cifar", "resnet50_ldam", "refiner_vit_s_distilled"} <= set(SUITE)


@pytest.mark.parametrize("point", list(CHECKS))
@pytest.mark.parametrize("name", SUITE)
def test_contract(name, point):
    CHECKS[point](name)


@pytest.mark.parametrize("name", SUITE)
def test_pretrained_true_loads_a_local_file_by_timms_route(name, tmp_path):
    """``pretrained=True, pretrained_cfg_overlay=dict(file=...)``: the model's own weights load exactly; a student
    (``*_distilled``) loads its backbone's, its DIST token and head kept at their initialisation."""
    from safetensors.torch import save_file

    base = name[: -len("_distilled")] if name.endswith("_distilled") else name
    source = make(base, seed=1)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    fresh = make(name, seed=2)
    loaded = make(name, seed=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    own = loaded.state_dict()
    for k, v in source.state_dict().items():
        torch.testing.assert_close(own[k], v, rtol=0, atol=0, msg=k)
    for k in set(own) - set(source.state_dict()):  # the student's own parts
        torch.testing.assert_close(own[k], fresh.state_dict()[k], rtol=0, atol=0, msg=k)
    assert set(own) - set(source.state_dict()) == ({"dist_token", "head_dist.weight", "head_dist.bias"}
                                                   if name != base else set())


def test_resnet50_weights_load_into_resnet50_ldam_but_its_cosine_classifier(tmp_path):
    from safetensors.torch import save_file

    small = _small("resnet50_ldam")[0]
    torch.manual_seed(1)
    plain = timm.create_model("resnet50", **small)
    path = tmp_path / "resnet50.safetensors"
    save_file(plain.state_dict(), str(path))
    fresh = make("resnet50_ldam", seed=2)
    loaded = make("resnet50_ldam", seed=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, (fresh if k == "fc.weight" else plain).state_dict()[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("kw", [dict(dynamic_img_size=True), dict(reg_tokens=2, no_embed_class=True),
                                dict(pos_embed="none", reg_tokens=1)])
@pytest.mark.parametrize("name", ["vit_micro_patch2_8_distilled", "refiner_vit_tiny_distilled"])
def test_student_token_embedding_is_the_backbones_plus_dist(name, kw):
    """A student's own _pos_embed (scriptable) is its backbone's, with the DIST token after the class token."""
    m = make(name, **kw).eval()
    x = batch(name, m)
    if kw.get("dynamic_img_size"):  # another input size: pos_embed is resampled
        x = torch.cat([x, x], dim=-1)
    patches = m.patch_embed(x)
    with m._pos_embed_prefix():
        want = type(m)._backbone_class._pos_embed(m, patches)
    want = torch.cat((want[:, :1], m.dist_token.expand(len(x), -1, -1), want[:, 1:]), dim=1)
    torch.testing.assert_close(m._pos_embed(patches), want, rtol=0, atol=0)


# -- the table in docs/models.md --------------------------------------------------------------------------------------

TABLE_START = "<!-- timm-contract-table -->"


def table() -> str:
    """The yes/no table of docs/models.md: each check above run on each registered model."""
    rows = ["| model | " + " | ".join(CHECKS) + " |", "| --- |" + " --- |" * len(CHECKS)]
    for name in SUITE:
        cells = []
        for fn in CHECKS.values():
            try:
                fn(name)
                cells.append("yes")
            except Exception:  # noqa: BLE001  (a failed check of any kind is a "no")
                cells.append("no")
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def test_docs_table_lists_every_model_and_point():
    text = DOCS.read_text()
    assert TABLE_START in text, f"{DOCS} has no {TABLE_START} table"
    lines = text.split(TABLE_START, 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", *CHECKS]
    rows = [ln for ln in lines[2:] if ln.startswith("| `")]
    assert [re.match(r"\| `([^`]+)`", r).group(1) for r in rows] == SUITE
    for r in rows:  # the goal is all yes; test_contract checks each cell
        cells = [c.strip() for c in r.strip("|").split("|")[1:]]
        assert cells == ["yes"] * len(CHECKS), r


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table())
    sys.exit(0)
