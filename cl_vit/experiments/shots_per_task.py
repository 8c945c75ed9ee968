"""Many / medium / few accuracy after every experience, mean over seeds (docs/miniatures.md, "Long-tailed CIL").

    python -m cl_vit.experiments.shots_per_task RUN_DIR [RUN_DIR ...] [--shots count|index]

One row per setting (the report's grouping: runs that differ only by seed), one column per experience: the accuracy
on the test images of the seen classes of each shot group after that experience (results.json
``shot_accuracy_per_experience``), in %, as ``many / medium / few``; a group with no seen class yet is ``-``.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from cl_vit.errors import UserError, report_error

GROUPS = ("many", "medium", "few")


def shot_rows(run, kind: str, head: str = "main") -> list[dict]:
    """Per experience, ``{group: accuracy}`` of one run (groups without a seen class are absent)."""
    per = run.results.get("shot_accuracy_per_experience", {}).get(head, {}).get(kind)
    if per is None:
        raise UserError(f"{run.path}: results.json has no {kind!r} shot accuracies per experience (a long-tailed "
                        "benchmark records them; choose --shots from the run's shot_groups)")
    return per


def table(groups, kind: str | None = None) -> str:
    lines = []
    n = max(len(shot_rows(g.runs[0], kind or g.runs[0].default_shot_kind)) for g in groups)
    lines.append("| benchmark | strategy | seeds | " + " | ".join(f"after {k + 1}" for k in range(n)) + " |")
    lines.append("| --- | --- | --- |" + " ---: |" * n)
    for g in groups:
        rows = [shot_rows(r, kind or r.default_shot_kind) for r in g.runs]
        cells = []
        for k in range(n):
            parts = []
            for group in GROUPS:
                values = [row[k][group] for row in rows if k < len(row) and group in row[k]]
                parts.append(f"{100 * np.mean(values):.1f}" if values else "-")
            cells.append(" / ".join(parts))
        seeds = ",".join(str(s) for s in g.seeds)
        lines.append(f"| {g.benchmark} | {g.strategy} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from cl_vit.runs import group_runs, load_runs

    parser = argparse.ArgumentParser(prog="python -m cl_vit.experiments.shots_per_task", description=__doc__.split(
        "\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--shots", choices=("count", "index"), default=None,
                        help="shot-group definition (default: each run's own)")
    args = parser.parse_args(argv)
    try:
        groups = [g for g in group_runs(load_runs(args.run_dirs)) if g.finished]
        if not groups:
            raise UserError(f"no finished run under {' '.join(args.run_dirs)}")
        print(table(groups, args.shots))
    except UserError as e:
        return report_error(e)
    print("\nAccuracy in % on the test images of the seen classes of each shot group (many / medium / few), "
          "mean over seeds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
