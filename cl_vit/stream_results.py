"""The results of a stream: every confusion matrix measured along it, and results.json derived from them.

``StreamResults`` is what the runner records after each experience and what results.json is written from; every
number in results.json is a function of the stored confusions (``cl_vit.metrics``). Writing it to disk is
``cl_vit.rundir``'s; reading a finished run back is ``cl_vit.runs``'.
"""
from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np

from cl_vit import metrics as M
from cl_vit.cost import summarize as summarize_cost

if TYPE_CHECKING:  # results need no Avalanche import
    from cl_vit.streams import StreamInfo

SCHEMA_VERSION = 1
#: the confusions of the task-incremental predictions (the task id given; CODA-Prompt's "local" accuracy): stored
#: beside the heads' and reported under results.json "task_incremental", not as a head of the model
LOCAL = "local"

def versions() -> dict:
    return dict(_versions())


@functools.lru_cache(maxsize=None)
def _versions() -> dict:  # reading package metadata takes tens of ms; results.json is written every experience
    out = {}
    for pkg in ("torch", "timm", "lightning", "avalanche-lib", "torchmetrics", "albumentations", "hydra-core"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _clean(x):
    """NaN -> None for JSON (results.json never holds NaN)."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


EPOCH_SELECTION = ("best epoch: the epoch (of those evaluated, every epoch_eval epochs) with the highest overall test "
             "accuracy of the main head (a DeiT-LT student: the mean of CLS and DIST), every head's numbers taken at "
             "that epoch. Selected on the test set, as DeiT-LT's reported numbers are (main.py keeps the best test "
             "accuracy over epochs): not a held-out selection. last: the final epoch.")


@dataclass
class StreamResults:
    """Everything measured along a stream; the source of results.json."""

    info: StreamInfo
    #: head -> {(trained_up_to, evaluated): sparse confusion}; head "main" is the model's output
    confusions: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=lambda: {"main": {}})
    wall_time: list[float] = field(default_factory=list)
    #: per experience: parameters, strategy state and peak memory (cl_vit.cost)
    cost: list[dict | None] = field(default_factory=list)
    completed: int = 0
    meta: dict = field(default_factory=dict)
    #: the process's resident memory after each experience (flat along a long stream: python -m cl_vit.bench
    #: memory); a resumed run continues the list from its own process
    rss_mib: list[float] = field(default_factory=list)
    #: experience -> per-epoch test numbers of its last and best epoch (cl_vit.epoch_eval.ShotGroupEpochEval.summary)
    epoch_selection: dict[int, dict] = field(default_factory=dict)
    #: per (head, i, j): the accuracy and the results.json entry, computed once; results.json is rewritten after
    #: every experience and holds O(experiences^2) confusions, so recomputing them all made a long stream slow down
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_rows(self) -> int:
        return len(self.info.train_classes)

    @property
    def n_cols(self) -> int:
        return len(self.info.eval_classes)

    def record(self, i: int, evaluation: dict[str, dict[int, np.ndarray]] | None, wall: float,
               cost: dict | None = None) -> None:
        for head, per_exp in (evaluation or {}).items():
            for j, entries in per_exp.items():
                self.confusions.setdefault(head, {})[(i, j)] = entries
                self._cache.pop((head, i, j), None)
        self.wall_time.append(float(wall))
        self.cost = self.cost[:i] + [None] * (i - len(self.cost)) + [cost]
        self.completed = i + 1

    def row(self, i: int) -> dict:
        """What experience ``i`` added (its evaluation and wall time): every checkpoint carries it, so that a damaged
        results.json is rebuilt from the checkpoints (``recover``)."""
        evaluation = {head: {j: entries for (r, j), entries in conf.items() if r == i}
                      for head, conf in self.confusions.items()}
        return {"evaluation": {h: e for h, e in evaluation.items() if e}, "wall_time": self.wall_time[i]}

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` experiences only (resume from an earlier checkpoint re-trains the rest)."""
        self.confusions = {h: {k: e for k, e in conf.items() if k[0] < n} for h, conf in self.confusions.items()}
        self._cache.clear()
        self.wall_time = self.wall_time[:n]
        self.rss_mib = self.rss_mib[:n]
        self.cost = self.cost[:n]
        self.completed = n

    def _cached(self, head: str, key: tuple[int, int]) -> tuple[float, dict]:
        got = self._cache.get((head, *key))
        if got is None:
            e = self.confusions[head][key]
            got = self._cache[(head, *key)] = (
                M.confusion_accuracy(e),
                {"head": head, "trained_up_to": key[0], "evaluated": key[1], "entries": e.tolist()})
        return got

    def accuracy_matrix(self, head: str = "main", upto: int | None = None) -> np.ndarray:
        """``R`` as ``metrics.accuracy_matrix`` gives it, each entry computed once."""
        rows = self.completed if upto is None else upto
        R = np.full((rows, self.n_cols), np.nan)
        for key in self.confusions.get(head, {}):
            if key[0] < rows:
                R[key] = self._cached(head, key)[0]
        return R

    def metrics(self, head: str = "main") -> dict:
        R = self.accuracy_matrix(head)
        if R.shape[0] == 0 or np.all(np.isnan(R)):
            return {k: None for k in M.METRIC_KEYS}
        evaluated = [i for i in range(R.shape[0]) if not np.all(np.isnan(R[i]))]
        last = evaluated[-1]
        conf = {k: v for k, v in self.confusions[head].items() if k[0] <= last}
        out = M.summarize(R[: last + 1], conf)
        return {k: _clean(v) for k, v in out.items()}

    def final_entries(self, head: str = "main") -> np.ndarray:
        """Pooled confusion of the last evaluated row (every seen test sample once)."""
        conf = self.confusions.get(head, {})
        if not conf:
            return np.zeros((0, 3), dtype=np.int64)
        return self.row_entries(head, max(i for i, _ in conf))

    def row_entries(self, head: str, row: int) -> np.ndarray:
        """Pooled confusion after training experience ``row`` (every test sample seen by then, once)."""
        parts = [e for (i, _), e in sorted(self.confusions.get(head, {}).items()) if i == row]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)

    def to_json(self, status: str) -> dict:
        R = self.accuracy_matrix()
        doc = {
            "schema_version": SCHEMA_VERSION,
            "status": status,
            "completed_experiences": self.completed,
            "n_experiences": self.n_rows,
            **self.meta,
            "class_order": self.info.class_order,
            "class_order_rule": self.info.class_order_rule,
            "class_names": self.info.class_names,
            "experiences": self.info.train_classes,
            "eval_experiences": self.info.eval_classes,
            "accuracy_matrix": [[_clean(float(v)) for v in row] for row in R],
            "average_accuracy_per_experience": [_clean(float(v)) for v in M.average_accuracy(R)] if len(R) else [],
            "metrics": self.metrics(),
            "heads": {},
            "wall_time": {"per_experience": self.wall_time, "total": float(sum(self.wall_time))},
            "rss_mib": {"per_experience": [round(v, 1) for v in self.rss_mib]},
            "cost": {"per_experience": self.cost, **summarize_cost(self.cost)},
            "versions": versions(),
            "confusion": [self._cached(head, key)[1] for head, conf in self.confusions.items() for key in sorted(conf)],
        }
        if self.meta.get("shot_groups"):
            doc.update(self.long_tail_results())
            kind = M.default_shot_kind(self.meta["shot_groups"])  # the flat keys: the official cut-offs if any
            doc["shot_definition"] = kind
            doc["metrics"].update({f"{g}_shot_accuracy": doc["shot_accuracy"].get("main", {}).get(kind, {}).get(g)
                                   for g in ("many", "medium", "few")})
        if self.epoch_selection:
            doc["epoch_selection"] = {"definition": EPOCH_SELECTION,
                                      "experiences": {str(i): v for i, v in sorted(self.epoch_selection.items())}}
        for head in self.confusions:
            if head != "main":
                Rh = self.accuracy_matrix(head)
                entry = {"accuracy_matrix": [[_clean(float(v)) for v in row] for row in Rh], "metrics": self.metrics(head)}
                if head == LOCAL:
                    doc["task_incremental"] = entry
                else:
                    doc["heads"][head] = entry
        return doc

    def long_tail_results(self) -> dict:
        """Shot-group accuracy of every head under every group definition in ``meta["shot_groups"]``, and the
        main head's per-class accuracy, from the last evaluated row (the classes seen so far)."""
        definitions = {name: d["groups"] for name, d in self.meta["shot_groups"].items()}
        shot = {head: {name: M.shot_group_accuracy(self.final_entries(head), groups)
                       for name, groups in definitions.items()}
                for head in self.confusions if head != LOCAL}
        per_class = M.per_class_accuracy(self.final_entries("main"), self.info.n_classes)
        # after each evaluated experience, over the classes seen by then (long-tailed CIL reports it per task)
        rows = {head: {i for i, _ in conf} for head, conf in self.confusions.items()}
        per_exp = {head: {name: [M.shot_group_accuracy(self.row_entries(head, i), groups) if i in rows[head] else None
                                 for i in range(self.completed)]
                          for name, groups in definitions.items()}
                   for head in self.confusions}
        return {"shot_accuracy": shot, "shot_accuracy_per_experience": per_exp,
                "per_class_accuracy": [_clean(float(v)) for v in per_class]}

    @classmethod
    def from_json(cls, doc: dict, info: StreamInfo) -> "StreamResults":
        res = cls(info=info, wall_time=list(doc["wall_time"]["per_experience"]),
                  completed=int(doc["completed_experiences"]),
                  rss_mib=list((doc.get("rss_mib") or {}).get("per_experience", [])),
                  cost=list((doc.get("cost") or {}).get("per_experience", [])))
        res.confusions = {}
        for c in doc.get("confusion", []):
            entries = np.asarray(c["entries"], dtype=np.int64).reshape(-1, 3)
            res.confusions.setdefault(c["head"], {})[(c["trained_up_to"], c["evaluated"])] = entries
        res.confusions.setdefault("main", {})
        res.epoch_selection = {int(i): v for i, v in (doc.get("epoch_selection") or {}).get("experiences", {}).items()}
        return res


def matrix_csv(R: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trained_up_to"] + [f"exp_{j + 1}" for j in range(R.shape[1])])  # numbered from 1, as shown
    for i, row in enumerate(R):
        w.writerow([f"exp_{i + 1}"] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buf.getvalue()


