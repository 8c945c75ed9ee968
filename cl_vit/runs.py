"""Reading run directories back: ``load_run`` / ``load_runs`` / ``group_runs`` for the report, the plots and the
notebooks; ``recover`` for a resume; ``Run.restore`` to rebuild a trained module from its config and a checkpoint.

The public, typed view of run directories: load_run(path) -> Run; load_runs(paths) also expands Hydra multirun
folders; group_runs(runs) -> [RunGroup], the runs of one setting that differ only by seed. Nothing here needs the code
that made a run, except ``Run.restore``, which builds through ``cl_vit.builder`` and refuses a config that names
code (``_target_``) unless told to trust it (``cl_vit.loading.check_file_config``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import yaml

from cl_vit import loading
from cl_vit import metrics as M
from cl_vit.cost import COST_KEYS
from cl_vit.errors import UserError
from cl_vit.loading import DamagedCheckpoint
from cl_vit.rundir import DamagedResults, RunDirectory
from cl_vit.stream_results import SCHEMA_VERSION, StreamResults

if TYPE_CHECKING:  # reading results back needs no Avalanche import
    from cl_vit.streams import StreamInfo


def recover(rd: RunDirectory, info: StreamInfo) -> tuple[StreamResults, dict | None, list[str]]:
    """Where a resumed run continues: its results so far, the last readable checkpoint and a line per damage found.

    A checkpoint that cannot be read (truncated by a full disk or a killed copy) is passed over for the one before
    it, and the experiences after that are trained again (each draws its randomness from (seed, index), so they give
    the same results); a damaged results.json is rebuilt from the checkpoints, which carry their row of results."""
    notes = []
    try:
        doc = rd.read_results()
    except DamagedResults as e:
        doc = None
        notes.append(f"{e}: rebuilding it from the checkpoints")
    if doc is not None:
        if doc["class_order"] != info.class_order:
            raise UserError(f"resume={rd.path}: the stream's class order differs from the saved one; check data_root")
        results = StreamResults.from_json(doc, info)
        state, k = None, results.completed - 1
        while k >= 0 and state is None:
            try:
                state = rd.load_checkpoint(k)
            except (DamagedCheckpoint, FileNotFoundError) as e:
                notes.append(str(e) if isinstance(e, DamagedCheckpoint) else f"{rd.checkpoint_path(k)} is missing")
                k -= 1
        if k + 1 < results.completed:
            notes.append(f"continuing after experience {k + 1}, the last readable checkpoint; experiences "
                         f"{k + 2}-{results.completed} are trained again")
            results.truncate(k + 1)
        return results, state, notes
    results, state = StreamResults(info=info), None
    for k in range(len(info.train_classes)):
        if not rd.checkpoint_path(k).exists():
            break
        try:
            ckpt = rd.load_checkpoint(k)
        except DamagedCheckpoint as e:
            notes.append(str(e))
            break
        if "row" not in ckpt or ckpt.get("class_order") != info.class_order:
            raise UserError(f"{rd.path}: results.json is damaged and {rd.checkpoint_path(k).name} does not hold its "
                            "row of results (written by an older cl_vit, or another stream): start a new run")
        row = ckpt["row"]
        evaluation = {h: {int(j): np.asarray(e, dtype=np.int64).reshape(-1, 3) for j, e in per.items()}
                      for h, per in row["evaluation"].items()}
        results.record(k, evaluation, float(row["wall_time"]))
        state = ckpt
    if notes:
        notes.append(f"results.json rebuilt from {results.completed} checkpoints; continuing after experience "
                     f"{results.completed}")
    return results, state, notes


# -- reading runs back -------------------------------------------------------------------------------------------
#
# The public, typed view of run directories for the report command, the notebooks and the tests:
# load_run(path) -> Run; load_runs(paths) also expands Hydra multirun folders; group_runs(runs) -> [RunGroup], the
# runs of one setting that differ only by seed. Nothing here needs the code that made a run, except Run.restore.

SHOT_GROUP_NAMES = ("many", "medium", "few")
#: the summary of a run: the headline metrics, shot-group accuracies (when the run has shot groups), wall time
SHOT_KEYS = tuple(f"{g}_shot_accuracy" for g in SHOT_GROUP_NAMES)
#: the task-incremental ("local") A_N and consecutive-drop forgetting (CODA-Prompt's pair), from "task_incremental"
LOCAL_KEYS = ("task_incremental_accuracy", "task_incremental_forgetting")
SUMMARY_KEYS = (*M.METRIC_KEYS, *SHOT_KEYS, *LOCAL_KEYS, "wall_time", *COST_KEYS)

#: config keys that say where and how a run was executed, not what it computed: runs that differ only in these and in
#: the seed are repetitions of one setting
EXECUTION_KEYS = ("seed", "resume", "data_root", "dry_run", "logger", "trainer.accelerator", "data.num_workers",
                  "data.pin_memory", "data.persistent_workers", "data.eval_batch_size", "trainer.finite_check_every")


class NotARunError(UserError, FileNotFoundError):
    """A path that holds no cl_vit run directory."""


def _float_array(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


#: config keys added after runs were made, with the value that does what those runs did (their config lacks the key):
#: ``setting`` fills them in, so that a run and its repetition with today's config are one setting
ADDED_KEYS: dict[str, Any] = {"loss.mask_unseen": True, "scheduler.warmup_lr": None, "scheduler.min_lr": None,
                               "scheduler.cooldown_epochs": 0, "scheduler.warmup_per_epoch": False,
                               "trainer.tf32": True, "trainer.eval_autocast": None}


def flatten_config(cfg: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``; an empty mapping stays one value
    (``strategy.finetune``)."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def _is_execution_key(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in EXECUTION_KEYS)


@dataclass(frozen=True)
class ShotGroups:
    """The shot group ("many", "medium" or "few") of every class (stream labels) under one definition."""

    kind: str
    definition: str
    groups: tuple[str, ...]

    def classes(self, group: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.groups) == group)


@dataclass(frozen=True)
class Head:
    """One output of a run's model: ``main`` (what the model predicts) or an extra head (DeiT-LT's ``cls``,
    ``dist``)."""

    name: str
    #: ``R[i, j]``: accuracy on evaluation experience j after training experience i (nan: not evaluated)
    accuracy_matrix: np.ndarray
    metrics: dict

    @property
    def average_accuracy(self) -> np.ndarray:
        """``A_t`` after every experience (nan where the stream was not evaluated)."""
        return M.average_accuracy(self.accuracy_matrix) if len(self.accuracy_matrix) else np.zeros(0)


@dataclass
class Restored:
    """A run rebuilt from its config and one checkpoint: the trained module and the stream it ran on."""

    module: Any
    scenario: Any
    info: StreamInfo
    source: Any
    experience: int


@dataclass
class Run:
    """A run directory read back: config, status, accuracy matrices per head, metrics, shot groups, timings."""

    path: Path
    config: dict
    results: dict
    stream: dict | None
    #: Hydra's record of the launch (``.hydra/hydra.yaml``): the config-group choices (``strategy: ftpp``)
    choices: dict = field(default_factory=dict)
    #: the command line's overrides (``.hydra/overrides.yaml``); None for a run started from Python
    overrides: list | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- what ran ------------------------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return self.results.get("status", "unknown")

    @property
    def finished(self) -> bool:
        return self.status == "completed"

    @property
    def completed_experiences(self) -> int:
        return int(self.results.get("completed_experiences", 0))

    @property
    def n_experiences(self) -> int | None:
        n = self.results.get("n_experiences")
        if n is None and self.stream:
            n = len(self.stream.get("experiences", []))
        return n

    @property
    def state(self) -> str:
        """``completed``, ``unfinished (k/N)`` (stopped or still running after k experiences), ``failed (k/N)`` or
        ``interrupted (k/N)`` (stopped by a fault or a signal), ``damaged (...)`` (results.json or config.yaml cannot
        be read) or ``not started``."""
        if self.finished:
            return "completed"
        if self.status == "damaged":
            return f"damaged ({self.results.get('damage')})"
        if "completed_experiences" not in self.results:
            return "not started"
        if self.status in ("failed", "interrupted"):
            return f"{self.status} ({self.completed_experiences}/{self.n_experiences or '?'})"
        return f"unfinished ({self.completed_experiences}/{self.n_experiences or '?'})"

    def config_value(self, key: str, default=None):
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def benchmark(self) -> str:
        return self.results.get("benchmark") or self.config_value("benchmark.name", "?")

    @property
    def model(self) -> str:
        return self.results.get("model") or self.config_value("model.name", "?")

    @property
    def strategy(self) -> str:
        """The strategy as it was chosen on the command line (``ftpp``), else the strategies that ran (``l2+lwf``)."""
        choice = self.choices.get("strategy")
        if choice:
            return "+".join(choice) if isinstance(choice, list) else str(choice)
        names = self.results.get("strategy") or list(self.config_value("strategy", {}) or {})
        return "+".join(names) or "?"

    @property
    def seed(self):
        return self.results.get("seed", self.config_value("seed"))

    @property
    def label(self) -> str:
        return f"{self.benchmark} · {self.model} · {self.strategy} · seed {self.seed}"

    @property
    def wall_time(self) -> float | None:
        return (self.results.get("wall_time") or {}).get("total")

    def setting(self, same: Sequence[str] = ()) -> dict[str, Any]:
        """What the run computed, the seed aside: its config without ``EXECUTION_KEYS`` and without the benchmark's
        strengths for strategies the run does not use (``benchmark.strategy_args.ewc.lam`` does not change a finetune
        run), and the train/test split it read (``split``: name and sha256 of the file lists, from results.json),
        which the config alone does not fix. ``same``: further keys (and the keys under them) left out, values
        that change with the seed by design (a per-seed teacher run, ``strategy.deit_lt.teacher``)."""
        used = set(self.config_value("strategy", {}) or {})
        unused = tuple(f"benchmark.strategy_args.{n}." for n in
                       (self.config_value("benchmark.strategy_args", {}) or {}) if n not in used)
        same = tuple(same)
        # a run from before a key existed did what the key's value in ADDED_KEYS does
        flat = {k: v for k, v in {**ADDED_KEYS, **flatten_config(self.config)}.items()
                if not _is_execution_key(k) and not k.startswith(unused)
                and not any(k == s or k.startswith(s + ".") for s in same)}
        split = (self.results.get("source") or {}).get("split")
        if isinstance(split, dict) and split.get("sha256"):
            flat["split"] = f"{split.get('name', '?')}:{split['sha256'][:12]}"
        return flat

    def setting_key(self, same: Sequence[str] = ()) -> str:
        """Equal for runs that repeat one setting (``setting``) with other seeds."""
        return json.dumps(self.setting(same), sort_keys=True, default=str)

    # -- results -------------------------------------------------------------------------------------------------

    @property
    def accuracy_matrix(self) -> np.ndarray:
        return self.head("main").accuracy_matrix

    @property
    def metrics(self) -> dict:
        return dict(self.results.get("metrics", {}))

    @property
    def average_accuracy(self) -> np.ndarray:
        return self.head("main").average_accuracy

    @property
    def head_names(self) -> list[str]:
        return ["main", *self.results.get("heads", {})]

    def head(self, name: str = "main") -> Head:
        if name == "main":
            doc = self.results
        elif name in self.results.get("heads", {}):
            doc = self.results["heads"][name]
        else:
            raise KeyError(f"{self.path} has no head {name!r}: its heads are {self.head_names}")
        n_cols = len(self.results.get("eval_experiences", []))
        rows = doc.get("accuracy_matrix", [])
        if not rows:  # nothing evaluated yet, or a damaged run (no results to read)
            return Head(name, np.zeros((0, n_cols)), dict(doc.get("metrics", {})))
        R = np.array([_float_array(row) for row in rows], dtype=float).reshape(-1, n_cols)
        return Head(name, R, dict(doc.get("metrics", {})))

    @property
    def heads(self) -> dict[str, Head]:
        return {h: self.head(h) for h in self.head_names}

    def confusions(self, head: str = "main") -> dict[tuple[int, int], np.ndarray]:
        key = ("confusions", head)
        if key not in self._cache:  # parsed once: results.json of a large benchmark holds many entries
            self._cache[key] = {
                (c["trained_up_to"], c["evaluated"]): np.asarray(c["entries"], dtype=np.int64).reshape(-1, 3)
                for c in self.results.get("confusion", [])
                if c["head"] == head
            }
        return dict(self._cache[key])

    def final_entries(self, head: str = "main") -> np.ndarray:
        """The pooled sparse confusion of the last evaluation: every test sample of the seen classes once."""
        conf = self.confusions(head)
        if not conf:
            return np.zeros((0, 3), dtype=np.int64)
        return self.row_entries(head, max(i for i, _ in conf))

    def row_entries(self, head: str, row: int) -> np.ndarray:
        """Pooled confusion after training experience ``row`` (every test sample seen by then, once)."""
        parts = [e for (i, _), e in sorted(self.confusions(head).items()) if i == row]
        return np.concatenate(parts) if parts else np.zeros((0, 3), dtype=np.int64)

    # -- classes and the long tail -------------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        order = self.results.get("class_order") or (self.stream or {}).get("class_order") or []
        return len(order)

    @property
    def class_names(self) -> list[str]:
        return list(self.results.get("class_names") or [])

    @property
    def class_counts(self) -> np.ndarray | None:
        """Training images of every class (stream labels), when the run recorded them."""
        counts = self.results.get("class_counts")
        return None if counts is None else np.asarray(counts, dtype=np.int64)

    def per_class_accuracy(self, head: str = "main") -> np.ndarray:
        """Accuracy of every class (stream labels) at the last evaluation; nan for classes not evaluated."""
        return M.per_class_accuracy(self.final_entries(head), self.n_classes)

    @property
    def shot_group_kinds(self) -> list[str]:
        sg = self.results.get("shot_groups") or {}
        if "groups" in sg:  # the single definition by training-set size
            return ["count"]
        return [k for k, v in sg.items() if isinstance(v, dict) and "groups" in v]

    @property
    def default_shot_kind(self) -> str:
        """``index`` where the run has official cut-offs (what its flat ``*_shot_accuracy`` metrics use), else
        ``count``; runs written before the cut-offs became the default recorded ``count`` ones."""
        return self.results.get("shot_definition") or "count"

    def shot_groups(self, kind: str | None = None) -> ShotGroups | None:
        """Shot groups of the classes: ``count`` (many > 100, medium 20-100, few < 20 training images) or ``index``
        (DeiT-LT's cut-offs on the frequency-sorted classes), None: the run's default; None when the run has none
        (not long-tailed)."""
        kind = kind or self.default_shot_kind
        sg = self.results.get("shot_groups") or {}
        entry = sg if "groups" in sg and kind == "count" else sg.get(kind)
        if not isinstance(entry, dict) or "groups" not in entry:
            return None
        return ShotGroups(kind, str(entry.get("definition", "")), tuple(entry["groups"]))

    def shot_accuracy(self, head: str = "main", kind: str | None = None) -> dict[str, float]:
        """Accuracy per shot group at the last evaluation, as recorded, else from the confusions; {} without groups."""
        kind = kind or self.default_shot_kind
        stored = ((self.results.get("shot_accuracy") or {}).get(head) or {}).get(kind)
        if not stored and kind == self.default_shot_kind and head in self.head_names:  # the flat metrics' definition
            metrics = self.head(head).metrics
            stored = {g: metrics.get(f"{g}_shot_accuracy") for g in SHOT_GROUP_NAMES}
        if isinstance(stored, dict) and any(v is not None for v in stored.values()):
            return {g: float(stored[g]) for g in SHOT_GROUP_NAMES if stored.get(g) is not None}
        groups = self.shot_groups(kind)
        if groups is None:
            return {}
        return M.shot_group_accuracy(self.final_entries(head), groups.groups)

    def summary(self, head: str = "main", shots: str | None = None) -> dict[str, float | None]:
        """``SUMMARY_KEYS`` -> value (None where undefined): what the report shows for one run."""
        key = ("summary", head, shots)
        if key not in self._cache:
            self._cache[key] = self._summary(head, shots)
        return dict(self._cache[key])

    def _summary(self, head: str, shots: str) -> dict:
        metrics = self.head(head).metrics if head in self.head_names else {}
        out = {k: metrics.get(k) for k in M.METRIC_KEYS}
        shot = self.shot_accuracy(head, shots) if head in self.head_names else {}
        out.update({f"{g}_shot_accuracy": shot.get(g) for g in SHOT_GROUP_NAMES})
        local = (self.results.get("task_incremental") or {}).get("metrics", {}) if head == "main" else {}
        out.update(zip(LOCAL_KEYS, (local.get("final_average_accuracy"), local.get("forgetting_consecutive"))))
        out["wall_time"] = self.wall_time
        cost = self.results.get("cost") or {}
        out.update({k: cost.get(k) for k in COST_KEYS})
        return out

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def checkpoint_path(self, experience: int = -1) -> Path:
        """The checkpoint after ``experience`` (negative: counted from the last completed one)."""
        if experience < 0:
            experience += self.completed_experiences
        return RunDirectory(self.path).checkpoint_path(experience)

    def restore(self, experience: int = -1, data_root: str | Path | None = None,
                trust_code: bool = False) -> Restored:
        """Rebuild the run's source, stream and module from config.yaml and load the checkpoint after ``experience``.

        ``data_root`` overrides where the dataset is (the run's own is used otherwise). Custom timm models must be
        registered (their module imported) first. A config.yaml that names code (``_target_``: a custom model,
        strategy or source) is refused unless ``trust_code=True``: a run directory received from someone else must
        not choose code to run.
        """
        from omegaconf import OmegaConf

        from cl_vit.builder import build

        path = self.checkpoint_path(experience)
        if not path.exists():
            raise UserError(f"{self.path} has no checkpoint {path.name} ({self.completed_experiences} experiences "
                            "completed): choose an experience that was completed")
        loading.check_file_config(self.config, f"{self.path / 'config.yaml'}", trusted=trust_code)
        cfg = OmegaConf.create(self.config)
        if data_root is not None:
            cfg.data_root = str(data_root)
        with loading.trust_code(trust_code):
            source, scenario, info, module, _ = build(cfg)
        state = loading.load_checkpoint(path, "checkpoint")
        for s in module.strategies:  # before the weights: a strategy may regrow the network
            s.load_state_dict(state.get("strategies", {}).get(s.name, {}))
        module.load_state_dict(state["module"])
        module.eval()
        return Restored(module, scenario, info, source, int(state.get("experience", experience)))


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() or (path / ".hydra" / "config.yaml").is_file()


def load_run(path: str | Path) -> Run:
    """Read a run directory, finished or not (a Hydra job that never started reads as ``not started``).

    Raises :class:`NotARunError` (a ``UserError`` and a ``FileNotFoundError``) when the path holds no run."""
    rd = RunDirectory(path)
    config_path = rd.config_path if rd.config_path.exists() else rd.path / ".hydra" / "config.yaml"
    if not config_path.exists():
        raise NotARunError(f"{rd.path} is not a cl_vit run directory (no config.yaml): give a run directory or a "
                           "Hydra multirun folder")
    damage = []
    try:
        config = loading.read_yaml(config_path) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        config, damage = {}, [f"{config_path.name} cannot be read ({type(e).__name__})"]
    try:
        results = rd.read_results() or {"status": "not started", "schema_version": SCHEMA_VERSION}
    except DamagedResults:
        results, damage = {"schema_version": SCHEMA_VERSION}, [*damage, "results.json cannot be read"]
    if damage:  # shown as damaged (Run.state) instead of failing the notebook or the report
        results.update(status="damaged", damage="; ".join(damage))
    try:
        stream = json.loads(rd.stream_path.read_text()) if rd.stream_path.exists() else None
    except (ValueError, UnicodeDecodeError):
        stream = None
    hydra_path = rd.path / ".hydra" / "hydra.yaml"
    choices = {}
    if hydra_path.exists():
        choices = ((loading.read_yaml(hydra_path) or {}).get("hydra", {}).get("runtime", {})
                   .get("choices") or {})
    overrides_path = rd.path / ".hydra" / "overrides.yaml"
    overrides = list(loading.read_yaml(overrides_path) or []) if overrides_path.exists() else None
    return Run(path=rd.path, config=config, results=results, stream=stream, choices=dict(choices), overrides=overrides)


def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_runs(path: str | Path) -> list[Path]:
    """The run directories at or under ``path`` (a run directory, a Hydra multirun folder, an outputs tree), in
    natural order (job 10 after job 9)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise UserError(f"{path} does not exist: give a run directory or a Hydra multirun folder")
    if is_run_dir(path):
        return [path]
    found = []
    for child in sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural):
        found += find_runs(child)
    return found


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run at or under the given paths (run directories or Hydra multirun folders)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs = []
    for p in paths:
        found = find_runs(p)
        if not found:
            raise NotARunError(f"no cl_vit run directory under {Path(p).expanduser().resolve()}: give run "
                               "directories (with config.yaml) or Hydra multirun folders")
        runs += [load_run(f) for f in found]
    return runs


@dataclass
class RunGroup:
    """Runs of one setting that differ only by seed (finished runs), or a single run."""

    runs: list[Run]
    #: config values (dotted keys) that tell this group apart from groups with the same benchmark, model and strategy
    settings: dict = field(default_factory=dict)

    benchmark = property(lambda self: self.runs[0].benchmark)
    model = property(lambda self: self.runs[0].model)
    strategy = property(lambda self: self.runs[0].strategy)
    seeds = property(lambda self: [r.seed for r in self.runs])
    finished = property(lambda self: all(r.finished for r in self.runs))

    @property
    def state(self) -> str:
        return self.runs[0].state if len(self.runs) == 1 else "completed" if self.finished else "mixed"

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        seeds = f"seed {self.seeds[0]}" if len(self.runs) == 1 else f"{len(self.runs)} seeds"
        return f"{self.strategy}" + (f" ({extra})" if extra else "") + f" · {self.model} · {seeds}"

    def values(self, key: str, head: str = "main", shots: str | None = None) -> np.ndarray:
        """One value per run of a ``SUMMARY_KEYS`` entry (nan where undefined)."""
        return _float_array([r.summary(head, shots).get(key) for r in self.runs])

    def mean_std(self, key: str, head: str = "main", shots: str | None = None) -> tuple[float | None, float | None]:
        """Mean and sample standard deviation (ddof 1) over the runs that define ``key``; std is None for one run."""
        v = self.values(key, head, shots)
        v = v[~np.isnan(v)]
        if v.size == 0:
            return None, None
        return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)

    def accuracy_matrix(self, head: str = "main") -> np.ndarray:
        """The accuracy matrix averaged over the runs."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # cells no run evaluated stay nan
            return np.nanmean(np.stack([r.head(head).accuracy_matrix for r in self.runs]), 0)

    def average_accuracies(self, head: str = "main") -> np.ndarray:
        """``A_t`` of every run: shape [runs, experiences]."""
        return np.stack([r.head(head).average_accuracy for r in self.runs])


def _settings(runs: Sequence[Run], same: Sequence[str]) -> list[dict]:
    """What tells runs of one benchmark, model and strategy apart: the keys set on their command lines (Hydra's
    overrides) whose values differ, each run's value from its config; without overrides (runs started from Python),
    the config keys whose values differ. A key a run does not have (``+key`` on another run's command line) or an
    unresolved ``${...}`` (a run that never started) is left out of that run's settings."""
    def differing(values: list[dict]) -> list[dict]:
        # an unresolved ${...} (what Hydra records of a run that never started) says nothing about its value
        known = lambda k: [json.dumps(v.get(k), default=str) for v in values if "${" not in str(v.get(k))]  # noqa: E731
        keys = sorted({k for v in values for k in v if len(set(known(k))) > 1})
        return [{k: v[k] for k in keys if v.get(k) is not None and "${" not in str(v[k])} for v in values]

    flats = [r.setting(same) for r in runs]
    if any(r.overrides is None for r in runs):
        return differing(flats)
    keys = {k for r in runs for o in r.overrides if not (k := str(o).lstrip("+~").split("=", 1)[0]).startswith("hydra.")
            and not _is_execution_key(k) and not any(k == x or k.startswith(x + ".") for x in same)}
    settings = differing([{k: f[k] if k in f else r.choices.get(k) for k in keys} for r, f in zip(runs, flats)])
    finished = [json.dumps(s, sort_keys=True, default=str) for r, s in zip(runs, settings) if r.finished]
    # finished settings that no override tells apart (a default changed between runs): the config says how
    return settings if len(set(finished)) == len(finished) else differing(flats)


def group_runs(runs: Sequence[Run], by_seed: bool = True, same: Sequence[str] = ()) -> list[RunGroup]:
    """Finished runs that differ only by seed (and ``EXECUTION_KEYS``, and the config keys in ``same``) form one
    group; an unfinished run is never averaged with others. Groups keep the order of their first run."""
    buckets: dict[str, list[Run]] = {}
    for r in runs:
        key = r.setting_key(same) if by_seed and r.finished else f"path:{r.path}"
        buckets.setdefault(key, []).append(r)
    groups = [RunGroup(rs) for rs in buckets.values()]
    same_label: dict[tuple, list[RunGroup]] = {}
    for g in groups:
        same_label.setdefault((g.benchmark, g.model, g.strategy), []).append(g)
    for gs in same_label.values():
        if len(gs) > 1:
            for g, settings in zip(gs, _settings([g.runs[0] for g in gs], same)):
                g.settings = settings
    return groups
