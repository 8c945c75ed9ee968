"""One run on several processes (``trainer=ddp``): launching, ranks, and the collectives strategies need.

How a multi-process run works. Every process runs the whole stream: ``launch`` (called by ``cl_vit.run.run`` before
anything is written) lets Lightning's subprocess launcher re-run the command line once per extra local device, with
``hydra.run.dir=<the same directory> hydra.output_subdir=null`` appended (Lightning's ``_hydra_subprocess_cmd``), so
all ranks build the same source, stream, model and strategies from the same config and seed, then joins the process
group. The group therefore exists before the first experience, and strategies may use collectives from their first
hook on. Lightning's per-experience Trainers find it initialised (``LOCAL_RANK`` is set) and launch nothing more.
Spawn-based strategies (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) would run only ``fit`` in the children and
lose the loop around it, so they are refused.

What a strategy must do under DDP:

* statistics computed from data (a Fisher matrix, class means, ...) are reduced across processes: ``reduce_mean`` /
  ``reduce_sum`` (one all-reduce for a whole dict of tensors). ``experience.train_loader(shard=True)`` gives each
  process its own part of the data, every sample exactly once over all processes.
* anything else that is state must be the same on every process (same seed, same weights: DDP keeps the networks
  identical); ``broadcast`` copies rank 0's value where that is not so by construction. The runner checks this after
  every experience (``assert_consistent``) and stops with the name of the strategy whose state differs.
* held models (teachers, old networks) are moved to ``module.device`` in ``on_fit_start``.

Only rank 0 writes the run directory; the runner makes every rank wait until it is written (``barrier``).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cl_vit.errors import UserError

log = logging.getLogger("cl_vit")

#: Lightning strategies that run only ``fit`` in spawned processes: the loop over experiences would be lost
SPAWN_STRATEGIES = ("spawn", "fork", "notebook")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_rank_zero() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def check_strategy(name: str) -> None:
    """One line for a Lightning strategy that cannot run the loop over experiences."""
    if any(s in str(name) for s in SPAWN_STRATEGIES):
        raise UserError(
            f"trainer.strategy={name} starts its processes per fit and would lose the loop over experiences: "
            "use trainer=ddp (Lightning's subprocess launcher; every process runs the whole stream)"
        )


def env_rank() -> int:
    """This process's rank as the launcher's environment tells it, before any process group exists."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def quiet_other_ranks() -> None:
    """Ranks other than 0 keep warnings on the console and leave the run's log file (run.log) to rank 0."""
    if env_rank() == 0 and is_rank_zero():
        return
    logging.getLogger("cl_vit").setLevel(logging.WARNING)
    root = logging.getLogger()
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            root.removeHandler(h)
            h.close()


def launch(trainer_kwargs: Mapping[str, Any]) -> None:
    """Start the other processes of a multi-process run and join the process group; nothing for one process.

    Call it from the command line's process (``python -m cl_vit.run``): the children re-run that command line.
    """
    if is_initialized() or _single_process(trainer_kwargs):
        return
    import lightning as L

    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    check_strategy(trainer_kwargs.get("strategy", "auto"))
    trainer = L.Trainer(**{**trainer_kwargs, "logger": False, "enable_progress_bar": False,
                           "enable_checkpointing": False, "enable_model_summary": False})
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    if strategy.launcher is not None and not isinstance(strategy.launcher, _SubprocessScriptLauncher):
        check_strategy("spawn")
    if strategy.launcher is not None and not strategy.cluster_environment.creates_processes_externally:
        _check_command_line()
    if strategy.launcher is None:
        strategy.setup_environment()
    else:
        strategy.launcher.launch(strategy.setup_environment)
    quiet_other_ranks()
    log.info("Distributed run: %d processes (%s, backend %s)", world_size(), type(strategy).__name__,
             dist.get_backend())


def _single_process(trainer_kwargs: Mapping[str, Any]) -> bool:
    """Plainly one process (one device, one node): no Trainer needs to be built to know it."""
    devices = trainer_kwargs.get("devices", "auto")
    return str(devices) in ("1", "[0]") and int(trainer_kwargs.get("num_nodes", 1)) == 1


def _check_command_line() -> None:
    """Lightning starts the other local processes by re-running this process's command line; that needs one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise UserError("a multi-process run (trainer=ddp) starts from the command line: python -m cl_vit.run "
                        "trainer=ddp ... (Lightning re-runs it once per extra device)")
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        # the re-run command line would start the whole sweep again in every child (Lightning issue #11300)
        raise UserError("trainer=ddp cannot run inside a Hydra sweep (-m): launch each run on its own")


# -- collectives -------------------------------------------------------------------------------------------------


def _comm_device(module: nn.Module | None) -> torch.device:
    if dist.get_backend() == "nccl":
        if module is not None:
            params = next(iter(module.parameters()), None)
            if params is not None and params.is_cuda:
                return params.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(module, values, op):
    """All-reduce a tensor or a mapping of tensors (flattened into one buffer: one collective)."""
    if world_size() == 1:
        return values
    single = isinstance(values, torch.Tensor)
    items = {"": values} if single else dict(values)
    device = _comm_device(module)
    flat = torch.cat([t.detach().to(device, torch.float64).reshape(-1) for t in items.values()])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if op == "mean":
        flat /= world_size()
    out, offset = {}, 0
    for k, t in items.items():
        n = t.numel()
        out[k] = flat[offset: offset + n].reshape(t.shape).to(t.device, t.dtype)
        offset += n
    return out[""] if single else out


def agree_on_stop(signum: int | None) -> int | None:
    """The stop signal as every process sees it: this process's, or one that reached another rank (the largest
    number wins); one small all-reduce per call under DDP, nothing otherwise."""
    if world_size() == 1:
        return signum
    flag = torch.tensor([float(signum or 0)], device=_comm_device(None))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    got = int(flag.item())
    return got or None


def reduce_mean(module: nn.Module | None, values):
    """Mean over processes of a tensor, or of every tensor of a mapping (returned as a new dict).

    Computed in float64 and cast back, so every process gets the same bits. With one process: ``values`` as given.
    """
    return _all_reduce(module, values, "mean")


def reduce_sum(module: nn.Module | None, values):
    """Sum over processes of a tensor or of every tensor of a mapping (e.g. counts over ``shard=True`` loaders)."""
    return _all_reduce(module, values, "sum")


def broadcast(module: nn.Module | None, value, src: int = 0):
    """Rank ``src``'s ``value`` on every process: tensors (same shape everywhere) or any picklable object."""
    if world_size() == 1:
        return value
    if isinstance(value, torch.Tensor):
        buf = value.detach().to(_comm_device(module)).clone()
        dist.broadcast(buf, src=src)
        return buf.to(value.device)
    obj = [value]
    dist.broadcast_object_list(obj, src=src)
    return obj[0]


def all_gather_object(value) -> list:
    """Every process's ``value``, in rank order (a one-element list with one process)."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


# -- consistency -------------------------------------------------------------------------------------------------


def fingerprint(obj) -> list[float]:
    """A short numeric summary of nested state (tensors, arrays, modules, numbers), equal where the state is."""
    out: list[float] = []

    def walk(o):
        if isinstance(o, nn.Module):
            walk(o.state_dict())
        elif isinstance(o, torch.Tensor):
            t = o.detach()
            t = t.to(torch.float64) if not t.is_complex() else torch.view_as_real(t).to(torch.float64)
            out.extend([float(t.numel()), float(t.sum()), float(t.abs().sum()), float((t * t).sum())])
        elif isinstance(o, np.ndarray) and o.dtype.kind in "biuf":
            walk(torch.from_numpy(np.asarray(o, dtype=np.float64)))
        elif isinstance(o, Mapping):
            for k in sorted(o, key=str):
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif isinstance(o, (bool, int, float, np.number)):
            out.append(float(o))

    walk(obj)
    return out


def first_mismatch(prints: list[dict[str, list[float]]], rtol: float = 1e-6) -> tuple[str, int] | None:
    """(part, rank) of the first part whose fingerprint on some rank differs from rank 0's; None if all agree."""
    ref = prints[0]
    for r, other in enumerate(prints[1:], start=1):
        for part, values in ref.items():
            theirs = other.get(part)
            if theirs is None or len(theirs) != len(values) or not all(
                math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
                for a, b in zip(values, theirs)
            ):
                return part, r
    return None


def assert_consistent(parts: Mapping[str, Any], when: str) -> None:
    """Stop when some process holds different state than rank 0 (an unreduced statistic, a rank-dependent anchor)."""
    if world_size() == 1:
        return
    prints = all_gather_object({k: fingerprint(v) for k, v in parts.items()})
    bad = first_mismatch(prints)
    if bad is not None:
        part, r = bad
        raise RuntimeError(
            f"{part} differs between rank 0 and rank {r} {when}: reduce statistics with "
            "cl_vit.distributed.reduce_mean/reduce_sum or copy rank 0's value with cl_vit.distributed.broadcast"
        )
