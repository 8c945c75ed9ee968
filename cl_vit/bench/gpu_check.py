"""``python -m cl_vit.bench.gpu_check OUT [--cpu] [--budget S]``: every GPU number of docs/scale.md from one command.

``scripts/gpu_check.sh OUT`` runs it on a machine whose Python lacks some of the suite's dependencies (wheels in
``.whl/``). Each section is written to ``OUT/results.json`` and ``OUT/summary.md`` as soon as it is measured; a section
that fails is recorded with its error and the others go on; one that would overrun the time budget is skipped and
says so. Sections, in the order they run:

* ``peak``: the bf16 matrix-product rate measured on this GPU (8192^3, median of 10 after 3 warm-ups), beside the
  data sheet's dense bf16 peak: the two denominators of model FLOP utilisation (MFU).
* ``train``: the suite's training step (ContinualModule with the finetune strategy in a Lightning Trainer,
  bf16-mixed, fused AdamW) on one batch resident on the GPU, for ViT-B/16 and Refiner-ViT-S at 224, batch 256:
  images/s, peak memory, FLOPs per image counted by ``torch.utils.flop_counter`` (forward + backward), MFU; a bare
  PyTorch loop with the same model and optimiser beside it (the suite's overhead); later the same with
  ``compile=true``.
* ``deferred_checks``: ViT-B/16's suite step with the non-finite checks read every step (``trainer.finite_check_every``
  1, the default) and every ``DEFERRED_EVERY`` steps, twice each, alternating, against the bare loop: whether the
  per-step reads hold the suite below 0.90x of the bare loop (issue 26).
* ``refiner_recompute``: ``python -m cl_vit.bench.refiner --recompute`` on the GPU: per official size, peak memory
  (``max_memory_allocated``) recomputing the refiner's maps against the plain twin and against keeping them, and
  the paired speed of recomputing against keeping.
* ``deit_lt``: the DeiT-LT student step of experiment=deit-lt-imagenet-lt (deit_base_distilled_patch16_224, Mixup /
  CutMix, hard distillation from a ResNet-50 at 224) against the same student with ``distillation=none``.
* ``prefetcher``: the Refiner-ViT recipes' prefetcher order on the device (``augment.prefetcher``): uint8 Mixup /
  CutMix (``strategy=mixup``) equal to the CPU's from the same numpy draws, ``PrefetchStage``'s normalisation
  likewise, and the images/s of mixing + normalising + erasing against Refiner-ViT-S's step.
* ``eval_autocast``: ``trainer.eval_autocast=float16`` (the DyTox and GCAB recipes) on the device under ``32-true``:
  the evaluation forward's linear layers give fp16 outputs and its predictions equal those of a forward by hand
  under ``torch.cuda.amp.autocast()`` (the official evaluate's context); without the key, fp32.
* ``data``: the ImageNet-R training pipeline (cl_vit.data.transforms.imagenet_transforms, reduced JPEG decode) on
  generated 250-900 px JPEGs with 4, 8 and 16 DataLoader workers, against the GPU step's images/s.
* ``recipe``: one experience of ``benchmark=imagenet-r`` (the closer-look L2 recipe) and of
  ``experiment=coda-prompt-imagenet-r``, end to end through ``python -m cl_vit.run`` on generated ImageNet-R-shaped
  data (20 classes, 120 training images each, as one real experience), random initial weights (none can be
  downloaded): wall time split into training, evaluation and checkpoint (results.json ``cost.time_s``), training
  images/s, peak memory.
* ``profile``: torch.profiler tables of the eager steps (``OUT/profiles.txt``) and a trace of Refiner-ViT-S's.

``--cpu`` runs every section with tiny sizes on the CPU: a check of the script, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from cl_vit.bench.gpu import MODELS, measure, peak_bf16_flops
from cl_vit.errors import report_error
from cl_vit.rundir import atomic_write_bytes, atomic_write_text


#: the sections, in the order they run (each one's estimate of seconds is in ``main``)
SECTIONS = ("peak", "train", "deferred_checks", "refiner_recompute", "twin", "prompt_step", "deit_lt", "prefetcher",
            "eval_autocast", "data", "recipe", "profile", "train_compiled")
#: the ViT of the script check on the CPU (--cpu)
CPU_VIT = {"name": "vit_small_patch16_224", "embed_dim": 64, "depth": 2, "num_heads": 2}
#: trainer.finite_check_every of the deferred_checks section (issue 26: one read of the checks per this many steps)
DEFERRED_EVERY = 50
#: Refiner-ViT-S's plain twin: a timm ViT of its width, depth, heads and MLP ratio (patch embedding for the conv stem)
TWIN = {"name": "vit_small_patch16_224", "embed_dim": 384, "depth": 16, "num_heads": 12, "mlp_ratio": 3.0}


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in this (main) thread after ``seconds`` (a compile that would eat the whole budget)."""
    def handler(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s (time budget)")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Check:
    """The output folder, the budget and the sections' results."""

    def __init__(self, out: Path, cpu: bool, budget: float):
        self.out, self.cpu, self.deadline = out, cpu, time.monotonic() + budget
        self.device = "cpu" if cpu else "cuda"
        self.doc: dict = {"environment": environment(self.device), "sections": {}}
        self.work = Path(os.environ.get("CL_VIT_GPU_CHECK_WORK", "/tmp/cl_vit-gpu-check"))
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn, estimate: float):
        """Run ``fn()`` if ``estimate`` seconds are left; record its result, error or skip."""
        if self.left() < estimate:
            self.record(name, {"skipped": f"{self.left():.0f} s left of the budget, {estimate:.0f} s needed"})
            return None
        print(f"== {name} ({self.left():.0f} s left)", flush=True)
        t0 = time.perf_counter()
        try:
            with time_limit(self.left() - 5):
                result = fn()
        except Exception as e:  # noqa: BLE001 - every failure (a SectionTimeout too) is recorded, the rest goes on
            traceback.print_exc()
            result = {"error": f"{type(e).__name__}: {e}"}
        result["section_s"] = round(time.perf_counter() - t0, 1)
        self.record(name, result)
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return result

    def record(self, name: str, result: dict) -> None:
        self.doc["sections"][name] = result
        print(json.dumps({name: result}, indent=1, default=str), flush=True)
        atomic_write_text(self.out / "results.json", json.dumps(self.doc, indent=1, default=str))
        try:
            atomic_write_text(self.out / "summary.md", summary(self.doc))
        except Exception:  # noqa: BLE001 - the summary is a view of results.json, never a reason to stop
            traceback.print_exc()


def environment(device: str) -> dict:
    import lightning
    import timm

    env = {"torch": torch.__version__, "timm": timm.__version__, "lightning": lightning.__version__,
           "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "cpus": os.cpu_count()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(), capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                   cuda=torch.version.cuda)
        with contextlib.suppress(Exception):
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
    else:
        env["gpu"] = None
    return env


# -- sections --------------------------------------------------------------------------------------------------------


def matmul_peak(device: str, n: int, dtype=torch.bfloat16, repeats: int = 10) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(3 + repeats):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    rate = 2 * n ** 3 / statistics.median(times)
    out = {"n": n, "dtype": str(dtype), "measured_flops": rate}
    if device == "cuda":
        out["datasheet_flops"] = peak_bf16_flops(torch.cuda.get_device_name())
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_section(check: Check, compile_: bool) -> dict:
    g = sizes(check.cpu)
    peak = (check.doc["sections"].get("peak") or {}).get("measured_flops")
    sheet = (check.doc["sections"].get("peak") or {}).get("datasheet_flops")
    out = {}
    for label, name in MODELS.items():
        try:
            m = measure(name, img_size=g["img"], batch=g["batch"], steps=g["steps"], warmup=g["warmup"],
                        device=check.device, precision=g["precision"], compile_=compile_, bare=not compile_)
        except SectionTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - one model failing leaves the other's numbers
            traceback.print_exc()
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        flops = m["flops_per_image"] * m["images_per_s"]
        m["model_flops_per_s"] = flops
        if peak:
            m["mfu_measured_peak"] = flops / peak
        if sheet:
            m["mfu_datasheet_peak"] = flops / sheet
        out[label] = m
        if check.device == "cuda":
            torch.cuda.empty_cache()
    vit, ref = out.get("ViT-B/16", {}), out.get("Refiner-ViT-S", {})
    if "images_per_s" in vit and "images_per_s" in ref:
        out["refiner_s_over_vit_b"] = ref["images_per_s"] / vit["images_per_s"]
    return {"batch": g["batch"], "img_size": g["img"], "precision": g["precision"], "compile": compile_, **out}


def deferred_checks_section(check: Check) -> dict:
    """ViT-B/16's suite step with the non-finite checks read every step (today's default) and every DEFERRED_EVERY
    steps (trainer.finite_check_every), against the bare loop: whether the per-step reads are what holds the suite
    below 0.90x of the bare loop (docs/scale.md). Each variant twice, alternating; the bare loop once."""
    g = sizes(check.cpu)
    name = MODELS["ViT-B/16"] if not check.cpu else CPU_VIT  # the script check: a small ViT
    runs: dict = {1: [], DEFERRED_EVERY: []}
    bare = None
    for rnd in range(2):
        for every in (1, DEFERRED_EVERY):
            m = measure(name, img_size=g["img"], batch=g["batch"], steps=g["steps"], warmup=g["warmup"],
                        device=check.device, precision=g["precision"], bare=bare is None,
                        finite_check_every=every)
            bare = m.get("bare_images_per_s", bare)
            runs[every].append(m["images_per_s"])
    out = {"model": name, "batch": g["batch"], "bare_images_per_s": bare,
           "images_per_s_every_step": runs[1], f"images_per_s_every_{DEFERRED_EVERY}": runs[DEFERRED_EVERY]}
    if bare:
        out["suite_over_bare_every_step"] = max(runs[1]) / bare
        out[f"suite_over_bare_every_{DEFERRED_EVERY}"] = max(runs[DEFERRED_EVERY]) / bare
    return out


def refiner_recompute_section(check: Check) -> dict:
    """The memory-efficient refiner on the GPU (docs/models.md): per official size, peak memory of a training step
    recomputing the maps (the default) against its plain ViT twin and against keeping the maps, and the speed of
    recomputing against keeping (paired steps), as ``python -m cl_vit.bench.refiner --recompute`` on a GPU."""
    from cl_vit.bench import refiner

    if check.cpu:  # the script check: the smallest case's speed only
        rows: list = []
        refiner._recompute_rows(True, False, "cpu", 1, 1, 1, rows, pairs=2, memory=False)
        return {"rows": rows}
    return {"rows": refiner.run_recompute()["rows"]}


def twin_section(check: Check) -> dict:
    """Refiner-ViT-S against its plain ViT twin (the same blocks without the refiner): what the refiner costs."""
    g = sizes(check.cpu)
    m = measure(TWIN, img_size=g["img"], batch=g["batch"], steps=g["steps"], warmup=g["warmup"],
                device=check.device, precision=g["precision"])
    out = {"twin": TWIN, "batch": g["batch"], **m}
    ref = ((check.doc["sections"].get("train") or {}).get("Refiner-ViT-S") or {}).get("images_per_s")
    if ref:
        out["refiner_s_over_twin"] = ref / m["images_per_s"]
    return out


def prompt_step_section(check: Check) -> dict:
    """The training step of the L2 recipe against CODA-P's (two passes: the query without prompts, then the prompted
    pass), ViT-B/16 at the recipe's batch 128 on a batch resident on the GPU: compute, not data loading."""
    from cl_vit.bench.gpu import Repeat, make_net, resident_batch, train_images_per_s
    from cl_vit.strategies.coda_prompt import CodaPrompt
    from cl_vit.strategies.l2 import L2

    g = sizes(check.cpu)
    batch, n_classes = g["batch"] // 2, 200
    x, y = resident_batch(batch, 3, g["img"], 20, check.device)
    out = {"model": "vit_base_patch16_224", "batch": batch, "classes": "20 of 200 (one ImageNet-R experience)"}
    arms = {"l2": lambda: L2(lam=1e-3, params=["*attn.qkv.*"], train_only_selected=True),
            "coda_prompt": lambda: CodaPrompt(pool_size=100, length=8, ortho_mu=0.0)}
    for arm, make in arms.items():
        net = make_net("vit_base_patch16_224", n_classes, 3, g["img"], check.device)
        out[arm] = train_images_per_s(net, n_classes, [make()], Repeat((x, y), g["warmup"] + g["steps"]),
                                      g["warmup"], g["steps"], batch, check.device, g["precision"],
                                      optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
                                      mask_old_logits=True, classes=range(20))
        del net
        if check.device == "cuda":
            torch.cuda.empty_cache()
    out["coda_over_l2_images_per_s"] = out["coda_prompt"]["images_per_s"] / out["l2"]["images_per_s"]
    if out["l2"]["peak_memory_bytes"]:
        out["coda_over_l2_peak_memory"] = out["coda_prompt"]["peak_memory_bytes"] / out["l2"]["peak_memory_bytes"]
    return out


def deit_lt_section(check: Check) -> dict:
    """Images/s of the DeiT-LT student step with its teacher's forward, and without a teacher."""
    import timm

    from cl_vit.bench.gpu import Repeat, resident_batch, train_images_per_s
    from cl_vit.models import build_model
    from cl_vit.models.teachers import Teacher
    from cl_vit.strategies.deit_lt import DeiTLT

    g = sizes(check.cpu)
    n_classes, batch = 1000, g["batch"]
    x, y = resident_batch(batch, 3, g["img"], n_classes, check.device)
    out = {"student": "deit_base_distilled_patch16_224", "teacher": "resnet50 at the student's size",
           "batch": batch, "img_size": g["img"]}
    for label, distillation in (("with_teacher", "hard"), ("without_teacher", "none")):
        torch.manual_seed(0)
        net = build_model({"name": "deit_base_distilled_patch16_224", "drop_path_rate": 0.1}, n_classes, 3, g["img"])
        strategy = DeiTLT(teacher="generated" if distillation == "hard" else None, distillation=distillation,
                          drw_start_epoch=0)
        if distillation == "hard":
            teacher = timm.create_model("resnet50", num_classes=n_classes).eval().requires_grad_(False)
            strategy.teacher = Teacher(teacher, [str(c) for c in range(n_classes)], [1] * n_classes,
                                       (3, g["img"], g["img"]), {"name": "resnet50"}, "generated")
        counts = [max(1, int(1280 * 0.01 ** (c / (n_classes - 1)))) for c in range(n_classes)]
        out[label] = train_images_per_s(net, n_classes, [strategy], Repeat((x, y), g["warmup"] + g["steps"]),
                                        g["warmup"], g["steps"], batch, check.device, g["precision"],
                                        class_counts=counts)
    out["teacher_cost"] = out["without_teacher"]["images_per_s"] / out["with_teacher"]["images_per_s"]
    return out


def prefetcher_section(check: Check) -> dict:
    """timm's prefetcher order on the device (the Refiner-ViT recipes' ``augment.prefetcher``, docs/strategies.md):
    ``strategy=mixup``'s uint8 mixing gives on the device the batches and targets it gives on the CPU from the same
    numpy draws, and ``PrefetchStage``'s normalisation the same values (random erasing off: its draws come from the
    device's generator); and how fast both run against Refiner-ViT-S's training step (the train section)."""
    import numpy as np
    from timm.data import Mixup

    from cl_vit.data.transforms import PrefetchStage
    from cl_vit.strategies.mixup import mix_uint8

    g = sizes(check.cpu)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (g["batch"], 3, g["img"], g["img"]), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 1000, (g["batch"],), generator=gen)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=1000)  # the recipes' settings
    draws = {}
    for dev in ("cpu", check.device):
        np.random.seed(0)
        draws[dev] = [mix_uint8(mixup, x.to(dev), y.to(dev)) for _ in range(8)]  # Mixup and CutMix batches both
    pairs = list(zip(draws["cpu"], draws[check.device]))
    stage = PrefetchStage((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # Refiner-ViT's default_cfg mean / std
    out = {"batch": g["batch"], "img_size": g["img"], "draws": len(pairs),
           "mixed_equal": all(torch.equal(a[0], b[0].cpu()) for a, b in pairs),
           "targets_max_abs_diff": max(float((a[1] - b[1].cpu()).abs().max()) for a, b in pairs),
           "normalised_max_abs_diff": float((stage(x) - stage(x.to(check.device)).cpu()).abs().max())}
    erasing = PrefetchStage((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), re_prob=0.25, re_mode="pixel")  # the recipes' erasing
    xd, yd = x.to(check.device), y.to(check.device)

    def mix_and_stage():
        erasing(mix_uint8(mixup, xd, yd)[0])
        sync(check.device)

    mix_and_stage()
    n, t0 = 10, time.perf_counter()
    for _ in range(n):
        mix_and_stage()
    out["images_per_s"] = g["batch"] * n / (time.perf_counter() - t0)
    step = ((check.doc["sections"].get("train") or {}).get("Refiner-ViT-S") or {}).get("images_per_s")
    if step:
        out["share_of_refiner_s_step"] = step / out["images_per_s"]
    return out


def eval_autocast_section(check: Check) -> dict:
    """ContinualModule.predict_step with trainer.eval_autocast float16 and without, on one batch of a small ViT on the
    device: the dtypes of its linear layers' outputs and its predictions against a forward by hand under CUDA fp16
    autocast. The script check (--cpu) opens the CPU to the key with bfloat16 (the key does nothing there)."""
    from unittest import mock

    import timm

    from cl_vit import hardware
    from cl_vit.module import ContinualModule

    dtype, device_type = ("bfloat16", "cpu") if check.cpu else ("float16", "cuda")
    torch.manual_seed(0)
    net = timm.create_model(CPU_VIT["name"], embed_dim=CPU_VIT["embed_dim"], depth=CPU_VIT["depth"],
                            num_heads=CPU_VIT["num_heads"], num_classes=10, img_size=32, patch_size=8)
    x = torch.randn(64, 3, 32, 32, device=check.device)
    batch = (x, torch.zeros(64, dtype=torch.long, device=check.device), torch.zeros(64, dtype=torch.long))
    out: dict = {"dtype": dtype}
    for key in (None, dtype):
        module = ContinualModule(net, 10, eval_autocast=key).to(check.device).eval()
        module.seen_mask[:] = True
        seen = []
        hook = torch.nn.modules.module.register_module_forward_hook(
            lambda m, a, o: seen.append(str(o.dtype)) if isinstance(m, torch.nn.Linear) else None)
        try:
            with torch.no_grad(), mock.patch.object(hardware, "EVAL_AUTOCAST_DEVICES", (device_type,)):
                preds = module.predict_step(batch, 0)["preds"]["main"]
        finally:
            hook.remove()
        with torch.no_grad(), torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=key is not None):
            by_hand = module.forward_outputs(x)["logits"].argmax(1)
        out[f"linear_dtypes_{key}"] = sorted(set(seen))
        out[f"preds_equal_by_hand_{key}"] = bool(torch.equal(preds, by_hand))
    out["ok"] = (out["linear_dtypes_None"] == ["torch.float32"] and out[f"linear_dtypes_{dtype}"] == [f"torch.{dtype}"]
                 and out["preds_equal_by_hand_None"] and out[f"preds_equal_by_hand_{dtype}"])
    return out


def make_imagenet_r(root: Path, classes: list[str], per_class: int, workers: int) -> None:
    """ImageNet-R's layout (<root>/imagenet-r/<wnid>/*.jpg) with photo-like JPEGs of 250-900 px (cl_vit.bench.data),
    one process per class folder."""
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / "imagenet-r" / wnid, per_class, i) for i, wnid in enumerate(classes)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_make_class, jobs))


def _make_class(job) -> None:
    import numpy as np

    from cl_vit.bench.data import make_class_jpegs

    folder, per_class, seed = job
    make_class_jpegs(folder, per_class, np.random.default_rng(seed))


def data_section(check: Check) -> dict:
    from torch.utils.data import DataLoader

    from cl_vit.data.base import ImageFileDataset, scan_image_folder
    from cl_vit.data.imagenet_r import imagenet_r_wnids
    from cl_vit.data.transforms import imagenet_transforms

    g = sizes(check.cpu)
    classes = imagenet_r_wnids()[: g["classes"]]
    root = check.work / "data"
    t0 = time.perf_counter()
    make_imagenet_r(root, classes, g["per_class"], workers=min(16, os.cpu_count() or 1))
    gen_s = time.perf_counter() - t0
    samples, _ = scan_image_folder(root / "imagenet-r", classes)
    decode, transform = imagenet_transforms(224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), train=True)
    ds = ImageFileDataset(samples, transform, decode=decode)
    out = {"images": len(samples), "generate_s": gen_s, "batch": g["data_batch"], "workers": {}}
    for workers in g["workers"]:
        loader = DataLoader(ds, batch_size=g["data_batch"], shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=check.device == "cuda", drop_last=True)
        n, t0 = 0, None
        for epoch in range(2):
            for i, (xb, _) in enumerate(loader):
                if t0 is None and epoch == 0 and i == 1:  # the workers have started and filled their queues once
                    t0, n = time.perf_counter(), 0
                n += len(xb)
        out["workers"][str(workers)] = {"images_per_s": n / (time.perf_counter() - t0), "images": n}
        del loader
    step = ((check.doc["sections"].get("train") or {}).get("ViT-B/16") or {}).get("images_per_s")
    if step:
        out["gpu_step_images_per_s"] = step
        out["fed_with"] = {w: v["images_per_s"] / step for w, v in out["workers"].items()}
    return out


def recipe_section(check: Check) -> dict:
    """One experience of the L2 and CODA-P recipes end to end through the command line."""
    g = sizes(check.cpu)
    from cl_vit.data.imagenet_r import imagenet_r_wnids

    classes = imagenet_r_wnids()[: g["classes"]]
    root = check.work / "data"
    if not (root / "imagenet-r").is_dir():
        make_imagenet_r(root, classes, g["per_class"], workers=min(16, os.cpu_count() or 1))
    common = ["benchmark.source_args.split=own", f"benchmark.source_args.wnids=[{','.join(classes)}]",
              "benchmark.n_experiences=1", f"trainer.max_epochs={g['epochs']}", "model.pretrained=false",
              f"data_root={root}", "logger=none", "data.verify=none",
              *(["trainer=cpu", "data.num_workers=0", "data.persistent_workers=false",
                 f"benchmark.source_args.img_size={g['img']}", f"model.img_size={g['img']}",
                 "data.batch_size=8"] if check.cpu else ["trainer=gpu"])]
    arms = {"l2": ["benchmark=imagenet-r"], "coda_prompt": ["experiment=coda-prompt-imagenet-r"]}
    out = {"epochs": g["epochs"], "classes": len(classes), "images_per_class": g["per_class"]}
    for arm, args in arms.items():
        run_dir = check.work / "runs" / arm
        cmd = [sys.executable, "-m", "cl_vit.run", *args, *common, f"hydra.run.dir={run_dir}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, check.left() - 10))
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            out[arm] = {"error": f"exit {proc.returncode}", "command": " ".join(cmd[1:]),
                        "output_tail": (proc.stdout + proc.stderr)[-3000:]}
            continue
        doc = json.loads((run_dir / "results.json").read_text())
        stream = json.loads((run_dir / "stream.json").read_text())
        cost = doc["cost"]["per_experience"][0]
        n_train = stream["experiences"][0]["n_train"]
        out[arm] = {"process_wall_s": wall, "experience_wall_s": doc["wall_time"]["per_experience"][0],
                    "time_s": cost["time_s"], "train_images": n_train,
                    "train_images_per_s": n_train * g["epochs"] / cost["time_s"]["train"],
                    # after the first epoch (workers started, kernels chosen): the speed of a long run
                    "steady_images_per_s": (n_train / statistics.median(cost["time_s"]["epochs"][1:])
                                            if len(cost["time_s"].get("epochs", [])) > 1 else None),
                    "peak_memory_bytes": cost["device_peak_bytes"] or cost["host_peak_rss_bytes"],
                    "params_trainable": cost["params_trainable"], "params_total": cost["params_total"],
                    "accuracy": doc["accuracy_matrix"][0][0], "command": "python " + " ".join(cmd[1:])}
    if "train_images_per_s" in out.get("l2", {}) and "train_images_per_s" in out.get("coda_prompt", {}):
        out["coda_over_l2_images_per_s"] = out["coda_prompt"]["train_images_per_s"] / out["l2"]["train_images_per_s"]
        if out["l2"]["steady_images_per_s"] and out["coda_prompt"]["steady_images_per_s"]:
            out["coda_over_l2_steady_images_per_s"] = (out["coda_prompt"]["steady_images_per_s"]
                                                       / out["l2"]["steady_images_per_s"])
        out["coda_over_l2_peak_memory"] = out["coda_prompt"]["peak_memory_bytes"] / out["l2"]["peak_memory_bytes"]
    return out


def profile_section(check: Check) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from cl_vit.bench.gpu import bare_step

    g = sizes(check.cpu)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if check.device == "cuda" else [])
    sort = "self_cuda_time_total" if check.device == "cuda" else "self_cpu_time_total"
    text, out = [], {}
    for label, name in MODELS.items():
        step = bare_step(name, g["img"], g["batch"], check.device, g["precision"])
        for _ in range(3):
            step()
        sync(check.device)
        with profile(activities=activities) as prof:
            for _ in range(3):
                step()
            sync(check.device)
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
        except (KeyError, AttributeError, ValueError):  # newer torch names the column after the device
            table = prof.key_averages().table(sort_by=sort.replace("cuda", "device"), row_limit=25,
                                              max_name_column_width=70)
        text.append(f"## {label} at {g['img']}, batch {g['batch']}, {g['precision']}, bare eager step x3\n\n{table}\n")
        if label == "Refiner-ViT-S":
            trace = check.work / "trace.json"
            prof.export_chrome_trace(str(trace))
            atomic_write_bytes(check.out / "trace_refiner_s.json.gz", gzip.compress(trace.read_bytes()))
            if (check.out / "trace_refiner_s.json.gz").stat().st_size > 15 * 2**20:
                (check.out / "trace_refiner_s.json.gz").unlink()
        out[label] = "profiles.txt"
        del step
        if check.device == "cuda":
            torch.cuda.empty_cache()
    atomic_write_text(check.out / "profiles.txt", "\n".join(text))
    return out


def sizes(cpu: bool) -> dict:
    if cpu:
        return dict(img=32, batch=4, steps=2, warmup=1, precision="32-true", matmul=256, classes=4, per_class=10,
                    data_batch=8, workers=(0, 2), epochs=2)
    from cl_vit.hardware import trainer_kwargs

    precision = trainer_kwargs({"accelerator": "gpu", "precision": "bf16-mixed"})["precision"]
    return dict(img=224, batch=256, steps=20, warmup=5, precision=precision, matmul=8192, classes=20,
                per_class=150, data_batch=128, workers=(4, 8, 16), epochs=4)


# -- summary ---------------------------------------------------------------------------------------------------------


def _fmt(v, unit=""):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.3g}{unit}" if abs(v) < 100 else f"{v:,.0f}{unit}"
    return f"{v}{unit}"


def _gib(v) -> str:
    return "—" if v is None else f"{v / 2**30:.2f}"


def summary(doc: dict) -> str:
    env, s = doc["environment"], doc["sections"]
    lines = [f"# GPU check: {env.get('gpu') or 'CPU (script check only)'}", "",
             f"{env['date']} · torch {env['torch']} · timm {env['timm']} · lightning {env['lightning']}"
             + (f" · CUDA {env.get('cuda')} · driver {env.get('driver')}" if env.get("gpu") else ""), ""]
    for name, res in s.items():
        if "error" in res or "skipped" in res:
            lines.append(f"- {name}: {res.get('error') or 'skipped: ' + res['skipped']}")
    peak = s.get("peak") or {}
    if "measured_flops" in peak:
        sheet = peak.get("datasheet_flops")
        lines += ["", f"Matrix product {peak['n']}^3 {peak['dtype']}: {_fmt(peak['measured_flops'] / 1e12)} TFLOP/s "
                  f"measured; data sheet {_fmt(sheet / 1e12 if sheet else None)} TFLOP/s"]
    for key in ("train", "train_compiled"):
        res = s.get(key) or {}
        rows = [(k, v) for k, v in res.items() if isinstance(v, dict) and "images_per_s" in v]
        if rows:
            lines += ["", f"| {key} (batch {res['batch']}, {res['img_size']} px, {res['precision']}) | images/s | "
                      "bare loop | peak GiB | GFLOP/img | MFU (measured) | MFU (sheet) |", "|---|---:|---:|---:|---:|---:|---:|"]
            for k, v in rows:
                lines.append(f"| {k} | {v['images_per_s']:.0f} | {_fmt(v.get('bare_images_per_s'))} | "
                             f"{_gib(v.get('peak_memory_bytes'))} | {v['flops_per_image'] / 1e9:.1f} | "
                             f"{_fmt(v.get('mfu_measured_peak'))} | {_fmt(v.get('mfu_datasheet_peak'))} |")
    dc = s.get("deferred_checks") or {}
    if "suite_over_bare_every_step" in dc:
        k = DEFERRED_EVERY
        lines += ["", f"ViT-B/16 suite / bare loop: {dc['suite_over_bare_every_step']:.2f} with the non-finite checks "
                  f"read every step, {dc[f'suite_over_bare_every_{k}']:.2f} read every {k} "
                  f"(trainer.finite_check_every={k}; aim 0.90)"]
    rr = (s.get("refiner_recompute") or {}).get("rows") or []
    for r in rr:
        lines.append(f"- refiner recompute, {r['case']}: {r['metric']} {r['value']:.4g} / {r['baseline']:.4g} = "
                     f"{r['ratio']:.3f}" + (f" (quartiles {r['quartiles'][0]}-{r['quartiles'][1]})"
                                            if r.get("quartiles") else ""))
    t = s.get("twin") or {}
    if "refiner_s_over_twin" in t:
        lines += ["", f"Refiner-ViT-S / its plain ViT twin: {t['refiner_s_over_twin']:.2f}x images/s "
                  f"(twin {t['images_per_s']:.0f}, bare {_fmt(t.get('bare_images_per_s'))})"]
    ps = s.get("prompt_step") or {}
    if "coda_over_l2_images_per_s" in ps:
        lines += ["", f"Step, ViT-B/16 batch {ps['batch']}: L2 {ps['l2']['images_per_s']:.0f} images/s, CODA-P "
                  f"{ps['coda_prompt']['images_per_s']:.0f} ({ps['coda_over_l2_images_per_s']:.2f}x), peak "
                  f"{_gib(ps['l2']['peak_memory_bytes'])} vs {_gib(ps['coda_prompt']['peak_memory_bytes'])} GiB"]
    d = s.get("deit_lt") or {}
    if "teacher_cost" in d:
        lines += ["", f"DeiT-LT student step: {d['with_teacher']['images_per_s']:.0f} images/s with the teacher, "
                  f"{d['without_teacher']['images_per_s']:.0f} without ({d['teacher_cost']:.2f}x)"]
    pf = s.get("prefetcher") or {}
    if "mixed_equal" in pf:
        same = "equal to" if pf["mixed_equal"] else "DIFFERENT from"
        lines += ["", f"Prefetcher order on the device (batch {pf['batch']}, {pf['img_size']} px): uint8 mixing "
                  f"{same} the CPU's over {pf['draws']} draws, targets "
                  f"{pf['targets_max_abs_diff']:.1e}, normalisation {pf['normalised_max_abs_diff']:.1e} apart; mixing "
                  f"+ normalising + erasing {pf['images_per_s']:.0f} images/s"
                  + (f" ({pf['share_of_refiner_s_step']:.1%} of a Refiner-ViT-S step)"
                     if pf.get("share_of_refiner_s_step") else "")]
    ea = s.get("eval_autocast") or {}
    if "ok" in ea:
        lines += ["", f"trainer.eval_autocast={ea['dtype']}: evaluation linear outputs {ea['linear_dtypes_' + ea['dtype']]} "
                  f"(without the key {ea['linear_dtypes_None']}), predictions "
                  + ("equal to" if ea[f"preds_equal_by_hand_{ea['dtype']}"] else "DIFFERENT from")
                  + " an autocast forward by hand: " + ("ok" if ea["ok"] else "NOT OK")]
    dt = s.get("data") or {}
    if dt.get("workers"):
        lines += ["", "Data pipeline images/s: " + ", ".join(f"{w} workers {v['images_per_s']:.0f}"
                                                           for w, v in dt["workers"].items())
                  + (f" (GPU step {dt['gpu_step_images_per_s']:.0f})" if dt.get("gpu_step_images_per_s") else "")]
    r = s.get("recipe") or {}
    for arm in ("l2", "coda_prompt"):
        v = r.get(arm) or {}
        if "time_s" in v:
            t = v["time_s"]
            lines.append(f"- recipe {arm}: {v['train_images_per_s']:.0f} training images/s "
                         f"({_fmt(v.get('steady_images_per_s'))} after the first epoch), train {t['train']:.1f} s, "
                         f"evaluate {t['evaluate']:.1f} s, checkpoint {t.get('checkpoint', 0):.1f} s, process "
                         f"{v['process_wall_s']:.1f} s, peak {_gib(v.get('peak_memory_bytes'))} GiB")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_vit.bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (results.json, summary.md, profiles.txt, a trace)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections (default: %(default)s)")
    p.add_argument("--skip", nargs="*", default=[], metavar="SECTION", choices=SECTIONS,
                   help=f"sections to leave out, of {list(SECTIONS)}")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        return report_error("no CUDA device: run on a GPU machine, or give --cpu to check the script")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.cpu, args.budget)
    g = sizes(args.cpu)
    sections = {
        "peak": (lambda: matmul_peak(check.device, g["matmul"], torch.float32 if args.cpu else torch.bfloat16), 10),
        "train": (lambda: train_section(check, compile_=False), 40),
        "deferred_checks": (lambda: deferred_checks_section(check), 40),
        "refiner_recompute": (lambda: refiner_recompute_section(check), 60),
        "twin": (lambda: twin_section(check), 20),
        "prompt_step": (lambda: prompt_step_section(check), 30),
        "deit_lt": (lambda: deit_lt_section(check), 40),
        "prefetcher": (lambda: prefetcher_section(check), 15),
        "eval_autocast": (lambda: eval_autocast_section(check), 5),
        "data": (lambda: data_section(check), 45),
        "recipe": (lambda: recipe_section(check), 100),
        "profile": (lambda: profile_section(check), 25),
        "train_compiled": (lambda: train_section(check, compile_=True), 90),
    }
    for name in SECTIONS:
        if name not in args.skip:
            check.section(name, *sections[name])
    print(summary(check.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
