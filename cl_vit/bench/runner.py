"""runner: one experience through the suite against a bare PyTorch loop doing the same work.

The suite runs ``cl_vit.run.run`` (Lightning Trainer, strategy hooks, evaluation, checkpoint and results.json, the
default TensorBoard logging) on the one-experience split-digits stream. The bare loop builds the same model and
data with ``cl_vit.builder.build`` and runs the same epochs with the same batches, loss, optimiser and learning-rate
schedule (the suite's optimiser implementation: torch's fused AdamW), then one evaluation pass over the test set:
what a hand-written PyTorch script would do.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import OmegaConf

from cl_vit.bench import compose_config, interleaved_clocks, row, scratch

#: the one-experience split-digits stream: 10 classes, 1,347 training images (43 batches of 32 per epoch)
OVERRIDES = ["benchmark=split-digits", "benchmark.n_experiences=1", "trainer.accelerator=cpu"]
AIM = 1.10


@contextlib.contextmanager
def silenced():
    """The runs' console output (progress bars, tables) stays out of the benchmark's."""
    logger = logging.getLogger("cl_vit")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def suite_run(overrides: list[str], run_dir: Path) -> dict:
    from cl_vit.run import run

    with silenced():
        return run(compose_config(overrides), run_dir)


def bare_run(overrides: list[str]) -> dict:
    """The stream of ``overrides`` trained and evaluated by a plain PyTorch loop; returns the accuracy matrix."""
    from cl_vit import metrics as M
    from cl_vit.hardware import create_optimizer
    from cl_vit.module import classification_loss, warmup_cosine
    from cl_vit.builder import build
    from cl_vit.runner import experience_seed
    from cl_vit.strategies.base import ExperienceInfo

    cfg = compose_config(overrides)
    _, scenario, info, module, _ = build(cfg)
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    epochs, bs, ebs = int(cfg.trainer.max_epochs), int(cfg.data.batch_size), int(cfg.data.eval_batch_size)
    n = len(info.train_classes)
    R = np.full((n, n), np.nan)
    for i, experience in enumerate(scenario.train_stream):
        seed = experience_seed(cfg.seed, i)
        L.seed_everything(seed, verbose=False)
        seen = sorted({c for exp in info.train_classes[: i + 1] for c in exp})
        module.start_experience(ExperienceInfo(i, n, list(info.train_classes[i]), seen, info.n_classes))
        loader = torch.utils.data.DataLoader(experience.dataset, batch_size=bs, shuffle=True,
                                             generator=torch.Generator().manual_seed(seed))
        opt = create_optimizer(module.net, opt_cfg["name"], lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
        total = epochs * len(loader)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, total, 0, 0.0))
        module.train()
        for _ in range(epochs):
            for batch in loader:
                x, y = batch[0], batch[1]
                loss = classification_loss(module.forward_outputs(x)["logits"], y, module.seen_mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        module.eval()
        with torch.no_grad():
            for j in range(i + 1):
                ys, ps = [], []
                for batch in torch.utils.data.DataLoader(scenario.test_stream[j].dataset, batch_size=ebs):
                    logits = module.forward_outputs(batch[0])["logits"]
                    ps.append(logits.masked_fill(~module.seen_mask, float("-inf")).argmax(1))
                    ys.append(batch[1])
                R[i, j] = M.confusion_accuracy(M.confusion_entries(torch.cat(ys).numpy(), torch.cat(ps).numpy()))
    return {"accuracy_matrix": R.tolist(), "final_average_accuracy": float(np.nanmean(R[-1]))}


def run(quick: bool = False) -> dict:
    overrides = [*OVERRIDES, *(["trainer.max_epochs=1", "model=vit_micro"] if quick else [])]  # quick: a smoke run
    cfg = compose_config(overrides)
    epochs = int(cfg.trainer.max_epochs)
    steps = epochs * math.ceil(1347 / int(cfg.data.batch_size))
    with scratch("cl_vit_bench_runner_") as root:
        counter = iter(range(10**6))
        results = {}

        def suite(logger: str):
            def go():
                results[logger] = suite_run([*overrides, f"logger={logger}"], root / f"{logger}_{next(counter)}")
            return go

        def bare():
            results["bare"] = bare_run(overrides)

        wall, cpu = interleaved_clocks({"suite": suite("tensorboard"), "suite_nolog": suite("none"), "bare": bare},
                                       repeats=1 if quick else 3, warmup=0 if quick else 1)
        a_suite = results["tensorboard"]["metrics"]["final_average_accuracy"]
        a_bare = results["bare"]["final_average_accuracy"]
        case = f"1 experience, {epochs} epochs, {steps} steps"
        rows = []
        for key, label in (("suite", case), ("suite_nolog", f"{case}, logger=none")):
            for clock, times in (("wall", wall), ("CPU", cpu)):
                rows.append(row(label, f"{clock} s: suite / bare loop", times[key], times["bare"], aim=f"<= {AIM:.2f}x",
                                target=AIM, accuracy=a_suite, baseline_accuracy=a_bare))
        return {
            "name": "runner",
            "device": "cpu",
            "rows": rows,
            "notes": [
                f"split-digits as one experience (10 classes), {cfg.model.name}, batch {cfg.data.batch_size}, "
                f"AdamW + cosine; torch threads {torch.get_num_threads()}; median of "
                f"{1 if quick else 3} interleaved repetitions; CPU = this process's CPU time",
                f"final accuracy: suite {a_suite:.4f}, bare loop {a_bare:.4f}",
            ],
        }
