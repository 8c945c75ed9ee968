"""Readable tables of runs: the end-of-run summary (accuracy matrix and headline metrics), the stream, and the
side-by-side report of many runs::

    python -m cl_vit.report RUN_DIR [RUN_DIR ...]        # Markdown; runs differing only by seed -> mean ± std
    python -m cl_vit.report multirun/2025-01-01/12-00-00 # a Hydra multirun folder: every job in it
    python -m cl_vit.report RUN_DIR ... --csv            # CSV for scripts and spreadsheets (every column)
    python -m cl_vit.report RUN_DIR ... --latex --columns A_N,"F max"   # a booktabs table for the paper

Runs that never started (refused at config time, dry runs) are left out unless ``--all``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

METRIC_LABELS = {
    "final_average_accuracy": "A_N (final average accuracy, mean over experiences)",
    "global_accuracy": "global accuracy (all seen test samples)",
    "average_incremental_accuracy": "average incremental accuracy (mean of A_t)",
    "forgetting_max": "forgetting, max-based (Chaudhry et al. 2018)",
    "forgetting_first_last": "forgetting, first-minus-last (Avalanche)",
    "forgetting_consecutive": "forgetting, consecutive-drop (CODA-Prompt)",
    "bwt": "backward transfer (BWT)",
}


def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:6.2f}"


def format_matrix(matrix, a_t=None) -> str:
    R = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    if R.size == 0:
        return "(no experience evaluated yet)"
    n_cols = R.shape[1]
    head = "trained up to │" + "".join(f"  exp {j + 1:<3}" for j in range(n_cols)) + ("  │     A_t" if a_t is not None else "")
    lines = [head, "─" * len(head)]
    for i, row in enumerate(R):
        cells = "".join(f"  {_pct(v):>7}" for v in row)
        tail = f"  │ {_pct(a_t[i])}" if a_t is not None else ""
        lines.append(f"exp {i + 1:<10}│{cells}{tail}")
    return "\n".join(lines)


def format_metrics(metrics: dict) -> str:
    width = max(len(v) for v in METRIC_LABELS.values())
    lines = [f"{METRIC_LABELS.get(k, k):<{width}}  {_pct(v)}" for k, v in metrics.items() if k in METRIC_LABELS]
    lines += [f"{k:<{width}}  {_pct(v)}" for k, v in metrics.items() if k not in METRIC_LABELS]
    return "\n".join(lines)


def format_results(doc: dict, run_dir: str | Path | None = None) -> str:
    """The end-of-run summary: accuracy matrix (%), headline metrics (%), wall time and the run directory."""
    parts = [
        f"\n{doc.get('benchmark', '?')} · {doc.get('model', '?')} · {'+'.join(doc.get('strategy', []))} · "
        f"seed {doc.get('seed', '?')} · {doc.get('status', '?')}",
        "",
        "Accuracy matrix (%), rows: trained up to experience i, columns: evaluated experience j",
        format_matrix(doc.get("accuracy_matrix", []), doc.get("average_accuracy_per_experience")),
        "",
        "Metrics (%)",
        format_metrics(doc.get("metrics", {})),
    ]
    for head, h in doc.get("heads", {}).items():
        parts += ["", f"head {head}: A_N {_pct(h['metrics'].get('final_average_accuracy'))}"]
    local = (doc.get("task_incremental") or {}).get("metrics")
    if local:
        parts += ["", "Task-incremental (local: each task's own classes, task id given) (%)", format_metrics(local)]
    parts += format_epoch_selection(doc)
    wall = doc.get("wall_time", {}).get("total")
    if wall is not None:
        parts += ["", f"wall time: {wall:.1f} s"]
    if run_dir is not None:
        parts += [f"run directory: {run_dir}"]
    return "\n".join(parts)


def format_epoch_selection(doc: dict) -> list[str]:
    """The last experience's per-epoch test numbers (%): final epoch, and best epoch labelled as selected on the
    test set."""
    sel = (doc.get("epoch_selection") or {}).get("experiences") or {}
    if not sel:
        return []
    s = sel[max(sel, key=int)]
    lines = ["", f"Per-epoch test accuracy (%), overall / many / medium / few: last epoch {s['last_epoch']}; best epoch "
                 f"{s['best_epoch']} of {s['epochs_evaluated']} evaluated, SELECTED ON THE TEST SET (as DeiT-LT reports)"]
    for head in s["last"]:
        row = lambda m: " / ".join(_pct(m.get(k)).strip() for k in ("overall", "many", "medium", "few"))  # noqa: E731
        lines.append(f"  {head:<5} last {row(s['last'][head])}   best {row(s['best'].get(head, {}))}")
    return lines


def format_stream(stream: dict) -> str:
    lines = [f"{'experience':<11} {'n_train':>8} {'n_test':>7}  classes"]
    for k, e in enumerate(stream["experiences"]):
        cls = e["classes"]
        shown = str(cls) if len(cls) <= 12 else f"[{', '.join(map(str, cls[:12]))}, ... ({len(cls)})]"
        lines.append(f"{k + 1:<11} {e['n_train']:>8} {e.get('n_test', '—'):>7}  {shown}")
    for k, e in enumerate(stream.get("eval_experiences", [])):
        lines.append(f"eval {k + 1:<6} {'':>8} {e['n_test']:>7}  {e['classes']}")
    lines.append(f"model {stream.get('model', '?')}: {stream['n_params']:,} parameters")
    return "\n".join(lines)


def format_model(net, depth: int = 2, optimizer=None) -> str:
    """What ``dry_run=true`` shows of a network: its module tree down to ``depth`` (a container of more than three
    modules of one class, such as a ViT's blocks, as one line and its first member), parameters and trainable
    parameters per module; then the optimiser's parameter groups (learning rate, weight decay, tensors, a few names)."""
    rows = []

    def count(m):
        ps = list(m.parameters())
        return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)

    def walk(m, name, level):
        total, trainable = count(m)
        if not total and level:  # dropout, identity: nothing to train or count
            return
        rows.append((f"{'  ' * level}{name}", type(m).__name__, total, trainable))
        children = list(m.named_children())
        if level >= depth or not children:
            return
        kinds = {type(c) for _, c in children}
        if len(children) > 3 and len(kinds) == 1:  # 12 blocks: one line for all, the first one opened
            rows.append((f"{'  ' * (level + 1)}[{children[0][0]}..{children[-1][0]}]",
                         f"{len(children)} x {type(children[0][1]).__name__}", *count(m)))
            walk(children[0][1], children[0][0], level + 2)
            return
        for child_name, child in children:
            walk(child, child_name, level + 1)

    walk(net, "(model)", 0)
    width = max(len(r[0]) for r in rows) + 2
    kind = max(len(r[1]) for r in rows) + 2
    lines = [f"{'module':<{width}}{'class':<{kind}}{'params':>12}{'trainable':>12}"]
    lines += [f"{n:<{width}}{c:<{kind}}{t:>12,}{g:>12,}" for n, c, t, g in rows]
    if optimizer is not None:
        names = {id(p): n for n, p in net.named_parameters()}
        lines.append(f"optimizer {type(optimizer).__name__}, {len(optimizer.param_groups)} parameter groups (as built "
                     "before the strategies' before_experience hooks, which may freeze parameters):")
        for i, g in enumerate(optimizer.param_groups):
            params = [p for p in g["params"] if p.requires_grad]
            shown = [names.get(id(p), "?") for p in params[:3]]
            more = f", ... ({len(params)} tensors)" if len(params) > 3 else ""
            lines.append(f"  group {i}: lr {g['lr']:.3g}, weight_decay {g.get('weight_decay', 0)}, "
                         f"{sum(p.numel() for p in params):,} trainable parameters: {', '.join(shown)}{more}")
    return "\n".join(lines)


# -- the side-by-side report of runs: python -m cl_vit.report RUN_DIR [RUN_DIR ...] -------------------------------

#: report columns: summary key -> (Markdown header, CSV header)
COLUMNS = {
    "final_average_accuracy": ("A_N", "final_average_accuracy"),
    "global_accuracy": ("global acc.", "global_accuracy"),
    "average_incremental_accuracy": ("avg. inc. acc.", "average_incremental_accuracy"),
    "forgetting_max": ("F max", "forgetting_max"),
    "forgetting_first_last": ("F first-last", "forgetting_first_last"),
    "forgetting_consecutive": ("F consec.", "forgetting_consecutive"),
    "bwt": ("BWT", "bwt"),
    "many_shot_accuracy": ("many", "many_shot_accuracy"),
    "medium_shot_accuracy": ("medium", "medium_shot_accuracy"),
    "few_shot_accuracy": ("few", "few_shot_accuracy"),
    "task_incremental_accuracy": ("local A_N", "task_incremental_accuracy"),
    "task_incremental_forgetting": ("local F consec.", "task_incremental_forgetting"),
    "wall_time": ("wall time", "wall_time_s"),
    # cl_vit.cost: the largest trainable count of an experience, the last total, the largest peak memory
    "params_trainable": ("trainable", "params_trainable_max"),
    "params_total": ("params", "params_total"),
    "peak_memory": ("peak mem.", "peak_memory_bytes"),
}
SHOT_COLUMNS = ("many_shot_accuracy", "medium_shot_accuracy", "few_shot_accuracy")
#: shown only when some run has them
OPTIONAL_COLUMNS = (*SHOT_COLUMNS, "task_incremental_accuracy", "task_incremental_forgetting")


def _duration(s: float | None) -> str:
    if s is None:
        return "—"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else f"{int(n)}"


def summary_rows(groups, head: str = "main", shots: str | None = None) -> list[dict]:
    """One row per group of runs (``cl_vit.runs.group_runs``): identity columns, then every ``COLUMNS`` key as
    ``(mean, std)`` (std None for a single run, both None where undefined)."""
    rows = []
    for g in groups:
        row = {
            "benchmark": g.benchmark,
            "model": g.model,
            "strategy": g.strategy,
            "settings": ", ".join(f"{k}={v}" for k, v in g.settings.items()),
            "seeds": ",".join(str(s) for s in g.seeds),
            "runs": len(g.runs),
            "status": g.state,
            "paths": [str(r.path) for r in g.runs],
        }
        for key in COLUMNS:
            row[key] = g.mean_std(key, head, shots)
        rows.append(row)
    return rows


def _cell(key: str, mean_std) -> str:
    mean, std = mean_std
    if mean is None:
        return "—"
    if key == "wall_time":
        return _duration(mean) + (f" ± {_duration(std)}" if std is not None else "")
    if key in ("params_trainable", "params_total"):
        return _count(mean)
    if key == "peak_memory":
        return f"{mean / 2**30:.2f} GiB" if mean >= 2**30 else f"{mean / 2**20:.0f} MiB"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _columns(rows: list[dict], chosen: Sequence[str] | None = None) -> list[str]:
    """``chosen`` (keys of ``COLUMNS``), else every column; shot-group and task-incremental columns only when some
    run has them."""
    if chosen:
        return list(chosen)
    return [k for k in COLUMNS if k not in OPTIONAL_COLUMNS or any(r[k][0] is not None for r in rows)]


def parse_columns(spec: str) -> list[str]:
    """``--columns A_N,"F max",wall_time``: Markdown headers or CSV names (case-insensitive) -> ``COLUMNS`` keys."""
    import difflib

    from cl_vit.errors import UserError

    names = {n.lower(): key for key, (md, csv_name) in COLUMNS.items() for n in (key, md, csv_name)}
    out = []
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        if name.lower() not in names:
            close = difflib.get_close_matches(name.lower(), list(names), n=3, cutoff=0.5)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise UserError(f"--columns: {name!r} is not a column: {hint}columns are "
                            f"{', '.join(md for md, _ in COLUMNS.values())} (or their CSV names)")
        out.append(names[name.lower()])
    return out


#: columns where lower is better (the LaTeX table bolds the best entry of every accuracy and forgetting column)
LOWER_IS_BETTER = ("forgetting_max", "forgetting_first_last", "forgetting_consecutive", "task_incremental_forgetting")
#: cost columns: no best entry is marked
COST_COLUMNS = ("wall_time", "params_trainable", "params_total", "peak_memory")


def format_markdown(rows: list[dict], legend: str = "", columns: Sequence[str] | None = None) -> str:
    ident = ["benchmark", "model", "strategy"] + (["settings"] if any(r["settings"] for r in rows) else [])
    ident += ["seeds", "runs", "status"]
    keys = _columns(rows, columns)
    header = ident + [COLUMNS[k][0] for k in keys]
    align = "|".join(" --- " if h in ident else " ---: " for h in header)
    lines = ["| " + " | ".join(header) + " |", f"|{align}|"]
    for r in rows:
        cells = [str(r[c]).replace("|", "\\|") for c in ident] + [_cell(k, r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n{legend}" if legend else "")


def format_csv(rows: list[dict]) -> str:
    """Machine-readable: fractions (not %), seconds, ``<column>_std`` beside every value, the run directories."""
    import csv
    import io

    keys = _columns(rows)
    header = ["benchmark", "model", "strategy", "settings", "seeds", "runs", "status"]
    for k in keys:
        header += [COLUMNS[k][1], COLUMNS[k][1] + "_std"]
    header.append("run_dirs")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    fmt = lambda v: "" if v is None else repr(float(v))  # noqa: E731
    for r in rows:
        line = [r["benchmark"], r["model"], r["strategy"], r["settings"], r["seeds"], r["runs"], r["status"]]
        for k in keys:
            line += [fmt(r[k][0]), fmt(r[k][1])]
        line.append(";".join(r["paths"]))
        w.writerow(line)
    return buf.getvalue()


#: LaTeX's special characters in text
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}"}


def _latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(c, c) for c in text)


def format_latex(rows: list[dict], columns: Sequence[str] | None = None, caption: str = "") -> str:
    """A booktabs table (``\\usepackage{booktabs}``): mean ± std in % (as the Markdown table), the best entry of every
    accuracy and forgetting column in bold (highest accuracy and BWT, lowest forgetting; ties all bold); benchmark
    and model columns only where the rows differ in them."""
    keys = _columns(rows, columns)
    ident = [c for c in ("benchmark", "model") if len({r[c] for r in rows}) > 1] + ["strategy"]
    ident += ["settings"] if any(r["settings"] for r in rows) else []
    best = {}
    for k in keys:
        shown = [round(100 * r[k][0], 2) for r in rows if r[k][0] is not None]
        if k not in COST_COLUMNS and len(shown) > 1:
            best[k] = min(shown) if k in LOWER_IS_BETTER else max(shown)

    def cell(r, k):
        text = _cell(k, r[k]).replace("—", "--")
        if r[k][0] is None:
            return text
        text = _latex_escape(text).replace(" ± ", r" $\pm$ ")
        return r"\textbf{" + text + "}" if k in best and round(100 * r[k][0], 2) == best[k] else text

    lines = [r"\begin{tabular}{" + "l" * len(ident) + "r" * len(keys) + "}", r"\toprule",
             " & ".join(_latex_escape(h) for h in [*ident, *(COLUMNS[k][0] for k in keys)]) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join([*(_latex_escape(str(r[c])) for c in ident), *(cell(r, k) for k in keys)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if caption:
        lines.append("% " + caption)
    return "\n".join(lines)


def legend(runs, head: str = "main", shots: str | None = None, grouped: bool = True) -> str:
    parts = ["Accuracies and forgettings in %" + (", mean ± sample standard deviation over seeds" if grouped else "")
             + ". A_N: mean accuracy over the experiences after the last; global acc.: over all seen test samples; "
               "avg. inc. acc.: mean of A_t; forgetting F: max-based (Chaudhry et al. 2018), first-minus-last "
               "(Avalanche), consecutive-drop (CODA-Prompt); BWT (GEM). Cost: trainable = most parameters trained in "
               "one experience, params = parameters after the last, peak mem. = largest GPU peak of an experience "
               "(host peak RSS on CPU runs)."]
    if head == "main" and any(r.results.get("task_incremental") for r in runs):
        parts.append("local: task-incremental accuracy (each task's own classes, the task id given; CODA-Prompt's "
                     "local accuracy) and its consecutive-drop forgetting.")
    found = next((g for r in runs if (g := r.shot_groups(shots)) is not None), None)
    if found is not None and found.definition:
        parts.append(f"Shot groups ({found.kind}): {found.definition}.")
    if head != "main":
        parts.append(f"Head: {head}.")
    return " ".join(parts)


def markdown_table(runs, group: bool = True, head: str = "main", shots: str | None = None,
                   same: Sequence[str] = ()) -> str:
    """The report of runs (``Run`` objects, or paths of run directories / Hydra multirun folders) as Markdown."""
    from cl_vit.runs import Run, group_runs, load_runs

    if isinstance(runs, (str, Path)) or not all(isinstance(r, Run) for r in runs):
        runs = load_runs(runs)
    return format_markdown(summary_rows(group_runs(runs, by_seed=group, same=same), head, shots),
                           legend(runs, head, shots, group))


def shot_table(runs, shots: str | None = None) -> str:
    """Markdown: overall and per-shot-group accuracy (%) of every head of every long-tailed run."""
    lines = ["| run | head | overall | many | medium | few |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in runs:
        if r.shot_groups(shots) is None:
            continue
        for h in r.head_names:
            acc = r.shot_accuracy(h, shots)
            overall = r.head(h).metrics.get("global_accuracy")
            lines.append(f"| {r.label} | {h} | {_pct(overall).strip()} | "
                         + " | ".join(_pct(acc.get(g)).strip() for g in ("many", "medium", "few")) + " |")
    return "\n".join(lines)


# -- the end of a run ----------------------------------------------------------------------------------------------


def hparams_of(run) -> dict:
    """The run's config flattened to TensorBoard hparams values (numbers, strings, booleans)."""
    from cl_vit.runs import flatten_config

    out = {"strategy": run.strategy}
    for k, v in flatten_config(run.config).items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
    return out


def log_hparams(writer, run, step: int) -> dict:
    """Final metrics as scalars ``final/<key>`` at ``step`` and the hparams plugin's records of the run in the same
    event stream, so that TensorBoard's HPARAMS tab lists the run's config next to its results."""
    from torch.utils.tensorboard.summary import hparams

    metrics = {f"final/{k}": v for k, v in run.summary().items() if v is not None}
    for k, v in metrics.items():
        writer.add_scalar(k, v, step)
    file_writer = writer._get_file_writer()
    for summary in hparams(hparams_of(run), metrics) if file_writer is not None else ():
        file_writer.add_summary(summary)
    return metrics


def finish_run(run_dir: str | Path, writer=None) -> list[Path]:
    """End of a run: its figures as PNG files in the run directory and, given a TensorBoard ``SummaryWriter``, as
    images ``figures/<name>`` together with the hyper-parameters and final metrics. Returns the PNG paths."""
    from lightning.pytorch.utilities import rank_zero_only

    from cl_vit import plots
    from cl_vit.runs import load_run

    if rank_zero_only.rank != 0:  # every DDP rank runs the stream; one draws
        return []
    run = load_run(run_dir)
    step = run.completed_experiences  # the last experience's number (from 1, as everywhere it is shown)
    paths = []
    for name, fig in plots.run_figures(run).items():
        paths.append(plots.save_png(fig, run.path / f"{name}.png"))
        if writer is not None:
            writer.add_figure(f"figures/{name}", fig, step)
    if writer is not None:
        log_hparams(writer, run, step)
        writer.flush()
    return paths


def main(argv: list[str] | None = None) -> int:
    import argparse

    from cl_vit.errors import UserError, report_error
    from cl_vit.runs import group_runs, load_runs

    p = argparse.ArgumentParser(
        prog="python -m cl_vit.report",
        description="Side-by-side table of cl_vit runs. Runs that differ only by seed are grouped (mean ± sample "
                    "std); runs that did not finish are shown with their state.",
    )
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories or Hydra multirun folders")
    p.add_argument("--csv", action="store_true", help="CSV (fractions, seconds, a _std column per value; every column)")
    p.add_argument("--latex", action="store_true",
                   help="a booktabs LaTeX table: mean ± std, the best entry of each accuracy/forgetting column in bold")
    p.add_argument("--columns", default=None, metavar="A,B,...",
                   help="the metric columns of the Markdown and LaTeX tables, in order: headers (A_N, \"F max\") or CSV "
                        "names (final_average_accuracy); the CSV keeps every column")
    p.add_argument("--all", action="store_true",
                   help="also list runs that never started (refused at config time, dry runs)")
    p.add_argument("--no-group", action="store_true", help="one row per run instead of grouping seeds")
    p.add_argument("--head", default="main", help="report this head's accuracies (e.g. cls, dist of DeiT-LT runs)")
    p.add_argument("--shots", default=None, choices=("count", "index"),
                   help="shot-group definition: count (training images) or index (DeiT-LT's class-index cut-offs); "
                        "default: index where the benchmark has official cut-offs, else count")
    p.add_argument("--same", action="append", default=[], metavar="KEY",
                   help="a config key whose values change with the seed by design (e.g. strategy.deit_lt.teacher, a "
                        "per-seed teacher run): runs that differ in it are still seeds of one setting; repeatable")
    args = p.parse_args(argv)
    try:
        columns = parse_columns(args.columns) if args.columns else None
        runs = load_runs(args.paths)
        started = runs if args.all else [r for r in runs if r.state != "not started"]
        rows = summary_rows(group_runs(started, by_seed=not args.no_group, same=args.same), args.head, args.shots)
    except UserError as e:
        return report_error(e)
    left_out = len(runs) - len(started)
    note = f"{left_out} run{'s' * (left_out != 1)} that never started (refused or dry runs) left out: --all lists them"
    if args.csv:
        sys.stdout.write(format_csv(rows))
    elif args.latex:
        print(format_latex(rows, columns, legend(started, args.head, args.shots, not args.no_group)))
    else:
        print(format_markdown(rows, legend(started, args.head, args.shots, not args.no_group), columns))
    if left_out:
        print(note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
