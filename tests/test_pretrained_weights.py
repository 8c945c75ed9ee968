"""Pre-trained weights: model.checkpoint=PATH (.safetensors, .pth, .bin, cl_vit run checkpoints) into any backbone,
and model.pretrained=true failing at once, in one line, when the weights cannot be had (no network in tests)."""
import pytest
import torch
from conftest import TINY, run_cli, script_module
from safetensors.torch import save_file

import cl_vit  # noqa: F401
from cl_vit import models
from cl_vit.errors import UserError
from cl_vit.models import build_model, weights_origin

MICRO = {"name": "vit_micro_patch2_8"}


def reference(num_classes=10, **kw):
    import timm

    torch.manual_seed(123)
    return timm.create_model("vit_micro_patch2_8", num_classes=num_classes, **kw)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_checkpoint_formats_load_into_the_backbone(tmp_path, suffix):
    ref = reference()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    torch.manual_seed(0)
    net = build_model({**MICRO, "checkpoint": str(path)}, 10, 1, 8)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert weights_origin(net) == f"checkpoint:{path}"
    assert weights_origin(build_model(MICRO, 10, 1, 8)) is None


def test_foreign_head_size_and_position_embedding_are_adapted(tmp_path):
    ref = reference(num_classes=1000, img_size=16)  # another head and 8x8 patches instead of 4x4
    path = tmp_path / "w.pth"
    torch.save({"state_dict": ref.state_dict()}, path)
    torch.manual_seed(0)
    net = build_model({**MICRO, "checkpoint": str(path)}, 10, 1, 8)
    assert net.pos_embed.shape != ref.pos_embed.shape  # resampled by timm's checkpoint_filter_fn
    assert torch.equal(net.blocks[2].attn.qkv.weight, ref.blocks[2].attn.qkv.weight)
    assert net.head.weight.shape == (10, 64)


def test_a_run_checkpoint_initialises_a_new_backbone(tmp_path):
    ref = reference()
    path = tmp_path / "exp_004.pt"
    torch.save({"experience": 4, "module": {**{f"net.{k}": v for k, v in ref.state_dict().items()},
                                            "seen_mask": torch.ones(10, dtype=torch.bool)}}, path)
    net = build_model({**MICRO, "checkpoint": str(path)}, 10, 1, 8)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())


def test_checkpoint_of_another_model_fails_in_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(UserError) as e:
        build_model({**MICRO, "checkpoint": str(path)}, 10, 1, 8)
    assert "does not fit" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        build_model({**MICRO, "checkpoint": str(tmp_path / "missing.pth")}, 10, 1, 8)


def test_pretrained_offline_fails_at_once_saying_how_to_give_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = {"name": "vit_tiny_patch16_224", "pretrained": True, "pretrained_tag": "augreg_in21k_ft_in1k"}
    with pytest.raises(UserError) as e:
        build_model(cfg, 10, 3, 224)
    assert "model.checkpoint=PATH" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)
    # no offline flag, but the hub does not answer
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(models, "_reachable", lambda url, timeout=4.0: False)
    with pytest.raises(UserError, match="cannot be reached.*model.checkpoint=PATH"):
        build_model(cfg, 10, 3, 224)
    # a model timm has no weights for, and an unknown tag
    with pytest.raises(UserError, match="no pretrained weights"):
        build_model({**MICRO, "pretrained": True}, 10, 1, 8)
    with pytest.raises(UserError, match="not a timm tag"):
        build_model({**cfg, "pretrained_tag": "nope"}, 10, 3, 224)


def test_unreachable_host_is_detected():
    assert not models._reachable("https://cl-vit-test.invalid", timeout=2.0)


def test_cli_pretrained_offline_exits_2_with_one_line(tmp_path, data_root):
    proc = run_cli(*TINY, "model.name=vit_tiny_patch16_224", "model.pretrained=true",
                   "model.pretrained_tag=augreg_in21k_ft_in1k", "model.patch_size=2", "dry_run=true",
                   f"hydra.run.dir={tmp_path / 'run'}", data_root=data_root, timeout=120,
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: pretrained weights for 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'")
    assert sum(ln.startswith("error:") for ln in lines) == 1


# -- the default stream's pre-trained backbone (weights/) ------------------------------------------------------------

PRETRAINED_METHODS = ("simplecil", "slca", "l2p", "dualprompt", "coda_prompt", "aper", "ease", "inflora", "sdlora")


def test_methods_built_on_a_pretrained_backbone_start_from_the_shipped_one_on_the_default_stream():
    from conftest import compose
    from safetensors import safe_open

    from cl_vit.config import CONFIG_DIR

    shipped = CONFIG_DIR.parent / "weights" / "refiner_vit_tiny-fmnist8.safetensors"
    for name in PRETRAINED_METHODS:
        model = compose([f"strategy={name}"]).model
        assert model.checkpoint == str(shipped) and model.checkpoint_head is False, name
        # another model, another benchmark: no shipped weights (the model's own initialisation)
        assert compose([f"strategy={name}", "model=vit_micro"]).model.checkpoint is None, name
        assert compose([f"strategy={name}", "benchmark=synthetic"]).model.checkpoint is None, name
    for name in ("finetune", "l2", "ranpac", "gcab", "replay"):  # from scratch
        assert compose([f"strategy={name}"]).model.checkpoint is None, name
    # the closer-look arms name their own checkpoint
    assert compose(["experiment=closer-look-digits/l2p"]).model.checkpoint.endswith("pretrain-fmnist-8/checkpoints/"
                                                                                     "exp_000.pt")
    # a safetensors file (tensors only, nothing that runs code) that fits the default backbone but its classifier
    with safe_open(str(shipped), "pt") as f:
        keys = set(f.keys())
        some = next(k for k in sorted(keys) if k.startswith("blocks.0.attn.qkv.weight"))
        stored = f.get_tensor(some)
    cfg = compose(["strategy=simplecil"])
    net = build_model(dict(cfg.model), 10, 1, 8)
    own = net.state_dict()
    assert keys == {k for k in own if not k.startswith("head.")}
    assert torch.equal(own[some], stored)


def test_export_backbone_keeps_the_network_but_its_classifier(tmp_path):
    from safetensors.torch import load_file

    export = script_module("export_backbone")
    net = reference()
    state = {f"net.{k}": v for k, v in net.state_dict().items()} | {"strategy_state": torch.zeros(1)}
    torch.save({"module": state}, tmp_path / "exp_000.pt")
    assert export.main([str(tmp_path / "exp_000.pt"), str(tmp_path / "b.safetensors")]) == 0
    back = load_file(str(tmp_path / "b.safetensors"))
    assert set(back) == {k for k in net.state_dict() if not k.startswith("head.")}
    assert all(torch.equal(back[k], net.state_dict()[k]) for k in back)
    torch.save({"weights": state}, tmp_path / "other.pt")
    assert export.main([str(tmp_path / "other.pt"), str(tmp_path / "c.safetensors")]) == 2


def test_the_shipped_backbone_is_the_file_its_readme_describes():
    import hashlib
    import re

    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "weights" / "README.md").read_text()
    for name, digest in re.findall(r"## (\S+\.safetensors)\n.*?sha256 `([0-9a-f]{64})`", readme, re.S):
        assert hashlib.sha256((REPO_ROOT / "weights" / name).read_bytes()).hexdigest() == digest, name
    shipped = sorted(p.name for p in (REPO_ROOT / "weights").glob("*.safetensors"))
    assert shipped == sorted(re.findall(r"## (\S+\.safetensors)", readme)) == ["refiner_vit_tiny-fmnist8.safetensors"]
