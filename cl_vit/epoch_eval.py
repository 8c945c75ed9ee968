"""Per-epoch test accuracy of every head, overall and per shot group, for long-tailed runs (TensorBoard).

DeiT-LT's evaluation runs after every epoch and prints overall / head / mid / tail accuracy for the averaged, CLS and
DIST outputs (val-iisc/DeiT-LT engine.py ``evaluate``); ``ShotGroupEpochEval`` does the same inside the experience's
Lightning fit, on the test data of the experiences seen so far, and logs

    epoch_eval/<head>/overall, epoch_eval/<head>/many, .../medium, .../few

where ``<head>`` is ``main`` (the model's output: the mean of the two heads for a distilled student) and each extra
head (``cls``, ``dist``). Shot groups are by training images per class (cl_vit.data.longtail.shot_groups: many > 100,
medium 20-100, few < 20). The final, stored numbers come from the runner's evaluation (results.json); these curves are
for watching training.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from cl_vit import metrics as M
from cl_vit.data.longtail import shot_groups


class ShotGroupEpochEval(Callback):
    def __init__(self, loader, class_counts: Sequence[int], every: int = 1):
        self.loader = loader
        self.groups = shot_groups(class_counts)
        self.every = max(1, int(every))

    @torch.no_grad()
    def evaluate(self, pl_module) -> dict[str, float]:
        """``{"<head>/overall": acc, "<head>/<group>": acc}`` on the loader's data, without touching training state."""
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        ys, preds = [], {}
        try:
            for i, (x, y, exp) in enumerate(self.loader):
                out = pl_module.predict_step((x.to(pl_module.device), y, exp), i)
                ys.append(y.cpu())
                for head, p in out["preds"].items():
                    preds.setdefault(head, []).append(p.cpu())
        finally:
            for m, training in modes.items():
                m.train(training)
        y = torch.cat(ys).numpy()
        metrics = {}
        for head, p in preds.items():
            entries = M.confusion_entries(y, torch.cat(p).numpy())
            metrics[f"{head}/overall"] = M.confusion_accuracy(entries)
            for group, acc in M.shot_group_accuracy(entries, self.groups).items():
                metrics[f"{head}/{group}"] = acc
        return {k: v for k, v in metrics.items() if np.isfinite(v)}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if (trainer.current_epoch + 1) % self.every or trainer.logger is None or not trainer.is_global_zero:
            return
        metrics = self.evaluate(pl_module)
        trainer.logger.log_metrics({f"epoch_eval/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
