"""ContinualModule: the LightningModule that holds the math (backbone + head, losses, optimiser, prediction).

Policy lives elsewhere: the runner decides what to train on and when to evaluate; strategies add loss terms and
state through their hooks (cl_vit.strategies.base).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from cl_vit.errors import NonFiniteLoss
from cl_vit.hardware import check_eval_autocast, create_optimizer, evaluation_autocast
from cl_vit.strategies.base import ExperienceInfo, Strategy

LOSSES = ("ce", "bce")


def classification_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Loss over the classes in ``mask`` only (task-agnostic class-incremental training).

    ``ce``: softmax cross-entropy with the other logits at -inf. ``bce``: sigmoid binary cross-entropy against the
    one-hot target over the masked classes (LwF.MC, which Smith et al. 2023 found to reduce task-recency bias).
    """
    if kind == "ce":
        if y.ndim == 2:  # soft targets (Mixup/CutMix): drop the masked columns, since 0 * log(0) would give nan
            return F.cross_entropy(logits[:, mask], y[:, mask])
        return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)
    if kind == "bce":
        target = F.one_hot(y, logits.shape[1]).to(logits.dtype)[:, mask]
        return F.binary_cross_entropy_with_logits(logits[:, mask], target)
    raise ValueError(f"unknown classification loss {kind!r}: choose from {LOSSES}")


def task_local_predictions(logits: torch.Tensor, y: torch.Tensor, task_of_class: torch.Tensor) -> torch.Tensor:
    """Task-incremental predictions: the argmax over the classes of each sample's own task (``task_of_class[c]``:
    the task of class c), i.e. with the task id given, as CODA-Prompt's "local" accuracy (GT-RIPL/CODA-Prompt
    learners/default.py L181-196: ``model.forward(input)[:, task_in]`` against ``target - task_in[0]``)."""
    same = task_of_class[None, :] == task_of_class[y][:, None]
    return logits.masked_fill(~same, float("-inf")).argmax(1)


def warmup_multistep(step: int, warmup: int, milestones: Sequence[int], gamma: float) -> float:
    """Learning-rate factor: linear warm-up, then ``gamma`` per milestone passed (LDAM-DRW's step schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return gamma ** sum(step >= m for m in milestones)


def net_outputs(net: nn.Module, x: torch.Tensor) -> dict:
    """``logits`` and, for timm models, the ``pre_logits`` features of ``net``; multi-head nets add ``heads``.

    A net may define its own ``forward_outputs`` (distilled and gated models do). Strategies call this on the
    frozen copies they hold (LwF's and feature distillation's previous model)."""
    if hasattr(net, "forward_outputs"):
        return net.forward_outputs(x)
    feats = net.forward_features(x)
    pre = net.forward_head(feats, pre_logits=True)
    return {"logits": net.get_classifier()(pre), "pre_logits": pre}


def _casting_plugin(module):
    """The trainer's precision plugin where it holds the whole network in one dtype and casts each step's batch to it
    (``64-true``, ``16-true``, ``bf16-true``); None otherwise (32-bit, mixed precision, no trainer)."""
    from lightning.pytorch.plugins.precision import Precision

    trainer = getattr(module, "_trainer", None)
    plugin = getattr(trainer, "precision_plugin", None) if trainer is not None else None
    if plugin is None or type(plugin).convert_input is Precision.convert_input:
        return None
    return plugin


def as_step_input(module, data):
    """``data`` (a tensor or a collection of them) cast as the trainer's precision plugin casts a training step's
    batch: floating tensors to float64 under ``64-true``, to half under ``16-true`` / ``bf16-true``, unchanged
    otherwise. For batches the suite reads itself (a replay memory's samples, the statistics passes)."""
    plugin = _casting_plugin(module)
    return data if plugin is None else plugin.convert_input(data)


@contextlib.contextmanager
def outside_step(module) -> Iterator[None]:
    """The context of a forward pass the suite runs outside Lightning's steps (class statistics, Fisher information,
    coresets, fine-tuning on a memory): the precision plugin's forward context where the network is held in one dtype
    (the default dtype set as in a step); nothing otherwise, so that under mixed precision these passes stay in
    float32 without autocast, as the official codes compute their statistics. Cast the batches with
    :func:`as_step_input`."""
    plugin = _casting_plugin(module)
    with plugin.forward_context() if plugin is not None else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def modes_kept(net: nn.Module) -> Iterator[None]:
    """Every module of ``net`` gets back the training mode it had before the block, whatever the block sets (a frozen
    part kept in eval mode stays so). The passes the suite runs between two fits need it: Lightning's next fit keeps
    the modes it finds, it does not call ``train()``."""
    modes = {m: m.training for m in net.modules()}
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


def coda_cosine(epoch: int, epochs: int) -> float:
    """CODA-Prompt's per-epoch learning-rate formula (GT-RIPL/CODA-Prompt utils/schedulers.py CosineSchedule L53-54):
    cos(99 pi e / (200 (K - 1))), a quarter period that ends at 1.6% of the base rate after K epochs
    (``scheduler.name=coda_cosine_formula``)."""
    return math.cos(99 * math.pi * epoch / (200 * max(1, epochs - 1)))


def coda_cosine_as_run(epoch: int, epochs: int) -> float:
    """The factor CODA-Prompt's runs train epoch ``epoch`` at (``scheduler.name=coda_cosine``): the scheduler's
    ``__init__`` steps to epoch 0 and then sets ``last_epoch`` back to -1 (utils/schedulers.py L19-20), and the loop
    steps it before every epoch but the first (learners/default.py L95), so epoch e > 0 runs at the formula's e - 1:
    epochs 0 and 1 both at the base rate, the last at cos(99 pi (K - 2) / (200 (K - 1)))."""
    return coda_cosine(max(0, epoch - 1), epochs)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class DeiTCosine:
    """DeiT-LT's learning rate (val-iisc/DeiT-LT, ``scheduler.name=deit_cosine``), timm's ``CosineLRScheduler`` as
    main.py L234 builds it through ``create_scheduler`` (``--sched cosine``): linear warm-up from ``warmup_lr``
    (arguments.py ``--warmup-lr 1e-6``) to the base rate over ``warmup_epochs`` (``--warmup-epochs 5``), and a cosine
    over all ``epochs`` counted from epoch 0, not from the warm-up's end, down to ``min_lr`` (``--min-lr 1e-5``);
    both rates absolute, as timm takes them.

    The official loop evaluates it at the times it steps it: with gradient accumulation (``--accum-iter 4`` in every
    sh/train_*.sh) before the first batch of each accumulation window and before the epoch's last batch, at the
    fractional epoch ``epoch + batch / batches`` (engine.py L77-80), so each update trains at the rate of its window's
    start (the last one at the last batch's); without accumulation once after each epoch, at that epoch (main.py
    L504-505), so epoch e trains at the rate of ``max(e - 1, 0)`` (the first two at ``warmup_lr``)."""

    def __init__(self, optimizer, epochs: int, warmup_epochs: float, warmup_lr: float | None, min_lr: float | None):
        from timm.scheduler import CosineLRScheduler

        self.schedule = CosineLRScheduler(optimizer, t_initial=epochs, lr_min=1e-5 if min_lr is None else min_lr,
                                          warmup_lr_init=1e-6 if warmup_lr is None else warmup_lr,
                                          warmup_t=warmup_epochs, cycle_limit=1, t_in_epochs=True)

    def set_rate(self, epoch: int, batch: int, batches: int, accumulate: int) -> None:
        if accumulate > 1:
            if batch % accumulate == 0 or batch == batches - 1:
                self.schedule.step(epoch + batch / batches)
        elif batch == 0:
            self.schedule.step(max(epoch - 1, 0))


class TimmTrainCosine(DeiTCosine):
    """timm train.py's learning rate as Refiner-ViT's main.py runs it (zhoudaquan/Refiner_ViT,
    ``scheduler.name=timm_cosine``): the same ``CosineLRScheduler`` as :class:`DeiTCosine` (main.py L461
    ``create_scheduler``, timm/scheduler/scheduler_factory.py of the bundled timm 0.4.8), stepped after each epoch to the
    next one (main.py L646 ``step(epoch + 1)``), so epoch e trains at the schedule's value at e (epoch 0 at
    ``warmup_lr``). ``epochs`` is the cosine's length; the ``cooldown_epochs`` after it train at ``min_lr``
    (the factory runs cycle length + cooldown epochs in all, and the scheduler holds ``lr_min`` past its one cycle)."""

    def set_rate(self, epoch: int, batch: int, batches: int, accumulate: int) -> None:
        if batch == 0:
            self.schedule.step(epoch)


class _DeferredChecks:
    """The non-finite loss and gradient checks without a device-to-host read per step (``trainer.finite_check_every``
    = k > 1): each step's verdict stays on the device, where it is also the ``found_inf`` of a fused Adam / AdamW,
    which then skips that step's update (as under GradScaler): no non-finite value reaches the weights. Every k
    steps, and at the end of each epoch and fit, one read of the verdicts; the first bad step stops the run with the
    step it happened in. For optimisers without ``found_inf`` (SGD, SAM, unfused) and fp16 (GradScaler's own), the
    checks stay per step."""

    LOSS, GRADIENT = 1, 2

    def __init__(self, every: int, optimizer: torch.optim.Optimizer, experience):
        self.every, self.optimizer, self.experience = every, optimizer, experience  # optimizer: the unwrapped one
        self.pending: list[tuple[torch.Tensor, str]] = []  # (verdict code on the device, where)
        self._loss_bad: torch.Tensor | None = None

    @classmethod
    def for_run(cls, every: int, optimizer, precision: str, experience) -> "_DeferredChecks | None":
        fused = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and optimizer.defaults.get("fused")
        if every <= 1 or not fused or precision.startswith("16"):
            return None
        return cls(every, optimizer, experience)

    def loss(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())  # gradient accumulation: any micro-batch of the step
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad

    def gradients(self, grads: list, where: str) -> None:
        grad_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all() if grads else None
        code = torch.zeros((), dtype=torch.int32, device=grads[0].device if grads else None)
        if self._loss_bad is not None:
            code = code + self._loss_bad.to(code.device) * self.LOSS
        if grad_bad is not None:
            code = code + grad_bad * self.GRADIENT
        self._loss_bad = None
        # read by the fused kernel: a bad step leaves weights and moments alone
        self.optimizer.found_inf = (code > 0).float()
        self.pending.append((code, where))

    def due(self) -> bool:
        return len(self.pending) >= self.every

    def read(self) -> None:
        if not self.pending:
            return
        codes = torch.stack([c for c, _ in self.pending]).tolist()  # the one read of these steps
        pending, self.pending = self.pending, []
        for code, (_, where) in zip(codes, pending):
            if code:
                what = "loss" if code & self.LOSS else "gradient (the loss was finite)"
                raise NonFiniteLoss(
                    f"non-finite {what} in {where} (found {len(pending)} steps or fewer later: "
                    f"trainer.finite_check_every={self.every}; that step's update was skipped); lower optimizer.lr, "
                    "set trainer.gradient_clip_val, or train in trainer.precision=32-true",
                    self.experience.index if self.experience is not None else None,
                )


def scale_learning_rates(opt: torch.optim.Optimizer, net: nn.Module, scales: dict[str, float]):
    """The optimiser (before its first step) with each parameter group split by learning-rate factor (parameters named in ``scales``
    get ``lr * factor``, the others keep ``lr``); weight decay and the other settings stay per group."""
    factor = {id(p): float(scales[n]) for n, p in net.named_parameters() if n in scales}
    groups = []
    for g in opt.param_groups:
        split: dict[float, list] = {}
        for p in g["params"]:
            split.setdefault(factor.get(id(p), 1.0), []).append(p)
        groups += [{**g, "params": ps, "lr": g["lr"] * f} for f, ps in split.items()]
    opt.param_groups = []
    for g in groups:
        opt.add_param_group(g)
    return opt


class ContinualModule(L.LightningModule):
    """A timm backbone with one linear head over every class of the benchmark.

    Logits of classes not seen yet are masked out in training and evaluation (``seen_mask``; in training not with
    ``mask_unseen=False``, Mammoth's cross-entropy over the whole head); with ``mask_old_logits`` the training loss
    covers only the current experience's classes (FT++ of CODA-Prompt).
    """

    def __init__(
        self,
        net: nn.Module,
        n_classes: int,
        strategies: Sequence[Strategy] = (),
        loss: str = "ce",
        mask_old_logits: bool = False,
        mask_unseen: bool = True,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        finite_check_every: int = 1,
        eval_autocast: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net", "strategies"])
        self.net = net
        self.n_classes = n_classes
        self.strategies = list(strategies)
        self.loss_name = loss
        self.mask_old_logits = mask_old_logits
        self.mask_unseen = mask_unseen
        #: steps between reads of the non-finite checks (trainer.finite_check_every; 1: every step, _DeferredChecks)
        self.finite_check_every = max(1, int(finite_check_every))
        self._deferred: _DeferredChecks | None = None
        #: trainer.eval_autocast: the dtype of the evaluation forward's CUDA autocast (None: the training precision)
        self.eval_autocast = check_eval_autocast(eval_autocast)
        self.optimizer_cfg = dict(optimizer or {"name": "adamw", "lr": 1e-3, "weight_decay": 0.05})
        self.scheduler_cfg = dict(scheduler or {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.0})
        self._deit_schedule: DeiTCosine | None = None  # scheduler.name=deit_cosine / timm_cosine, set per batch
        self.register_buffer("seen_mask", torch.zeros(n_classes, dtype=torch.bool))
        self.register_buffer("current_mask", torch.zeros(n_classes, dtype=torch.bool))
        self.experience: ExperienceInfo | None = None
        #: the evaluation task of every class (-1: none), set by the runner around its evaluation pass: predict_step
        #: then adds the task-incremental prediction "local" (task_local_predictions)
        self.task_of_class: torch.Tensor | None = None
        # update() only, computed once per epoch: the per-step forward() and argument checks cost more than the
        # tiny models' steps (python -m cl_vit.bench runner)
        self.train_acc = MulticlassAccuracy(num_classes=n_classes, average="micro", validate_args=False)
        #: (parameter, frozen entries, their value) of every trainable tensor with frozen parts in this fit
        self._frozen: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        #: what the training batch goes through after the strategies' before_batch and before the forward pass (the
        #: builder sets timm's prefetcher normalisation and erasing here: cl_vit.data.transforms.PrefetchStage)
        self.batch_stage = None

    # -- the stream ------------------------------------------------------------------------------------------------

    def start_experience(self, experience: ExperienceInfo) -> None:
        self.experience = experience
        self.current_mask.zero_()
        self.current_mask[experience.classes] = True
        self.seen_mask[experience.seen_classes] = True

    @property
    def training_mask(self) -> torch.Tensor:
        """The classes the training loss covers (without ``mask_old_logits``): the seen ones, or every output."""
        return self.seen_mask if self.mask_unseen else torch.ones_like(self.seen_mask)

    # -- forward ---------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_outputs(x)["logits"]

    def forward_outputs(self, x: torch.Tensor) -> dict:
        """``logits`` and, for timm models, the ``pre_logits`` features; multi-head nets add ``heads``.

        A net may define its own ``forward_outputs`` (distilled and gated models do)."""
        return net_outputs(self.net, x)

    # -- training --------------------------------------------------------------------------------------------------

    def loss_mask(self, y: torch.Tensor) -> torch.Tensor:
        """The classes the classification loss of targets ``y`` covers: one row for all, or (FT++ with hard labels)
        one row per sample."""
        mask = self.current_mask if self.mask_old_logits else self.training_mask
        if self.mask_old_logits and y.ndim == 1 and self.loss_name == "ce":
            # FT++ masks the past classes for the current experience's samples; a replayed sample of a past class
            # (strategy=[replay,...]) keeps every seen class, else its own label would be masked (an infinite loss)
            mask = torch.where(self.current_mask[y][:, None], self.current_mask, self.seen_mask)
        return mask

    def training_step(self, batch, batch_idx):
        batch = {"x": batch[0], "y": batch[1], **({"key": batch[3]} if len(batch) > 3 else {})}
        for s in self.strategies:
            batch = s.before_batch(self, batch)
        if self.batch_stage is not None:
            batch = {**batch, "x": self.batch_stage(batch["x"])}
        outputs = self.forward_outputs(batch["x"])
        y = batch["y"]
        mask = self.loss_mask(y)
        weight = math.prod(s.cls_loss_weight for s in self.strategies)
        terms = {"cls": weight * classification_loss(outputs["logits"], y, mask, self.loss_name)}
        for s in self.strategies:
            for k, v in s.training_loss(self, batch, outputs).items():
                terms[f"{s.name}/{k}" if k != s.name else k] = v
        loss = sum(terms.values())
        if self._deferred is not None:  # no read of the loss now; the step is skipped on the device if it is not finite
            self._deferred.loss(loss)
        elif not torch.isfinite(loss):  # one scalar; training on would only spread NaN into every weight
            self._stop_non_finite(terms, batch_idx)
        if self._logging_step():
            bs = y.shape[0]
            for k, v in terms.items():
                self.log(f"train/loss/{k}", v.detach(), batch_size=bs)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        if y.ndim == 1:  # hard labels (batch-level mixing turns them soft)
            preds = outputs["logits"].detach().masked_fill(~self.seen_mask, float("-inf")).argmax(1)
            self.train_acc.update(preds, y)
        return loss

    def _logging_step(self) -> bool:
        """Whether Lightning writes step metrics after this step (every ``trainer.log_every_n_steps``).

        Logging only then gives the same TensorBoard curves without the cost of ``self.log`` on every step, which
        outweighs a small model's step on a CPU (python -m cl_vit.bench runner); the progress bar shows the loss of
        the last logged step. Without a Trainer (a step called directly) every step logs."""
        if self._trainer is None:
            return True
        every = self._trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _where(self, batch_idx: int) -> str:
        i = self.experience.index + 1 if self.experience is not None else "?"
        return f"experience {i}, epoch {self.current_epoch + 1}, step {batch_idx + 1}"

    def _stop_non_finite(self, terms: dict, batch_idx: int) -> None:
        bad = [f"{k}={float(v.detach()):g}" for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        raise NonFiniteLoss(
            f"non-finite loss in {self._where(batch_idx)}: loss term {', '.join(bad) or 'sum'}; lower optimizer.lr, "
            "set trainer.gradient_clip_val, or train in trainer.precision=32-true",
            self.experience.index if self.experience is not None else None,
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give a non-finite gradient (an overflow in backward): stop before the step
        writes it into the weights. fp16 loss scaling produces and skips such steps itself, so it is left alone."""
        if self._trainer is None or str(self.trainer.precision).startswith("16"):
            return
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if self._deferred is not None:
            self._deferred.gradients(grads, self._where(self.trainer.fit_loop.epoch_loop.batch_idx))
            return
        if not grads or torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            return
        name = next(n for n, p in self.net.named_parameters() if p.grad is not None and not p.grad.isfinite().all())
        raise NonFiniteLoss(
            f"non-finite gradient in {self._where(self.trainer.fit_loop.epoch_loop.batch_idx)}: parameter {name!r} "
            "(the loss was finite); lower optimizer.lr, set trainer.gradient_clip_val, or train in "
            "trainer.precision=32-true",
            self.experience.index if self.experience is not None else None,
        )

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._deit_schedule is not None:
            self._deit_schedule.set_rate(self.current_epoch, batch_idx, self.trainer.num_training_batches,
                                         self.trainer.accumulate_grad_batches)

    def on_train_epoch_start(self) -> None:
        self.train_acc.reset()
        self.on_train_epoch_start_rho()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self._deferred is not None and self._deferred.due():
            self._deferred.read()

    def on_train_epoch_end(self) -> None:
        if self._deferred is not None:  # nothing of this epoch reaches evaluation or a checkpoint unread
            self._deferred.read()
        if self.train_acc.update_count:  # the metric object: Lightning computes it (synced under DDP) and resets it
            self.log("train/acc", self.train_acc, prog_bar=True)

    def on_fit_start(self) -> None:
        for s in self.strategies:
            s.on_fit_start(self)

    def on_train_epoch_start_rho(self) -> None:
        """SAM's radius for this epoch (optimizer.sam_rho_milestones / sam_rho_values: a step schedule)."""
        cfg = self.optimizer_cfg
        if not cfg.get("sam_rho") or not cfg.get("sam_rho_milestones"):
            return
        from cl_vit.optim.sam import rho_at

        rho = rho_at(self.current_epoch, cfg["sam_rho"], cfg["sam_rho_milestones"], cfg.get("sam_rho_values") or ())
        opt = self.optimizers()
        for group in getattr(opt, "optimizer", opt).param_groups:
            group["rho"] = rho

    def frozen_slices(self) -> dict[str, torch.Tensor]:
        """The entries of trainable parameters of ``net`` (name -> boolean mask of the parameter's shape) that this
        experience must leave bit-identical.

        A frozen whole parameter has ``requires_grad=False`` and never reaches the optimiser; a frozen part of a
        tensor that trains (CODA-Prompt's earlier components, the classifier rows of past classes, GCAB's claimed
        weights) receives no gradient, but weight decay and momentum would still move it. The strategies declare
        theirs (``Strategy.frozen_slices``); with ``mask_old_logits`` the classifier rows of past classes are frozen
        too, unless a strategy's loss reaches them (``Strategy.reads_old_logits``, LwF's distillation)."""
        from cl_vit.strategies.selection import classifier_names

        params = dict(self.net.named_parameters())
        out: dict[str, torch.Tensor] = {}

        def add(name: str, where) -> None:
            p = params.get(name)
            if p is None or not p.requires_grad:
                return
            where = torch.as_tensor(where, device=p.device)
            if where.dtype != torch.bool:  # row indices
                rows, where = where.long().flatten(), torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                where[rows] = True
            out[name] = out[name] | where if name in out else where.expand(p.shape).clone()

        exp = self.experience
        if self.mask_old_logits and exp is not None and not any(s.reads_old_logits for s in self.strategies):
            old = sorted(set(exp.seen_classes) - set(exp.classes))
            for n in classifier_names(self.net):
                if old and params[n].ndim and params[n].shape[0] == self.n_classes:
                    add(n, old)
        for s in self.strategies:
            for n, where in s.frozen_slices(self).items():
                add(n, where)
        return {n: m for n, m in out.items() if m.any()}

    def on_train_start(self) -> None:
        opt = self.optimizers()
        self._deferred = _DeferredChecks.for_run(self.finite_check_every, getattr(opt, "optimizer", opt),
                                                 str(self.trainer.precision), self.experience)
        params = dict(self.net.named_parameters())
        self._frozen = [(params[n], m, params[n].detach().clone()) for n, m in self.frozen_slices().items()]

    def on_train_end(self) -> None:
        self._frozen = []
        if self._deferred is not None:
            self._deferred.read()
            self._deferred = None

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimiser's step, then every frozen entry back to its value at the start of the fit, whatever the
        optimiser did to it (decoupled weight decay, momentum)."""
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            for p, where, value in self._frozen:
                p.copy_(torch.where(where, value, p))

    def on_after_backward(self) -> None:
        for s in self.strategies:
            s.after_backward(self)

    def configure_optimizers(self):
        cfg = dict(self.optimizer_cfg)
        sam_rho = cfg.pop("sam_rho", None)
        for key in ("sam_rho_milestones", "sam_rho_values"):  # on_train_epoch_start_rho
            cfg.pop(key, None)
        opt = create_optimizer(
            self.net,
            cfg.pop("name"),
            lr=cfg.pop("lr"),
            weight_decay=cfg.pop("weight_decay", 0.0),
            **{k: v for k, v in cfg.items() if v is not None},
        )
        scales = {k: v for s in self.strategies for k, v in s.lr_scales(self).items()}
        if scales:
            opt = scale_learning_rates(opt, self.net, scales)
        if sam_rho:  # sharpness-aware minimisation around the chosen optimiser (two passes per step)
            from cl_vit.optim.sam import SAM

            opt = SAM(opt, rho=float(sam_rho))
        sched = dict(self.scheduler_cfg)
        name = sched.get("name", "cosine")
        self._deit_schedule = None
        if name == "constant":
            return opt
        if name in ("deit_cosine", "timm_cosine"):  # set before the batches the official loop sets it at
            epochs = self.trainer.max_epochs or 1
            if name == "timm_cosine":  # trainer.max_epochs counts the cool-down epochs too (timm's num_epochs)
                epochs -= int(sched.get("cooldown_epochs") or 0)
            schedule = DeiTCosine if name == "deit_cosine" else TimmTrainCosine
            self._deit_schedule = schedule(opt, max(1, epochs), float(sched.get("warmup_epochs", 0)),
                                           sched.get("warmup_lr"), sched.get("min_lr"))
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        if name in ("coda_cosine", "coda_cosine_formula"):
            factor = coda_cosine_as_run if name == "coda_cosine" else coda_cosine
            lam = lambda step: factor(step // per_epoch, epochs)  # noqa: E731
        else:
            warmup = int(sched.get("warmup_epochs", 0) * per_epoch)
            if name == "multistep" and sched.get("warmup_per_epoch"):
                # the rate set once per epoch (LDAM-DRW / Saddle-LongTail adjust_learning_rate): warm-up epoch e at
                # (e + 1) / warmup_epochs for all of its steps
                ms, warm = list(sched.get("milestones") or ()), int(sched.get("warmup_epochs", 0))
                gamma = float(sched.get("gamma", 0.1))
                lam = lambda step: warmup_multistep(step // per_epoch, warm, ms, gamma)  # noqa: E731
            elif name == "multistep":
                milestones = [int(m * per_epoch) for m in sched.get("milestones") or ()]
                gamma = float(sched.get("gamma", 0.1))
                lam = lambda step: warmup_multistep(step, warmup, milestones, gamma)  # noqa: E731
            elif name == "cosine_epoch":  # torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch (RanPAC)
                min_ratio, warm = float(sched.get("min_lr_ratio", 0.0)), int(sched.get("warmup_epochs", 0))
                lam = lambda step: warmup_cosine(step // per_epoch, epochs, warm, min_ratio)  # noqa: E731
            else:
                min_ratio = float(sched.get("min_lr_ratio", 0.0))
                lam = lambda step: warmup_cosine(step, total, warmup, min_ratio)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- evaluation ------------------------------------------------------------------------------------------------

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        """Task-agnostic predictions over the classes seen so far: the main output and every extra head."""
        x, y, exp = batch
        with evaluation_autocast(self.eval_autocast, x.device):
            outputs = self.forward_outputs(x)
            for s in self.strategies:
                outputs = s.evaluation_outputs(self, outputs)
        preds = {"main": outputs["logits"].masked_fill(~self.seen_mask, float("-inf")).argmax(1)}
        for name, logits in outputs.get("heads", {}).items():
            preds[name] = logits.masked_fill(~self.seen_mask, float("-inf")).argmax(1)
        if self.task_of_class is not None:
            preds["local"] = task_local_predictions(outputs["logits"], y, self.task_of_class.to(y.device))
        return {"y": y, "exp": exp, "preds": preds}
