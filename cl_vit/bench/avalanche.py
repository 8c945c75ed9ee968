"""avalanche: the whole split-digits stream with plain fine-tuning, the suite against avalanche-lib's Naive strategy;
then the referee: the suite's finetune, ewc and lwf against avalanche-lib's Naive, EWC and LwF on split-fmnist.

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
import warnings

import numpy as np
import torch
from omegaconf import OmegaConf

from cl_vit.bench import compose_config, interleaved_clocks, row, scratch
from cl_vit.bench.runner import silenced, suite_run

OVERRIDES = ["benchmark=split-digits", "strategy=finetune", "trainer.accelerator=cpu", "logger=none"]
AIM = 0.8
#: --quick: a smoke run of the same code on 2 experiences (an experience after the first is what EWC and LwF act on)
QUICK = ["trainer.max_epochs=1", "model=vit_micro", "benchmark.n_experiences=2"]

#: the referee's stream: split-fmnist (5 x 2 classes, 12,000 training images per experience) area-downsampled to 8x8
#: with the micro ViT at patch 2 (16 tokens), 1 epoch of batch 64 (188 steps per experience): a CPU-sized setting in
#: which the two libraries' methods can be told apart (docs/miniatures.md, "Referee")
REFEREE = ["benchmark=split-fmnist", "benchmark.source_args.img_size=8", "model=vit_micro", "model.patch_size=2",
           "trainer.accelerator=cpu", "logger=none"]
REFEREE_SEEDS = (0, 1, 2)
#: the referee's strengths, each sized so that the method departs from fine-tuning beyond the seeds' spread (a
#: referee compares implementations, so each must change the outcome). Probe, suite only, seed 0, A_N % (fine-tuning
#: 19.8): ewc lam 1e2 19.9, 1e4 14.7, 1e6 14.8; lwf (kd) alpha 1 19.9, 10 19.0, 100 17.3 (outputs/probe-referee,
#: docs/miniatures.md "Referee"). avalanche-lib's EWC importances are the mean of squared batch gradients, the
#: suite's (the closer-look authors') that times the batch size, so Avalanche gets lam x batch size.
EWC_LAM = 1.0e4
LWF_ALPHA, LWF_T = 10.0, 2.0


def method_pairs(batch_size: int) -> dict[str, tuple[list[str], str, dict]]:
    """Each referee method: the suite's overrides, avalanche-lib's strategy and its arguments, set to one loss form.

    - finetune / Naive: cross-entropy over the classes seen so far (Naive's output masked to them, SeenMasked).
    - ewc / EWC: one accumulated Fisher with the latest weights as anchor (the suite's decay 1 = Avalanche's
      mode="online", decay_factor=1), over every backbone parameter; no factor 1/2 in either penalty. Left as each
      library defines it: the suite leaves the classifier out of the penalty and takes the Fisher of the CE over the
      current experience's classes (the closer-look authors' EWC_MC); Avalanche penalises every parameter and takes
      the Fisher of its training criterion (CE over the seen classes).
      ``ewc-backbone``: the same suite run beside Avalanche's EWC with the classifier's importances set to zero,
      the suite's parameter rule: it tells how much of a difference between the two comes from that rule.
    - lwf / LwF: CE + alpha x softmax distillation at temperature 2 over the classes of earlier experiences (the
      suite's form=kd: cross-entropy to the old model's soft targets; Avalanche's: KL divergence, the same gradient).
    """
    ewc = ["strategy=ewc", 'strategy.ewc.params=["*"]', f"strategy.ewc.lam={EWC_LAM}"]
    ewc_args = {"ewc_lambda": EWC_LAM * batch_size, "mode": "online", "decay_factor": 1.0}
    return {
        "finetune": (["strategy=finetune"], "naive", {}),
        "ewc": (ewc, "ewc", ewc_args),
        "ewc-backbone": (ewc, "ewc", {**ewc_args, "backbone_only": True}),
        "lwf": (["strategy=lwf", "strategy.lwf.form=kd", f"strategy.lwf.lam={LWF_ALPHA}",
                 f"strategy.lwf.temperature={LWF_T}"], "lwf", {"alpha": LWF_ALPHA, "temperature": LWF_T}),
    }


def referee(quick: bool = False) -> tuple[list[dict], list[str]]:
    """The suite's finetune, ewc and lwf against avalanche-lib's Naive, EWC and LwF on the referee stream, per seed:
    same model and initial weights, data, optimiser, schedule, epochs and batch size. Returns rows (A_N, mean over
    seeds, suite / Avalanche) and notes (each method's per-seed A_N).

    ``quick``: split-digits in 2 experiences, 1 epoch, seed 0 (a smoke run of the same code)."""
    from cl_vit.errors import UserError

    base = [*OVERRIDES, *QUICK] if quick else REFEREE
    seeds = (0,) if quick else REFEREE_SEEDS
    cfg = compose_config(base)
    bs = int(cfg.data.batch_size)
    case = (f"{cfg.benchmark.name} {cfg.benchmark.source_args.get('img_size', '')}px, "
            f"{cfg.trainer.max_epochs} epoch(s), {len(seeds)} seed(s)")
    with scratch("cl_vit_bench_referee_") as root:
        rows, notes, suite_cache = [], [], {}
        for name, (suite_args, method, method_args) in method_pairs(bs).items():
            a_suite, a_av = [], []
            for seed in seeds:
                overrides = [*base, *suite_args, f"seed={seed}"]
                key = tuple(overrides)
                if key not in suite_cache:  # ewc-backbone reuses the ewc runs
                    try:
                        metrics = suite_run(overrides, root / f"{name}_{seed}")["metrics"]
                        suite_cache[key] = metrics["final_average_accuracy"]
                    except UserError as e:  # the referee's data is not on this machine
                        return [], [f"referee not run: {e}"]
                a_suite.append(suite_cache[key])
                with silenced():
                    a_av.append(avalanche_run(overrides, method=method, **method_args)["final_average_accuracy"])
            ms, ma = float(np.mean(a_suite)), float(np.mean(a_av))
            sd = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            theirs = f"{method}, classifier unpenalised" if method_args.get("backbone_only") else method
            rows.append(row(case, f"A_N: suite {name.split('-')[0]} / Avalanche {theirs}", ms, ma,
                            aim="equal within the seeds' spread",
                            suite_per_seed=a_suite, avalanche_per_seed=a_av, seeds=list(seeds)))
            notes.append(f"referee {name}: suite {100 * ms:.2f} ± {100 * sd(a_suite):.2f}, Avalanche {theirs} "
                         f"{100 * ma:.2f} ± {100 * sd(a_av):.2f} (A_N %, mean ± std over seeds {list(seeds)}; "
                         "per seed "
                         f"{[round(100 * a, 2) for a in a_suite]} vs {[round(100 * a, 2) for a in a_av]})")
        return rows, notes


class SeenMasked(torch.nn.Module):
    """The net with the logits of classes not seen yet at -inf: Naive's cross-entropy and argmax then cover the seen
    classes only, the suite's task-agnostic loss and evaluation (ContinualModule.seen_mask)."""

    def __init__(self, net: torch.nn.Module, n_classes: int):
        super().__init__()
        self.net = net
        self.register_buffer("seen", torch.zeros(n_classes, dtype=torch.bool))

    def forward(self, x):
        return self.net(x).masked_fill(~self.seen, float("-inf"))


def avalanche_run(overrides: list[str], fused: bool = False, method: str = "naive", backbone_only: bool = False,
                  **method_args) -> dict:
    """The stream trained with avalanche.training.Naive (or ``method``: ``ewc``, ``lwf``, avalanche-lib's EWC and LwF
    strategies with ``method_args``); returns the accuracy matrix and A_N.

    ``backbone_only`` (EWC): the classifier's importances are set to zero after each computation, so that its
    parameters leave the penalty as in the suite's EWC.

    ``fused``: the suite's AdamW implementation (torch's fused kernel) instead of torch's default."""
    import lightning as L
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import EWC, LwF, Naive
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from timm.optim import create_optimizer_v2

    from cl_vit.hardware import create_optimizer
    from cl_vit.module import warmup_cosine
    from cl_vit.builder import build
    from cl_vit.runner import experience_seed

    cfg = compose_config(overrides)
    _, scenario, info, module, _ = build(cfg)
    opt_cfg = OmegaConf.to_container(cfg.optimizer, resolve=True)
    epochs, bs = int(cfg.trainer.max_epochs), int(cfg.data.batch_size)

    def optimizer():
        if fused:
            return create_optimizer(module.net, opt_cfg["name"], lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"])
        return create_optimizer_v2(module.net, opt=opt_cfg["name"], lr=opt_cfg["lr"],
                                   weight_decay=opt_cfg["weight_decay"])

    def make_optimizer(self, **kwargs):  # a new optimiser per experience, as the suite's Trainer makes one
        self.optimizer = optimizer()
        self.optimized_param_id = dict(self.model.named_parameters())

    base = {"naive": Naive, "ewc": EWC, "lwf": LwF}[method]
    FreshOptimizer = type(f"FreshOptimizer{base.__name__}", (base,), {"make_optimizer": make_optimizer})

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
    strategy = FreshOptimizer(
        model=model, optimizer=optimizer(), criterion=torch.nn.CrossEntropyLoss(), **method_args,
        train_mb_size=bs, train_epochs=epochs, eval_mb_size=int(cfg.data.eval_batch_size), device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
        plugins=[Seeded(), SeenClasses(), PerStepCosine()],
    )
    if backbone_only:
        from avalanche.training.plugins import EWCPlugin

        from cl_vit.strategies.selection import classifier_names

        plugin = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
        heads = {f"net.{n}" for n in classifier_names(module.net)}  # parameter names inside SeenMasked
        importances = plugin.compute_importances

        def backbone_importances(*args, **kwargs):
            imp = importances(*args, **kwargs)
            for n in heads:
                imp[n].data.zero_()
            return imp

        plugin.compute_importances = backbone_importances
    n = len(info.train_classes)
    R = np.full((n, n), np.nan)
    for i, experience in enumerate(scenario.train_stream):
        strategy.train(experience, num_workers=0)
        metrics = strategy.eval(scenario.test_stream[: i + 1], num_workers=0)
        for j in range(i + 1):
            R[i, j] = metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"]
    return {"accuracy_matrix": R.tolist(), "final_average_accuracy": float(np.nanmean(R[-1]))}


def run(quick: bool = False) -> dict:
    overrides = [*OVERRIDES, *(QUICK if quick else [])]
    cfg = compose_config(overrides)
    with scratch("cl_vit_bench_avalanche_") as root:
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
        case = f"split-digits, {cfg.benchmark.n_experiences} experiences, {cfg.trainer.max_epochs} epochs"
        rows = []
        fused_case = f"{case}, Naive fused AdamW"
        for key, label, a_base in (("avalanche", case, a_av), ("avalanche_fused", fused_case, a_fused)):
            for clock, times in (("wall", wall), ("CPU", cpu)):
                rows.append(row(label, f"{clock} s: suite / Naive", times["suite"], times[key], aim=f"<= {AIM:.2f}x",
                                target=AIM, accuracy=a_suite, baseline_accuracy=a_base))
        referee_rows, referee_notes = referee(quick)
        return {
            "name": "avalanche",
            "device": "cpu",
            "rows": [
                *rows,
                row(case, "A_N: suite / Naive", a_suite, a_av, aim="equal accuracy"),
                *referee_rows,
            ],
            "notes": [
                f"{cfg.model.name}, AdamW lr {cfg.optimizer.lr} + per-step cosine, batch {cfg.data.batch_size}; "
                f"torch threads {torch.get_num_threads()}; median of {repeats} interleaved repetitions; CPU = this "
                "process's CPU time",
                "Naive: torch's default AdamW loop, as an Avalanche script gets it; the 'Naive fused AdamW' rows give "
                "Naive the suite's fused AdamW",
                f"final A_N: suite {a_suite:.4f}, Avalanche Naive {a_av:.4f} (fused AdamW: {a_fused:.4f})",
                *referee_notes,
            ],
        }
