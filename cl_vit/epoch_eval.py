"""Per-epoch test accuracy of every head, overall and per shot group, for long-tailed runs (TensorBoard).

DeiT-LT's evaluation runs after every epoch and prints overall / head / mid / tail accuracy for the averaged, CLS and
DIST outputs (val-iisc/DeiT-LT engine.py ``evaluate``); ``ShotGroupEpochEval`` does the same inside the experience's
Lightning fit, on the test data of the experiences seen so far, and logs

    epoch_eval/<head>/overall, epoch_eval/<head>/many, .../medium, .../few

where ``<head>`` is ``main`` (the model's output: the mean of the two heads for a distilled student) and each extra
head (``cls``, ``dist``). The shot groups are the run's default definition (cl_vit.metrics.default_shot_kind: the
official index cut-offs where the benchmark has them, else by training images per class, many > 100, medium 20-100,
few < 20); every other definition is logged too, named: ``epoch_eval/<head>/count/many``. The final, stored numbers
come from the runner's evaluation (results.json); these curves are for watching training.

The callback also keeps every evaluated epoch's numbers and ``summary()`` gives the last epoch's and the best epoch's,
best = highest overall accuracy of the ``main`` head (for a DeiT-LT student the mean of CLS and DIST, as main.py
L540-583 selects ``acc1_avg`` and keeps every head's numbers of that epoch). That epoch is selected on the test set,
as the DeiT-LT paper's reported numbers are: results.json keeps it apart (``epoch_selection``) and says so.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from cl_vit import metrics as M
from cl_vit.data.longtail import shot_groups
from cl_vit.metrics import default_shot_kind


class ShotGroupEpochEval(Callback):
    """``shot_groups``: results.json's record of the run's definitions (cl_vit.data.longtail.shot_group_record);
    without it, the count groups of ``class_counts``."""

    def __init__(self, loader, class_counts: Sequence[int], every: int = 1, shot_groups_record: dict | None = None):
        self.loader = loader
        record = shot_groups_record or {}
        default = default_shot_kind(record) if record else "count"
        #: metric prefix ("" for the default definition, "<kind>/" for the others) -> groups of every class
        self.definitions = {("" if kind == default else f"{kind}/"): d["groups"]
                            for kind, d in record.items() if isinstance(d, dict) and "groups" in d}
        if not self.definitions:
            self.definitions = {"": shot_groups(class_counts)}
        self.every = max(1, int(every))
        #: (epoch, metrics) of every evaluated epoch, epochs counted from 1
        self.history: list[tuple[int, dict[str, float]]] = []

    @torch.no_grad()
    def evaluate(self, pl_module) -> dict[str, float]:
        """``{"<head>/overall": acc, "<head>/<group>": acc}`` on the loader's data, without touching training state."""
        from cl_vit.module import modes_kept

        ys, preds = [], {}
        # as Lightning's own evaluation step: the trainer's precision plugin casts the batch (float64 under
        # 64-true) and gives the step its context (the default dtype, or mixed precision's autocast)
        trainer = getattr(pl_module, "_trainer", None)
        plugin = trainer.precision_plugin if trainer is not None else None
        with modes_kept(pl_module):
            pl_module.eval()
            for i, (x, y, exp) in enumerate(self.loader):
                batch = (x.to(pl_module.device), y, exp)
                if plugin is None:
                    out = pl_module.predict_step(batch, i)
                else:
                    with plugin.predict_step_context():
                        out = pl_module.predict_step(plugin.convert_input(batch), i)
                ys.append(y.cpu())
                for head, p in out["preds"].items():
                    preds.setdefault(head, []).append(p.cpu())
        y = torch.cat(ys).numpy()
        metrics = {}
        for head, p in preds.items():
            entries = M.confusion_entries(y, torch.cat(p).numpy())
            metrics[f"{head}/overall"] = M.confusion_accuracy(entries)
            for prefix, groups in self.definitions.items():
                for group, acc in M.shot_group_accuracy(entries, groups).items():
                    metrics[f"{head}/{prefix}{group}"] = acc
        return {k: v for k, v in metrics.items() if np.isfinite(v)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every or not trainer.is_global_zero:
            return
        metrics = self.evaluate(pl_module)
        self.history.append((trainer.current_epoch + 1, metrics))
        for logger in trainer.loggers:
            logger.log_metrics({f"epoch_eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    def summary(self) -> dict | None:
        """``{"epochs_evaluated", "last_epoch", "last", "best_epoch", "best"}``, ``last``/``best`` as
        ``{head: {"overall": acc, group: acc}}``; None when no epoch was evaluated (or on a rank other than 0)."""
        if not self.history:
            return None
        best_epoch, best = max(self.history, key=lambda em: (em[1].get("main/overall", float("-inf")), -em[0]))
        last_epoch, last = self.history[-1]
        return {"epochs_evaluated": len(self.history), "last_epoch": last_epoch, "last": _by_head(last),
                "best_epoch": best_epoch, "best": _by_head(best)}


def _by_head(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, v in metrics.items():
        head, _, name = key.partition("/")
        out.setdefault(head, {})[name] = float(v)
    return out
