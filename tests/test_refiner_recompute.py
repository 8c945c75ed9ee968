"""Refiner-ViT training recomputes its attention maps in backward instead of keeping them (issue 26): the same
gradients and batch-norm running statistics as keeping them, less memory saved for backward, and inference as it was.
Peak memory and speed: ``python -m cl_vit.bench refiner`` (docs/models.md, "Memory-efficient refiner")."""
import pytest
import timm
import torch
import torch.nn.functional as F

import cl_vit  # noqa: F401  (registers the models)
from cl_vit.bench.refiner import keep_refiner_maps
from cl_vit.models import refiner as refiner_mod
from cl_vit.models.refiner import RefinerAttention

CASES = {
    "shared, batch norm": dict(name="refiner_vit_tiny"),
    "every, batch norm": dict(name="refiner_vit_tiny", layout="every", zero_init_refiner=False),
    "shared, instance norm": dict(name="refiner_vit_tiny", refiner_norm="instance"),
    "attention dropout": dict(name="refiner_vit_tiny", attn_drop_rate=0.2),
    "block checkpointing": dict(name="refiner_vit_tiny", grad_checkpointing=True),
    "conv stem": dict(name="refiner_vit_s", depth=2, img_size=32, embed_dim=48, num_heads=4, in_chans=1),
}


def _model(spec: dict, keep: bool):
    spec = dict(spec)
    name, ckpt = spec.pop("name"), spec.pop("grad_checkpointing", False)
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5, **spec).train()
    if ckpt:
        m.set_grad_checkpointing(True)
    keep_refiner_maps(m, keep, min_tokens=0)  # these maps are small: recompute them all the same
    return m


def _step(model, x, y, prefix_len: int = 0):
    """One seeded forward/backward; returns (loss, gradients, buffers, bytes saved for backward)."""
    if prefix_len:  # prompt prefixes on every block (the prompt methods set them per forward pass)
        g = torch.Generator().manual_seed(1)
        for m in model.modules():
            if isinstance(m, RefinerAttention):
                p = torch.randn(x.shape[0], prefix_len, model.embed_dim, generator=g, requires_grad=True)
                m.prefix = (p, p * 0.5)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(2)  # attention dropout draws the same masks in both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return loss.item(), grads, buffers, saved[0]


def _data(model, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    c, (h, w) = model.in_chans, model.patch_embed.img_size
    return torch.randn(batch, c, h, w, generator=g), torch.randint(0, 5, (batch,), generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_recomputed_maps_give_todays_gradients_and_running_statistics(case):
    kept, recomputed = _model(CASES[case], keep=True), _model(CASES[case], keep=False)
    before = {n: b.clone() for n, b in kept.named_buffers()}
    x, y = _data(kept)
    loss_k, grads_k, bufs_k, saved_k = _step(kept, x, y)
    loss_r, grads_r, bufs_r, saved_r = _step(recomputed, x, y)
    assert loss_r == loss_k
    assert grads_r.keys() == grads_k.keys() and len(grads_k) > 10
    for n in grads_k:
        torch.testing.assert_close(grads_r[n], grads_k[n], rtol=0, atol=1e-6, msg=n)
    # batch norms counted the batch once: running statistics moved, exactly as keeping the maps moves them
    for n in bufs_k:
        torch.testing.assert_close(bufs_r[n], bufs_k[n], rtol=0, atol=0, msg=n)
    refiner_bn = [n for n in bufs_k if ".attn.refiner.norm1.running_mean" in n]
    if "batch" in case:
        assert refiner_bn and all(not torch.equal(bufs_k[n], before[n]) for n in refiner_bn)
        assert all(int(bufs_r[n]) == 1 for n in bufs_r if ".attn." in n and n.endswith("num_batches_tracked"))
    if not CASES[case].get("grad_checkpointing"):  # (whole blocks checkpointed keep only their inputs anyway)
        assert saved_r < saved_k  # the maps were not kept: the test would pass vacuously otherwise


def test_recomputed_maps_with_prompt_prefixes():
    """Prefix columns (L2P / DualPrompt / CODA-Prompt) pass through the recomputed product too."""
    kept, recomputed = _model(CASES["shared, batch norm"], keep=True), _model(CASES["shared, batch norm"], keep=False)
    x, y = _data(kept)
    loss_k, grads_k, bufs_k, saved_k = _step(kept, x, y, prefix_len=3)
    loss_r, grads_r, bufs_r, saved_r = _step(recomputed, x, y, prefix_len=3)
    assert loss_r == loss_k and saved_r < saved_k
    for n in grads_k:
        torch.testing.assert_close(grads_r[n], grads_k[n], rtol=0, atol=1e-6, msg=n)


def test_inference_never_recomputes(monkeypatch):
    """Evaluation, and training-mode forwards without gradients, run the refiner as they always did."""
    model = _model(CASES["shared, batch norm"], keep=False)
    x, _ = _data(model)
    ref = _model(CASES["shared, batch norm"], keep=True)

    def refuse(*a, **k):
        raise AssertionError("checkpoint called outside training")

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", refuse)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))  # training mode, no gradients
    model.eval(), ref.eval()
    assert torch.equal(model(x), ref(x))
    assert len(model.get_attention_maps(x)) == len(model.blocks)


def test_small_maps_are_kept():
    """refiner_vit_tiny's 17-token maps (the default run) are kept: recomputing them would cost time for no memory."""
    torch.manual_seed(0)
    model = timm.create_model("refiner_vit_tiny", num_classes=5).train()
    default = _step(model, *_data(model))[3]
    keep_refiner_maps(model, keep=False, min_tokens=0)
    assert _step(model, *_data(model))[3] < default


@pytest.mark.parametrize("case", ["shared, batch norm", "conv stem"])
def test_share_blocks_recompute_in_one_function(case, monkeypatch):
    """With batch norms, a share block's refined product is one autograd function keeping only the map, V and the
    norms' batch statistics: the gradients and running statistics of recomputing through torch.utils.checkpoint
    (and of keeping the maps, above), and no more kept for backward."""
    calls = []
    real = refiner_mod._SharedRefinedProduct.apply
    monkeypatch.setattr(refiner_mod._SharedRefinedProduct, "apply", lambda *a: calls.append(1) or real(*a))
    fused = _model(CASES[case], keep=False)
    x, y = _data(fused)
    loss_f, grads_f, bufs_f, saved_f = _step(fused, x, y)
    assert len(calls) == sum(b.is_share for b in fused.blocks)
    monkeypatch.setattr(refiner_mod._SharedRefinedProduct, "applies", staticmethod(lambda *a: False))
    ckpt = _model(CASES[case], keep=False)
    loss_c, grads_c, bufs_c, saved_c = _step(ckpt, x, y)
    assert len(calls) == sum(b.is_share for b in fused.blocks)  # the checkpoint path ran this time
    # the checkpoint keeps the map and V; this function those and each norm's mean and 1/std (float32)
    stats = sum(2 * 4 * (2 * b.attn.refiner.norm1.num_features + 2 * b.attn.num_heads)
                for b in fused.blocks if b.is_share)
    assert loss_f == loss_c and saved_f == saved_c + stats
    for n in grads_c:
        torch.testing.assert_close(grads_f[n], grads_c[n], rtol=0, atol=1e-6, msg=n)
    for n in bufs_c:
        torch.testing.assert_close(bufs_f[n], bufs_c[n], rtol=0, atol=0, msg=n)


def _unique_saved_bytes(model, x, y) -> int:
    """Bytes of the distinct storages a training step keeps for backward (a tensor kept twice counts once)."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return sum(storages.values())


def test_share_blocks_keep_the_map_they_are_given(monkeypatch):
    """The share-block function keeps the attend block's map itself, not a channels_last copy of it: in distinct
    storages it keeps what the checkpoint keeps plus the norms' statistics, no map more."""
    spec = CASES["conv stem"]
    fused = _model(spec, keep=False)
    x, y = _data(fused)
    fused_bytes = _unique_saved_bytes(fused, x, y)
    monkeypatch.setattr(refiner_mod._SharedRefinedProduct, "applies", staticmethod(lambda *a: False))
    ckpt_bytes = _unique_saved_bytes(_model(spec, keep=False), x, y)
    stats = sum(2 * 4 * (2 * b.attn.refiner.norm1.num_features + 2 * b.attn.num_heads)
                for b in fused.blocks if b.is_share)
    one_map = x.shape[0] * fused.blocks[0].attn.num_heads * (fused.patch_embed.num_patches + 1) ** 2 * 4
    assert fused_bytes - ckpt_bytes <= stats < one_map
