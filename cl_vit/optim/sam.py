"""Sharpness-aware minimisation (Foret et al., ICLR 2021) around any torch optimiser.

As the SAM code that val-iisc/Saddle-LongTail trains its teachers with (davda54/sam ``sam.py``: ``first_step`` climbs
to ``w + rho * g / ||g||`` with the global L2 norm of all gradients, ``second_step`` returns to ``w`` and lets the base
optimiser step with the gradient taken there). Here the two passes run inside ``step(closure)``, the protocol of
closure-based optimisers, so that Lightning's automatic optimisation drives it unchanged: the closure (forward,
zero_grad, backward) runs once at ``w`` and once at ``w + e(w)``. Weight decay stays the base optimiser's business,
as in Saddle-LongTail (SGD's coupled weight decay, not part of the perturbation).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim import Optimizer


class SAM(Optimizer):
    """Wraps an already built optimiser; shares its param groups (so LR schedulers act on both) and its state."""

    def __init__(self, base: Optimizer, rho: float = 0.05, adaptive: bool = False):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        self.base = base
        super().__init__(base.param_groups, dict(base.defaults, rho=rho, adaptive=adaptive))
        self.param_groups = base.param_groups
        for group in self.param_groups:
            group.setdefault("rho", rho)
            group.setdefault("adaptive", adaptive)
        self.state = base.state
        self._w: dict[torch.Tensor, torch.Tensor] = {}

    def _grad_norm(self) -> torch.Tensor:
        norms = [
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2)
            for g in self.param_groups for p in g["params"] if p.grad is not None
        ]
        if not norms:
            return torch.zeros(())
        device = norms[0].device
        return torch.norm(torch.stack([n.to(device) for n in norms]), p=2)

    @torch.no_grad()
    def first_step(self) -> None:
        """Climb to the local worst case ``w + e(w)``, ``e(w) = rho * g / ||g||``."""
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                self._w[p] = p.detach().clone()
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self) -> None:
        """Return to ``w`` and take the base optimiser's step with the gradient measured at ``w + e(w)``.

        ``w`` is the copy taken before the climb, as Saddle-LongTail sam.py L22 / L33 keeps and restores it
        (``old_p``), not ``(w + e) - e``, which differs from ``w`` by rounding."""
        for p, w in self._w.items():
            p.copy_(w)
        self._w.clear()
        self.base.step()

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        if closure is None:
            raise RuntimeError(
                "SAM needs a closure that recomputes the loss (forward, zero_grad, backward): "
                "16-bit mixed precision with a gradient scaler cannot drive it; use 32-true or bf16-mixed"
            )
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups


def rho_at(epoch: int, rho: float, milestones=(), values=()) -> float:
    """SAM's radius in (0-based) ``epoch`` under a step schedule: ``rho`` until the first milestone, then
    ``values[k]`` from epoch ``milestones[k]`` on. Saddle-LongTail's ``adjust_rho`` with ``--rho_schedule step
    --rho_steps a b c d`` (imnet_train_sam.py L444-458, on 1-based epochs: a up to 5, b up to 60, c up to 75, d after)
    is ``rho=a, milestones=[5, 60, 75], values=[b, c, d]``."""
    if len(milestones) != len(values):
        raise ValueError(f"SAM rho schedule: {len(milestones)} milestones but {len(values)} values")
    current = float(rho)
    for m, v in zip(milestones, values):
        if epoch >= m:
            current = float(v)
    return current
