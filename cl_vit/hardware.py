"""Where a run computes: the Trainer arguments for the machine at hand (precision, accelerator), CPU threads and
torch.compile.

``trainer=cpu``, ``trainer=gpu`` and ``trainer=ddp`` (configs/trainer/) choose the device; everything else about a
run stays the same. On a GPU without bf16 (before Ampere: V100, T4) ``bf16-*`` precision falls back to the fp16
equivalent, with loss scaling, and says so once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Mapping, MutableMapping

from cl_vit.errors import ConfigError, UserError

# no torch at module level: cl_vit/__init__ calls passive_openmp() from here before anything imports torch

log = logging.getLogger("cl_vit")

CUDA_ACCELERATORS = ("gpu", "cuda")
#: keys of cfg.trainer that are the suite's, not Lightning's (configure_threads; ContinualModule's checks)
SUITE_TRAINER_KEYS = ("threads", "finite_check_every", "tf32", "eval_autocast")
#: trainer.eval_autocast: the dtypes the evaluation forward may run under on a CUDA GPU (null: the training precision)
EVAL_AUTOCAST_DTYPES = ("float16", "bfloat16")


def uses_cuda(accelerator: str, cuda_available: bool) -> bool:
    return accelerator in CUDA_ACCELERATORS or (accelerator == "auto" and cuda_available)


def resolve_precision(precision: str, on_cuda: bool, bf16_supported: bool,
                      device_name: str = "this GPU") -> tuple[str, str | None]:
    """``(precision to use, message or None)``: bf16 on a CUDA device without native bf16 becomes fp16."""
    precision = str(precision)
    if on_cuda and precision.startswith("bf16") and not bf16_supported:
        fallback = "16-mixed" if precision == "bf16-mixed" else "16-true"
        return fallback, (f"trainer.precision={precision}: {device_name} has no native bf16; "
                          f"using {fallback} (fp16, with loss scaling where mixed)")
    return precision, None


def _bf16_supported() -> bool:
    import torch

    try:  # emulated bf16 (pre-Ampere GPUs) runs, but slower than fp16: count only the native kind
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation and reports native support only
        return torch.cuda.is_bf16_supported()


def trainer_kwargs(trainer_cfg: Mapping[str, Any], cuda_available: bool | None = None) -> dict:
    """The Lightning Trainer arguments of ``cfg.trainer`` for this machine; one line when they cannot work here."""
    import torch

    kwargs = dict(trainer_cfg)
    tf32 = kwargs.get("tf32", True)
    if not isinstance(tf32, bool):
        raise ConfigError("trainer.tf32", tf32, "true (fp32 matmuls on TF32 tensor cores) or false (full fp32)")
    check_eval_autocast(kwargs.get("eval_autocast"))
    for key in SUITE_TRAINER_KEYS:
        kwargs.pop(key, None)
    accelerator = str(kwargs.get("accelerator", "auto"))
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if accelerator in CUDA_ACCELERATORS and not cuda:
        raise UserError(
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible (torch.cuda.is_available() is False): "
            "run with trainer=cpu, or check CUDA_VISIBLE_DEVICES and that torch is a CUDA build"
        )
    if uses_cuda(accelerator, cuda):
        precision, message = resolve_precision(kwargs.get("precision", "32-true"), True, _bf16_supported(),
                                               torch.cuda.get_device_name())
        if message:
            log.warning(message)
        kwargs["precision"] = precision
        # trainer.tf32: fp32 matmuls (fp32 precision, or what autocast leaves in fp32) may use TF32 tensor cores;
        # false keeps them full fp32, torch's own default from 1.12 on
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return kwargs


def check_eval_autocast(dtype: str | None) -> str | None:
    """``trainer.eval_autocast`` as given, or one line naming what it may be."""
    if dtype is not None and dtype not in EVAL_AUTOCAST_DTYPES:
        raise ConfigError("trainer.eval_autocast", dtype, "null (evaluate at trainer.precision) or "
                          f"{' / '.join(EVAL_AUTOCAST_DTYPES)} (the evaluation forward under CUDA autocast)")
    return dtype


#: the device types trainer.eval_autocast applies on: the official torch.cuda.amp.autocast() does nothing off CUDA
EVAL_AUTOCAST_DEVICES = ("cuda",)


def evaluation_autocast(dtype: str | None, device):
    """The context of the evaluation forward on ``device``: autocast to ``dtype`` (trainer.eval_autocast) on a CUDA
    device, nothing elsewhere.

    Inside Lightning's own autocast (a ``*-mixed`` precision) the inner dtype wins. The weight-cast cache stays off,
    as Lightning keeps its own: two nested autocasts of different dtypes that both cache fail on the first matmul
    ("mat1 and mat2 must have the same dtype", torch 2.14)."""
    import torch

    device_type = torch.device(device).type if dtype is not None else None
    if device_type not in EVAL_AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype), cache_enabled=False)


#: torch optimisers (timm names) with a fused implementation on CPU and CUDA (torch >= 2.4)
FUSED_OPTIMIZERS = ("adam", "adamw")


def trainable_parameters(net: torch.nn.Module) -> list:
    return [p for p in net.parameters() if p.requires_grad]


def create_optimizer(net: torch.nn.Module, name: str, lr: float, weight_decay: float = 0.0, **kwargs):
    """timm's ``create_optimizer_v2``, with torch's fused implementation where it exists and nothing says otherwise.

    The fused AdamW updates every tensor in one kernel: the same algorithm, a fraction of the time the default
    per-tensor loop takes for a ViT's many small tensors (python -m cl_vit.bench avalanche). ``optimizer.foreach`` or
    ``optimizer.fused`` in the config choose explicitly."""
    from timm.optim import create_optimizer_v2

    if kwargs.get("filter_bias_and_bn") is False and weight_decay and "param_group_fn" not in kwargs:
        # every trainable parameter decayed, the model's no_weight_decay() (cls_token, pos_embed) too: what timm < 1.0
        # did for filter_bias_and_bn=False and what torch.optim.SGD(model.parameters()) does (RanPAC, SLCA, LDAM-DRW)
        kwargs["param_group_fn"] = trainable_parameters
    if name.lower() in FUSED_OPTIMIZERS and "fused" not in kwargs and "foreach" not in kwargs:
        try:
            return create_optimizer_v2(net, opt=name, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # older torch, or a device/dtype without a fused kernel
            pass
    return create_optimizer_v2(net, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)


def compile_forward(module, **compile_kwargs) -> None:
    """``compile=true``: torch.compile the module's forward pass (backbone and heads) in place.

    The compiled function replaces ``module.forward_outputs`` on this instance only; parameters, buffers and
    state_dict keys stay as they are (no ``_orig_mod.`` prefix), so checkpoints, strategies that address parameters
    by name and copies of ``module.net`` are unaffected. A strategy that regrows the network triggers a recompile.
    """
    import torch

    if getattr(module, "_cl_vit_compiled", False):
        return
    module.forward_outputs = torch.compile(module.forward_outputs, **compile_kwargs)
    module._cl_vit_compiled = True


# -- CPU threads ---------------------------------------------------------------------------------------------------
#
# torch's OpenMP threads spin while they wait for work (libgomp's default). Two processes that each spin on every
# core of a shared machine spend the time slices the other holds spinning: on 2 cores, two default runs side by
# side took 27x as long as one alone (issue 26). So the suite (1) tells OpenMP to sleep instead of spinning, before
# torch is loaded, and (2) gives torch as many intra-op threads as this process has cores, shared among the
# processes it starts. `python -m cl_vit.bench contention` measures the result.

#: what the user's environment said before the suite touched it (cl_vit/__init__ imports this module first)
_USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")


#: the OpenMP wait policy torch's OpenMP read when it loaded (None: OpenMP's default, spinning for a while)
_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")


def passive_openmp(environ: MutableMapping[str, str] = os.environ, torch_loaded: bool | None = None) -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the user chose a policy: idle OpenMP threads sleep instead of spinning.

    OpenMP reads it once, when torch is first imported, so the package's ``__init__`` calls this before it imports
    torch. A process that imported torch earlier keeps the policy it loaded with, and nothing is set (the record in
    results.json says which policy the run had)."""
    global _OMP_WAIT_POLICY
    if torch_loaded if torch_loaded is not None else "torch" in sys.modules:
        return
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _OMP_WAIT_POLICY = environ["OMP_WAIT_POLICY"]


def available_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask: taskset, cgroups cpusets, a scheduler's slot)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        return list(range(os.cpu_count() or 1))


def threads_per_process(processes: int = 1, cores: int | None = None) -> int:
    """Intra-op threads for each of ``processes`` processes sharing this process's cores (at least 1).

    For a launcher that starts its own processes (a joblib sweep of runs, seeds side by side): give each child
    ``thread_environment(n_jobs)``."""
    cores = len(available_cores()) if cores is None else cores
    return max(1, cores // max(1, int(processes)))


def thread_environment(processes: int, cores: int | None = None) -> dict[str, str]:
    """Environment variables for one of ``processes`` child processes run side by side on this process's cores:
    ``{**os.environ, **thread_environment(n)}`` for ``subprocess``, or set in a joblib worker before torch loads."""
    n = str(threads_per_process(processes, cores))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def choose_threads(requested: int | None = None, processes: int = 1, workers: int = 0,
                   cores: int | None = None, env_threads: str | None = None) -> tuple[int, str]:
    """``(intra-op threads, where the number comes from)`` for the main process of a run.

    ``trainer.threads`` (``requested``) wins; then the user's ``OMP_NUM_THREADS`` for a single-process run (under
    DDP Lightning's launcher sets that variable itself, so it says nothing about the user's wish); otherwise this
    process's cores divided among the ``processes`` ranks on this machine, less one core per DataLoader worker
    (each worker runs single-threaded, as torch sets it)."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise UserError(f"trainer.threads={requested!r} must be a whole number >= 1 (or null: chosen from the "
                            "cores this process may use)")
        return requested, "trainer.threads"
    if processes <= 1 and env_threads and env_threads.strip().isdigit() and int(env_threads) >= 1:
        return int(env_threads), "OMP_NUM_THREADS"
    per_process = threads_per_process(processes, cores)
    return max(1, per_process - max(0, int(workers))), "cores"


def configure_threads(requested: int | None = None, processes: int = 1, workers: int = 0) -> dict:
    """Set torch's intra-op threads for this run (:func:`choose_threads`); returns the record for results.json."""
    import torch

    cores = available_cores()
    threads, source = choose_threads(requested, processes, workers, len(cores), _USER_OMP_NUM_THREADS)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return thread_record(source, processes=processes, workers=workers)


def thread_record(source: str | None = None, processes: int = 1, workers: int = 0) -> dict:
    """What results.json says about this process's CPU threads: results depend on the thread count (the order of
    floating-point reductions), so a run records it beside the package versions."""
    import torch

    return {"torch_threads": torch.get_num_threads(), "source": source, "affinity": available_cores(),
            "processes": int(processes), "loader_workers": int(workers),
            "omp_wait_policy": _OMP_WAIT_POLICY}
