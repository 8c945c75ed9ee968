"""``python -m cl_vit.bench refiner``: Refiner-ViT training steps against a timm ViT of the same depth, width and heads.

Per model, two rows, each a ratio refiner / ViT measured in this process:

* training-step throughput (images/s): forward, cross-entropy, backward and an AdamW step; the two models alternate
  (``interleaved``) and the median step time counts. Aim: the refiner at >= 0.8x its ViT twin.
* training-step peak memory (MiB): in a fresh subprocess per model, the peak resident set size (Linux VmHWM, reset
  through /proc/self/clear_refs after the model, optimizer and batch exist and malloc_trim) during the first training
  step, minus the resident size before it: activations, gradients, optimizer state and temporaries of one step.

The twin is ``timm.models.vision_transformer.VisionTransformer`` with the refiner's depth, width, heads, MLP ratio,
patch size and input, and timm's own patch embedding and fused attention; a conv-stem refiner pays for its stem.
CPU sizes are small (images of 112 pixels instead of 224) so that the run takes minutes: the refiner's cost grows
with N^2 (N tokens) against the linear layers' N, so its ratio at 224 is lower than at 112; the ``@224`` row says
by how much. On a GPU the same rows run at 224 with peak memory from ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

from cl_vit.bench import interleaved_clocks, pair_spread, paired_times, row

THROUGHPUT_AIM = 0.8
#: the memory-efficient refiner's aim: the median of paired step-time ratios recompute/keep at least this (issue 26,
#: "no loss of speed": a loss under 2 % is below what one run of paired CPU steps resolves)
SPEED_AIM = 0.98
#: paired steps per case for the recompute/keep speed ratio (full run, --quick)
PAIRS, QUICK_PAIRS = 12, 3


def _twin_args(name: str, kw: dict) -> dict:
    """Build arguments of the refiner and its plain timm ViT twin."""
    import timm

    import cl_vit  # noqa: F401  (registers the refiner models)

    with torch.device("meta"):
        m = timm.create_model(name, **kw)
    return dict(img_size=m.patch_embed.img_size, patch_size=m.patch_embed.patch_size, in_chans=m.in_chans,
                num_classes=m.num_classes, embed_dim=m.embed_dim, depth=len(m.blocks),
                num_heads=m.blocks[0].attn.num_heads, mlp_ratio=m.blocks[0].mlp.fc1.out_features / m.embed_dim,
                qkv_bias=True)


def _build(spec: dict):
    import timm
    from timm.models.vision_transformer import VisionTransformer
    from timm.optim import create_optimizer_v2

    import cl_vit  # noqa: F401

    torch.manual_seed(0)
    if spec["kind"] == "vit":
        model = VisionTransformer(**_twin_args(spec["name"], spec["kw"]))
    else:
        model = timm.create_model(spec["name"], **spec["kw"])
    if spec.get("grad_checkpointing"):
        model.set_grad_checkpointing(True)
    if spec.get("keep_maps"):
        keep_refiner_maps(model)
    device = torch.device(spec.get("device", "cpu"))
    model.to(device).train()
    opt = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05)  # as cl_vit.module trains
    g = torch.Generator().manual_seed(0)
    c, (h, w) = model.in_chans, model.patch_embed.img_size
    x = torch.randn(spec["batch"], c, h, w, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (spec["batch"],), generator=g).to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return model, step


def keep_refiner_maps(model, keep: bool = True, min_tokens: Optional[int] = None) -> None:
    """``keep``: the refiner as it was before issue 26, every map kept for backward instead of recomputed;
    ``min_tokens``: recompute maps from this many tokens on (default: RefinerAttention.recompute_min_tokens)."""
    from cl_vit.models.refiner import RefinerAttention

    for m in model.modules():
        if isinstance(m, RefinerAttention):
            m.recompute = not keep
            if min_tokens is not None:
                m.recompute_min_tokens = min_tokens


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _memory_child(spec_json: str) -> None:
    """Runs in a fresh process: prints the peak memory of one training step above the resident size before it."""
    spec = json.loads(spec_json)
    torch.set_num_threads(spec.get("threads", 1))
    _, step = _build(spec)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what building the model left in malloc's free lists
    except OSError:
        pass
    from cl_vit.rundir import write_in_place  # before the baseline: its import is no part of the step

    before = _rss_bytes()
    write_in_place("/proc/self/clear_refs", "5")  # resets VmHWM to the current resident size
    step()
    print(json.dumps({"peak_bytes": _hwm_bytes() - before}))


#: glibc's mmap threshold for the allocator-peak rows: every block of 1 MiB or more is its own mapping, handed back
#: to the system when freed, so VmHWM follows the tensors alive at once instead of glibc's heap reuse (by default the
#: threshold grows with the largest block freed, up to 32 MiB, and freed maps stay in the heap's resident pages)
FIXED_MMAP_THRESHOLD = 1 << 20


def _cpu_peak(spec: dict, allocator: bool = False) -> float:
    """VmHWM peak of one training step in a fresh process; ``allocator``: with glibc's mmap threshold fixed at
    FIXED_MMAP_THRESHOLD, i.e. the peak of the memory the step's tensors hold rather than of the process's heap."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if allocator:
        env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
    code = f"from cl_vit.bench.refiner import _memory_child; _memory_child({json.dumps(json.dumps(spec))})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def _cuda_peak(spec: dict) -> float:
    model, step = _build(spec)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()  # the first step, as on the CPU: activations, gradients, AdamW state
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del model, step
    torch.cuda.empty_cache()
    return peak


def _cases(quick: bool, cuda: bool) -> list[dict]:
    big = 224 if cuda else 112
    if quick:
        return [
            dict(case="refiner_vit_tiny @8 b32", name="refiner_vit_tiny", kw={}, batch=32),
            dict(case="refiner_vit_s d4 @64 b4", name="refiner_vit_s", kw=dict(depth=4, img_size=64), batch=4),
        ]
    cases = [
        dict(case="refiner_vit_tiny @8 b32", name="refiner_vit_tiny", kw={}, batch=32),
        dict(case=f"refiner_vit_s @{big} b8", name="refiner_vit_s", kw=dict(img_size=big), batch=8),
        dict(case=f"refiner_vit_s stem=patch @{big} b8", name="refiner_vit_s", kw=dict(img_size=big, stem="patch"),
             batch=8),
        dict(case=f"refiner_vit_m @{big} b4", name="refiner_vit_m", kw=dict(img_size=big), batch=4),
        dict(case=f"refiner_vit_l @{big} b4", name="refiner_vit_l", kw=dict(img_size=big), batch=4),
        dict(case=f"vit_base_refined @{big} b4", name="vit_base_patch16_224_refined", kw=dict(img_size=big),
             batch=4),
    ]
    if not cuda:
        cases.append(dict(case="refiner_vit_s @224 b2", name="refiner_vit_s", kw=dict(img_size=224), batch=2))
    return cases


def run(quick: bool = False, device: Optional[str] = None) -> dict:
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dev = "cuda" if cuda else "cpu"
    repeats, warmup = (2, 1) if quick else (5, 1)
    rows, notes = [], []
    # CPU: one thread and process CPU time, which on a machine shared with other jobs still measures this work
    threads = torch.get_num_threads() if cuda else 1
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _measure(quick, cuda, dev, threads, repeats, warmup, rows)
    finally:
        torch.set_num_threads(saved_threads)
    if quick:
        notes.append("--quick is a smoke run: the depth-4 S is dominated by its conv stem; the full run gives the "
                     "representative ratios")
    timer = "wall time" if cuda else "process CPU time"
    notes.append(f"device {dev}, {threads} intra-op thread(s); {timer}, median of {repeats} interleaved steps after "
                 f"{warmup} warm-up round(s); baseline = timm VisionTransformer of the same depth/width/heads/MLP "
                 "ratio/patch/input with its linear patch embedding and fused attention; optimizer: timm adamw")
    notes.append("peak memory: " + ("torch.cuda.max_memory_allocated during the first training step above the "
                                    "allocation before it" if cuda else
                                    "VmHWM of a fresh subprocess during the first training step above its resident "
                                    "size before it (activations, gradients, AdamW state, temporaries)"))
    return {"name": "refiner", "device": dev, "rows": rows, "notes": notes}


def _measure(quick, cuda, dev, threads, repeats, warmup, rows) -> None:
    for c in _cases(quick, cuda):
        spec = dict(name=c["name"], kw=c["kw"], batch=c["batch"], device=dev, threads=threads)
        ref, ref_step = _build(dict(spec, kind="refiner"))
        vit, vit_step = _build(dict(spec, kind="vit"))
        wall, cpu = interleaved_clocks({"vit": vit_step, "refiner": ref_step}, repeats=repeats, warmup=warmup)
        t = wall if cuda else cpu  # CPU: process CPU time, steady on a shared machine
        n_ref = sum(p.numel() for p in ref.parameters())
        n_vit = sum(p.numel() for p in vit.parameters())
        del ref, vit, ref_step, vit_step
        rows.append(row(c["case"], "train images/s", c["batch"] / t["refiner"], c["batch"] / t["vit"],
                        aim=f">= {THROUGHPUT_AIM}x ViT", higher_is_better=True, target=THROUGHPUT_AIM,
                        params_refiner=n_ref, params_vit=n_vit))
        if quick and c["name"] != "refiner_vit_tiny":
            continue
        peak = _cuda_peak if cuda else _cpu_peak
        rows.append(row(c["case"], "train step peak MiB", peak(dict(spec, kind="refiner")),
                        peak(dict(spec, kind="vit"))))
    if not quick:
        spec = dict(name="refiner_vit_s", kw=dict(img_size=224 if cuda else 112), batch=8, device=dev,
                    threads=threads, kind="refiner")
        peak = _cuda_peak if cuda else _cpu_peak
        rows.append(row(f"refiner_vit_s grad ckpt @{spec['kw']['img_size']}", "train step peak MiB",
                        peak(dict(spec, grad_checkpointing=True)), peak(spec), aim="< 1x without", target=1.0))
    _recompute_rows(quick, cuda, dev, threads, repeats, warmup, rows)


def recompute_cases(quick: bool, cuda: bool) -> list[dict]:
    """The official sizes at 224 for the memory-efficient refiner rows (CPU: small batches, a step takes seconds)."""
    if quick:
        return [dict(name="refiner_vit_tiny", kw={}, batch=32)]
    if cuda:
        return [dict(name=n, kw={}, batch=b) for n, b in (("refiner_vit_s", 128), ("refiner_vit_m", 64),
                                                           ("refiner_vit_l", 64))]
    return [dict(name="refiner_vit_s", kw={}, batch=8), dict(name="refiner_vit_s", kw={}, batch=4),
            *(dict(name=n, kw={}, batch=2) for n in ("refiner_vit_s", "refiner_vit_m", "refiner_vit_l"))]


def _recompute_rows(quick, cuda, dev, threads, repeats, warmup, rows, only: Optional[str] = None,
                    batch: Optional[int] = None, pairs: Optional[int] = None, memory: bool = True) -> None:
    """Per official size: peak memory of a training step with the maps recomputed (the default) against the plain
    ViT twin (aim <= 1.5x) and with the maps kept (as before issue 26), and the step speed of recomputing against
    keeping: ``pairs`` pairs of steps back to back in this process, the median of their ratios and its quartiles
    (aim: no loss, a median of at least SPEED_AIM)."""
    pairs = pairs or (QUICK_PAIRS if quick else PAIRS)
    peak = _cuda_peak if cuda else _cpu_peak
    for c in recompute_cases(quick, cuda):
        if (only and c["name"] != only) or (batch and c["batch"] != batch):
            continue
        spec = dict(name=c["name"], kw=c["kw"], batch=c["batch"], device=dev, threads=threads, kind="refiner")
        case = f"{c['name']} @{8 if c['name'] == 'refiner_vit_tiny' else 224} b{c['batch']}"
        twin = peak(dict(spec, kind="vit")) if memory else None
        if memory:
            rows.append(row(case, "peak MiB: recompute/ViT", peak(spec), twin, aim="<= 1.5x ViT", target=1.5))
            rows.append(row(case, "peak MiB: keep maps/ViT", peak(dict(spec, keep_maps=True)), twin))
        if memory and not cuda:  # the tensors' peak without glibc's heap reuse (cuda: max_memory_allocated is it)
            rows.append(row(case, "allocator peak MiB: recompute/ViT", _cpu_peak(spec, allocator=True),
                            _cpu_peak(dict(spec, kind="vit"), allocator=True), aim="<= 1.5x ViT", target=1.5))
        _, fast = _build(spec)
        _, kept = _build(dict(spec, keep_maps=True))
        # paired steps: each ratio is one keep step's time over the recompute step next to it (CPU: process time)
        spread = pair_spread(paired_times(kept, fast, pairs=pairs, warmup=warmup,
                                          clock=time.perf_counter if cuda else time.process_time))
        r = row(case, "img/s: recompute/keep", c["batch"] / spread["candidate_s"], c["batch"] / spread["baseline_s"],
                aim=f">= {SPEED_AIM}x (no loss beyond noise)", higher_is_better=True, target=SPEED_AIM,
                quartiles=[round(spread["q1"], 3), round(spread["q3"], 3)], pairs=spread["pairs"])
        # the ratio is the median of the pairs' ratios, not the ratio of the two sides' medians
        r.update(ratio=spread["median"], meets_aim=spread["median"] >= SPEED_AIM)
        rows.append(r)
        del fast, kept


def run_recompute(quick: bool = False, only: Optional[str] = None, batch: Optional[int] = None,
                  pairs: Optional[int] = None, memory: bool = True) -> dict:
    """Only the memory-efficient refiner rows (docs/models.md): ``python -m cl_vit.bench.refiner --recompute``;
    ``memory=False``: the speed rows alone."""
    cuda = torch.cuda.is_available()
    dev, threads = ("cuda", torch.get_num_threads()) if cuda else ("cpu", 1)
    repeats, warmup = (2, 1) if quick else (5, 1)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list = []
    try:
        _recompute_rows(quick, cuda, dev, threads, repeats, warmup, rows, only, batch, pairs, memory)
    finally:
        torch.set_num_threads(saved_threads)
    timer = "wall time" if cuda else "process CPU time"
    n = pairs or (QUICK_PAIRS if quick else PAIRS)
    return {"name": "refiner", "device": dev, "rows": rows,
            "notes": [f"device {dev}, {threads} intra-op thread(s); speed: {timer}, {n} pairs of training steps "
                      f"(keep maps, recompute; back to back, order alternating) after {warmup} warm-up, the median "
                      "of the pairs' ratios and its quartiles; peak memory as in the other rows; ViT = timm "
                      "VisionTransformer of the same depth/width/heads/MLP ratio, linear patch embedding"]}


if __name__ == "__main__":
    import argparse

    from cl_vit.bench.__main__ import format_table

    p = argparse.ArgumentParser(prog="python -m cl_vit.bench.refiner")
    p.add_argument("--recompute", action="store_true", help="only the memory-efficient refiner rows at 224")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help="with --recompute: only this model (e.g. refiner_vit_s)")
    p.add_argument("--batch", type=int, help="with --recompute: only this batch size")
    p.add_argument("--pairs", type=int, help=f"with --recompute: pairs of steps for the speed ratio (default {PAIRS})")
    p.add_argument("--speed-only", action="store_true", help="with --recompute: the speed rows alone")
    a = p.parse_args()
    if a.recompute:
        print(format_table([run_recompute(quick=a.quick, only=a.only, batch=a.batch, pairs=a.pairs,
                                          memory=not a.speed_only)]))
    else:
        print(format_table([run(quick=a.quick)]))
