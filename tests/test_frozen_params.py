"""Frozen means bit-identical: every strategy that freezes something, trained for two experiences with AdamW, strong
weight decay on every parameter (``filter_bias_and_bn=false``), leaves what it froze exactly as it was.

Whole frozen parameters never reach the optimiser (``requires_grad=False``); frozen parts of a tensor that trains
(CODA-Prompt's earlier components, DualPrompt's other E-prompts, the classifier rows of past classes under
``loss.mask_old_logits``, GCAB's claimed weights) are restored after every optimiser step
(``ContinualModule.frozen_slices``)."""
import pytest
import torch
from conftest import TINY, compose

import cl_vit  # noqa: F401  (registers the micro ViT)
from cl_vit.rundir import RunDirectory
from cl_vit.run import build, run

#: two experiences of 5 split-digits classes; AdamW whose decay alone moves every entry it reaches
DECAY = TINY + ["trainer.limit_train_batches=2", "benchmark.n_experiences=2", "optimizer.name=adamw",
                "optimizer.lr=0.01", "optimizer.weight_decay=0.5", "+optimizer.filter_bias_and_bn=false"]
BACKBONE = ("blocks.", "patch_embed.", "cls_token", "pos_embed", "norm.")
OLD = slice(0, 5)  # the classes of the first experience


def _run(tmp_path, data_root, *over):
    cfg = compose([*DECAY, *over], data_root)
    _, _, _, module, _ = build(cfg)
    init = {f"net.{k}": v.clone() for k, v in module.net.state_dict().items()}
    run(cfg, tmp_path / "run")
    rd = RunDirectory(tmp_path / "run")
    return module, init, rd.load_checkpoint(0), rd.load_checkpoint(1)


def _same(a, b, keys, rows=slice(None)):
    assert keys, "nothing to compare"
    for k in keys:
        assert torch.equal(a[k][rows], b[k][rows]), k


def _moved(a, b, keys, rows=slice(None)):
    assert any(not torch.equal(a[k][rows], b[k][rows]) for k in keys), keys


def _backbone(state):
    return [k for k in state if k.startswith(tuple(f"net.{p}" for p in BACKBONE))]


HEAD = ["net.head.weight", "net.head.bias"]


@pytest.mark.parametrize("name,over", [
    ("coda_prompt", ["strategy.coda_prompt.pool_size=4"]),
    ("dualprompt", ["strategy.dualprompt.pool_size=2"]),
    ("l2p", ["strategy.l2p.pool_size=6", "strategy.l2p.top_k=2"]),
])
def test_prompt_methods_keep_the_backbone_past_components_and_past_classifier_rows(name, over, tmp_path, data_root):
    _, init, a, b = _run(tmp_path, data_root, f"strategy={name}", *over, f"strategy.{name}.first_session=false")
    m0, m1 = a["module"], b["module"]
    _same(init, m1, _backbone(init))
    _same(m0, m1, HEAD, OLD)
    _moved(m0, m1, HEAD, slice(5, 10))  # the new rows train (and decay)
    prompt = [k for k in m0 if k.startswith("net.prompt.e_")]
    if name == "coda_prompt":  # 2 of 4 components per experience: the first experience's stay
        _same(m0, m1, prompt, slice(0, 2))
        _moved(m0, m1, prompt, slice(2, 4))
    elif name == "dualprompt":  # E-prompt and key 0 belong to the first experience
        _same(m0, m1, prompt, slice(0, 1))
        _same(init, m0, prompt, slice(1, 2))  # and E-prompt 1 waits untouched for the second
        _moved(m0, m1, prompt, slice(1, 2))
    else:  # L2P's pool is shared: any row may train
        _moved(m0, m1, prompt)


def test_ftpp_and_l2_keep_the_classifier_rows_of_past_classes_and_lwf_trains_them(tmp_path, data_root):
    _, init, a, b = _run(tmp_path / "ftpp", data_root, "strategy=ftpp")
    _same(a["module"], b["module"], HEAD, OLD)
    _moved(a["module"], b["module"], _backbone(init))
    _, init, a, b = _run(tmp_path / "l2", data_root, "strategy=l2", "strategy.l2.params=[*attn.qkv.*]",
                         "strategy.l2.train_only_selected=true", "loss.mask_old_logits=true")
    frozen = [k for k in _backbone(init) if ".attn.qkv." not in k]
    _same(init, b["module"], frozen)
    _same(a["module"], b["module"], HEAD, OLD)
    # LwF's distillation reaches the past classes' logits: their rows train under the masked cross-entropy too
    _, init, a, b = _run(tmp_path / "lwf", data_root, "strategy=lwf", "loss.mask_old_logits=true")
    _moved(a["module"], b["module"], HEAD, OLD)


def test_gcab_keeps_what_past_tasks_own_under_weight_decay(tmp_path, data_root):
    module, init, a, b = _run(tmp_path, data_root, "strategy=gcab")
    m0, m1 = a["module"], b["module"]
    own = [k for k in m0 if k.startswith(("net.tokens.0", "net.e0.0", "net.e2.0", "net.heads.0."))]
    _same(m0, m1, own)
    claimed = module.net.cab.gated_parameters(m0["net.mask_pre0"], m0["net.mask_pre2"])
    assert claimed and any(v.any() for v in claimed.values())
    for n, v in claimed.items():
        k, where = f"net.cab.{n}", v.bool()
        assert torch.equal(m0[k][where], m1[k][where]), k
        assert not torch.equal(m0[k], m1[k]), k  # the rest of the weight trains
    # the official behaviour, as an option: AdamW decays the claimed weights too
    module, init, a, b = _run(tmp_path / "decay", data_root, "strategy=gcab", "strategy.gcab.decay_gated_weights=true")
    m0, m1 = a["module"], b["module"]
    claimed = module.net.cab.gated_parameters(m0["net.mask_pre0"], m0["net.mask_pre2"])
    assert any(not torch.equal(m0[f"net.cab.{n}"][v.bool()], m1[f"net.cab.{n}"][v.bool()])
               for n, v in claimed.items())


def test_ranpac_slca_and_simplecil_keep_what_they_freeze(tmp_path, data_root):
    # RanPAC: the first session trains the selection (here the qkv projections) and its cosine head, then nothing
    _, init, a, b = _run(tmp_path / "ranpac", data_root, "strategy=ranpac", "strategy.ranpac.M=16",
                         "strategy.ranpac.petl=null", "strategy.ranpac.params=[*attn.qkv.*]")
    backbone = _backbone(init)
    _same(init, a["module"], [k for k in backbone if ".attn.qkv." not in k])
    _moved(init, a["module"], [k for k in backbone if ".attn.qkv." in k])
    _same(a["module"], b["module"], backbone)
    # SLCA: the past classes' rows stay through the second experience's training (alignment comes after it)
    _, init, a, b = _run(tmp_path / "slca", data_root, "strategy=slca", "strategy.slca.samples_per_class=8")
    h0, h1 = a["strategies"]["slca"]["head_before_ca"], b["strategies"]["slca"]["head_before_ca"]
    _same(h0, h1, ["weight", "bias"], OLD)
    _moved(h0, h1, ["weight"], slice(5, 10))
    # SimpleCIL trains nothing
    _, init, a, b = _run(tmp_path / "simplecil", data_root, "strategy=simplecil")
    _same(init, b["module"], _backbone(init))
