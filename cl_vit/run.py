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

import logging
import sys
from pathlib import Path

import hydra
import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cl_vit.config import CONFIG_DIR, check_group_choices, validate
from cl_vit.errors import UserError

log = logging.getLogger("cl_vit")

if not OmegaConf.has_resolver("cl_vit.run_dir"):
    # a resumed run writes into the directory it resumes; Hydra's own record of the first launch stays untouched
    OmegaConf.register_new_resolver("cl_vit.run_dir", lambda resume, default: resume if resume else default)
    OmegaConf.register_new_resolver("cl_vit.hydra_subdir", lambda resume: None if resume else ".hydra")

#: what a resumed run may change: where it runs and how it loads data, never what it computes
RESUME_OVERRIDABLE = ("trainer.", "data.num_workers", "data.pin_memory", "data.persistent_workers",
                      "data.eval_batch_size", "data.verify", "data_root", "hydra.", "resume", "logger.", "compile")


def data_root(cfg) -> str:
    return str(Path(str(cfg.data_root)).expanduser())


def source_arguments(cfg: DictConfig) -> dict:
    """``benchmark.source_args`` plus what the run decides for every source: ``normalize: model`` resolved to the
    backbone's pretrained mean/std, the corrupt-image policy (``skip_corrupt``, ``data.verify``)."""
    args = OmegaConf.to_container(cfg.benchmark.source_args or {}, resolve=True)
    if args.get("normalize") == "model" and not (args.get("mean") and args.get("std")):
        from cl_vit.data.transforms import model_normalization

        mean, std, _ = model_normalization(OmegaConf.to_container(cfg.model, resolve=True))
        args.update(mean=list(mean), std=list(std))
    args.setdefault("skip_corrupt", bool(cfg.get("skip_corrupt", False)))
    args.setdefault("verify", cfg.data.get("verify", "header"))
    return args


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


def dataset_labels(source, info) -> list[int]:
    """The label each stream class has in the dataset's own files: the stream's class order undone, and the source's
    re-indexing (``map_targets``, meta ``class_map``: file label -> source label) undone."""
    order = np.asarray(info.class_order, dtype=np.int64)
    class_map = (source.meta.get("map_targets") or {}).get("class_map")
    if class_map is None:
        return order.tolist()
    return np.argsort(np.asarray(class_map, dtype=np.int64))[order].tolist()


def build(cfg: DictConfig, scenario=None):
    """Source, stream, model and strategies from a config: everything a run needs, nothing trained yet."""
    from cl_vit.data import build_source
    from cl_vit.models import build_model
    from cl_vit.module import ContinualModule
    from cl_vit.streams import StreamInfo, build_stream
    from cl_vit.strategies import build_strategies

    b = cfg.benchmark
    source = None
    if scenario is None:
        source = build_source(b.source, data_root=data_root(cfg), **source_arguments(cfg))
        class_order = b.class_order
        if OmegaConf.is_config(class_order):
            class_order = OmegaConf.to_container(class_order)
        scenario, info = build_stream(
            source,
            n_experiences=b.n_experiences,
            classes_per_experience=OmegaConf.to_container(b.classes_per_experience)
            if OmegaConf.is_config(b.classes_per_experience) else b.classes_per_experience,
            class_order=class_order,
            seed=cfg.seed,
            remainder=b.remainder,
            joint=b.joint,
        )
        in_chans, img_size = source.in_chans, source.img_size
        class_counts = source.train_counts()[np.asarray(info.class_order)].tolist()
    else:
        info = StreamInfo.from_scenario(scenario)
        x = scenario.train_stream[0].dataset[0][0]
        in_chans, img_size = int(x.shape[0]), int(x.shape[-1])
        counts = np.zeros(info.n_classes, dtype=np.int64)
        for e in scenario.train_stream:
            counts += np.bincount(np.asarray(list(e.dataset.targets)), minlength=info.n_classes)
        class_counts = counts.tolist()
    L.seed_everything(cfg.seed, verbose=False)  # the network's initialisation is a function of the seed
    net = build_model(OmegaConf.to_container(cfg.model), info.n_classes, in_chans, img_size)
    strategies = build_strategies(OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.get("strategy") else {})
    if cfg.get("train") is False:  # evaluation only: strategies shape training (a DeiT-LT teacher is not needed)
        strategies = []
    module = ContinualModule(
        net,
        info.n_classes,
        strategies,
        loss=cfg.loss.name,
        mask_old_logits=cfg.loss.mask_old_logits,
        optimizer=OmegaConf.to_container(cfg.optimizer),
        scheduler=OmegaConf.to_container(cfg.scheduler),
    )
    module.input_size = (int(in_chans), int(img_size), int(img_size))  # the geometry the net was built for
    for s in strategies:
        s.setup(module)
    if cfg.get("compile"):
        from cl_vit.hardware import compile_forward

        compile_forward(module)
    return source, scenario, info, module, class_counts


def run(cfg: DictConfig, run_dir: str | Path, scenario=None):
    """Run (or resume, with ``cfg.resume``) a stream into ``run_dir``; returns the results document.

    ``scenario``: a ready Avalanche classification scenario to run instead of ``cfg.benchmark``.
    """
    from cl_vit import distributed, report
    from cl_vit.data.longtail import shot_group_record
    from cl_vit.hardware import trainer_kwargs
    from cl_vit.models import weights_origin
    from cl_vit.results import RunDirectory, StreamResults
    from cl_vit.runner import ContinualRunner, StreamLogger
    from cl_vit.streams import describe

    distributed.quiet_other_ranks()
    validate(cfg)
    trainer_args = trainer_kwargs(OmegaConf.to_container(cfg.trainer))
    rd = RunDirectory(run_dir)
    resuming = bool(cfg.get("resume"))
    if resuming and not rd.config_path.exists():
        raise UserError(f"resume={rd.path} holds no run (no config.yaml): give the run directory of an earlier run")
    if not resuming and rd.has_results():
        raise UserError(f"{rd.path} already holds a run: continue it with resume={rd.path}, or set another hydra.run.dir")

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
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_json("stream.json", stream_doc)
        print(f"dry run: nothing trained · stream written to {rd.stream_path}")
        return stream_doc

    # several processes (trainer=ddp): the others start here, re-running this command line; only rank 0 writes
    distributed.launch(trainer_args)
    meta = {
        "benchmark": cfg.benchmark.name,
        "model": cfg.model.name,
        # "timm:<arch>.<tag>" or "checkpoint:<path>" when the backbone did not start at random (the L2/EWC anchor)
        "weights": weights_origin(module.net),
        "strategy": strategy_names,
        "seed": int(cfg.seed),
        "n_params": int(n_params),
        "source": source.meta if source is not None else {"name": "avalanche scenario"},
        "class_counts": class_counts,
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
    logger = None
    if cfg.logger.name == "tensorboard":
        logger = StreamLogger(save_dir=str(rd.path), name="tensorboard", version="", default_hp_metric=False)
    if resuming:
        doc = rd.read_results()
        if doc is not None:
            if doc["class_order"] != info.class_order:
                raise UserError(f"resume={rd.path}: the stream's class order differs from the saved one; check data_root")
            results = StreamResults.from_json(doc, info)
            results.meta = meta
        if results.completed:
            state = rd.load_checkpoint(results.completed - 1)
            for s in module.strategies:
                s.load_state_dict(state["strategies"].get(s.name, {}))
            module.load_state_dict(state["module"])
            if logger is not None:
                logger.step_offset = int(state.get("global_step", 0))
        if results.completed >= len(info.train_classes):
            log.info("%s is already complete", rd.path)
            if distributed.is_rank_zero():
                print(report.format_results(results.to_json("completed"), rd.path))
            return results.to_json("completed")
        log.info("Resuming %s after experience %d of %d", rd.path, results.completed, len(info.train_classes))
    elif distributed.is_rank_zero():
        rd.path.mkdir(parents=True, exist_ok=True)
        rd.write_text("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
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
        logger=logger,
        eval_every=cfg.eval_every,
        results=results,
        class_counts=class_counts,
        # every checkpoint can rebuild its network alone (cl_vit.models.teachers.load_teacher)
        checkpoint_meta={"model": OmegaConf.to_container(cfg.model, resolve=True), "input_size": list(module.input_size)},
        epoch_eval=int(cfg.get("epoch_eval") or 0) if cfg.benchmark.get("long_tailed") else 0,
        ema_decay=OmegaConf.select(cfg, "ema.decay"),
        dataset_labels=dataset_labels(source, info) if source is not None else None,
        train=OmegaConf.select(cfg, "train", default=True) is not False,
    )
    runner.run()
    report.finish_run(rd.path, logger.experiment if logger is not None else None)  # figures, TensorBoard hparams
    if logger is not None:
        logger.close()
    doc = results.to_json("completed")
    if distributed.is_rank_zero():
        print(report.format_results(doc, rd.path))
    return doc


def resume_config(cfg: DictConfig, task_overrides: list[str]) -> DictConfig:
    """The saved config of the run being resumed, with the few overrides a resume may change."""
    run_dir = Path(str(cfg.resume)).expanduser()
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        raise UserError(f"resume={run_dir} holds no run (no config.yaml): give the run directory of an earlier run")
    bad = [o for o in task_overrides if not o.lstrip("+~").startswith(RESUME_OVERRIDABLE)]
    if bad:
        raise UserError(
            f"resume continues a run with its saved config; {bad[0]!r} would change what it computes: "
            "only trainer.*, data loading and data_root may change on resume"
        )
    saved = OmegaConf.load(saved_path)
    OmegaConf.set_struct(saved, False)
    for o in task_overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key != "resume" and not key.startswith("hydra."):
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    saved.resume = str(run_dir)
    return saved


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        if cfg.get("resume"):
            cfg = resume_config(cfg, list(hc.overrides.task))
        run(cfg, hc.runtime.output_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
