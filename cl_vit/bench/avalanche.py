"""avalanche: the whole split-digits stream with plain fine-tuning, the suite against avalanche-lib's Naive strategy.

Same model (``cl_vit.builder.build``: same initial weights), same optimiser (timm's AdamW with the same parameter
groups, created afresh for every experience as the suite does), same per-step cosine schedule, epochs and batch
sizes, same stream objects. Avalanche evaluates after every experience on the test sets seen so far, one
experience at a time (its own loop), with an evaluator that keeps only per-experience accuracy and no loggers; the
suite runs as ``python -m cl_vit.run logger=none`` would (it still writes checkpoints and results.json each
experience). The losses differ in one point: the suite's cross-entropy covers the classes seen so far, Naive's all
classes; both A_N are reported.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from cl_vit.bench import compose_config, interleaved_clocks, row
from cl_vit.bench.runner import silenced, suite_run

OVERRIDES = ["benchmark=split-digits", "strategy=finetune", "trainer.accelerator=cpu", "logger=none"]
AIM = 0.8


class SeenMasked(torch.nn.Module):
    """The net with the logits of classes not seen yet at -inf: Naive's cross-entropy and argmax then cover the seen
    classes only, the suite's task-agnostic loss and evaluation (ContinualModule.seen_mask)."""

    def __init__(self, net: torch.nn.Module, n_classes: int):
        super().__init__()
        self.net = net
        self.register_buffer("seen", torch.zeros(n_classes, dtype=torch.bool))

    def forward(self, x):
        return self.net(x).masked_fill(~self.seen, float("-inf"))


def avalanche_run(overrides: list[str], fused: bool = False) -> dict:
    """The stream trained with avalanche.training.Naive; returns the accuracy matrix and A_N.

    ``fused``: the suite's AdamW implementation (torch's fused kernel) instead of torch's default."""
    import lightning as L
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from timm.optim import create_optimizer_v2

    from cl_vit.hardware import create_optimizer
    from cl_vit.module import warmup_cosine
    from cl_vit.builder import build
    from cl_vit.runner import experience_seed

    cfg = compose_config(overrides)
    _, scenario, info, module, _ = build(cfg)
    opt_cfg = OmegaConf.to_container(cfg.optimizer)
    epochs, bs = int(cfg.trainer.max_epochs), int(cfg.data.batch_size)

    def optimizer():
        if fused:
            return create_optimizer(module.net, opt_cfg["name"], lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
        return create_optimizer_v2(module.net, opt=opt_cfg["name"], lr=opt_cfg["lr"],
                                   weight_decay=opt_cfg["weight_decay"])

    class FreshOptimizerNaive(Naive):
        def make_optimizer(self, **kwargs):  # a new optimiser per experience, as the suite's Trainer makes one
            self.optimizer = optimizer()
            self.optimized_param_id = dict(self.model.named_parameters())

    class PerStepCosine(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            total = epochs * math.ceil(len(strategy.experience.dataset) / bs)
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                strategy.optimizer, lambda s: warmup_cosine(s, total, 0, 0.0))

        def after_training_iteration(self, strategy, **kwargs):
            self.scheduler.step()

    class Seeded(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            L.seed_everything(experience_seed(cfg.seed, strategy.experience.current_experience), verbose=False)

    warnings.filterwarnings("ignore", message="No loggers specified")
    class SeenClasses(SupervisedPlugin):
        def before_training_exp(self, strategy, **kwargs):
            model.seen[list(strategy.experience.classes_in_this_experience)] = True

    model = SeenMasked(module.net, info.n_classes)
    strategy = FreshOptimizerNaive(
        model=model, optimizer=optimizer(), criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=bs, train_epochs=epochs, eval_mb_size=int(cfg.data.eval_batch_size), device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        plugins=[Seeded(), SeenClasses(), PerStepCosine()],
    )
    n = len(info.train_classes)
    R = np.full((n, n), np.nan)
    for i, experience in enumerate(scenario.train_stream):
        strategy.train(experience, num_workers=0)
        metrics = strategy.eval(scenario.test_stream[: i + 1], num_workers=0)
        for j in range(i + 1):
            R[i, j] = metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
    return {"accuracy_matrix": R.tolist(), "final_average_accuracy": float(np.nanmean(R[-1]))}


def run(quick: bool = False) -> dict:
    overrides = [*OVERRIDES, *(["trainer.max_epochs=1", "model=vit_micro"] if quick else [])]  # quick: a smoke run
    cfg = compose_config(overrides)
    root = Path(tempfile.mkdtemp(prefix="cl_vit_bench_avalanche_"))
    counter = iter(range(10**6))
    results = {}

    def suite():
        results["suite"] = suite_run(overrides, root / f"suite_{next(counter)}")

    def naive(fused: bool):
        def go():
            with silenced():
                results[fused] = avalanche_run(overrides, fused=fused)
        return go

    repeats = 1 if quick else 3
    wall, cpu = interleaved_clocks({"suite": suite, "avalanche": naive(False), "avalanche_fused": naive(True)},
                                   repeats=repeats, warmup=0 if quick else 1)
    a_suite = results["suite"]["metrics"]["final_average_accuracy"]
    a_av, a_fused = results[False]["final_average_accuracy"], results[True]["final_average_accuracy"]
    case = f"split-digits, 5 experiences, {cfg.trainer.max_epochs} epochs"
    rows = []
    for key, label, a_base in (("avalanche", case, a_av), ("avalanche_fused", f"{case}, Naive fused AdamW", a_fused)):
        for clock, times in (("wall", wall), ("CPU", cpu)):
            rows.append(row(label, f"{clock} s: suite / Naive", times["suite"], times[key], aim=f"<= {AIM:.2f}x",
                            target=AIM, accuracy=a_suite, baseline_accuracy=a_base))
    return {
        "name": "avalanche",
        "device": "cpu",
        "rows": [
            *rows,
            row(case, "A_N: suite / Naive", a_suite, a_av, aim="equal accuracy"),
        ],
        "notes": [
            f"{cfg.model.name}, AdamW lr {cfg.optimizer.lr} + per-step cosine, batch {cfg.data.batch_size}; "
            f"torch threads {torch.get_num_threads()}; median of {repeats} interleaved repetitions; CPU = this "
            "process's CPU time",
            "Naive: torch's default AdamW loop, as an Avalanche script gets it; the 'Naive fused AdamW' rows give "
            "Naive the suite's fused AdamW",
            f"final A_N: suite {a_suite:.4f}, Avalanche Naive {a_av:.4f} (fused AdamW: {a_fused:.4f})",
        ],
    }
