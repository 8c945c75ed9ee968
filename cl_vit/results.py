"""The run directory: the unit of results.

Layout::

    RUN_DIR/
      config.yaml            the resolved config of the run
      stream.json            the protocol: classes and train/test sizes of every experience, parameter count
      results.json           schema-versioned results (rewritten after every experience, atomically)
      accuracy_matrix.csv    rows = trained up to experience i, columns = evaluated experience j
      checkpoints/exp_XXX.pt network, masks, strategy state and log step after experience XXX
      tensorboard/           TensorBoard events

Every file is written to a temporary file in the same folder and renamed into place, so a run killed at any moment
leaves each file either as it was or complete. ``load_run`` is the public way to read a run back.
"""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cl_vit import metrics as M
from cl_vit.streams import StreamInfo

SCHEMA_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def versions() -> dict:
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


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    config_path = property(lambda self: self.path / "config.yaml")
    results_path = property(lambda self: self.path / "results.json")
    stream_path = property(lambda self: self.path / "stream.json")
    matrix_csv_path = property(lambda self: self.path / "accuracy_matrix.csv")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")

    def checkpoint_path(self, i: int) -> Path:
        return self.checkpoint_dir / f"exp_{i:03d}.pt"

    def has_results(self) -> bool:
        return self.results_path.exists()

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def save_checkpoint(self, i: int, state: dict) -> Path:
        path = self.checkpoint_path(i)
        _atomic_write(path, lambda f: torch.save(state, f))
        return path

    def load_checkpoint(self, i: int) -> dict:
        return torch.load(self.checkpoint_path(i), map_location="cpu", weights_only=False)

    def read_results(self) -> dict | None:
        return json.loads(self.results_path.read_text()) if self.has_results() else None


@dataclass
class StreamResults:
    """Everything measured along a stream; the source of results.json."""

    info: StreamInfo
    #: head -> {(trained_up_to, evaluated): sparse confusion}; head "main" is the model's output
    confusions: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=lambda: {"main": {}})
    wall_time: list[float] = field(default_factory=list)
    completed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.info.train_classes)

    @property
    def n_cols(self) -> int:
        return len(self.info.eval_classes)

    def record(self, i: int, evaluation: dict[str, dict[int, np.ndarray]] | None, wall: float) -> None:
        for head, per_exp in (evaluation or {}).items():
            for j, entries in per_exp.items():
                self.confusions.setdefault(head, {})[(i, j)] = entries
        self.wall_time.append(float(wall))
        self.completed = i + 1

    def accuracy_matrix(self, head: str = "main", upto: int | None = None) -> np.ndarray:
        rows = self.completed if upto is None else upto
        return M.accuracy_matrix(self.confusions.get(head, {}), rows, self.n_cols)

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
        last = max(i for i, _ in conf)
        return np.concatenate([e for (i, _), e in sorted(conf.items()) if i == last])

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
            "versions": versions(),
            "confusion": [
                {"head": head, "trained_up_to": i, "evaluated": j, "entries": e.tolist()}
                for head, conf in self.confusions.items()
                for (i, j), e in sorted(conf.items())
            ],
        }
        if self.meta.get("shot_groups"):
            doc.update(self.long_tail_results())
            doc["metrics"].update({f"{g}_shot_accuracy": doc["shot_accuracy"].get("main", {}).get("count", {}).get(g)
                                   for g in ("many", "medium", "few")})
        for head in self.confusions:
            if head != "main":
                Rh = self.accuracy_matrix(head)
                doc["heads"][head] = {
                    "accuracy_matrix": [[_clean(float(v)) for v in row] for row in Rh],
                    "metrics": self.metrics(head),
                }
        return doc

    def long_tail_results(self) -> dict:
        """Shot-group accuracy of every head under every group definition in ``meta["shot_groups"]``, and the
        main head's per-class accuracy, from the last evaluated row (the classes seen so far)."""
        definitions = {name: d["groups"] for name, d in self.meta["shot_groups"].items()}
        shot = {head: {name: M.shot_group_accuracy(self.final_entries(head), groups)
                       for name, groups in definitions.items()}
                for head in self.confusions}
        per_class = M.per_class_accuracy(self.final_entries("main"), self.info.n_classes)
        return {"shot_accuracy": shot, "per_class_accuracy": [_clean(float(v)) for v in per_class]}

    @classmethod
    def from_json(cls, doc: dict, info: StreamInfo) -> "StreamResults":
        res = cls(info=info, wall_time=list(doc["wall_time"]["per_experience"]),
                  completed=int(doc["completed_experiences"]))
        res.confusions = {}
        for c in doc.get("confusion", []):
            entries = np.asarray(c["entries"], dtype=np.int64).reshape(-1, 3)
            res.confusions.setdefault(c["head"], {})[(c["trained_up_to"], c["evaluated"])] = entries
        res.confusions.setdefault("main", {})
        return res


def matrix_csv(R: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trained_up_to"] + [f"exp_{j}" for j in range(R.shape[1])])
    for i, row in enumerate(R):
        w.writerow([f"exp_{i}"] + ["" if np.isnan(v) else f"{v:.6f}" for v in row])
    return buf.getvalue()


# -- reading runs back -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A run directory read back: config, status, the accuracy matrix and the headline metrics."""

    path: Path
    config: dict
    results: dict
    stream: dict | None

    @property
    def status(self) -> str:
        return self.results.get("status", "unknown")

    @property
    def finished(self) -> bool:
        return self.status == "completed"

    @property
    def accuracy_matrix(self) -> np.ndarray:
        return np.array(
            [[np.nan if v is None else v for v in row] for row in self.results.get("accuracy_matrix", [])], dtype=float
        ).reshape(-1, len(self.results.get("eval_experiences", [])))

    @property
    def metrics(self) -> dict:
        return dict(self.results.get("metrics", {}))

    @property
    def average_accuracy(self) -> np.ndarray:
        return np.array([np.nan if v is None else v for v in self.results.get("average_accuracy_per_experience", [])])

    def confusions(self, head: str = "main") -> dict[tuple[int, int], np.ndarray]:
        return {
            (c["trained_up_to"], c["evaluated"]): np.asarray(c["entries"], dtype=np.int64).reshape(-1, 3)
            for c in self.results.get("confusion", [])
            if c["head"] == head
        }


def load_run(path: str | Path) -> Run:
    """Read a run directory (finished or not). Raises FileNotFoundError when it holds no run."""
    rd = RunDirectory(path)
    if not rd.config_path.exists():
        raise FileNotFoundError(f"{rd.path} is not a cl_vit run directory (no config.yaml)")
    config = yaml.safe_load(rd.config_path.read_text())
    results = rd.read_results() or {"status": "not started", "schema_version": SCHEMA_VERSION}
    stream = json.loads(rd.stream_path.read_text()) if rd.stream_path.exists() else None
    return Run(path=rd.path, config=config, results=results, stream=stream)
