"""What a DeiT-LT student took from its teacher (docs/miniatures.md, "DeiT-LT, in miniature"), on the test set.

    python -m cl_vit.experiments.deit_lt_probe RUN_DIR [RUN_DIR ...]

For each finished DeiT-LT student run (``strategy=deit_lt``, a distilled model), the teacher named in its config
(``strategy.deit_lt.teacher``: a distilled student's own teacher; for a ``distillation=none`` twin, the teacher it
*would* have had, as a control) and the student's CLS and DIST heads classify the benchmark's test images. Per head,
in %, overall and per shot group (the benchmark's class-index cut-offs where it has them, else training counts):

- ``acc``: accuracy;
- ``agree``: how often the head predicts the teacher's class;
- ``copies``: on the test images the teacher gets wrong, how often the head predicts the teacher's wrong class.

Shot groups are the run's own (results.json ``shot_groups`` under its ``shot_definition``).

A head that learnt from the teacher agrees with it, mistakes included, more than its undistilled twin does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from cl_vit import loading
from cl_vit.errors import UserError, report_error

GROUPS = ("all", "many", "medium", "few")


def predictions(run_dir: Path, batch_size: int = 500, trust_code: bool = False) -> dict[str, np.ndarray]:
    """Labels and the predicted stream labels of the teacher and the student's heads on the test set;
    ``trust_code``: build a run (and teacher) whose config names code, refused otherwise (cl_vit/loading.py)."""
    from cl_vit.models.teachers import load_teacher
    from cl_vit.runs import load_run
    from cl_vit.strategies.deit_lt import resize_for_teacher, teacher_permutation

    run = load_run(run_dir)
    teacher_path = run.config_value("strategy.deit_lt.teacher")
    if not teacher_path:
        raise UserError(f"{run_dir} names no strategy.deit_lt.teacher: give DeiT-LT student runs")
    restored = run.restore(trust_code=trust_code)
    module, scenario = restored.module, restored.scenario
    with loading.trust_code(trust_code):
        teacher = load_teacher(teacher_path)
    exp = scenario.train_stream[0]
    index = teacher_permutation(teacher.class_names, list(getattr(exp, "class_names", [])) or teacher.class_names)
    test = scenario.test_stream[0].dataset
    loader = torch.utils.data.DataLoader(test, batch_size=batch_size, shuffle=False)
    out: dict[str, list] = {"y": [], "teacher": [], "cls": [], "dist": []}
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0], batch[1]
            heads = module.forward_outputs(x)["heads"]
            t = teacher.net(resize_for_teacher(x, teacher.input_size[-1]))
            if index is not None:
                t = t[:, index]
            out["y"].append(y)
            out["teacher"].append(t.argmax(1))
            out["cls"].append(heads["cls"].argmax(1))
            out["dist"].append(heads["dist"].argmax(1))
    res = {k: torch.cat(v).numpy() for k, v in out.items()}
    record = run.results.get("shot_groups") or {}
    groups = (record.get(run.results.get("shot_definition")) or {}).get("groups")
    if groups is None:
        raise UserError(f"{run_dir} has no shot groups in results.json: give runs of a long-tailed benchmark")
    res["group"] = np.array([groups[int(c)] for c in res["y"]])  # stream labels index the groups
    return res


def summary(p: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per head (teacher, cls, dist) and group: acc, agree, copies (%)."""
    out: dict[str, dict[str, float]] = {}
    for head in ("teacher", "cls", "dist"):
        for g in GROUPS:
            sel = np.ones_like(p["y"], bool) if g == "all" else p["group"] == g
            wrong = sel & (p["teacher"] != p["y"])
            row = out.setdefault(f"{head}/{g}", {})
            row["acc"] = 100 * float((p[head][sel] == p["y"][sel]).mean()) if sel.any() else float("nan")
            row["agree"] = 100 * float((p[head][sel] == p["teacher"][sel]).mean()) if sel.any() else float("nan")
            row["copies"] = 100 * float((p[head][wrong] == p["teacher"][wrong]).mean()) if wrong.any() else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cl_vit.experiments.deit_lt_probe", description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="finished DeiT-LT student runs")
    ap.add_argument("--trust-code", action="store_true",
                    help="build runs whose config.yaml (or teacher) names code: only runs whose author you trust")
    args = ap.parse_args(argv)
    print("| run | head | acc all / many / medium / few | agree with teacher all / many / medium / few "
          "| copies the teacher's mistakes |")
    print("| --- | --- | --- | --- | ---: |")
    try:
        for run_dir in args.runs:
            s = summary(predictions(run_dir, trust_code=args.trust_code))
            for head in ("teacher", "cls", "dist"):
                acc = " / ".join(f"{s[f'{head}/{g}']['acc']:.2f}" for g in GROUPS)
                agree = " / ".join(f"{s[f'{head}/{g}']['agree']:.2f}" for g in GROUPS)
                copies = "—" if head == "teacher" else f"{s[f'{head}/all']['copies']:.2f}"
                print(f"| {run_dir} | {head} | {acc} | {agree} | {copies} |", flush=True)
    except UserError as e:
        return report_error(loading.as_command_flag(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
