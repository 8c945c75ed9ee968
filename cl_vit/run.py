"""``python -m cl_vit.run [group=option ...] [key=value ...]``: run a benchmark stream end to end.

    python -m cl_vit.run                                   # split-digits, the offline default
    python -m cl_vit.run benchmark=split-digits strategy=finetune trainer.max_epochs=2 seed=3
    python -m cl_vit.run dry_run=true                      # print the stream and the model, train nothing
    python -m cl_vit.run resume=outputs/split-digits/...   # continue after the last completed experience
    python -m cl_vit.run trainer=gpu compile=true          # one GPU, bf16; trainer=ddp: every GPU (Lightning DDP)

The run directory is Hydra's output directory (``hydra.run.dir=PATH``). ``run(cfg, run_dir)`` is the same thing as a
function, for notebooks and tests.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

from cl_vit.loading import gc_paused

with gc_paused():  # Lightning and Hydra (see main)
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from cl_vit.builder import build, data_root, dataset_labels, source_arguments  # noqa: F401  (re-exported)
    from cl_vit.config import CONFIG_DIR, check_group_choices, check_override_keys, validate
    from cl_vit.errors import Interrupted, RunStopped, UserError, override, report_error, resume_command

log = logging.getLogger("cl_vit")

if not OmegaConf.has_resolver("cl_vit.run_dir"):
    # a resumed run writes into the directory it resumes; Hydra's own record of the first launch stays untouched
    OmegaConf.register_new_resolver("cl_vit.run_dir", lambda resume, default: resume if resume else default)
    OmegaConf.register_new_resolver("cl_vit.hydra_subdir", lambda resume: None if resume else ".hydra")
    # a weights file the repository ships (weights/: the default stream's pre-trained backbone) for the model it was
    # trained as, None for any other model: ${cl_vit.weights_for:${model.name},MODEL,FILE}
    OmegaConf.register_new_resolver(
        "cl_vit.weights_for",
        lambda model, trained_as, name: str(CONFIG_DIR.parent / "weights" / name) if model == trained_as else None)

#: what a resumed run may change: where it runs, how it loads data, what it logs and shows, never what it computes.
#: A key or a prefix ending in "."; ``trainer=gpu`` (the group) changes the device keys below only.
RESUME_DEVICE_KEYS = ("trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                      "trainer.precision", "trainer.sync_batchnorm", "trainer.threads")
RESUME_OVERRIDABLE = ("trainer", *RESUME_DEVICE_KEYS, "trainer.enable_progress_bar", "trainer.log_every_n_steps",
                      "trainer.finite_check_every",
                      "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.eval_batch_size",
                      "data.verify", "data_root", "logger", "logger.", "epoch_eval", "compile", "hydra.", "resume",
                      "trust_code", "skip_corrupt", "checkpoint_every_epochs", "keep_checkpoints")
#: what may also change when the run stopped with status ``failed`` (a non-finite loss): the fix for the next
#: experiences, recorded in config.yaml under ``resumed_with``
RESUME_AFTER_FAILURE = ("optimizer.", "scheduler.", "trainer.gradient_clip_val", "trainer.gradient_clip_algorithm")


def _matches(key: str, allowed) -> bool:
    return any(key == a or (a.endswith(".") and key.startswith(a)) for a in allowed)


def loader_config(cfg: DictConfig):
    """The DataLoader settings; ``data.pin_memory: auto`` pins host memory only when training runs on a GPU."""
    import dataclasses

    import torch

    from cl_vit.runner import LoaderConfig

    data = OmegaConf.to_container(cfg.data, resolve=True)
    kwargs = {f.name: data[f.name] for f in dataclasses.fields(LoaderConfig) if f.name in data}
    if kwargs.get("pin_memory") == "auto":
        kwargs["pin_memory"] = torch.cuda.is_available() and str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda")
    return LoaderConfig(**kwargs)


def run(cfg: DictConfig, run_dir: str | Path, scenario=None, name: str | None = None):
    """Run (or resume, with ``cfg.resume``) a stream into ``run_dir``; returns the results document.

    ``scenario``: a ready Avalanche classification scenario to run instead of ``cfg.benchmark``. ``name``: the run's
    name in the loggers (a multirun job's overrides, ``cl_vit.loggers.run_name``); default: the run directory's.
    """
    from cl_vit import loading

    with loading.trust_code(bool(cfg.get("trust_code", False))):  # configs read from files may name code only then
        return _run_locked(cfg, run_dir, scenario, name)


def _run_locked(cfg: DictConfig, run_dir, scenario, name: str | None = None):
    from cl_vit import distributed
    from cl_vit.hardware import configure_threads, trainer_kwargs
    from cl_vit.rundir import RunDirectory

    distributed.quiet_other_ranks()
    validate(cfg)
    # before the model is built; a multi-process run divides the cores again once its ranks exist (_run)
    configure_threads(cfg.trainer.get("threads"), workers=int(cfg.data.num_workers))
    trainer_args = trainer_kwargs(OmegaConf.to_container(cfg.trainer, resolve=True))
    rd = RunDirectory(run_dir)
    resuming = bool(cfg.get("resume"))
    if resuming and Path(str(cfg.resume)).expanduser().resolve() != rd.path:  # never another run's directory
        raise UserError(f"{override('resume', cfg.resume)} continues that run in its own directory, not in {rd.path}: "
                        "leave hydra.run.dir out (a resume writes where the run is)")
    if resuming and not rd.config_path.exists():
        raise UserError(f"{override('resume', rd.path)} holds no run (no config.yaml): give the run directory of an "
                        "earlier run")
    if not resuming and rd.has_results():
        raise UserError(f"{rd.path} already holds a run: continue it with {override('resume', rd.path)}, or set "
                        "another hydra.run.dir")
    # one live process per run directory (rank 0 of a DDP run; the others never write it)
    writer = distributed.env_rank() == 0 and os.environ.get("NODE_RANK", "0") in ("", "0") and not cfg.dry_run
    created = not rd.path.exists()
    lock = rd.lock() if writer else None
    if lock is not None and resuming:  # no live writer now: what a killed one left half-written goes
        for stale in rd.remove_stale_temporaries():
            log.info("removed %s, left by a process killed while writing it", stale.name)
    try:
        return _run(cfg, rd, scenario, resuming, trainer_args, name)
    finally:
        if lock is not None:
            lock.release()
            if created:  # a run that stopped before writing anything leaves no empty directory behind
                lock.remove_if_unused()


def _run(cfg: DictConfig, rd, scenario, resuming: bool, trainer_args: dict, name: str | None):
    from cl_vit import distributed, report
    from cl_vit.data.longtail import shot_group_record
    from cl_vit.models import weights_origin, weights_record
    from cl_vit.stream_results import StreamResults
    from cl_vit.runs import recover
    from cl_vit.loggers import build_loggers
    from cl_vit.runner import ContinualRunner, StreamLogger
    from cl_vit.streams import describe

    source, scenario, info, module, class_counts = build(cfg, scenario)
    n_params = sum(p.numel() for p in module.net.parameters())
    stream_doc = {**describe(scenario, info), "n_params": int(n_params), "model": cfg.model.name,
                  "class_order": info.class_order}
    strategy_names = [s.name for s in module.strategies]
    log.info("Benchmark %s: %d classes in %d experiences (class order: %s)", cfg.benchmark.name, info.n_classes,
             len(info.train_classes), info.class_order_rule)
    log.info("Model %s: %.2fM parameters · strategy %s", cfg.model.name, n_params / 1e6, "+".join(strategy_names))
    if cfg.dry_run:
        print(report.format_stream(stream_doc))
        # the network as the first experience gets it; strategies may still freeze parts in before_experience
        print(report.format_model(module.net, DRY_RUN_DEPTH, _first_optimizer(module)))
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_json("stream.json", stream_doc)
        print(f"dry run: nothing trained · stream written to {rd.stream_path}")
        return stream_doc

    # several processes (trainer=ddp): the others start here, re-running this command line; only rank 0 writes
    distributed.launch(trainer_args)
    from cl_vit.hardware import configure_threads

    local_ranks = max(1, distributed.world_size() // int(trainer_args.get("num_nodes", 1)))
    threads = configure_threads(cfg.trainer.get("threads"), processes=local_ranks, workers=int(cfg.data.num_workers))
    meta = {
        # the commit the code ran from and whether its checkout had changes (None outside a git checkout)
        "code": code_version(),
        "benchmark": cfg.benchmark.name,
        "model": cfg.model.name,
        # "timm:<arch>.<tag>" or "checkpoint:<path>" when the backbone did not start at random (the L2/EWC anchor)
        "weights": weights_origin(module.net),
        # its timm tag, file and the file's sha256: which bytes the run started from
        "weights_file": weights_record(module.net),
        "strategy": strategy_names,
        "seed": int(cfg.seed),
        "n_params": int(n_params),
        "source": source.meta if source is not None else {"name": "avalanche scenario"},
        "class_counts": class_counts,
        # results depend on the thread count (floating-point reduction order): this process's threads and cores
        "threads": threads,
    }
    if cfg.benchmark.get("long_tailed"):
        # groups come from the whole training set, also when a long-tailed stream has several experiences
        cutoffs = cfg.benchmark.get("shot_index_cutoffs")
        cutoffs = list(cutoffs) if cutoffs is not None else None
        if source is not None:
            meta["shot_groups"] = shot_group_record(source.train_counts(), cutoffs, info.class_order)
        else:
            meta["shot_groups"] = shot_group_record(class_counts, cutoffs)

    results = StreamResults(info=info, meta=meta)
    if resuming and name is None:  # a multirun job resumed: its TensorBoard events keep their folder
        name = next((p.name for p in (rd.path / "tensorboard").glob("*/events.out.tfevents.*")), None)
    loggers = build_loggers(OmegaConf.to_container(cfg.logger, resolve=True), rd.path, name)
    logger = next((lg for lg in loggers if isinstance(lg, StreamLogger)), None)  # TensorBoard: figures, hparams
    if resuming:
        _check_same_data(rd, meta["source"])
        results, state, notes = recover(rd, info)  # a damaged checkpoint or results.json: one line each
        for note in notes:
            log.warning("%s", note)
        results.meta = meta
        if state is not None:
            for s in module.strategies:
                s.load_state_dict(state["strategies"].get(s.name, {}))
            module.load_state_dict(state["module"])
            for lg in loggers:
                lg.step_offset = int(state.get("global_step", 0))
        if results.completed >= len(info.train_classes):
            log.info("%s is already complete", rd.path)
            if distributed.is_rank_zero():
                print(report.format_results(results.to_json("completed"), rd.path))
            return results.to_json("completed")
        log.info("Resuming %s after experience %d of %d", rd.path, results.completed, len(info.train_classes))
    elif distributed.is_rank_zero():
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_file("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        rd.write_json("stream.json", stream_doc)
    distributed.barrier()

    runner = ContinualRunner(
        module,
        scenario,
        info,
        rd,
        seed=int(cfg.seed),
        trainer=trainer_args,
        loader=loader_config(cfg),
        logger=loggers,
        eval_every=cfg.eval_every,
        results=results,
        class_counts=class_counts,
        # every checkpoint can rebuild its network alone (cl_vit.models.teachers.load_teacher)
        checkpoint_meta={"model": OmegaConf.to_container(cfg.model, resolve=True), "input_size": list(module.input_size)},
        epoch_eval=int(cfg.get("epoch_eval") or 0) if cfg.benchmark.get("long_tailed") else 0,
        ema_decay=OmegaConf.select(cfg, "ema.decay"),
        dataset_labels=dataset_labels(source, info) if source is not None else None,
        train=OmegaConf.select(cfg, "train", default=True) is not False,
        checkpoint_every_epochs=int(cfg.get("checkpoint_every_epochs") or 0),
        keep_checkpoints=cfg.get("keep_checkpoints", "all"),
    )
    try:
        runner.run()
    except RunStopped as e:
        e.run_dir = rd.path
        for lg in loggers:  # what was logged up to the stop, on disk for the resume to continue
            lg.finalize("success")
        raise
    report.finish_run(rd.path, logger.experiment if logger is not None else None)  # figures, TensorBoard hparams
    for lg in loggers:
        lg.close()
    doc = results.to_json("completed")
    if distributed.is_rank_zero():
        print(report.format_results(doc, rd.path))
    return doc


def code_version(path: str | Path | None = None) -> dict | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``path`` (default: this package), ``dirty``
    meaning changes to tracked files or new files git does not ignore; None when it is not in a git checkout (an
    installed wheel) or git is missing."""
    import subprocess

    where = str(Path(path) if path is not None else Path(__file__).resolve().parent)
    try:
        git = lambda *a: subprocess.run(["git", "-C", where, *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) or status.returncode != 0}


#: how deep dry_run=true prints the module tree
DRY_RUN_DEPTH = 2


def _first_optimizer(module):
    """The optimiser ``module.configure_optimizers`` builds, without its schedule (which needs a Trainer); None when
    nothing trains (SimpleCIL)."""
    if not any(p.requires_grad for p in module.parameters()):
        return None
    scheduler = module.scheduler_cfg
    module.scheduler_cfg = {"name": "constant"}
    try:
        return module.configure_optimizers()
    finally:
        module.scheduler_cfg = scheduler


def resume_config(cfg: DictConfig, task_overrides: list[str]) -> DictConfig:
    """The saved config of the run being resumed, with the few overrides a resume may change."""
    run_dir = Path(str(cfg.resume)).expanduser()
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise UserError(f"resume={run_dir} holds no run (no config.yaml): give the run directory of an earlier run")
    status = _saved_status(run_dir)
    allowed = RESUME_OVERRIDABLE + (RESUME_AFTER_FAILURE if status == "failed" else ())
    keys = [o.lstrip("+~").partition("=")[0] for o in task_overrides]
    bad = [o for o, k in zip(task_overrides, keys) if not _matches(k, allowed)]
    if bad:
        after = ("; after a failed run also optimizer.*, scheduler.* and trainer.gradient_clip_val"
                 if status != "failed" else " and optimizer.*, scheduler.*, trainer.gradient_clip_val")
        raise UserError(
            f"resume continues a run with its saved config; {bad[0]!r} would change what it computes: a resume may "
            "change the device (trainer=gpu, trainer.devices, trainer.precision), trainer.enable_progress_bar, "
            f"logger, data loading (data.eval_batch_size, data.num_workers) and data_root{after}"
        )
    from cl_vit import loading

    saved = OmegaConf.create(loading.read_yaml(saved_path))
    # the saved config is a file: a received run directory must not choose code to run
    loading.check_file_config(saved, str(saved_path), trusted=bool(cfg.get("trust_code")))
    OmegaConf.set_struct(saved, False)
    fixes = []
    for o, key in zip(task_overrides, keys):
        if key == "resume" or key.startswith("hydra."):
            continue
        for k in RESUME_DEVICE_KEYS if key == "trainer" else (key,):  # a trainer preset keeps max_epochs & co.
            if key != "trainer" or OmegaConf.select(cfg, k, default="<absent>") != "<absent>":
                OmegaConf.update(saved, k, OmegaConf.select(cfg, k), merge=False)
        if _matches(key, RESUME_AFTER_FAILURE):
            fixes.append(o)
    if fixes:  # the next experiences train with the fix: config.yaml says so, and so does every later resume
        from cl_vit.rundir import atomic_write_text
        from cl_vit.runs import load_run

        done = load_run(run_dir).completed_experiences
        saved.resumed_with = [*(saved.get("resumed_with") or []), {"after_experience": done, "overrides": fixes}]
        atomic_write_text(saved_path, OmegaConf.to_yaml(saved))
    saved.resume = str(run_dir)
    saved.trust_code = bool(cfg.get("trust_code"))
    return saved


def _check_same_data(rd, source_meta: dict) -> None:
    """A resume reads the data the run started on: a split whose content changed since (a file added or removed) is
    refused in one line naming both digests."""
    try:
        saved = (rd.read_results() or {}).get("source") or {}
    except UserError:  # a damaged results.json is rebuilt from the checkpoints (runs.recover)
        return
    before, now = _split_digest(saved), _split_digest(source_meta)
    if before and now and before != now:
        raise UserError(f"{override('resume', rd.path)}: the train/test split changed since the run started "
                        f"(sha256 {before[:16]}... then, {now[:16]}... now): restore the data the run started on, or "
                        "start a new run")


def _split_digest(source_meta: dict) -> str | None:
    split = source_meta.get("split")
    return split.get("sha256") if isinstance(split, dict) else None


def _saved_status(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        if cfg.get("resume"):
            cfg = resume_config(cfg, list(hc.overrides.task))
        from hydra.types import RunMode

        from cl_vit.loggers import run_name

        # a multirun job is named by its overrides in every logger (TensorBoard: 0/tensorboard/strategy=l2,seed=1)
        name = run_name(hc.overrides.task) if hc.mode == RunMode.MULTIRUN and not cfg.get("resume") else None
        run(cfg, hc.runtime.output_dir, name=name)
    except UserError as e:
        sys.exit(report_error(e))
    except RunStopped as e:  # the completed experiences are kept; results.json says status and reason
        rd = getattr(e, "run_dir", hc.runtime.output_dir)
        again = resume_command(rd)
        if isinstance(e, Interrupted):
            k = f" {e.experience + 1}" if e.experience is not None else ""
            print(f"interrupted during experience{k}: continue with {again}", file=sys.stderr)
        else:
            extra = "".join(f" {a}" for a in getattr(e, "resume_args", ()))
            print(f"error: {e}; then continue with {again}{extra}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before the first experience started: nothing was trained
        print("interrupted before training started: nothing was trained", file=sys.stderr)
        sys.exit(130)


#: Hydra's flag that unpickles a file (``.hydra/config.pickle``) with the full unpickler; argparse also takes any
#: unambiguous prefix of it (``--exp``)
RERUN_FLAG = "--experimental-rerun"


def refuse_rerun(argv: list[str]) -> None:
    """Hydra's ``--experimental-rerun FILE`` rebuilds the config by unpickling FILE, which can run any code: refused
    in one line before Hydra reads it."""
    for a in argv:
        flag = a.partition("=")[0]
        if len(flag) > 2 and RERUN_FLAG.startswith(flag):
            raise UserError(f"{flag} (Hydra's) unpickles the file it is given, and unpickling a file can run any code, "
                            "so it is refused: continue a run with resume=RUN_DIR, or repeat it with the overrides of "
                            "RUN_DIR/.hydra/overrides.yaml")


def main() -> None:
    try:
        refuse_rerun(sys.argv[1:])
        check_group_choices(sys.argv[1:])
        check_override_keys(sys.argv[1:])
    except UserError as e:
        sys.exit(report_error(e))
    # the command: the modules every run imports (avalanche-lib among them) with the cyclic collector paused, then
    # everything so far set aside for the process's life (gc.freeze), so that no full collection walks the ~600,000
    # objects of the libraries again (~1 s of CPU less in the default run, python -m cl_vit.bench.startup)
    with gc_paused():
        from cl_vit import runner, streams  # noqa: F401
    gc.freeze()
    _main()


if __name__ == "__main__":
    main()
