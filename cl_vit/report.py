"""Readable tables of runs: the end-of-run summary (accuracy matrix and headline metrics) and the stream."""
from __future__ import annotations

from pathlib import Path

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
    wall = doc.get("wall_time", {}).get("total")
    if wall is not None:
        parts += ["", f"wall time: {wall:.1f} s"]
    if run_dir is not None:
        parts += [f"run directory: {run_dir}"]
    return "\n".join(parts)


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
