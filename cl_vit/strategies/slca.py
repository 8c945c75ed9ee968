"""SLCA (Zhang et al., "SLCA: Slow Learner with Classifier Alignment for Continual Learning on a Pre-trained Model",
ICCV 2023): fine-tune the whole pre-trained backbone with a learning rate 100 times smaller than the classifier's
(slow learner); after each experience, model each class's embeddings as a Gaussian and re-train the classifier on
samples drawn from every seen class's Gaussian (classifier alignment).

As the official code (GengDavid/SLCA models/slca.py, class ``SLCA``; convs/linears.py ``SimpleContinualLinear``):

* the backbone's learning rate is ``lr * bcb_lrscale``, ``bcb_lrscale = 1/100`` (slca.py L45-48, L158); the loss is
  the cross-entropy over the current experience's classes (L127-128: configs/strategy/slca.yaml sets
  ``loss.mask_old_logits``); the classifier rows of past classes are frozen while a new experience trains
  (linears.py L86-88 ``freeze_old``): here they are restored before every batch and at the end of the fit;
* after the fit the classifier is backed up (L107) and, for each new class, the mean of its embeddings and their
  covariance ``torch.cov(float64) + 1e-4 I`` are stored (models/base.py ``_compute_class_mean`` L247-270);
* from the second experience on, classifier alignment (L174-256): ``ca_epochs = 5`` epochs (L26); each epoch draws
  256 samples per seen class (L197) from N(mu_c (0.9 + 0.1 (t_c + 1) / (t + 1)), Sigma_c) (L199-207, t_c the class's
  experience, t the current one), shuffles them and takes as many batches of 256 as there are seen classes
  (L217-224); SGD on the classifier alone (lr 0.01, momentum 0.9, weight decay 5e-4, cosine over the epochs,
  L180-185); the loss is the cross-entropy of the seen classes' logits divided by the mean over experiences of the
  per-experience logit norms, then by ``ca_with_logit_norm = 0.1`` (L228-242; exps/slca/*.json);
* the aligned classifier is what is evaluated; the next experience trains from the backup taken before alignment
  (``fc.recall()`` in ``after_task``, L79).

Differences: the official code computes t_c as ``c // task_size`` (equal-sized experiences); here it is the class's
own experience, which is the same there and right for uneven splits (B50). The statistics come from the training
images under the test transform (``statistics_transform=test``; models/base.py L253 re-reads them with
``mode="test"``). Samples are drawn from a generator
seeded per experience, so a resumed or multi-process run draws the same ones.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.embeddings import check_statistics_transform, experience_embeddings
from cl_vit.strategies.selection import classifier_names


def class_gaussians(feats: torch.Tensor, labels: torch.Tensor, classes, eps: float = 1e-4
                    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(mean float64, covariance + eps I float32) of each class's embeddings (models/base.py L260-262)."""
    out = {}
    for c in classes:
        v = feats[labels == c].double()
        if len(v) < 2:
            raise UserError(f"SLCA needs at least 2 training images of class {c} for its covariance; it has {len(v)}")
        cov = torch.cov(v.T) + torch.eye(v.shape[1], dtype=torch.float64) * eps
        out[int(c)] = (v.mean(0), cov.float())
    return out


def normalised_logits(logits: torch.Tensor, groups: list[list[int]], temperature: float) -> torch.Tensor:
    """Logits divided by the mean over ``groups`` (column lists, one per experience) of each group's L2 norm
    (+1e-7), then by ``temperature`` (slca.py L228-242, ``ca_with_logit_norm``)."""
    norms = torch.cat([logits[:, g].norm(p=2, dim=-1, keepdim=True) + 1e-7 for g in groups], dim=-1)
    return logits / norms.mean(dim=-1, keepdim=True) / temperature


def replace_final_norm(net: nn.Module) -> None:
    """A fresh ``nn.LayerNorm(D)`` (weight 1, bias 0, eps 1e-5) in place of the pre-trained final norm, as SLCA's
    ViT-B/16 (convs/vits.py L709-711: ``del model.norm; model.norm = nn.LayerNorm(768)``); it trains with the
    backbone."""
    norm = getattr(net, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise UserError(f"strategy.slca.fresh_final_norm=true replaces a ViT's final LayerNorm (net.norm); "
                        f"{type(net).__name__} has none: set it to false")
    fresh = nn.LayerNorm(norm.normalized_shape)
    net.norm = fresh.to(device=norm.weight.device, dtype=norm.weight.dtype)


@register_strategy
class SLCA(Strategy):
    name = "slca"

    def __init__(self, backbone_lr_scale: float = 0.01, ca_epochs: int = 5, ca_lr: float = 0.01,
                 ca_momentum: float = 0.9, ca_weight_decay: float = 5e-4, samples_per_class: int = 256,
                 logit_norm: float | None = 0.1, cov_eps: float = 1e-4, statistics_transform: str = "test",
                 fresh_final_norm: bool = False):
        for key, value in (("backbone_lr_scale", backbone_lr_scale), ("ca_lr", ca_lr), ("cov_eps", cov_eps),
                           ("ca_weight_decay", ca_weight_decay), ("ca_momentum", ca_momentum)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"strategy.slca.{key}", value, "a number >= 0")
        for key, value in (("ca_epochs", ca_epochs), ("samples_per_class", samples_per_class)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"strategy.slca.{key}", value, "an integer >= 0")
        if logit_norm is not None and (not isinstance(logit_norm, (int, float)) or logit_norm <= 0):
            raise ConfigError("strategy.slca.logit_norm", logit_norm, "a number > 0, or null (plain cross-entropy)")
        self.backbone_lr_scale, self.ca_epochs, self.ca_lr = float(backbone_lr_scale), ca_epochs, float(ca_lr)
        self.ca_momentum, self.ca_weight_decay = float(ca_momentum), float(ca_weight_decay)
        self.samples_per_class, self.cov_eps = samples_per_class, float(cov_eps)
        self.logit_norm = None if logit_norm is None else float(logit_norm)
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.fresh_final_norm = bool(fresh_final_norm)
        self.means: dict[int, torch.Tensor] = {}
        self.covs: dict[int, torch.Tensor] = {}
        self.tasks: list[list[int]] = []
        self.head_before_ca: dict[str, torch.Tensor] | None = None
        self.head: nn.Linear | None = None
        self._backbone: list[str] = []
        self._old: list[int] = []
        self._old_rows: dict[str, torch.Tensor] = {}

    def setup(self, module) -> None:
        head = module.net.get_classifier() if hasattr(module.net, "get_classifier") else None
        if not isinstance(head, nn.Linear):
            raise UserError(f"strategy slca aligns a linear classifier; {type(module.net).__name__}'s is "
                            f"{type(head).__name__}: use a timm model with one linear head")
        self.head = head
        if self.fresh_final_norm:
            replace_final_norm(module.net)
        self._backbone = [n for n in dict(module.net.named_parameters()) if n not in classifier_names(module.net)]

    def lr_scales(self, module) -> dict[str, float]:
        return {n: self.backbone_lr_scale for n in self._backbone}

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if self.head_before_ca is not None:  # fc.recall(): train on from the classifier before alignment
            self.head.load_state_dict(self.head_before_ca)
        params = dict(module.net.named_parameters())
        for n in self._backbone:  # bcb_lrscale = 0 is the official fix_bcb: a frozen backbone
            params[n].requires_grad_(self.backbone_lr_scale > 0)
        for p in self.head.parameters():
            p.requires_grad_(True)
        self._old = sorted({c for t in self.tasks for c in t})
        self._old_rows = {n: p.detach()[self._old].clone() for n, p in self.head.named_parameters()}

    def _restore_old_rows(self) -> None:
        if self._old:
            with torch.no_grad():
                for n, p in self.head.named_parameters():
                    p[self._old] = self._old_rows[n].to(p)

    def before_batch(self, module, batch: dict) -> dict:
        self._restore_old_rows()
        return batch

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        self._restore_old_rows()
        self.tasks.append(sorted(experience.classes))
        self.head_before_ca = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        feats, labels = experience_embeddings(module, experience, self.statistics_transform)
        for c, (mean, cov) in class_gaussians(feats, labels, experience.classes, self.cov_eps).items():
            self.means[c], self.covs[c] = mean, cov
        if experience.index > 0 and self.ca_epochs > 0 and self.samples_per_class > 0:
            gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63 - 1))
            self.align(gen)

    def align(self, gen: torch.Generator) -> list[float]:
        """Classifier alignment on Gaussian samples; returns the mean loss of each epoch."""
        seen = [c for t in self.tasks for c in t]
        task_of = {c: i for i, t in enumerate(self.tasks) for c in t}
        pos = {c: i for i, c in enumerate(seen)}
        groups = [[pos[c] for c in t] for t in self.tasks]
        cur = len(self.tasks) - 1
        device = self.head.weight.device
        cols = torch.tensor(seen, device=device)
        chol = {c: torch.linalg.cholesky(self.covs[c].double()) for c in seen}
        params = list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(params, lr=self.ca_lr, momentum=self.ca_momentum, weight_decay=self.ca_weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.ca_epochs)
        n = self.samples_per_class
        history = []
        for _ in range(self.ca_epochs):
            xs, ys = [], []
            for c in seen:
                scale = 0.9 + (task_of[c] + 1) / (cur + 1) * 0.1
                z = torch.randn(n, chol[c].shape[0], generator=gen, dtype=torch.float64)
                xs.append((self.means[c] * scale + z @ chol[c].T).float())
                ys.append(torch.full((n,), pos[c], dtype=torch.long))
            order = torch.randperm(n * len(seen), generator=gen)
            x, y = torch.cat(xs)[order].to(device, params[0].dtype), torch.cat(ys)[order].to(device)
            losses = []
            for i in range(len(seen)):
                logits = self.head(x[i * n:(i + 1) * n])[:, cols]
                if self.logit_norm is not None:
                    logits = normalised_logits(logits, groups, self.logit_norm)
                loss = F.cross_entropy(logits, y[i * n:(i + 1) * n])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            sched.step()
            history.append(sum(losses) / len(losses))
        for p in params:
            p.grad = None
        return history

    def state_dict(self) -> dict:
        return {"means": dict(self.means), "covs": dict(self.covs), "tasks": [list(t) for t in self.tasks],
                "head_before_ca": self.head_before_ca}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covs = dict(state.get("means", {})), dict(state.get("covs", {}))
        self.tasks = [list(t) for t in state.get("tasks", [])]
        self.head_before_ca = state.get("head_before_ca")

    def __repr__(self) -> str:
        return (f"SLCA(backbone_lr_scale={self.backbone_lr_scale}, ca_epochs={self.ca_epochs}, "
                f"logit_norm={self.logit_norm}, fresh_final_norm={self.fresh_final_norm})")
