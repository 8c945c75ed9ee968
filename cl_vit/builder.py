"""A run's parts from its config: source, stream, model, module and strategies, nothing trained yet.

The command line (``cl_vit.run``), ``Run.restore`` (``cl_vit.runs``) and the benches build from here, so that the
run directory never reaches up to the command line.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cl_vit.errors import UserError
from cl_vit.loading import TARGET


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
    if TARGET not in args:  # the suite's own sources share the corrupt-image policy
        args.setdefault("skip_corrupt", bool(cfg.get("skip_corrupt", False)))
        args.setdefault("verify", cfg.data.get("verify", "header"))
    return args


def dataset_labels(source, info) -> list[int]:
    """The label each stream class has in the dataset's own files: the stream's class order undone, and the source's
    re-indexing (``map_targets``, meta ``class_map``: file label -> source label) undone."""
    order = np.asarray(info.class_order, dtype=np.int64)
    class_map = (source.meta.get("map_targets") or {}).get("class_map")
    if class_map is None:
        return order.tolist()
    return np.argsort(np.asarray(class_map, dtype=np.int64))[order].tolist()


def train_batch_stage(cfg: DictConfig, source, strategies):
    """timm's prefetcher stage (normalisation, random erasing) when the source's DeiT pipeline has
    ``augment.prefetcher`` on; checks that the strategies can take its uint8 batches."""
    from cl_vit.data.transforms import prefetch_meta, prefetch_stage
    from cl_vit.strategies import STRATEGIES

    meta = source.meta if source is not None else prefetch_meta(source_arguments(cfg))
    stage = prefetch_stage(meta)
    if stage is None:
        return None
    for s in strategies:
        if not s.uint8_batches:
            takes = sorted(n for n, c in STRATEGIES.items() if c.uint8_batches)
            raise UserError(f"strategy {s.name} expects normalised images, and benchmark.source_args.augment."
                            f"prefetcher=true hands uint8 batches to the strategies (works with "
                            f"{', '.join(takes)}): set it to false or drop {s.name}")
    return stage


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
    net = build_model(OmegaConf.to_container(cfg.model, resolve=True), info.n_classes, in_chans, img_size)
    strategies = build_strategies(OmegaConf.to_container(cfg.strategy, resolve=True) if cfg.get("strategy") else {})
    if cfg.get("train") is False:  # evaluation only: strategies shape training (a DeiT-LT teacher is not needed)
        strategies = []
    module = ContinualModule(
        net,
        info.n_classes,
        strategies,
        loss=cfg.loss.name,
        mask_old_logits=cfg.loss.mask_old_logits,
        mask_unseen=cfg.loss.get("mask_unseen", True),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
        finite_check_every=int(cfg.trainer.get("finite_check_every") or 1),
        eval_autocast=cfg.trainer.get("eval_autocast"),
    )
    module.input_size = (int(in_chans), int(img_size), int(img_size))  # the geometry the net was built for
    module.batch_stage = train_batch_stage(cfg, source, strategies)
    for s in strategies:
        s.setup(module)
    if cfg.get("compile"):
        from cl_vit.hardware import compile_forward

        compile_forward(module)
    return source, scenario, info, module, class_counts
