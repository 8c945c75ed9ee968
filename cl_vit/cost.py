"""What an experience costs: parameters (total, trainable in its fit), the state strategies carry, peak memory.

Recorded per experience in results.json (``cost.per_experience``) and summarised by the report (largest trainable
count, last total, largest peak). Methods differ in what grows: prompts and heads are parameters, prototypes, Gram
matrices and class Gaussians are buffers or strategy state, which ``state_numel`` counts (the network's buffers plus
every tensor of every strategy's ``state_dict``).

Peak memory: on a GPU, ``torch.cuda.max_memory_allocated`` from the experience's start (reset there) to the end of its
evaluation; the host's peak resident set size of the process so far (``ru_maxrss``, which cannot be reset) always.
Under DDP the largest value over the processes is kept.
"""
from __future__ import annotations

import resource
import sys
from typing import Any, Iterable

import torch

from cl_vit import distributed

#: the summary keys (results.json ``cost``, the report's columns)
COST_KEYS = ("params_trainable", "params_total", "peak_memory")


def tensor_numel(obj: Any) -> int:
    """Elements of every tensor in nested state (dicts, lists, tuples, modules)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, torch.nn.Module):
        return sum(t.numel() for t in obj.state_dict().values())
    if isinstance(obj, dict):
        return sum(tensor_numel(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_numel(v) for v in obj)
    return 0


def host_peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class ExperienceCost:
    """Started before an experience's hooks run, ``fit_started`` at its fit, ``finish``-ed after its evaluation."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.counts: dict[str, int] = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def fit_started(self, module: torch.nn.Module) -> None:
        params = list(module.parameters())
        self.counts = {"params_total": sum(p.numel() for p in params),
                       "params_trainable": sum(p.numel() for p in params if p.requires_grad)}

    def finish(self, module: torch.nn.Module, strategies: Iterable = ()) -> dict:
        buffers = sum(b.numel() for b in module.buffers())
        out = {**self.counts, "state_numel": buffers + sum(tensor_numel(s.state_dict()) for s in strategies),
               "device_peak_bytes": (int(torch.cuda.max_memory_allocated(self.device))
                                     if self.device.type == "cuda" else None),
               "host_peak_rss_bytes": host_peak_rss()}
        if distributed.world_size() > 1:
            shares = distributed.all_gather_object(out)
            for key in ("device_peak_bytes", "host_peak_rss_bytes"):
                values = [s[key] for s in shares if s[key] is not None]
                out[key] = max(values) if values else None
        return out


def summarize(per_experience: list[dict]) -> dict:
    """The report's cost columns: largest trainable count, the last total count, the largest peak memory (the
    device's where there is one, else the host's)."""
    rows = [c for c in per_experience if c]
    if not rows:
        return dict.fromkeys(COST_KEYS)
    device = [c["device_peak_bytes"] for c in rows if c.get("device_peak_bytes") is not None]
    host = [c["host_peak_rss_bytes"] for c in rows if c.get("host_peak_rss_bytes") is not None]
    return {"params_trainable": max(c.get("params_trainable", 0) for c in rows),
            "params_total": rows[-1].get("params_total"),
            "peak_memory": max(device) if device else max(host) if host else None}
