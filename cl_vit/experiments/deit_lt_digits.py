"""DeiT-LT on digits-lt over several seeds: the teacher alone, the student without distillation, the DeiT-LT student.

    python -m cl_vit.experiments.deit_lt_digits --seeds 0 1 2 --out runs/deit-lt-digits

Per seed, three runs of ``python -m cl_vit.run`` (in this process, same configs):

1. ``experiment=teacher-digits-lt``: ResNet-32, LDAM + DRW, SAM (rho 0.8);
2. ``experiment=deit-lt-digits-lt model.distilled=false strategy.deit_lt.distillation=none``: the same ViT-Micro
   without DIST token, same augmentation and schedule, cross-entropy (class-weighted in the DRW phase, as DeiT-LT's
   main.py trains a student without distillation);
3. ``experiment=deit-lt-digits-lt strategy.deit_lt.teacher=<run 1>``: the DeiT-LT student (mean of the CLS and DIST
   heads; the CLS-only and DIST-only rows beside it).

Prints a markdown table of test accuracy (%), mean and standard deviation over the seeds, overall and per shot group
(training images per class: many > 100, medium 20-100, few < 20), and writes it with the per-seed numbers to
``<out>/summary.json``. Run directories that already hold a completed run are read, not trained again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from cl_vit import metrics as M
from cl_vit.data.longtail import shot_groups
from cl_vit.rundir import atomic_write_json

GROUPS = ("many", "medium", "few")


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import cl_vit.run  # noqa: F401  (registers the config resolvers)
    from cl_vit.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_once(run_dir: Path, overrides: list[str]) -> dict:
    """The results document of ``run_dir``, training it first unless it is already complete."""
    from cl_vit.run import run

    results = run_dir / "results.json"
    if results.exists():
        doc = json.loads(results.read_text())
        if doc.get("status") == "completed":
            return doc
        raise SystemExit(f"{run_dir} holds an unfinished run: resume it (python -m cl_vit.run resume={run_dir}) or remove it")
    return run(_compose(overrides), run_dir)


def head_accuracies(doc: dict) -> dict[str, dict[str, float]]:
    """``{head: {"overall": acc, "many": ..., "medium": ..., "few": ...}}`` from the stored final confusions."""
    groups = shot_groups(doc["class_counts"])
    last = doc["completed_experiences"] - 1
    out = {}
    for head in sorted({c["head"] for c in doc["confusion"]}):
        rows = [np.asarray(c["entries"]).reshape(-1, 3) for c in doc["confusion"]
                if c["head"] == head and c["trained_up_to"] == last]
        entries = np.concatenate(rows)
        out[head] = {"overall": M.confusion_accuracy(entries), **M.shot_group_accuracy(entries, groups)}
    return out


def table(rows: dict[str, list[dict[str, float]]]) -> str:
    lines = ["| model | overall | many | medium | few |", "| --- | --- | --- | --- | --- |"]
    for name, per_seed in rows.items():
        cells = []
        for key in ("overall", *GROUPS):
            v = 100 * np.array([s[key] for s in per_seed])
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cl_vit.experiments.deit_lt_digits", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/deit-lt-digits"))
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. trainer.max_epochs=2")
    args = parser.parse_args(argv)
    common = ["logger=none", *args.overrides]
    rows: dict[str, list[dict[str, float]]] = {
        "teacher: ResNet-32, LDAM-DRW + SAM": [],
        "student without distillation: ViT-Micro": [],
        "DeiT-LT student (mean of CLS and DIST)": [],
        "DeiT-LT student, CLS head": [],
        "DeiT-LT student, DIST head": [],
    }
    names = list(rows)
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        teacher_dir = base / "teacher"
        teacher = run_once(teacher_dir, ["experiment=teacher-digits-lt", f"seed={seed}", *common])
        plain = run_once(base / "no-distillation", ["experiment=deit-lt-digits-lt", f"seed={seed}", "model.distilled=false",
                                                    "strategy.deit_lt.distillation=none", *common])
        student = run_once(base / "deit-lt", ["experiment=deit-lt-digits-lt", f"seed={seed}",
                                              f"strategy.deit_lt.teacher={teacher_dir.resolve()}", *common])
        rows[names[0]].append(head_accuracies(teacher)["main"])
        rows[names[1]].append(head_accuracies(plain)["main"])
        heads = head_accuracies(student)
        rows[names[2]].append(heads["main"])
        rows[names[3]].append(heads["cls"])
        rows[names[4]].append(heads["dist"])
    text = table(rows)
    summary = {"seeds": args.seeds, "overrides": args.overrides, "table": text, "per_seed": rows,
               "shot_groups": "training images per class: many > 100, medium 20-100, few < 20"}
    atomic_write_json(args.out / "summary.json", summary)
    print(text)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
