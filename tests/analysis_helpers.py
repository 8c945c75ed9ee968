"""Tiny test nets and tiny runs shared by the analysis tests (report, TensorBoard, notebooks).

Importing this module registers two timm models (the notebook kernels import it too, through CL_VIT_PLUGINS):
- ``twohead_micro_patch2_8``: a micro DeiT-style ViT with CLS and DIST heads whose ``forward_outputs`` returns
  ``heads`` {"cls", "dist"}, as the DeiT-LT students do;
- ``attnmaps_micro_patch2_8``: a micro ViT with ``get_attention_maps(x)`` following the Refiner-ViT API (one dict per
  block, "raw" [B, H, N, N] and "refined" [B, H, N, N] or None); its "refined" map is a 3x3 smoothing of the raw one
  on even blocks, a stand-in for the refiner's convolutions.

Runs are made once per test session under pytest's base temp folder and shared by the test files, which import the
fixtures ``sweep``, ``killed``, ``lt_run`` and ``attention_run`` from here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.nn.functional as F
from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

MICRO = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
#: the smallest runs that still train: one epoch of two batches per experience
FAST = ["model=vit_micro", "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.limit_train_batches=2",
        "trainer.log_every_n_steps=1"]


class TwoHeadMicro(VisionTransformerDistilled):
    def forward_outputs(self, x):
        x = self.forward_features(x)
        cls, dist = self.head(x[:, 0]), self.head_dist(x[:, 1])
        return {"logits": (cls + dist) / 2, "pre_logits": (x[:, 0] + x[:, 1]) / 2, "heads": {"cls": cls, "dist": dist}}


class AttentionMapsMicro(VisionTransformer):
    def get_attention_maps(self, x):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        maps = []
        for b, blk in enumerate(self.blocks):
            attn = blk.attn
            B, N, _ = x.shape
            qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            raw = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
            maps.append({"raw": raw, "refined": F.avg_pool2d(raw, 3, 1, 1) if b % 2 == 0 else None})
            x = blk(x)
        return maps


def _cfg():
    return {"url": "", "num_classes": 10, "input_size": (1, 8, 8), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": IMAGENET_INCEPTION_MEAN, "std": IMAGENET_INCEPTION_STD,
            "first_conv": "patch_embed.proj", "classifier": "head"}


default_cfgs = generate_default_cfgs({"twohead_micro_patch2_8.untrained": _cfg(),
                                      "attnmaps_micro_patch2_8.untrained": _cfg()})


@register_model
def twohead_micro_patch2_8(pretrained=False, **kwargs):
    return build_model_with_cfg(TwoHeadMicro, "twohead_micro_patch2_8", pretrained, **dict(MICRO, **kwargs))


@register_model
def attnmaps_micro_patch2_8(pretrained=False, **kwargs):
    return build_model_with_cfg(AttentionMapsMicro, "attnmaps_micro_patch2_8", pretrained, **dict(MICRO, **kwargs))


# -- runs shared by the test files -----------------------------------------------------------------------------


def shared(tmp_path_factory, name: str, make) -> Path:
    """``make(path)`` once per test session; later callers get the same folder."""
    root = tmp_path_factory.getbasetemp() / "analysis_runs" / name
    done = root / ".done"
    if not done.exists():
        root.mkdir(parents=True, exist_ok=True)
        make(root)
        done.write_text("ok")
    return root


def make_multirun(root: Path) -> None:
    """``python -m cl_vit.run -m strategy=finetune,ftpp seed=0,1``: 4 runs of split-digits (2 experiences) in one
    Hydra sweep, with TensorBoard."""
    from conftest import run_cli

    run_cli("-m", "strategy=finetune,ftpp", "seed=0,1", *FAST, "benchmark.n_experiences=2",
            f"hydra.sweep.dir={root / 'sweep'}", data_root=root, check=True, timeout=600)


def make_killed_run(root: Path) -> None:
    """A run killed (SIGKILL) during its second experience: results.json says 1 of 2 experiences completed."""
    from conftest import run_cli

    proc = run_cli(*FAST, "logger=none", "benchmark.n_experiences=2", f"hydra.run.dir={root / 'run'}", data_root=root,
                   env={"CL_VIT_TEST_SIGKILL_AT": "1:0"})
    assert proc.returncode == -9, proc.stderr[-2000:]


def make_two_head_lt_run(root: Path) -> None:
    """digits-lt as a 2-experience long-tailed stream with the two-head net, through the real runner."""
    from conftest import compose

    from cl_vit.run import run

    cfg = compose([*FAST, "logger=none", "benchmark=digits-lt", "benchmark.n_experiences=2",
                   "model.name=twohead_micro_patch2_8"], root)
    run(cfg, root / "run")


def make_attention_run(root: Path) -> None:
    """split-digits (5 experiences) with the attention-map stand-in and TensorBoard (log every step)."""
    from conftest import compose

    from cl_vit.run import run

    cfg = compose([*FAST, "benchmark.n_experiences=5", "model.name=attnmaps_micro_patch2_8"], root)
    run(cfg, root / "run")


def _run_fixture(name: str, make, sub: str):
    @pytest.fixture(scope="module", name=name)
    def fixture(tmp_path_factory) -> Path:
        return shared(tmp_path_factory, make.__name__, make) / sub

    return fixture


sweep = _run_fixture("sweep", make_multirun, "sweep")
killed = _run_fixture("killed", make_killed_run, "run")
lt_run = _run_fixture("lt_run", make_two_head_lt_run, "run")
attention_run = _run_fixture("attention_run", make_attention_run, "run")


def results(path: Path) -> dict:
    return json.loads((Path(path) / "results.json").read_text())
