"""What GCAB's drift projectors recover (docs/strategies.md, "Strengths on the default stream"):

    python -m cl_vit.experiments.gcab_probe RUN_DIR [RUN_DIR ...]

For each gcab run directory and each experience t >= 2, on the test images of the experiences seen so far (eval
mode): the SAB features after experience t-1 (F_{t-1}, from its checkpoint) against those after t (F_t) and against
the drift projector's P_t(F_t). Columns: the drift ||F_t - F_{t-1}|| / ||F_{t-1}||; P_t's relative error
||P_t(F_t) - F_{t-1}|| / ||F_{t-1}||; the same error of the best constant, the mean of F_{t-1} over the images (a
projector that learnt only the mean has about this error); the spread of P_t(F_t) over the images relative to
F_{t-1}'s (mean per-feature standard deviation); and the task-aware accuracy of task t-1's token and head on
P_t(F_t) and on F_{t-1} itself (a perfect projector), on task t-1's test images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _load(run_dir: Path, cfg, index: int, trust_code: bool = False):
    """The run's network after experience ``index`` (0-based), in eval mode."""
    from cl_vit import loading
    from cl_vit.builder import build
    from cl_vit.rundir import RunDirectory

    with loading.trust_code(trust_code):
        _, scenario, _, module, _ = build(cfg)
    state = RunDirectory(run_dir).load_checkpoint(index)
    for s in module.strategies:
        s.load_state_dict(state["strategies"].get(s.name, {}))
    module.load_state_dict(state["module"])
    return scenario, module.net.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@torch.no_grad()
def probe(run_dir: Path, trust_code: bool = False) -> list[dict]:
    """The drift rows of a gcab run directory; ``trust_code``: build a config.yaml that names code (``_target_``,
    interpolations), refused otherwise as every file the suite reads (cl_vit/loading.py ``check_file_config``)."""
    from omegaconf import OmegaConf

    import cl_vit.run  # noqa: F401  (registers the config resolvers)
    from cl_vit.loading import check_file_config, read_yaml
    from cl_vit.models.gated import sab_features

    raw = read_yaml(run_dir / "config.yaml") or {}
    check_file_config(raw, str(run_dir / "config.yaml"), trusted=trust_code)  # a received run may not choose code
    cfg = OmegaConf.create(raw)
    if "gcab" not in (cfg.get("strategy") or {}):
        raise SystemExit(f"{run_dir}: not a gcab run (strategy {list(cfg.get('strategy') or {})})")
    n = len(sorted((run_dir / "checkpoints").glob("exp_*.pt")))
    rows, (scenario, prev) = [], _load(run_dir, cfg, 0, trust_code)
    for t in range(1, n):
        _, net = _load(run_dir, cfg, t, trust_code)
        data = [scenario.test_stream[j].dataset for j in range(t + 1)]
        x = torch.stack([d[i][0] for d in data for i in range(len(d))])
        y = torch.tensor([int(d[i][1]) for d in data for i in range(len(d))])
        old, new = sab_features(prev.backbone, x), sab_features(net.backbone, x)
        mapped = net.projectors[t - 1](new)
        classes = torch.tensor(net.task_classes[t - 1])
        own = torch.isin(y, classes)

        def task_accuracy(feats):  # task t-1's token and head, as the cascade runs them at inference
            token = net.cab(net.tokens[t - 1].expand(int(own.sum()), -1, -1), feats[own],
                            *net.task_masks(t - 1, net.s_max))[:, 0]
            return float((classes[net.heads[t - 1](token).argmax(1)] == y[own]).float().mean())

        rows.append({"run": str(run_dir), "t": t + 1, "drift": _rel(new, old), "projector": _rel(mapped, old),
                     "mean": _rel(old.mean(0, keepdim=True).expand_as(old), old),
                     "spread": float(mapped.std(0).mean() / old.std(0).mean()),
                     "acc_projected": task_accuracy(mapped), "acc_exact": task_accuracy(old)})
        prev = net
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_vit.experiments.gcab_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("--trust-code", action="store_true",
                   help="build run directories whose config.yaml names code (_target_, interpolations): only for runs "
                        "whose author you trust (the suite's trust_code=true)")
    args = p.parse_args(argv)
    print("| run | experience t | drift | P_t error | mean's error | P_t spread | task t-1 on P_t(F_t) (%) | "
          "task t-1 on F_{t-1} (%) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    from cl_vit.errors import UserError, report_error
    from cl_vit.loading import as_command_flag

    try:
        for run in args.runs:
            for r in probe(run, args.trust_code):
                print(f"| {r['run']} | {r['t']} | {r['drift']:.2f} | {r['projector']:.2f} | {r['mean']:.2f} | "
                      f"{r['spread']:.2f} | {100 * r['acc_projected']:.1f} | {100 * r['acc_exact']:.1f} |")
    except UserError as e:
        return report_error(as_command_flag(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
