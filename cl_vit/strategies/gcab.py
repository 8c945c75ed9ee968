"""GCAB + CFDC: gated class-attention with cascaded feature drift compensation (Cotogni et al., 2022), exemplar-free.

The network (cl_vit/models/gated.py, :class:`~cl_vit.models.gated.GatedNet`) wraps the backbone in ``setup``; this
plug-in holds the training policy of the official code (github.com/OcraM17/GCAB-CFDC: continual/engine_GCAB.py,
continual/scaler.py, main.py):

* before each experience: a new task token, head, gate embeddings and (t > 0) drift projector P_t; a frozen copy of
  the SABs (F_{t-1}) for the projector loss; freezing (old tokens, heads, embeddings and projectors; at t > 0 the
  normalisation layers of the SABs and of the CAB, as main.py does for ``sabs[i]`` and ``tabs[0]``);
* per batch: s annealed from 1/s_max to s_max over the batches of each epoch (engine_GCAB.train_one_epoch);
* loss terms: the mask regulariser ``lambda_mask * sum(m (1 - m_pre)) / sum(1 - m_pre)`` over the current task's
  masks against the union of past masks, and the projector loss ``lambda_pfr * ||F_{t-1}(x) - P_t(F_t(x))||_2``
  (one L2 norm over the whole batch tensor, as the official ``torch.norm(..., p=2)``);
* after backward: gradients of CAB weights claimed by past tasks are zeroed (HAT), and the embeddings' gradients
  are compensated: ``g *= s_max / s * (cosh(clamp(s e, +-thres_cosh)) + 1) / (cosh(e) + 1)``; the embeddings are
  clamped to +-thres_emb after every optimiser step (applied before the next forward and at the end of the task);
* after each experience: the task's binarised masks join the union; P_t is frozen.

The classification loss is the module's BCE against a one-hot target over all seen classes (configs/strategy/
gcab.yaml sets ``loss.name: bce``, the official ``bce_with_logits``).
"""
from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn as nn

from cl_vit.errors import ConfigError
from cl_vit.models.gated import S_MAX, GatedNet, sab_features
from cl_vit.strategies.base import ExperienceInfo, TaskGrowingStrategy, register_strategy

log = logging.getLogger("cl_vit")


def annealed_s(batch_idx: int, n_batches: int, s_max: float) -> float:
    """engine_GCAB.py: ``s = (s_max - 1/s_max) * batch_index / len(loader) + 1/s_max`` (restarts every epoch)."""
    return (s_max - 1 / s_max) * batch_idx / n_batches + 1 / s_max


def mask_regulariser(masks, mask_pre) -> torch.Tensor:
    """HAT's regulariser: the share of the capacity still free (1 - mask_pre) that the current masks take.

    Sums are pooled over e0 and e2 (engine_GCAB.forward); with no past task mask_pre is 0 and this is the mean mask.
    """
    reg = sum((m * (1 - p)).sum() for m, p in zip(masks, mask_pre))
    free = sum((1 - p).sum() for p in mask_pre)
    return reg / free.clamp_min(1.0)


def compensate_embedding_grad(e: nn.Parameter, s: float, s_max: float, thres_cosh: float) -> None:
    """HAT's gradient compensation for the gate embeddings (scaler.py ContinualScaler.pre_step)."""
    if e.grad is None:
        return
    num = torch.cosh(torch.clamp(s * e.data, -thres_cosh, thres_cosh)) + 1
    den = torch.cosh(e.data) + 1
    e.grad.mul_(s_max / s * num / den)


def is_norm(m: nn.Module) -> bool:
    """LayerNorm, RmsNorm, BatchNorm, GroupNorm... (timm and torch name every normalisation layer *Norm*)."""
    return "Norm" in type(m).__name__ and any(True for _ in m.parameters(recurse=False))


@register_strategy
class GCAB(TaskGrowingStrategy):
    """Gated class-attention + cascaded feature drift compensation; defaults from the official CIFAR-100 options."""

    name = "gcab"

    def __init__(
        self,
        s_max: float = S_MAX,  # options/model/cifar_GCAB_FDC.yaml: smax 800
        lambda_mask: float = 0.05,  # lambda_gcab 0.05
        lambda_pfr: float = 0.001,  # lambda_pfr 0.001
        thres_cosh: float = 50.0,  # thres_cosh 50
        thres_emb: float = 6.0,  # thres_emb 6
        freeze_cab_norms: bool = True,  # main.py freezes tabs[0].norm* at t > 0 (the issue names the SABs' norms)
        decay_gated_weights: bool = False,
        backbone_no_decay: bool = True,
        init_from_last_block: bool = True,
        projector_norm: str = "token",  # the per-token norm; "image": main.py's LayerNorm((384, 1, 64))
        norm_eps: float | None = None,  # the LayerNorm eps of the SABs and the CAB; None: the backbone's own
        decay_embeddings: bool = False,
    ):
        if isinstance(s_max, bool) or not isinstance(s_max, (int, float)) or s_max <= 1:
            raise ConfigError("strategy.gcab.s_max", s_max, "a number > 1 (the paper uses 800)")
        for key, v in (("lambda_mask", lambda_mask), ("lambda_pfr", lambda_pfr)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"strategy.gcab.{key}", v, "a number >= 0")
        for key, v in (("thres_cosh", thres_cosh), ("thres_emb", thres_emb)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"strategy.gcab.{key}", v, "a number > 0")
        if projector_norm not in ("token", "image"):
            raise ConfigError("strategy.gcab.projector_norm", projector_norm,
                              "token (each token normalised alone) or image (the official joint LayerNorm)")
        if norm_eps is not None and (isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float))
                                     or norm_eps <= 0):
            raise ConfigError("strategy.gcab.norm_eps", norm_eps, "a number > 0, or null for the backbone's own")
        self.projector_norm = projector_norm
        self.norm_eps = None if norm_eps is None else float(norm_eps)
        self.s_max = float(s_max)
        self.lambda_mask = float(lambda_mask)
        self.lambda_pfr = float(lambda_pfr)
        self.thres_cosh = float(thres_cosh)
        self.thres_emb = float(thres_emb)
        self.freeze_cab_norms = bool(freeze_cab_norms)
        # The official optimiser (timm AdamW, weight decay 1e-6) also decays the weights that past tasks claim, so
        # they shrink slightly although their gradients are masked; by default they take no weight decay here, so
        # claimed weights stay bit-identical (HAT's guarantee). True: the official behaviour.
        self.decay_gated_weights = bool(decay_gated_weights)
        # true: the backbone's own no_weight_decay() (timm ConViT/ViT: pos_embed, cls_token) take no weight decay;
        # the official optimiser gets the GCAB wrapper, which has none, so only 1-D parameters and biases are exempt
        self.backbone_no_decay = bool(backbone_no_decay)
        # true: the current task's gate embeddings take weight decay, as the official embs_0 / embs_2 (2-D
        # nn.Embedding weights, which timm's create_optimizer decays, main.py L363); false: exempt as 1-D parameters
        self.decay_embeddings = bool(decay_embeddings)
        self.init_from_last_block = bool(init_from_last_block)
        self.module = None
        self.teacher: nn.Module | None = None
        self._mask_back: list[tuple[nn.Parameter, torch.Tensor]] = []

    # -- set-up and growth -----------------------------------------------------------------------------------------

    def setup(self, module) -> None:
        self.module = module
        if not isinstance(module.net, GatedNet):
            module.net = GatedNet(module.net, module.n_classes, self.s_max, self.init_from_last_block,
                                  self.projector_norm, self.norm_eps)
        module.net.decay_gated_weights = self.decay_gated_weights
        module.net.backbone_no_decay = self.backbone_no_decay
        module.net.decay_embeddings = self.decay_embeddings
        if module.loss_name != "bce":
            log.warning("gcab: loss.name=%s; the paper and the official code use bce (configs/strategy/gcab.yaml)",
                        module.loss_name)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        net: GatedNet = module.net
        t = net.n_tasks
        if t != experience.index:
            raise RuntimeError(f"gcab: the network holds {t} tasks at experience {experience.index}")
        self.teacher = None
        if t > 0:  # F_{t-1}: the SABs as they are before task t, frozen (main.py: teacher_model.freeze(['all']))
            self.teacher = copy.deepcopy(net.backbone).eval().requires_grad_(False)
        net.add_task(experience.classes)
        self._set_trainable(net)

    def _set_trainable(self, net: GatedNet) -> None:
        """Everything trains except what past tasks own; set from scratch each time, so a resumed run agrees."""
        t = net.n_tasks - 1
        net.requires_grad_(True)
        for c in range(t):
            for p in (net.tokens[c], net.e0[c], net.e2[c], *net.heads[c].parameters()):
                p.requires_grad_(False)
        for projector in net.projectors[:-1] if t > 0 else ():
            projector.requires_grad_(False)
        if t > 0:
            norms = [m for m in net.backbone.blocks.modules() if is_norm(m)]
            if self.freeze_cab_norms:
                norms += [net.cab.norm1, net.cab.norm2]
            for m in norms:
                m.requires_grad_(False)

    def on_fit_start(self, module) -> None:
        net: GatedNet = module.net
        if self.teacher is not None:
            self.teacher.to(module.device)
        params = net.gated_parameters()
        self._mask_back = [(params[n], 1 - v) for n, v in net.claimed().items()] if net.n_tasks > 1 else []

    def frozen_slices(self, module) -> dict:
        # the weights past tasks claim: their gradients are masked (after_backward); unless decay_gated_weights
        # (the official behaviour) no optimiser step moves them either
        if self.decay_gated_weights or module.net.n_tasks < 2:
            return {}
        return {n: v.bool() for n, v in module.net.claimed().items()}

    # -- per batch -------------------------------------------------------------------------------------------------

    def _s(self, module) -> float:
        try:
            trainer = module.trainer
            n = trainer.num_training_batches
            i = trainer.fit_loop.epoch_loop.batch_idx
        except (RuntimeError, AttributeError):
            return self.s_max
        if not math.isfinite(n) or n <= 0:
            return self.s_max
        return annealed_s(max(0, i), int(n), self.s_max)

    @torch.no_grad()
    def _clamp_embeddings(self, net: GatedNet) -> None:
        net.e0[-1].clamp_(-self.thres_emb, self.thres_emb)
        net.e2[-1].clamp_(-self.thres_emb, self.thres_emb)

    def before_batch(self, module, batch: dict) -> dict:
        net: GatedNet = module.net
        self._clamp_embeddings(net)  # the official clamp after each optimiser step, done before the next forward
        net.s = self._s(module)
        return batch

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        net: GatedNet = module.net
        terms = {}
        if outputs.get("masks") is not None:
            reg = mask_regulariser(outputs["masks"], (net.mask_pre0, net.mask_pre2))
            terms["mask"] = self.lambda_mask * reg
        if self.teacher is not None and self.lambda_pfr > 0:
            with torch.no_grad():
                old = sab_features(self.teacher, batch["x"])
            new = net.projectors[-1](outputs["sab"])
            terms["pfr"] = self.lambda_pfr * torch.linalg.vector_norm(old - new)
        return terms

    def after_backward(self, module) -> None:
        net: GatedNet = module.net
        for p, keep in self._mask_back:
            if p.grad is not None:
                p.grad.mul_(keep)
        for e in (net.e0[-1], net.e2[-1]):
            compensate_embedding_grad(e, net.s, self.s_max, self.thres_cosh)

    # -- end of an experience --------------------------------------------------------------------------------------

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        net: GatedNet = module.net
        self._clamp_embeddings(net)
        m0, m2 = net.binary_masks(net.n_tasks - 1)
        net.mask_pre0.copy_(torch.maximum(net.mask_pre0, m0))
        net.mask_pre2.copy_(torch.maximum(net.mask_pre2, m2))
        if net.n_tasks > 1:
            net.projectors[-1].requires_grad_(False)
        self.teacher = None
        self._mask_back = []
        log.info("  gcab: task %d claims %.1f%% of e0 and %.1f%% of e2; all tasks %.1f%% and %.1f%%",
                 net.n_tasks, 100 * float(m0.mean()), 100 * float(m2.mean()),
                 100 * float(net.mask_pre0.mean()), 100 * float(net.mask_pre2.mean()))

    # -- resume ----------------------------------------------------------------------------------------------------

    def grow(self, net: GatedNet, classes) -> None:
        """A resumed task's token, head, embeddings and projector (``TaskGrowingStrategy``)."""
        net.add_task(classes)

    def __repr__(self) -> str:
        return (f"GCAB(s_max={self.s_max:g}, lambda_mask={self.lambda_mask:g}, lambda_pfr={self.lambda_pfr:g}, "
                f"thres_cosh={self.thres_cosh:g}, thres_emb={self.thres_emb:g})")
