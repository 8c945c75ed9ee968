"""The strategy hook protocol: a strategy is a plug-in that overrides only the hooks it needs.

The runner calls, for every training experience::

    setup(module)                                   once, after the model is built (may wrap or grow module.net)
    load_state_dict(state)                          on resume, before the network weights are restored
    before_experience(module, experience)           may freeze parameters, snapshot anchors, copy old models
    train_dataset(module, experience, dataset)      the experience's training data (a replay memory adds to it)
      -- Lightning fit: per batch --
      lr_scales(module) -> {name: factor}           when the optimiser is built (e.g. SLCA's slower backbone)
      frozen_slices(module) -> {name: rows|mask}    entries that must not move although their tensor trains
      before_batch(module, batch) -> batch          e.g. batch-level augmentation (Mixup/CutMix)
      training_loss(module, batch, outputs) -> {name: tensor}   extra loss terms, each logged on its own
      after_backward(module)                        e.g. gradient masking
    after_experience(module, experience)            e.g. Fisher information, new anchors
    evaluation_outputs(module, outputs) -> outputs  the network's outputs at evaluation (iCaRL's nearest-mean scores)
    state_dict() -> dict                            everything a later experience reads (saved per experience)

Several strategies compose in one run; their terms are summed with the classification loss, which is scaled by the
product of the strategies' ``cls_loss_weight``. A strategy never opens files: data reaches it through
``experience.train_loader()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from cl_vit.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from cl_vit.module import ContinualModule


@dataclass
class ExperienceInfo:
    """What a strategy may know about the experience being trained."""

    index: int
    n_experiences: int
    #: stream labels of this experience's classes, and of all classes seen up to and including it
    classes: list[int]
    seen_classes: list[int]
    n_classes: int
    #: a DataLoader over this experience's training data (evaluation transforms are the source's business);
    #: ``transform="test"``: the same images in the same order under the test transform (statistics_transform);
    #: ``shuffle=False``: training batches in the dataset's order
    train_loader: Callable[..., Any] | None = None
    #: training images per class (stream labels) of the whole training set, for re-weighting strategies
    class_counts: list[int] | None = None
    #: class name of every stream label (None for a foreign Avalanche scenario), e.g. to match a teacher's classes
    class_names: list[str] | None = None
    #: label of every stream class in the dataset's own files, before any re-indexing (map_targets): the output order
    #: of checkpoints trained outside the suite (DeiT-LT's released teachers); None when unknown
    dataset_labels: list[int] | None = None
    #: ``dataset(j, transform="train")``: the training dataset of experience j <= index, items (x, y, task), under the
    #: training or (``"test"``) the test transform: a replay memory keeps indices into these, not images
    dataset: Callable[..., Any] | None = None
    #: the run's seed: a strategy's own random draws are functions of (seed, index, ...), so a resumed run and every
    #: process under DDP draw the same numbers (a replay memory's choices)
    seed: int = 0


class Strategy:
    """Base plug-in: every hook is a no-op, so a strategy overrides only what it needs."""

    #: the key of this strategy under ``strategy.`` in the config and in the logs
    name: str = "strategy"
    #: factor on the classification loss (DeiT-LT uses 1 - alpha)
    cls_loss_weight: float = 1.0
    #: whether this strategy's loss reaches the logits of past classes (LwF's distillation): with
    #: ``loss.mask_old_logits`` their classifier rows are otherwise frozen (ContinualModule.frozen_slices)
    reads_old_logits: bool = False
    #: whether it takes the uint8 training batches of ``benchmark.source_args.augment.prefetcher`` (normalised only
    #: after its ``before_batch``, by the module's PrefetchStage): a strategy that leaves the images alone or mixes
    #: them as timm's collate does
    uint8_batches: bool = False

    def setup(self, module: "ContinualModule") -> None:
        pass

    def on_fit_start(self, module: "ContinualModule") -> None:
        """Called on the training device at the start of each experience's fit (move held models here)."""

    def before_experience(self, module: "ContinualModule", experience: ExperienceInfo) -> None:
        pass

    def train_dataset(self, module: "ContinualModule", experience: ExperienceInfo, dataset):
        """The dataset the experience's training loader draws from (called before ``before_experience``); items
        (x, y, task[, key]): a fourth element reaches ``before_batch`` and ``training_loss`` as ``batch["key"]``."""
        return dataset

    def before_batch(self, module: "ContinualModule", batch: dict) -> dict:
        return batch

    def frozen_slices(self, module: "ContinualModule") -> dict[str, Any]:
        """Entries of trainable parameters of ``module.net``, by name (row indices, or a boolean mask of the
        parameter's shape), that the experience just started must leave bit-identical although their tensor trains
        (CODA-Prompt's earlier components); {} = none. Asked once per fit, after ``before_experience``; the module
        restores them after every optimiser step (ContinualModule.frozen_slices)."""
        return {}

    def lr_scales(self, module: "ContinualModule") -> dict[str, float]:
        """Factors on the learning rate of ``module.net``'s parameters by name (SLCA's slow backbone); {} = none."""
        return {}

    def training_loss(self, module: "ContinualModule", batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        return {}

    def after_backward(self, module: "ContinualModule") -> None:
        pass

    def after_experience(self, module: "ContinualModule", experience: ExperienceInfo) -> None:
        pass

    def evaluation_outputs(self, module: "ContinualModule", outputs: dict) -> dict:
        """The outputs (``logits``, ``pre_logits``, ``heads``) the evaluation predicts from; as computed by default."""
        return outputs

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class TaskGrowingStrategy(Strategy):
    """A strategy whose network grows parts for each task (GCAB, DyTox): its checkpoint state is each task's
    classes, and a resume regrows those tasks in the freshly built network (``grow``) before the weights load.
    ``self.module`` is the module of ``setup``, None before."""

    module: "ContinualModule | None" = None

    def grow(self, net, classes) -> None:
        """Add one task of ``classes`` to ``net``, as the strategy does when the task starts."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        net = self.module.net if self.module is not None else None
        return {"task_classes": [list(cs) for cs in net.task_classes] if net is not None else []}

    def load_state_dict(self, state: dict) -> None:
        if self.module is None:
            raise RuntimeError(f"{self.name}: load_state_dict before setup")
        net = self.module.net
        if net.n_tasks:
            raise UserError(f"{self.name}: the network already holds tasks; a checkpoint loads into a freshly "
                            f"built run")
        for classes in state.get("task_classes", []):
            self.grow(net, classes)


#: every strategy of the suite, by the name that selects it under ``strategy.`` in the config
STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` selectable as ``strategy.<cls.name>``. A file under cl_vit/strategies/ that
    defines a decorated class is found on its own (no list to edit); a class outside the package is named by
    ``_target_`` in its config instead."""
    STRATEGIES[cls.name] = cls
    return cls
