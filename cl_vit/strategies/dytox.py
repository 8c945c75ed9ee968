"""DyTox: dynamic task tokens with rehearsal and distillation (Douillard et al., CVPR 2022), as the official code
trains it (github.com/arthurdouillard/dytox: main.py, continual/engine.py ``forward``, continual/dytox.py).

The network (cl_vit/models/dytox.py, :class:`~cl_vit.models.dytox.DyToxNet`) wraps the backbone in ``setup``; this
plug-in holds the policy:

* before each experience: the previous network, frozen, becomes the teacher (main.py ``teacher_model``); a new task
  token and classifier, and from the second task a fresh divergence head; the old tokens and classifiers are frozen
  (``freeze_task: [old_task_tokens, old_heads]``), everything else trains;
* loss (engine.py ``forward``), with C_old the classes seen before and C the classes seen now:
  ``(1 - C_old / C) * cls + C_old / C * tau^2 * KL(softmax(z_old / tau) || softmax(z[:, old] / tau))`` (``auto_kd``,
  KL averaged over every old logit of the batch as ``F.kl_div(..., reduction='mean')``)
  ``+ head_div * loss(div head, target 0 for an old class, 1 + its rank among the new classes otherwise)``.
  The classification loss is the module's (configs/strategy/dytox.yaml sets BCE, the official ``bce_loss``).

The rehearsal memory is the suite's replay strategy (cl_vit/strategies/replay.py): configs/strategy/dytox.yaml
pulls it in with the official memory (herding, ``memory_size // seen classes`` per class, added once to the
experience's data), so every sample of the batch, replayed or new, takes the same three terms, as in the official
code.

After each experience but the first, the balanced finetuning (main.py, FINETUNING; ``finetuning: balanced``): the
classification loss alone (no teacher, no divergence head: ``head_div_mode tr``) on the memory as it stands after the
experience (continual/rehearsal.py get_finetuning_dataset: the memory only, class-balanced by construction), for
``finetuning_epochs`` at a constant learning rate, with the encoder frozen and everything else trainable, the old
tokens and classifiers included (``freeze_ft: [sab]``; ``freeze`` re-enables all first). It runs in
``after_experience`` as a plain loop; under DDP every process runs the whole memory and the gradients are averaged.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit import distributed
from cl_vit.errors import ConfigError
from cl_vit.models.dytox import DyToxNet
from cl_vit.strategies.base import ExperienceInfo, TaskGrowingStrategy, register_strategy
from cl_vit.strategies.replay import MemoryDataset, Replay, draw_seed

#: the purpose of the finetuning loader's seed (cl_vit/strategies/replay.py numbers its own 0-3)
FINETUNE = 10

log = logging.getLogger("cl_vit")


def kd_term(logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """engine.py forward: ``tau^2 * kl_div(log_softmax(z / tau), log_softmax(z_t / tau), 'mean', log_target)``
    on the old classes' logits: the pointwise KL averaged over batch x classes (what 'mean' computes, without its
    warning that 'batchmean' is the true KL)."""
    return F.kl_div(F.log_softmax(logits / tau, dim=1), F.log_softmax(teacher_logits / tau, dim=1),
                    reduction="none", log_target=True).mean() * tau ** 2


def divergence_targets(y: torch.Tensor, new_classes: torch.Tensor) -> torch.Tensor:
    """0 for a sample of an old class, 1 + the rank of its class among the experience's classes otherwise."""
    match = y[:, None] == new_classes[None, :]
    return torch.where(match.any(1), match.float().argmax(1) + 1, torch.zeros_like(y))


def divergence_loss(div_logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The module's classification loss over the divergence head's classes (engine.py: ``criterion``)."""
    if kind == "bce":
        onehot = F.one_hot(targets, div_logits.shape[1]).to(div_logits.dtype)
        return F.binary_cross_entropy_with_logits(div_logits, onehot)
    return F.cross_entropy(div_logits, targets)


@register_strategy
class DyTox(TaskGrowingStrategy):
    """Task tokens, task-attention block, divergence head and distillation; defaults from the official CIFAR
    options (configs/strategy/dytox.yaml cites them)."""

    name = "dytox"
    reads_old_logits = True

    def __init__(self, head_div: float = 0.1, distillation_tau: float = 1.0, auto_kd: bool = True, kd: float = 0.0,
                 init_from_last_block: bool = True, backbone_no_decay: bool = True, finetuning_epochs: int = 20,
                 finetuning_lr: float = 1.25e-5, finetuning_weight_decay: float = 1e-6,
                 norm_eps: float | None = None, finetuning_shuffle: bool = True):
        if isinstance(finetuning_epochs, bool) or not isinstance(finetuning_epochs, int) or finetuning_epochs < 0:
            raise ConfigError("strategy.dytox.finetuning_epochs", finetuning_epochs, "a whole number >= 0 (0: none)")
        for key, v in (("head_div", head_div), ("kd", kd), ("finetuning_lr", finetuning_lr),
                       ("finetuning_weight_decay", finetuning_weight_decay)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"strategy.dytox.{key}", v, "a number >= 0")
        if isinstance(distillation_tau, bool) or not isinstance(distillation_tau, (int, float)) \
                or distillation_tau <= 0:
            raise ConfigError("strategy.dytox.distillation_tau", distillation_tau, "a number > 0 (official: 1)")
        if norm_eps is not None and (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
                                     or norm_eps <= 0):
            raise ConfigError("strategy.dytox.norm_eps", norm_eps, "a number > 0, or null for the backbone's own")
        self.norm_eps = None if norm_eps is None else float(norm_eps)
        self.head_div = float(head_div)
        self.tau = float(distillation_tau)
        self.auto_kd = bool(auto_kd)
        self.kd = float(kd)
        self.init_from_last_block = bool(init_from_last_block)
        self.backbone_no_decay = bool(backbone_no_decay)
        self.finetuning_epochs = finetuning_epochs
        self.finetuning_lr = float(finetuning_lr)
        self.finetuning_weight_decay = float(finetuning_weight_decay)
        if not isinstance(finetuning_shuffle, bool):
            raise ConfigError("strategy.dytox.finetuning_shuffle", finetuning_shuffle, "true or false")
        self.finetuning_shuffle = finetuning_shuffle
        self.module = None
        self.teacher: nn.Module | None = None
        self._new: torch.Tensor | None = None
        self._old: torch.Tensor | None = None
        self._kd_weight = 0.0

    def setup(self, module) -> None:
        self.module = module
        if not isinstance(module.net, DyToxNet):
            module.net = DyToxNet(module.net, module.n_classes, self.init_from_last_block, self.norm_eps)
        module.net.backbone_no_decay = self.backbone_no_decay
        if module.loss_name != "bce":
            log.warning("dytox: loss.name=%s; the official CIFAR recipe uses bce (configs/strategy/dytox.yaml)",
                        module.loss_name)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        net: DyToxNet = module.net
        t = net.n_tasks
        if t != experience.index:
            raise RuntimeError(f"dytox: the network holds {t} tasks at experience {experience.index}")
        self.teacher = copy.deepcopy(net).eval().requires_grad_(False) if t > 0 else None
        old = sorted(set(experience.seen_classes) - set(experience.classes))
        self._old = torch.tensor(old, dtype=torch.long)
        self._new = torch.tensor(experience.classes, dtype=torch.long)
        net.add_task(experience.classes, divergence=self.head_div > 0)
        self._set_trainable(net)
        # auto_kd (engine.py forward): the classification loss and the distillation interpolated by C_old / C
        share = len(old) / len(experience.seen_classes) if self.teacher is not None else 0.0
        if self.auto_kd:
            self.cls_loss_weight, self._kd_weight = 1.0 - share, share
        else:
            self.cls_loss_weight, self._kd_weight = 1.0, self.kd if self.teacher is not None else 0.0

    @staticmethod
    def _set_trainable(net: DyToxNet) -> None:
        """freeze_task [old_task_tokens, old_heads]; set from scratch each time, so a resumed run agrees."""
        net.requires_grad_(True)
        for c in range(net.n_tasks - 1):
            net.tokens[c].requires_grad_(False)
            net.heads[c].requires_grad_(False)

    def on_fit_start(self, module) -> None:
        if self.teacher is not None:
            self.teacher.to(module.device)
        self._old = self._old.to(module.device)
        self._new = self._new.to(module.device)

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        terms = {}
        if self.teacher is not None and self._kd_weight > 0:
            with torch.no_grad():
                old_logits = self.teacher.forward_outputs(batch["x"])["logits"][:, self._old]
            terms["kd"] = self._kd_weight * kd_term(outputs["logits"][:, self._old], old_logits, self.tau)
        div = outputs.get("div")
        if div is not None and self.head_div > 0 and batch["y"].ndim == 1:
            targets = divergence_targets(batch["y"], self._new)
            terms["div"] = self.head_div * divergence_loss(div, targets, module.loss_name)
        return terms

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        self.teacher = None
        if self.finetuning_epochs and experience.index > 0:
            self.balanced_finetuning(module, experience)

    def balanced_finetuning(self, module, experience: ExperienceInfo) -> None:
        from cl_vit.module import modes_kept

        memory = next((s for s in module.strategies if isinstance(s, Replay)), None)
        if memory is None or not len(memory):
            log.warning("dytox: no replay memory to finetune on (compose strategy=[replay,dytox]); finetuning skipped")
            return
        net: DyToxNet = module.net
        net.requires_grad_(True)
        net.backbone.requires_grad_(False)
        if net.head_div is not None:  # not in the loss ('tr' only): the official AdamW skips it (no gradient)
            net.head_div.requires_grad_(False)
        params = [p for p in net.parameters() if p.requires_grad]
        # timm create_optimizer: no weight decay on 1-D parameters and biases
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": self.finetuning_weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=self.finetuning_lr, eps=1e-8)
        loader = experience.train_loader(MemoryDataset(experience.dataset, memory.exp, memory.idx),
                                         seed=draw_seed(experience.seed, FINETUNE, experience.index),
                                         shuffle=self.finetuning_shuffle)
        # each module's mode given back after (modes_kept): an eval-mode network would train the next experience
        # without its divergence head and drop path
        with modes_kept(net):
            net.train()  # freeze(['sab']) sets the SABs to eval; train_one_epoch's model.train() undoes it (L36)
            last = self._finetune(module, net, params, opt, loader)
        log.info("  dytox: balanced finetuning, %d epochs on %d memory samples, last loss %.4f",
                 self.finetuning_epochs, len(memory), last)

    def _finetune(self, module, net: DyToxNet, params: list, opt, loader) -> float:
        """The finetuning epochs; returns the last step's loss."""
        from cl_vit.module import as_step_input, classification_loss, outside_step

        last = float("nan")

        with torch.enable_grad(), outside_step(module):
            for _ in range(self.finetuning_epochs):
                for x, y, *_ in loader:
                    x, y = as_step_input(module, x.to(module.device)), torch.as_tensor(y).to(module.device)
                    logits = net.forward_outputs(x)["logits"]
                    loss = classification_loss(logits, y, module.seen_mask, module.loss_name)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if distributed.world_size() > 1:  # every process ran the whole memory: average, as DDP would
                        grads = distributed.reduce_mean(module, {str(i): p.grad for i, p in enumerate(params)
                                                                 if p.grad is not None})
                        for i, g in grads.items():
                            params[int(i)].grad.copy_(g)
                    opt.step()
                    last = float(loss.detach())
        return last

    def grow(self, net: DyToxNet, classes) -> None:
        """A resumed task's token, classifier and divergence head (``TaskGrowingStrategy``)."""
        net.add_task(classes, divergence=self.head_div > 0)

    def __repr__(self) -> str:
        return (f"DyTox(head_div={self.head_div:g}, distillation_tau={self.tau:g}, auto_kd={self.auto_kd}, "
                f"kd={self.kd:g}, finetuning_epochs={self.finetuning_epochs})")
