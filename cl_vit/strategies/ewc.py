"""Elastic weight consolidation (Kirkpatrick et al., PNAS 2017), online, as in the EWC_MC learner of the authors of
"A Closer Look at Rehearsal-Free Continual Learning" (shaunak27/data-free-continual-learning learners/kd.py):
loss + lambda * sum_j F_j (theta_j - theta*_j)^2 with the same parameter selection and anchor rule as ``l2``.

F is the diagonal Fisher from squared gradients over the experience's training data, computed at its end and
accumulated online: F <- decay * F + F_new. The authors' code adds each task's Fisher to the running sum (decay 1);
decay < 1 is the online EWC of Schwarz et al. (ICML 2018). No Fisher exists during the first experience, so EWC
has no penalty there.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.l2 import L2, _number, l2_penalty
from cl_vit.strategies.selection import QKV, to_cpu, to_device


def diagonal_fisher(forward: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    params: dict[str, torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Diagonal Fisher: mean over batches of (d batch-mean loss / d theta)^2 * batch size.

    The weighting is the authors' (``grad ** 2 * len(input) / len(dataloader)``, learners/kd.py EWC_MC
    ``accumulate_block_memory``). Parameters the loss does not reach, or that do not require grad, get zeros."""
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    trainable = {n: p for n, p in params.items() if p.requires_grad}
    n_batches = 0
    if not trainable:
        return fisher
    for x, y in batches:
        loss = loss_fn(forward(x), y)
        grads = torch.autograd.grad(loss, list(trainable.values()), allow_unused=True)
        for n, g in zip(trainable, grads):
            if g is not None:
                fisher[n] += g.detach() ** 2 * len(x)
        n_batches += 1
    return {n: f / max(1, n_batches) for n, f in fisher.items()}


@register_strategy
class EWC(L2):
    name = "ewc"

    def __init__(self, lam: float = 10.0, params: Sequence[str] = QKV, exclude: Sequence[str] = (),
                 train_only_selected: bool = False, decay: float = 1.0):
        super().__init__(lam, params, exclude, train_only_selected)
        self.decay = _number(f"strategy.{self.name}.decay", decay, 0.0, 1.0)
        self.fisher: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, module) -> None:
        super().on_fit_start(module)
        self.fisher = to_device(self.fisher, module.device)

    def penalty(self) -> torch.Tensor | None:
        if self.anchor is None or self.fisher is None:
            return None
        return l2_penalty(self._params, self.anchor, self.lam, self.fisher)

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        new = self.compute_fisher(module, experience)
        old = to_cpu(self.fisher)
        self.fisher = new if old is None else {n: self.decay * old[n] + f for n, f in new.items()}
        super().after_experience(module, experience)

    def compute_fisher(self, module, experience: ExperienceInfo) -> dict[str, torch.Tensor]:
        """Squared gradients of the run's classification loss over the experience's classes, on the training device.

        The authors use sigmoid BCE over the current task's classes; here the loss follows ``loss.name`` (bce gives
        theirs). Under DDP each process takes every world_size-th batch and the results are averaged across
        processes, so every process holds the same Fisher."""
        from cl_vit.module import as_step_input, classification_loss, modes_kept, net_outputs, outside_step

        trainer = getattr(module, "_trainer", None)
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        home = next(module.parameters()).device
        device = trainer.strategy.root_device if trainer is not None else home
        try:
            with modes_kept(module):
                module.to(device).eval()  # Lightning's teardown left the module on the CPU
                mask = module.current_mask
                loader = experience.train_loader(train=True, seed=torch.initial_seed() % (2**31 - 1))
                batches = ((as_step_input(module, b[0].to(device)), b[1].to(device)) for i, b in enumerate(loader)
                           if i % world == rank)
                with outside_step(module):
                    fisher = diagonal_fisher(lambda x: net_outputs(module.net, x)["logits"], batches, self._params,
                                             lambda z, y: classification_loss(z, y, mask, module.loss_name))
                if world > 1:
                    fisher = {n: trainer.strategy.reduce(f, reduce_op="mean") for n, f in fisher.items()}
        finally:
            module.to(home)
        return to_cpu(fisher)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "fisher": to_cpu(self.fisher)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.fisher = to_cpu(state.get("fisher"))
