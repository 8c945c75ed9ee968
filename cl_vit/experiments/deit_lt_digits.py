"""DeiT-LT over several seeds: the teacher alone, the student without distillation, the DeiT-LT student.

    python -m cl_vit.experiments.deit_lt_digits --seeds 0 1 2 --out runs/deit-lt-digits
    python -m cl_vit.experiments.deit_lt_digits --setting fmnist-regime --seeds 0 1 2 --out runs/deit-lt-fmnist-regime

Per seed, three runs of ``python -m cl_vit.run`` (in this process, same configs). ``--setting digits`` (default):

1. ``experiment=teacher-digits-lt``: ResNet-32, LDAM + DRW, SAM (rho 0.8);
2. ``experiment=deit-lt-digits-lt model.distilled=false strategy.deit_lt.distillation=none``: the same ViT-Micro
   without DIST token, same augmentation and schedule, cross-entropy (class-weighted in the DRW phase, as DeiT-LT's
   main.py trains a student without distillation);
3. ``experiment=deit-lt-digits-lt strategy.deit_lt.teacher=<run 1>``: the DeiT-LT student (mean of the CLS and DIST
   heads; the CLS-only and DIST-only rows beside it).

``--setting fmnist-regime`` (docs/miniatures.md, "DeiT-LT in its regime"): ``experiment=teacher-fmnist-lt-regime``,
and ``experiment=deit-lt-fmnist-lt-regime`` twice: with ``strategy.deit_lt.distillation=none`` (the same two-token
student, its DIST head learning the labels, so the pair differs only in the teacher) and with the seed's teacher.
Both students also get :mod:`cl_vit.experiments.deit_lt_probe`'s numbers (agreement with the teacher, copied
mistakes), and the shot groups are the runs' own (DeiT-LT's index cut-offs).

Prints a markdown table of test accuracy (%), mean and standard deviation over the seeds, overall and per shot group
(digits: training images per class, many > 100, medium 20-100, few < 20), and writes it with the per-seed numbers to
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
#: per setting: the teacher's and the students' experiments, the twin's overrides, whether the twin names the teacher
#: (the probe's control) and the shot groups (``count``: training images per class; ``run``: results.json's own)
SETTINGS = {
    "digits": dict(teacher="teacher-digits-lt", student="deit-lt-digits-lt", twin_dir="no-distillation",
                   twin=["model.distilled=false", "strategy.deit_lt.distillation=none"], probe=False, groups="count"),
    "fmnist-regime": dict(teacher="teacher-fmnist-lt-regime", student="deit-lt-fmnist-lt-regime", twin_dir="no-teacher",
                          twin=["strategy.deit_lt.distillation=none"], probe=True, groups="run"),
}


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


def head_accuracies(doc: dict, groups: str = "count") -> dict[str, dict[str, float]]:
    """``{head: {"overall": acc, "many": ..., "medium": ..., "few": ...}}`` from the stored final confusions; shot
    groups by training count (``count``) or the run's own definition (``run``: results.json ``shot_definition``)."""
    if groups == "run":
        groups = doc["shot_groups"][doc["shot_definition"]]["groups"]
    else:
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


def probe_numbers(run_dir: Path) -> dict[str, float]:
    """deit_lt_probe's overall numbers of a student run: each head's agreement with the teacher, the DIST head's
    copies of the teacher's mistakes (%)."""
    from cl_vit.experiments import deit_lt_probe

    s = deit_lt_probe.summary(deit_lt_probe.predictions(run_dir))
    return {"cls_agree": s["cls/all"]["agree"], "dist_agree": s["dist/all"]["agree"],
            "dist_copies": s["dist/all"]["copies"], "teacher_acc": s["teacher/all"]["acc"]}


def probe_table(probes: dict[str, list[dict[str, float]]]) -> str:
    keys = (("cls_agree", "CLS agrees with the teacher"), ("dist_agree", "DIST agrees with the teacher"),
            ("dist_copies", "DIST copies the teacher's mistakes"))
    lines = ["| student | " + " | ".join(k[1] for k in keys) + " |", "| --- |" + " ---: |" * len(keys)]
    for name, per_seed in probes.items():
        cells = []
        for key, _ in keys:
            v = np.array([p[key] for p in per_seed])
            per = " / ".join(f"{x:.1f}" for x in v)
            cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f} ({per})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m cl_vit.experiments.deit_lt_digits", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/deit-lt-digits"))
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="digits",
                        help="digits: the digits-lt miniature; fmnist-regime: Fashion-MNIST in DeiT-LT's regime")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run, e.g. trainer.max_epochs=2")
    args = parser.parse_args(argv)
    common = ["logger=none", *args.overrides]
    setting = SETTINGS[args.setting]
    twin_name = ("student without distillation: ViT-Micro" if args.setting == "digits"
                 else "student without a teacher (mean of CLS and DIST)")
    rows: dict[str, list[dict[str, float]]] = {"teacher: ResNet-32, LDAM-DRW + SAM": [], twin_name: []}
    if setting["probe"]:
        rows.update({"student without a teacher, CLS head": [], "student without a teacher, DIST head": []})
    rows.update({"DeiT-LT student (mean of CLS and DIST)": [], "DeiT-LT student, CLS head": [],
                 "DeiT-LT student, DIST head": []})
    probes: dict[str, list[dict[str, float]]] = {"student without a teacher": [], "DeiT-LT student": []}
    for seed in args.seeds:
        base = args.out / f"seed{seed}"
        teacher_dir = base / "teacher"
        named = f"strategy.deit_lt.teacher={teacher_dir.resolve()}"
        teacher = run_once(teacher_dir, [f"experiment={setting['teacher']}", f"seed={seed}", *common])
        twin_dir, student_dir = base / setting["twin_dir"], base / "deit-lt"
        plain = run_once(twin_dir, [f"experiment={setting['student']}", f"seed={seed}", *setting["twin"],
                                    *([named] if setting["probe"] else []), *common])
        student = run_once(student_dir, [f"experiment={setting['student']}", f"seed={seed}", named, *common])
        groups = setting["groups"]
        rows["teacher: ResNet-32, LDAM-DRW + SAM"].append(head_accuracies(teacher, groups)["main"])
        twin_heads = head_accuracies(plain, groups)
        rows[twin_name].append(twin_heads["main"])
        if setting["probe"]:
            rows["student without a teacher, CLS head"].append(twin_heads["cls"])
            rows["student without a teacher, DIST head"].append(twin_heads["dist"])
            probes["student without a teacher"].append(probe_numbers(twin_dir))
            probes["DeiT-LT student"].append(probe_numbers(student_dir))
        heads = head_accuracies(student, groups)
        rows["DeiT-LT student (mean of CLS and DIST)"].append(heads["main"])
        rows["DeiT-LT student, CLS head"].append(heads["cls"])
        rows["DeiT-LT student, DIST head"].append(heads["dist"])
    text = table(rows)
    if setting["probe"]:
        probes_text = probe_table(probes)
        text += "\n\nOn the test set, % (mean ± std; seeds " + ", ".join(map(str, args.seeds)) + "):\n\n" + probes_text
    summary = {"seeds": args.seeds, "setting": args.setting, "overrides": args.overrides, "table": text,
               "per_seed": rows, "shot_groups": "training images per class: many > 100, medium 20-100, few < 20"
               if setting["groups"] == "count" else "the runs' own (results.json shot_definition)"}
    if setting["probe"]:
        summary["probe"] = probes
    atomic_write_json(args.out / "summary.json", summary)
    print(text)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
