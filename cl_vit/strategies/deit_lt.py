"""DeiT-LT (Rangwani et al., CVPR 2024; official code val-iisc/DeiT-LT): a ViT student with CLS and DIST tokens learns
from long-tailed data, the CLS head from the labels and the DIST head from a flat (SAM-trained) CNN teacher that sees
the same strongly augmented, "out-of-distribution" batch as the student.

``loss = (1 - alpha) * CE(CLS logits, labels) + alpha * L_dist(DIST logits, teacher)`` (losses.py
``DistillationLoss``): the module's classification loss reads the CLS head (the student is put in
``distilled_training``) and is scaled by ``cls_loss_weight = 1 - alpha``; this strategy adds ``alpha * L_dist``.

- hard distillation (the default; every official script passes ``--distillation-type hard``): cross-entropy of the
  DIST logits against the teacher's argmax;
- soft distillation (``distillation=soft``): ``KL(softmax(t / tau) || softmax(s / tau)) * tau^2``, summed and divided
  by the number of logits (losses.py, the legacy DeiT normalisation);
- ``distillation=none``: no teacher; a DIST head learns the labels instead (losses.py ``distillation_type == 'none'``)
  and a student without DIST token is trained with the classification loss only, class-weighted in the DRW phase
  (main.py "Using CE Loss in DRW"): the no-distillation baseline under the same augmentation schedule.

Deferred re-weighting (``drw_start_epoch``, main.py ``--drw``): from that epoch on the distillation cross-entropy is
weighted by ``class_balanced_weights(counts, beta)`` indexed by the teacher's predicted class (``F.cross_entropy``'s
``weight``, as losses.py); the CLS loss stays unweighted (``--weighted-baseloss`` is off in every script). Without
``--drw`` main.py (L331-332) hands the criterion ``(args.weighted_distillation,)``, a one-element tuple and so always
true: the distillation loss is class-weighted from the first epoch, with or without ``--weighted-distillation``. That
is the default here too for ``drw_start_epoch=null`` (``weighted_without_drw=false``: unweighted throughout).

The batch both networks see: the source's train transform (``benchmark.source_args.train_transform=deit``: DeiT's
RandomResizedCrop + flip, RandAugment and per-image random erasing through timm's ``create_transform``, as
datasets.py build_transform_deit; cl_vit.data.transforms), then, here in ``before_batch``, optional in-batch random
erasing (``random_erasing``, for sources without that transform, e.g. digits; config validation refuses erasing in
both places) and Mixup/CutMix with timm's ``Mixup`` (engine.py ``mixup_fn``), switched off in the DRW phase when
``mixup_off_in_drw`` (``--no-mixup-drw``, set by the CIFAR scripts only). The teacher gets exactly that
batch, resized to its input size with bicubic interpolation (engine.py ``transforms.Resize(teacher_size,
interpolation=3)`` on the batch tensor; torchvision 0.15 of their environment.yml does not antialias tensors).

Defaults follow val-iisc/DeiT-LT arguments.py and its sh/train_*.sh scripts (noted per argument below).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing

from cl_vit.errors import UserError
from cl_vit.models.distilled import DistilledMixin, is_distilled
from cl_vit.models.teachers import Teacher, load_teacher
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.ldam import class_balanced_weights

log = logging.getLogger("cl_vit")

DISTILLATION_TYPES = ("hard", "soft", "none")


# -- the losses, as plain functions --------------------------------------------------------------------------------


def hard_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy against the teacher's argmax; ``weight[c]`` weighs samples the teacher calls ``c`` (a weighted
    mean, as ``F.cross_entropy(weight=...)`` in losses.py)."""
    return F.cross_entropy(student_logits, teacher_logits.argmax(1), weight=weight)


def soft_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
                           weight: torch.Tensor | None = None) -> torch.Tensor:
    """``sum KL(p_t || p_s) * tau^2 / numel`` (losses.py); with ``weight``, each sample's KL is weighted by
    ``weight[argmax teacher]`` (weighted mean over samples).

    The official weighted soft branch multiplies the teacher's *log*-probabilities by the class weights and
    renormalises them, which no longer gives a distribution; weighting each sample by its teacher class, as the hard
    branch does, is the consistent reading and what this function does.
    """
    log_s = F.log_softmax(student_logits / tau, dim=1)
    log_t = F.log_softmax(teacher_logits / tau, dim=1)
    per_sample = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)
    if weight is None:
        return per_sample.sum() * tau * tau / student_logits.numel()
    w = weight.to(per_sample)[teacher_logits.argmax(1)]
    return (w * per_sample).sum() / w.sum() * tau * tau / student_logits.shape[1]


def resize_for_teacher(x: torch.Tensor, size: int | None, mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """The student's batch at the teacher's input size (unchanged when it already has it)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(x, size=(size, size), mode=mode, antialias=antialias and mode in ("bilinear", "bicubic"),
                         **kwargs)


def teacher_permutation(teacher_classes: Sequence[str], student_classes: Sequence[str]) -> list[int] | None:
    """Teacher output column of each student label; ``None`` when they are in the same order.

    Raises a one-line ``UserError`` when the two class lists differ as sets.
    """
    t, s = list(map(str, teacher_classes)), list(map(str, student_classes))
    if t == s:
        return None
    if sorted(t) != sorted(s) or len(set(t)) != len(t):
        missing = [c for c in s if c not in t][:3]
        extra = [c for c in t if c not in s][:3]
        raise UserError(
            f"the teacher's {len(t)} classes do not match the benchmark's {len(s)} (benchmark classes missing from the "
            f"teacher: {missing}, teacher classes not in the benchmark: {extra}): train the teacher on this benchmark "
            "(python -m cl_vit.run experiment=teacher-<benchmark>) and give its run directory"
        )
    where = {c: i for i, c in enumerate(t)}
    return [where[c] for c in s]


def mix_batch(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's Mixup mixes pairs and needs an even batch; an odd last batch leaves its last sample unmixed."""
    n = x.shape[0] - x.shape[0] % 2
    if n == x.shape[0]:
        return mixup(x, y)
    target = mixup_target(y, mixup.num_classes, 1.0, mixup.label_smoothing)
    if n:
        x[:n], target[:n] = mixup(x[:n], y[:n])
    return x, target


# -- the strategy ----------------------------------------------------------------------------------------------------


@register_strategy
class DeiTLT(Strategy):
    """``strategy=deit_lt``; see the module docstring. ``teacher``: a teacher run directory or checkpoint."""

    name = "deit_lt"

    def __init__(
        self,
        teacher: str | None = None,
        alpha: float = 0.5,                     # --distillation-alpha (arguments.py default 0.5)
        distillation: str = "hard",             # --distillation-type hard (every sh/train_*.sh)
        tau: float = 1.0,                       # --distillation-tau (arguments.py default 1.0)
        drw_start_epoch: int | None = None,     # --drw (arguments.py None; scripts 1100 CIFAR, 1200 IN-LT, 900 iNat)
        beta: float = 0.9999,                   # --beta (arguments.py)
        weighted_distillation: bool = True,     # --weighted-distillation (every script)
        weighted_without_drw: bool = True,      # drw_start_epoch=null: weighted from epoch 0 (main.py L331-332)
        mixup: float = 0.8,                     # --mixup (arguments.py)
        cutmix: float = 1.0,                    # --cutmix
        cutmix_minmax: Sequence[float] | None = None,  # --cutmix-minmax
        mixup_prob: float = 1.0,                # --mixup-prob
        mixup_switch_prob: float = 0.5,         # --mixup-switch-prob
        mixup_mode: str = "batch",              # --mixup-mode
        label_smoothing: float = 0.1,           # --smoothing, given to Mixup (main.py)
        mixup_off_in_drw: bool = False,         # --no-mixup-drw (CIFAR scripts only)
        random_erasing: float = 0.0,            # in-batch; DeiT's --reprob 0.25 is in the train transform
        teacher_size: int | None = None,        # --teacher-size; None: the size the teacher was trained at
        teacher_interpolation: str = "bicubic",  # engine.py Resize(interpolation=3)
        teacher_antialias: bool = False,        # torchvision 0.15 resizes tensors without antialiasing
    ):
        if distillation not in DISTILLATION_TYPES:
            raise UserError(f"strategy.deit_lt.distillation={distillation!r} is not allowed: one of {list(DISTILLATION_TYPES)}")
        if not 0 <= alpha <= 1:
            raise UserError(f"strategy.deit_lt.alpha={alpha} is not allowed: a number in [0, 1]")
        if tau <= 0:
            raise UserError(f"strategy.deit_lt.tau={tau} is not allowed: a number > 0")
        if not 0 <= beta < 1:
            raise UserError(f"strategy.deit_lt.beta={beta} is not allowed: a number in [0, 1)")
        if drw_start_epoch is not None and drw_start_epoch < 0:
            raise UserError(f"strategy.deit_lt.drw_start_epoch={drw_start_epoch} is not allowed: an epoch >= 0 or null")
        if distillation != "none" and not teacher:
            raise UserError(
                "strategy.deit_lt.teacher is not set: give a teacher run directory "
                "(python -m cl_vit.run experiment=teacher-<benchmark>), or distillation=none to train without one"
            )
        self.teacher_path = teacher
        self.alpha, self.distillation, self.tau = float(alpha), distillation, float(tau)
        self.drw_start_epoch, self.beta, self.weighted_distillation = drw_start_epoch, beta, weighted_distillation
        self.weighted_without_drw = weighted_without_drw
        self.mixup_args = dict(mixup_alpha=mixup, cutmix_alpha=cutmix, cutmix_minmax=cutmix_minmax, prob=mixup_prob,
                               switch_prob=mixup_switch_prob, mode=mixup_mode, label_smoothing=label_smoothing)
        # main.py: mixup_active = args.mixup > 0 or args.cutmix > 0. or args.cutmix_minmax is not None
        self.mixup_active = mixup > 0 or cutmix > 0 or cutmix_minmax is not None
        self.mixup_off_in_drw = mixup_off_in_drw
        self.random_erasing = float(random_erasing)
        self.teacher_size, self.teacher_interpolation = teacher_size, teacher_interpolation
        self.teacher_antialias = teacher_antialias
        self.teacher: Teacher | None = None
        self.student_distilled = False
        self.mixup: Mixup | None = None
        self.erasing: RandomErasing | None = None
        self.weights: torch.Tensor | None = None
        self.teacher_index: torch.Tensor | None = None
        self._drw_phase = False

    # -- the classification loss's factor --------------------------------------------------------------------------

    @property
    def cls_loss_weight(self) -> float:
        if self.student_distilled:
            return 1.0 - self.alpha
        # a student without DIST head: main.py's no-distillation criterion becomes class-weighted CE under DRW
        return 0.0 if self._drw_phase else 1.0

    def in_drw(self, epoch: int) -> bool:
        return self.drw_start_epoch is not None and epoch >= self.drw_start_epoch

    # -- hooks ------------------------------------------------------------------------------------------------------

    def setup(self, module) -> None:
        net = module.net
        self.student_distilled = isinstance(net, DistilledMixin) or is_distilled(net)
        if self.distillation != "none" and not self.student_distilled:
            raise UserError(
                f"strategy deit_lt distils into a DIST token, but model {type(net).__name__} has none: set "
                "model.distilled=true (any timm ViT or Refiner-ViT) or use a deit_*_distilled model"
            )
        if self.student_distilled:
            if not isinstance(net, DistilledMixin):  # a distilled net built outside build_model
                from cl_vit.models.distilled import distill

                distill(net)
            net.set_distilled_training(True)
        if self.distillation != "none" and self.teacher is None:
            self.teacher = load_teacher(self.teacher_path)
            n_teacher = self.teacher.n_classes
            if n_teacher != module.n_classes:
                raise UserError(
                    f"the teacher at {self.teacher.path} predicts {n_teacher} classes but the benchmark has "
                    f"{module.n_classes}: train the teacher on this benchmark (experiment=teacher-<benchmark>)"
                )
            log.info("DeiT-LT teacher: %s (%d classes, input %s)", self.teacher.path, n_teacher, self.teacher.input_size)

    def on_fit_start(self, module) -> None:
        if self.teacher is not None:
            self.teacher.net.to(module.device).eval()
        if self.erasing is not None:
            self.erasing.device = module.device

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if experience.class_counts is None:
            raise UserError("strategy deit_lt needs the per-class training counts of the benchmark (a cl_vit source)")
        self.weights = class_balanced_weights(experience.class_counts, self.beta)
        if self.teacher is not None and self.teacher.label_order == "dataset":
            # a released teacher: output i is the dataset's label i (DeiT-LT losses.py L99-101 maps it by class_map)
            labels = getattr(experience, "dataset_labels", None)
            if labels is None:
                raise UserError(f"the released teacher {self.teacher.path} predicts in its dataset's own label order, "
                                "which this benchmark does not record: use a cl_vit source (cifar10-lt, imagenet-lt, ...)")
            self.teacher_index = None if list(labels) == list(range(len(labels))) else torch.as_tensor(labels)
        elif self.teacher is not None:
            names = getattr(experience, "class_names", None)
            if names is not None:
                index = teacher_permutation(self.teacher.class_names, names)
                self.teacher_index = None if index is None else torch.as_tensor(index)
            if list(self.teacher.class_counts) != list(experience.class_counts) and self.teacher_index is None:
                log.warning("DeiT-LT: the teacher was trained on other per-class counts than this benchmark's "
                            "(another imbalance ratio?): %s... vs %s...", self.teacher.class_counts[:5],
                            list(experience.class_counts)[:5])
        if self.mixup_active and self.mixup is None:
            self.mixup = Mixup(num_classes=experience.n_classes, **self.mixup_args)
        if self.random_erasing > 0 and self.erasing is None:
            # --remode pixel, --recount 1 (arguments.py), on the normalised batch as DeiT's transform does
            self.erasing = RandomErasing(probability=self.random_erasing, mode="pixel", max_count=1,
                                         device=str(module.device))

    def before_batch(self, module, batch: dict) -> dict:
        self._drw_phase = self.in_drw(module.current_epoch)
        x, y = batch["x"], batch["y"]
        if self.erasing is not None:
            x = self.erasing(x.clone())
        if self.mixup is not None and not (self._drw_phase and self.mixup_off_in_drw):
            x, y = mix_batch(self.mixup, x.clone(), y)
        return {**batch, "x": x, "y": y}

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the student's batch, in the student's label order."""
        size = self.teacher_size or int(self.teacher.input_size[-1])
        with torch.no_grad():
            logits = self.teacher.net(resize_for_teacher(x, size, self.teacher_interpolation, self.teacher_antialias))
        if self.teacher_index is not None:
            logits = logits[:, self.teacher_index.to(logits.device)]
        return logits.float()

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        mask = module.current_mask if module.mask_old_logits else module.seen_mask
        weight = self.weights.to(module.device) if self._drw_phase else None
        y = batch["y"]
        if not self.student_distilled:
            if not self._drw_phase:
                return {}
            return {"cls_drw": _masked_ce(outputs["logits"], y, mask, weight)}
        if self.alpha == 0:  # no distillation term at all (not 0 x a term, whose zero gradients AdamW would decay)
            return {}
        dist = outputs["heads"]["dist"]
        dist_weight = weight if self.weighted_distillation else None
        if self.drw_start_epoch is None and self.weighted_without_drw:  # see the module docstring
            dist_weight = self.weights.to(module.device)
        if self.distillation == "none":  # losses.py: the DIST head learns the labels
            return {"dist": self.alpha * _masked_ce(dist, y, mask, dist_weight)}
        t = self.teacher_logits(batch["x"])
        if self.distillation == "hard":
            loss = hard_distillation_loss(dist.masked_fill(~mask, float("-inf")), t.masked_fill(~mask, float("-inf")),
                                          dist_weight)
        else:
            loss = soft_distillation_loss(dist[:, mask], t[:, mask], self.tau,
                                          None if dist_weight is None else dist_weight[mask])
        return {"dist": self.alpha * loss}

    # -- state ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict()} if self.teacher is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("teacher") is not None:
            self.teacher = Teacher.from_state_dict(state["teacher"])

    def __repr__(self) -> str:
        return (f"DeiTLT(distillation={self.distillation}, alpha={self.alpha}, drw_start_epoch={self.drw_start_epoch}, "
                f"teacher={self.teacher_path})")


def _masked_ce(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over the classes in ``mask``; hard or soft (Mixup) targets; optional class weights."""
    if y.ndim == 2:
        return F.cross_entropy(logits[:, mask], y[:, mask], weight=None if weight is None else weight[mask])
    return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y, weight=weight)
