"""The policy InfLoRA and SD-LoRA share: task-wise LoRA terms on a frozen ViT (cl_vit/models/lora.py), a new term
per experience, the newest term and the classifier trained.

Each experience adds one set of terms (the trainable parameters of a run grow with its experiences: results.json
``cost``); what trains besides the classifier is the subclass's ``trainable``. The loss is the cross-entropy over the
current experience's classes (InfLoRA methods/inflora.py L220-225: logits of the current task's classifier only;
SD-LoRA models/sdlora.py L229-232: ``logits[:, known_classes:]``; the recipes set ``loss.mask_old_logits``, which
also keeps the past classes' classifier rows bit-identical). The batch norms of a frozen backbone (Refiner-ViT's
refiner) keep their running statistics, as for the prompt methods.

State: the number of tasks, so that a resumed run grows the network to its checkpoint's size before the weights load.
"""
from __future__ import annotations

from cl_vit.errors import ConfigError
from cl_vit.models.lora import TaskLoRA, add_lora
from cl_vit.strategies.base import ExperienceInfo, Strategy
from cl_vit.strategies.prompting import freeze_norm_statistics


def check_int(strategy: str, key: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"strategy.{strategy}.{key}", value, f"an integer >= {low}")
    return value


class LoRAStrategy(Strategy):
    """Subclasses name the adapted slices (``targets``) and the weighting (``lora_options``), and say what trains."""

    targets: tuple[str, ...] = ()

    def __init__(self, rank: int = 10):
        self.rank = check_int(self.name, "rank", rank)
        self.lora: TaskLoRA | None = None

    def lora_options(self) -> dict:
        return {}

    def setup(self, module) -> None:
        self.lora = add_lora(module.net, self.targets, self.rank, **self.lora_options())

    def grow(self, n_tasks: int, device=None) -> None:
        while self.lora.n_tasks < n_tasks:
            self.lora.add_task(device)

    def trainable(self, task: int) -> list[str]:
        """Names (under ``net.lora``) of the parameters trained in ``task``."""
        raise NotImplementedError  # pragma: no cover

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        from cl_vit.strategies.selection import classifier_names

        self.grow(experience.index + 1, next(module.net.parameters()).device)
        keep = classifier_names(module.net) | {f"lora.{n}" for n in self.trainable(experience.index)}
        for n, p in module.net.named_parameters():
            p.requires_grad_(n in keep)

    def on_fit_start(self, module) -> None:
        freeze_norm_statistics(module.net, frozen=False)  # Lightning expects training mode; before_batch refreezes

    def before_batch(self, module, batch: dict) -> dict:
        freeze_norm_statistics(module.net)
        return batch

    def state_dict(self) -> dict:
        return {"n_tasks": self.lora.n_tasks if self.lora is not None else 0}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_tasks"):
            self.grow(int(state["n_tasks"]))  # before the network's weights load: the terms must exist

