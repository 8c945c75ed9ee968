"""The run's loggers: Lightning's own classes, chosen with ``logger=`` and composed as ``logger=[tensorboard,csv]``.

    logger=tensorboard   TensorBoardLogger: RUN_DIR/tensorboard (a multirun job: RUN_DIR/tensorboard/<its overrides>)
    logger=csv           CSVLogger: RUN_DIR/csv/metrics.csv
    logger=wandb         WandbLogger: offline by default (RUN_DIR/wandb, ``wandb sync``), logger.wandb.offline=false
    logger=mlflow        MLFlowLogger: logger.mlflow.tracking_uri, default $MLFLOW_TRACKING_URI or file:./mlruns
                         (a file store names metrics train.loss, eval.A_t: one file per metric)

Each experience has its own Trainer, whose steps start at 0: the loggers here continue the steps across them
(``step_offset``) and stay open until the run's end (``close``), so that a run is one run in every logger.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping



class StreamSteps:
    """Mixin for a Lightning logger: steps continue across the experiences' Trainers; a Trainer's ``finalize`` only
    saves, ``close()`` ends the run."""

    step_offset = 0

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, None if step is None else step + self.step_offset)

    def finalize(self, status: str) -> None:
        if status == "success":
            self.save()

    def close(self) -> None:
        super().finalize("success")


def _stream_class(cls: type, **methods) -> type:
    return type(f"Stream{cls.__name__}", (StreamSteps, cls), {"__module__": __name__, **methods})


def _flat_names(self, metrics, step=None) -> None:
    # MLflow's file store keeps a metric in a file named by its path: train/loss beside train/loss/ce cannot be
    StreamSteps.log_metrics(self, {k.replace("/", "."): v for k, v in metrics.items()}, step)


def _csv_class() -> type:
    """Lightning's CSVLogger, except that a resumed run continues RUN_DIR/csv/metrics.csv: Lightning's writer deletes
    an existing file when it starts, which loses every step logged before the resume."""
    import csv

    from lightning.fabric.loggers.logger import rank_zero_experiment
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    class _Continued(ExperimentWriter):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):  # appended to; its columns are the writer's to extend
                with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                    self.metrics_keys = sorted(next(csv.reader(f), []))

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _Continued(log_dir=self.log_dir)
        return self._experiment

    return _stream_class(CSVLogger, experiment=experiment)


def _close_wandb(self) -> None:
    StreamSteps.close(self)
    if self._experiment is not None:  # Lightning leaves the wandb run open until the process exits
        self._experiment.finish()


def run_name(task_overrides) -> str:
    """A multirun job's name in every logger: its command-line overrides (``strategy=l2,seed=1``), without Hydra's own
    and those that change where it runs (``data_root``, ``logger``...; the seed stays)."""
    from cl_vit.runs import EXECUTION_KEYS

    keep = []
    for o in task_overrides:
        key = str(o).lstrip("+~").split("=", 1)[0]
        if key.startswith("hydra.") or (key != "seed" and any(key == k or key.startswith(k + ".")
                                                                for k in EXECUTION_KEYS)):
            continue
        keep.append(str(o).replace("/", "_"))
    return ",".join(keep)[:200] or "default"


def build_loggers(logger_cfg: Mapping | None, run_dir: str | Path, name: str | None = None) -> list:
    """The loggers of ``logger_cfg`` (``cfg.logger`` as a plain dict) writing for the run in ``run_dir``; ``name``:
    the run's name (a multirun job's overrides), else the run directory's name."""
    from lightning.pytorch import loggers as L

    from cl_vit.config import logger_names
    from cl_vit.runner import StreamLogger

    run_dir = Path(run_dir)
    out = []
    for kind in logger_names(logger_cfg):
        args: dict[str, Any] = dict((logger_cfg or {}).get(kind) or {})
        if kind == "tensorboard":  # a multirun job's events one level down, so TensorBoard names it by its overrides
            out.append(StreamLogger(save_dir=str(run_dir), name="tensorboard", version=name or "",
                                    default_hp_metric=False, **args))
        elif kind == "csv":
            out.append(_csv_class()(save_dir=str(run_dir), name="csv", version="", **args))
        elif kind == "wandb":
            args.setdefault("offline", True)
            out.append(_stream_class(L.WandbLogger, close=_close_wandb)(save_dir=str(run_dir), name=name or run_dir.name,
                                                                        **args))
        elif kind == "mlflow":
            if args.get("tracking_uri") is None:
                args.pop("tracking_uri", None)  # Lightning's default: $MLFLOW_TRACKING_URI, else file:./mlruns
            methods = {}
            if str(args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "file:").startswith("file:"):
                # MLflow 3 keeps the local file store only on request; a database store needs the full mlflow
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                methods["log_metrics"] = _flat_names
            out.append(_stream_class(L.MLFlowLogger, **methods)(run_name=name or run_dir.name, **args))
    return out
