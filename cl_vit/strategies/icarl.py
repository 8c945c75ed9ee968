"""iCaRL (Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017) as Mammoth runs
it (aimagelab/mammoth models/icarl.py):

- training data: the experience's plus the exemplar memory, once each (``icarl_replay``, utils/buffer.py L54-62);
- loss: sigmoid BCE over every output, targets one-hot, except the columns of the classes of past experiences, whose
  targets are the sigmoid of the previous network's logits (icarl.py ``get_loss`` L146-158, ``observe`` L115-117);
- exemplars: at the end of each experience, ``memory_size // n_seen`` per class (no remainder), past classes cut to
  their best-ranked, new classes chosen by herding on L2-normalised embeddings (``end_task`` L171-181,
  ``fill_buffer(use_herding=True, normalize_features=True)``; cl_vit/strategies/replay.py);
- classifier: nearest mean of exemplars. Each class mean is the mean of the exemplars' normalised embeddings
  averaged with that of their horizontally flipped images, normalised again (``compute_class_means`` L184-221); an
  image goes to the class of the smallest squared distance between its normalised embedding and the mean
  (``forward`` L84-96). The linear head's predictions are kept beside it as the head ``cnn``.

The exemplars' embeddings are taken under the test transform (Mammoth: the non-augmented images through the
normalisation, L193-194). Mammoth's own weight decay (``opt_wd`` 1e-5 added to the loss as 1e-5 * sum theta^2,
L98-102, L120) is the optimiser's ``weight_decay`` here (2e-5 for plain SGD gives the same step, with
``optimizer.filter_bias_and_bn=false``: the sum covers biases and norm weights, which timm leaves undecayed by default).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.lwf import PreviousModel
from cl_vit.strategies.replay import MemoryDataset, Replay


def icarl_loss(logits: torch.Tensor, old_logits: torch.Tensor | None, y: torch.Tensor, old: torch.Tensor
               ) -> torch.Tensor:
    """Mean BCE over every output: one-hot targets, the ``old`` columns (boolean mask) replaced by the sigmoid of
    the previous network's logits."""
    target = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    if old_logits is not None:
        target = torch.where(old, torch.sigmoid(old_logits).to(logits.dtype), target)
    return F.binary_cross_entropy_with_logits(logits, target)


def nme_scores(feats: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Minus the squared distance of each normalised embedding to each class mean (rows of ``means``)."""
    feats = feats / feats.norm(dim=1, keepdim=True)
    return -(means[None] - feats[:, None]).pow(2).sum(2)


def class_mean(feats: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
    """iCaRL's exemplar mean: the mean of the normalised embeddings, averaged with the flipped images' mean when
    given, normalised."""
    mean = F.normalize(feats, dim=1).mean(0)
    if flipped is not None:
        mean = (mean + F.normalize(flipped, dim=1).mean(0)) / 2
    return mean / mean.norm()


@register_strategy
class ICaRL(Replay):
    name = "icarl"
    cls_loss_weight = 0.0  # the BCE with distillation targets is the classification loss
    reads_old_logits = True

    def __init__(self, memory_size: int = 2000, flip: bool = True, selection: str = "herding"):
        super().__init__(memory_size=memory_size, policy="coreset", selection=selection, mix="append",
                         remainder="none")
        self.flip = bool(flip)
        self.previous = PreviousModel()
        self.means: torch.Tensor | None = None
        self.old_classes: list[int] = []

    def setup(self, module) -> None:
        self.previous.setup(module)

    def on_fit_start(self, module) -> None:
        self.previous.on_fit_start(module)

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        self.old_classes = sorted(set(experience.seen_classes) - set(experience.classes))

    def training_loss(self, module, batch, outputs) -> dict[str, torch.Tensor]:
        logits = outputs["logits"]
        old = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        old[self.old_classes] = True
        old_logits = None
        if self.previous.old_net is not None and self.old_classes:
            old_logits = self.previous.old_outputs(batch["x"])["logits"]
        return {"cls": icarl_loss(logits, old_logits, batch["y"], old)}

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        super().after_experience(module, experience)
        self.means = self.exemplar_means(module, experience)
        self.previous.after_experience(module, experience)

    @torch.no_grad()
    def exemplar_means(self, module, experience: ExperienceInfo, batch_size: int = 256) -> torch.Tensor:
        """One row per class (zeros for classes without exemplars), from the memory under the test transform."""
        from cl_vit.module import as_step_input, modes_kept, net_outputs, outside_step

        net, device = module.net, module.device
        data = MemoryDataset(experience.dataset, self.exp, self.idx, transform="test")
        feats, flipped = [], []
        with modes_kept(net), outside_step(module):
            net.eval()
            for start in range(0, len(data), batch_size):
                x = torch.stack([data[k][0] for k in range(start, min(start + batch_size, len(data)))])
                x = as_step_input(module, x.to(device))
                feats.append(net_outputs(net, x)["pre_logits"].float().cpu())
                if self.flip:
                    flipped.append(net_outputs(net, x.flip(-1))["pre_logits"].float().cpu())
        feats = torch.cat(feats)
        flipped = torch.cat(flipped) if self.flip else None
        means = torch.zeros(module.n_classes, feats.shape[1])
        for c in self.labels.unique().tolist():
            rows = self.labels == c
            means[c] = class_mean(feats[rows], flipped[rows] if flipped is not None else None)
        return means

    def evaluation_outputs(self, module, outputs: dict) -> dict:
        if self.means is None:
            return outputs
        means = self.means.to(outputs["pre_logits"].device)
        scores = nme_scores(outputs["pre_logits"].float(), means)
        scores = scores.masked_fill((means == 0).all(1)[None], float("-inf"))  # classes without exemplars
        return {**outputs, "logits": scores, "heads": {**outputs.get("heads", {}), "cnn": outputs["logits"]}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.previous.state_dict(), "means": self.means}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state:
            self.previous.load_state_dict(state)
            self.means = state.get("means")

    def __repr__(self) -> str:
        return f"ICaRL(memory_size={self.memory_size}, selection={self.selection!r}, flip={self.flip})"
