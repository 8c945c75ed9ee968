"""ContinualRunner: the loop over the experiences of a stream.

For each training experience: seed from (seed, experience index), strategies' ``before_experience``, a Lightning
``Trainer.fit`` on the experience's data, ``after_experience``, one evaluation pass over the union of the test data
of every experience seen so far (task-agnostic, predictions grouped by experience), then the run directory is saved
(results.json, accuracy_matrix.csv, the experience's checkpoint). A run resumed after experience k re-enters the loop
at k + 1 with exactly the state an uninterrupted run had, so both end with the same results.

Under DDP (``trainer=ddp``) every process runs this loop (cl_vit.distributed): Lightning shards the training data;
the evaluation pass gives each process a share of the test images without repeats (Lightning's unrepeated sampler
for ``predict``) and the predictions, gathered with each image's position in the union, are checked to cover every
image exactly once. Every process then holds the same results; rank 0 alone writes the run directory while the
others wait for it.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from cl_vit import distributed
from cl_vit import metrics as M
from cl_vit.cost import ExperienceCost
from cl_vit.data.base import CorruptImage
from cl_vit.errors import BadDataDuringRun, DiskFull, Interrupted, RunStopped
from cl_vit.hardware import SUITE_TRAINER_KEYS
from cl_vit.loggers import StreamSteps
from cl_vit.module import ContinualModule
from cl_vit.stream_results import LOCAL, StreamResults, matrix_csv
from cl_vit.rundir import RunDirectory
from cl_vit.streams import StreamInfo, statistics_dataset
from cl_vit.strategies.base import ExperienceInfo

log = logging.getLogger("cl_vit")

# Small in-memory datasets are fastest in the main process; the suite sets num_workers deliberately.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*The number of training batches .* is smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# a resume inside an epoch: the training loader's position comes back through the run's checkpoint callback
# (_ResumableLoader), which Lightning's check for its own stateful-loader interface does not see
warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended.*")
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def experience_seed(seed: int, index: int) -> int:
    """The seed of experience ``index``: a function of (seed, index) only, so a resumed run draws the same numbers."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0] % (2**31 - 1))


@dataclass
class LoaderConfig:
    batch_size: int = 32
    eval_batch_size: int = 256
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    #: DeiT's repeated augmentation (timm RepeatAugSampler, DeiT's RASampler): each image ``repeats`` times per epoch,
    #: the copies on different processes, the epoch cut to floor(N / 256) * 256 images over all processes
    repeated_aug: bool = False
    repeats: int = 3
    #: training loaders drop the last, incomplete batch (DyTox / GCAB-CFDC continual/factory.py L35); kept when it is
    #: the only batch
    drop_last: bool = False


class StreamLogger(StreamSteps, TensorBoardLogger):
    """TensorBoardLogger whose steps continue across the experiences' Trainers (each starts at step 0).

    One event file per run: Lightning closes the writer when each experience's ``fit`` ends, and torch's
    ``SummaryWriter`` then opens a new file on the next write; here a Trainer's ``finalize`` only flushes, and
    ``close()`` ends the run's writer.
    """

    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()
        super().finalize(status)


class ExperienceProgressBar(TQDMProgressBar):
    """Lightning's bar, titled with the experience: ``exp 2/5 · epoch 3/10``.

    It redraws at most every ``min_interval`` seconds (and at the end of an epoch): Lightning redraws it after every
    batch, which costs more than a small model's step (python -m cl_vit.bench runner)."""

    def __init__(self, index: int, n_experiences: int, min_interval: float = 0.2):
        super().__init__()
        self.index, self.n_experiences = index, n_experiences
        self.min_interval = min_interval
        self._drawn = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.monotonic()
        if now - self._drawn >= self.min_interval or batch_idx + 1 == self.train_progress_bar.total:
            self._drawn = now
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self.train_progress_bar.set_description(
            f"exp {self.index + 1}/{self.n_experiences} · epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        )

    #: what the evaluation pass evaluates (set by the runner before ``predict``)
    predict_text = "evaluating"

    @property
    def predict_description(self) -> str:
        return self.predict_text

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        # Lightning's own titles the bar "Predicting DataLoader 0"; the rest is as there
        if not self.has_dataloader_changed(dataloader_idx):
            return
        self.predict_progress_bar.reset(total=convert_inf(self.total_predict_batches_current_dataloader))
        self.predict_progress_bar.initial = 0
        self.predict_progress_bar.set_description(self.predict_text)


class _SigkillAt(Callback):
    """Fault injection for the resume tests: CL_VIT_TEST_SIGKILL_AT="EXP:BATCH[:EPOCH]" kills the process there."""

    def __init__(self, index: int, spec: str):
        exp, batch, *epoch = (int(v) for v in spec.split(":"))
        self.active = exp == index
        self.batch, self.epoch = batch, (epoch[0] if epoch else 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.active and trainer.current_epoch >= self.epoch and batch_idx >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class _FileSizeLimitAt(Callback):
    """Fault injection for the full-disk test: CL_VIT_TEST_FSIZE_AT="EXP:BYTES" limits every file this process
    writes to BYTES from experience EXP on (RLIMIT_FSIZE: a larger write fails as on a full disk)."""

    def __init__(self, index: int, spec: str):
        exp, self.limit = (int(v) for v in spec.split(":"))
        self.active = exp == index

    def on_train_start(self, trainer, pl_module):
        if self.active:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write instead of a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class _EpochTimes(Callback):
    """Wall time of each training epoch (results.json ``cost.time_s.epochs``): the steady speed of a fit, apart from
    its set-up and its first batches."""

    def __init__(self):
        self.seconds: list[float] = []

    def on_train_start(self, trainer, pl_module):  # a resume inside an epoch starts no epoch
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t0)


def _rng_state(generator: torch.Generator | None) -> dict:
    """Every random state a training epoch draws from, as tensors and plain values (weights_only loadable)."""
    import random

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(cached)],
             "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["loader"] = generator.get_state()
    return state


def _set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    import random

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "loader" in state:
        generator.set_state(state["loader"])


class RankSeeds(Callback):
    """Under DDP, training draws (drop path, Mixup / CutMix, dropout) from ``seed + rank``, as DeiT-LT's main.py
    L69-71, DyTox's main.py L335 and Refiner-ViT's main.py L331-332 seed each process; Lightning's DDP re-seeds
    every process alike as a fit starts (``reset_seed``): the same drop-path masks and mixing boxes everywhere. The common state comes
    back when the fit ends, so that what follows it (memory selection, evaluation) draws the same on every process.
    ``setup`` runs before a resume restores each process's saved states, which then win. One process: untouched."""

    def __init__(self, seed: int):
        self.seed, self._common = int(seed), None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit" or distributed.world_size() <= 1:
            return
        import random

        self._common = _rng_state(None)
        own = self.seed + distributed.rank()
        torch.manual_seed(own)
        np.random.seed(own % 2**32)
        random.seed(own)

    def teardown(self, trainer, pl_module, stage):
        if self._common is not None:
            _set_rng_state(self._common, None)
            self._common = None


def _metric_states(module: torch.nn.Module) -> dict:
    """What the module's torchmetrics metrics (the epoch's training accuracy) have accumulated so far: an epoch
    resumed in its middle logs the value of the whole epoch."""
    from torchmetrics import Metric

    return {name: {"state": {k: v.cpu().clone() if isinstance(v, torch.Tensor) else [t.cpu().clone() for t in v]
                             for k, v in m.metric_state.items()}, "updates": int(m._update_count)}
            for name, m in module.named_modules() if isinstance(m, Metric)}


def _load_metric_states(module: torch.nn.Module, states: dict) -> None:
    modules = dict(module.named_modules())
    for name, saved in states.items():
        m = modules.get(name)
        if m is None:
            continue
        for k, v in saved["state"].items():
            setattr(m, k, v.to(m.device) if isinstance(v, torch.Tensor) else [t.to(m.device) for t in v])
        m._update_count, m._computed = int(saved["updates"]), None


class _SkipFirst:
    """A batch sampler whose next iteration leaves out its first ``n`` batches: their indices are drawn (the same
    order as an uninterrupted epoch) but nothing is loaded. Later iterations are whole."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n = sampler, int(n)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        n, self.n = self.n, 0
        return itertools.islice(iter(self.sampler), n, None)


class _ResumableLoader(DataLoader):
    """An experience's training loader that a resume continues inside an epoch.

    Its position (``position``): the order generator's state when the epoch's iterator was made and the batches
    trained since. Given it back (``resume``), its next iterator redraws that epoch's order and leaves out the
    trained batches without loading them. The rest of the epoch then equals an uninterrupted one: Lightning loads
    each batch as its step asks for it (the length is known, so nothing is fetched ahead), and the host random state
    restored with the checkpoint is the one the next batch's augmentations drew from. With ``num_workers`` > 0 the
    order is the same but the workers' augmentation draws restart from their epoch seeds.

    The run's checkpoint callback carries the position, not Lightning's stateful-loader interface: Lightning 2.6
    gives a loader its state only when it sets the loader up after restoring its loops, and ``configure_optimizers``
    (the schedule's ``estimated_stepping_batches``) sets it up before; callbacks are restored before either."""

    #: batches of the current epoch trained so far (set before a checkpoint is written)
    trained = 0
    _epoch_start: torch.Tensor | None = None
    _resume: dict | None = None
    _skip = 0

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        return _SkipFirst(sampler, self._skip) if self._skip else sampler

    def __iter__(self):
        resume, self._resume = self._resume, None
        if resume is not None and resume.get("epoch_start") is not None and self.generator is not None:
            self.generator.set_state(resume["epoch_start"])
        self._epoch_start = self.generator.get_state() if self.generator is not None else None
        self._skip = int(resume["batches"]) if resume is not None else 0
        try:
            return super().__iter__()
        finally:
            self._skip = 0

    def position(self) -> dict:
        return {"epoch_start": self._epoch_start, "batches": int(self.trained)}

    def resume(self, position: dict) -> None:
        self._resume = position


class _EpochCheckpoint(Callback):
    """The experience's state part-way through its training, written through the run directory (plain types,
    atomic) and read back by Lightning with ``weights_only=True``: network, optimiser, schedule, Lightning's loops
    (the batch index inside the epoch), the training loader's position (``_ResumableLoader``), strategies, the
    module's metrics and every random state, so that a resume continues from there with the results an
    uninterrupted run gives. Written every ``every`` epochs of a long experience (``checkpoint_every_epochs``; 0:
    never) and when a signal stops training (``_StopOnSignal``); the state key keeps older files loadable."""

    def __init__(self, runner: "ContinualRunner", index: int, every: int, loader: DataLoader):
        self.runner, self.index, self.every, self.loader = runner, index, int(every), loader
        self.generator = loader.generator
        self._saved_step: int | None = None
        self._position: dict | None = None

    def on_train_epoch_end(self, trainer, pl_module):
        done = trainer.current_epoch + 1
        if self.every > 0 and done % self.every == 0 and done < (trainer.max_epochs or 0):
            self.save(trainer)

    def save(self, trainer) -> None:
        """Write the state now (every process takes part; rank 0 writes). A second signal waits for the write."""
        if self._saved_step == trainer.global_step:
            return
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        self._position = None  # at an epoch's end the next epoch starts afresh
        if isinstance(self.loader, _ResumableLoader) and done < trainer.num_training_batches:
            self.loader.trained = done
            self._position = self.loader.position()
        # Lightning's full state to write (weights_only=False here means "with optimiser, schedule and loops"; no
        # file is read): plain types only, checked by the run directory's writer
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        saving, self.runner._saving = self.runner._saving, True
        try:
            if distributed.is_rank_zero():
                self.runner.run_dir.save_epoch_checkpoint(self.index, state)
        finally:
            self.runner._saving = saving
        distributed.barrier()
        self._saved_step = trainer.global_step

    def state_dict(self) -> dict:
        own = {"rng": _rng_state(self.generator), "metrics": _metric_states(self.runner.module)}
        state = {**own, "strategies": {s.name: s.state_dict() for s in self.runner.module.strategies}}
        if distributed.world_size() > 1:  # every process's random states and metric sums (rank 0 writes the file)
            state["ranks"] = distributed.all_gather_object(own)
        if self._position is not None:  # inside an epoch: where the training loader stands
            state["loader"] = self._position
        return state

    def load_state_dict(self, state: dict) -> None:
        for s in self.runner.module.strategies:
            s.load_state_dict(state["strategies"].get(s.name, {}))
        ranks = state.get("ranks") or []
        own = ranks[distributed.rank()] if len(ranks) == distributed.world_size() else state
        _load_metric_states(self.runner.module, own.get("metrics", {}))
        _set_rng_state(own["rng"], self.generator)
        if state.get("loader") is not None and isinstance(self.loader, _ResumableLoader):
            self.loader.resume(state["loader"])


class _StopOnSignal(Callback):
    """Ends training or evaluation after the current step once SIGINT or SIGTERM arrived (``ContinualRunner``).

    In training (``checkpoint`` given) the experience's state is written first, so that a resume continues from
    that step: after a step inside an epoch it is written at once and the run stops as the next batch starts (the
    step's own logging done); after an epoch's last step, at the epoch boundary once the epoch's end ran (its
    logging, its evaluation), even after the last epoch."""

    def __init__(self, runner: "ContinualRunner", index: int, checkpoint: _EpochCheckpoint | None = None):
        self.runner, self.index, self.checkpoint = runner, index, checkpoint
        self.pending = False

    def _check(self):
        self.runner._check_stop(self.index)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.checkpoint is None:
            return self._check()
        signum = distributed.agree_on_stop(self.runner.stop_signal)
        if signum is None or self.pending:
            return
        self.runner.stop_signal, self.pending = signum, True
        if batch_idx + 1 < trainer.num_training_batches:
            self.checkpoint.save(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.pending:
            self._check()

    def on_train_epoch_start(self, trainer, pl_module):
        if self.pending:
            self._check()

    def on_train_epoch_end(self, trainer, pl_module):
        if self.pending:
            self.checkpoint.save(trainer)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._check()


#: the errors of a write that found no room: the disk, the file-size limit, the quota
DISK_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class _WithExperience(Dataset):
    """Items ``(x, y, j)``: the sample and the evaluation experience it belongs to (the epoch-end evaluation)."""

    def __init__(self, dataset, j: int):
        self.dataset, self.j = dataset, j

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return item[0], item[1], self.j


class _Indexed(Dataset):
    """Items ``(x, y, k)``: a sample and its position ``k`` in the dataset (the union of the seen test sets).

    ``predict_step`` passes the third element through as ``"exp"``; the position tells both the experience and,
    under DDP, that every sample was predicted exactly once.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        item = self.dataset[k]
        return item[0], item[1], k


class ContinualRunner:
    def __init__(
        self,
        module: ContinualModule,
        scenario,
        info: StreamInfo,
        run_dir: RunDirectory,
        *,
        seed: int = 0,
        trainer: dict | None = None,
        loader: LoaderConfig | None = None,
        logger: StreamSteps | Sequence[StreamSteps] | None = None,
        eval_every: int = 1,
        results: StreamResults | None = None,
        class_counts: Sequence[int] | None = None,
        on_experience_end=None,
        checkpoint_meta: dict | None = None,
        epoch_eval: int = 0,
        ema_decay: float | None = None,
        dataset_labels: Sequence[int] | None = None,
        train: bool = True,
        checkpoint_every_epochs: int = 0,
        keep_checkpoints: str | int = "all",
    ):
        self.module = module
        #: a state every k epochs inside an experience (0: only at its end); which experience checkpoints stay
        self.checkpoint_every_epochs = int(checkpoint_every_epochs or 0)
        RunDirectory.check_keep(keep_checkpoints)
        self.keep_checkpoints = keep_checkpoints
        self.scenario = scenario
        self.info = info
        self.run_dir = run_dir
        self.seed = seed
        self.trainer_kwargs = dict(trainer or {})
        for key in SUITE_TRAINER_KEYS:  # the suite's (threads: configure_threads; the module's), not Lightning's
            self.trainer_kwargs.pop(key, None)
        self.loader = loader or LoaderConfig()
        #: cl_vit.loggers: one or several (logger=[tensorboard,csv]); TensorBoard also gets figures and attention maps
        self.loggers = [] if logger is None else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        self.logger = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        self.eval_every = max(1, int(eval_every))
        self.results = results or StreamResults(info=info)
        self.class_counts = list(class_counts) if class_counts is not None else None
        self.on_experience_end = on_experience_end
        #: stored in every checkpoint beside the class names and counts (run.py: the model config and input size),
        #: so that a checkpoint rebuilds its network alone (a DeiT-LT teacher file)
        self.checkpoint_meta = dict(checkpoint_meta or {})
        #: every k epochs, overall and shot-group test accuracy of each head to TensorBoard (long-tailed runs); 0: off
        self.epoch_eval = int(epoch_eval)
        #: model EMA (cl_vit.ema): its decay, or None for none
        self.ema_decay = ema_decay
        #: ExperienceInfo.dataset_labels
        self.dataset_labels = list(dataset_labels) if dataset_labels is not None else None
        #: False: evaluate the network as loaded (model.checkpoint), train nothing (``train=false``)
        self.train = bool(train)

    # -- data ------------------------------------------------------------------------------------------------------

    def _loader(self, dataset, train: bool, seed: int | None = None, shard: bool = False,
                repeated: bool = False, resumable: bool = False, shuffle: bool = True) -> DataLoader:
        """``shard``: under DDP, this process's part of ``dataset``, every sample once over all processes.
        ``shuffle=False``: a training loader in the dataset's order (DyTox's balanced finetuning).
        ``repeated``: the experience's training loader with ``data.repeated_aug`` on: this process's part of the
        repeated epoch (the Trainer then keeps Lightning from replacing the sampler). ``resumable``: an experience's
        training loader, which a resume inside an epoch continues (``_ResumableLoader``)."""
        cfg = self.loader
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        sampler = None
        if repeated:
            from timm.data.distributed_sampler import RepeatAugSampler

            sampler = RepeatAugSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                       shuffle=True, num_repeats=cfg.repeats)
        elif resumable and distributed.world_size() > 1:
            # the sampler Lightning would put in (its DistributedSampler, seeded with the experience's seed), made here
            # so that Lightning keeps this loader, to which a resume gives its position, instead of building another
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(dataset, num_replicas=distributed.world_size(), rank=distributed.rank(),
                                         shuffle=True, seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        elif shard and distributed.world_size() > 1:
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=distributed.world_size(),
                                                   rank=distributed.rank(), shuffle=train, seed=seed or 0)
        return (_ResumableLoader if resumable else DataLoader)(
            dataset,
            batch_size=cfg.batch_size if train else cfg.eval_batch_size,
            shuffle=train and shuffle and sampler is None,
            sampler=sampler,
            drop_last=train and cfg.drop_last and len(dataset) > (cfg.batch_size if train else cfg.eval_batch_size),
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
            generator=generator,
        )

    def _trainer(self, index: int, callbacks=(), checkpoint: _EpochCheckpoint | None = None,
                 **overrides) -> L.Trainer:
        kwargs = dict(self.trainer_kwargs)
        kwargs.update(overrides)
        if kwargs.get("enable_progress_bar", True):
            callbacks = [ExperienceProgressBar(index, len(self.info.train_classes)), *callbacks]
        callbacks = [*callbacks, _StopOnSignal(self, index, checkpoint)]
        if os.environ.get("CL_VIT_TEST_SIGKILL_AT"):
            callbacks.append(_SigkillAt(index, os.environ["CL_VIT_TEST_SIGKILL_AT"]))
        if os.environ.get("CL_VIT_TEST_FSIZE_AT"):
            callbacks.append(_FileSizeLimitAt(index, os.environ["CL_VIT_TEST_FSIZE_AT"]))
        trainer = L.Trainer(
            logger=self.loggers or False,
            callbacks=callbacks,
            enable_checkpointing=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **kwargs,
        )
        # signals are the run's (``_signals``: a flag, and every process stops at the same step). Lightning's own
        # SIGTERM handler broadcasts from inside the handler, a collective the other processes are not in: under DDP
        # a SIGTERM to rank 0 alone hung the run (tests/test_ddp.py); and its SLURM requeue handler saves a
        # checkpoint the suite does not resume from
        trainer._signal_connector.register_signal_handlers = lambda: None
        return trainer

    # -- the loop --------------------------------------------------------------------------------------------------

    #: SIGINT or SIGTERM received during ``run``: the current step ends, then the run stops (``Interrupted``)
    stop_signal: int | None = None
    #: the experience under way (the one a stop names), and whether its results are being written just now
    _index: int = 0
    _saving: bool = False

    def run(self) -> StreamResults:
        """Train and evaluate every experience after the completed ones. A fault (``RunStopped``: a non-finite loss,
        a signal, a full disk) ends the run at a safe point: results.json keeps every completed experience, says
        ``failed`` or ``interrupted`` and why, and ``resume=`` continues after the last completed experience."""
        self._saved = self.results.to_json("running") if self.results.completed else None
        with self._signals():
            try:
                return self._run()
            except RunStopped as e:
                self._stopped(e)
                raise
            except CorruptImage as e:  # an image that no longer decodes (bad input found by a hook stays one line)
                stop = BadDataDuringRun(str(e), self._index)
                self._stopped(stop)
                raise stop from e
            except OSError as e:
                if e.errno not in DISK_ERRNOS:
                    raise
                stop = DiskFull(f"writing {e.filename or self.run_dir.path} failed ({e.strerror}): free space",
                                self.results.completed)
                self._stopped(stop)
                raise stop from e

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT and SIGTERM (a cluster scheduler's warning before it kills a job) set ``stop_signal``; the
        callbacks and the loop stop at the next step. A second signal stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.stop_signal = None

        def handler(signum, frame):
            # a second signal stops at once, except while a checkpoint and results.json are written: that finishes
            # first, so the experience just trained is kept and results.json agrees with the checkpoints
            if self.stop_signal is not None and not self._saving:
                raise Interrupted(signum, self._index)
            self.stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _check_stop(self, i: int) -> None:
        """Stop before the next collective when a signal reached this process or any other: under DDP every process
        stops at the same step, since a collective would otherwise wait for the rank that left."""
        signum = distributed.agree_on_stop(self.stop_signal)
        if signum is not None:
            self.stop_signal = signum
            raise Interrupted(signum, i)

    def _stopped(self, stop: RunStopped) -> None:
        """results.json after a fault: the last saved results, with the status and the reason."""
        if not distributed.is_rank_zero():
            return
        doc = dict(self._saved) if self._saved is not None else StreamResults(
            info=self.info, meta=self.results.meta).to_json("running")
        doc.update(status=stop.status, reason=str(stop))
        if stop.experience is not None:
            doc["stopped_in_experience"] = int(stop.experience) + 1
        try:
            self.run_dir.write_json("results.json", doc)
        except OSError as e:  # the disk is still full: results.json stays as it was (status "running")
            log.warning("results.json could not be updated (%s)", e.strerror)

    def _run(self) -> StreamResults:
        n = len(self.info.train_classes)
        start = self.results.completed
        for i, experience in enumerate(self.scenario.train_stream):
            if i < start:
                continue
            self._index = i
            self._check_stop(i)
            t0 = time.perf_counter()
            L.seed_everything(experience_seed(self.seed, i), workers=True, verbose=False)
            seen = sorted({c for exp in self.info.train_classes[: i + 1] for c in exp})
            info = ExperienceInfo(
                index=i,
                n_experiences=n,
                classes=list(self.info.train_classes[i]),
                seen_classes=seen,
                n_classes=self.info.n_classes,
                train_loader=lambda ds=experience.dataset, i=i, **kw: self._loader(
                    statistics_dataset(self.scenario, i) if kw.get("transform") == "test" else ds,
                    kw.get("train", True), kw.get("seed"), kw.get("shard", False), shuffle=kw.get("shuffle", True)),
                class_counts=self.class_counts,
                class_names=list(self.info.class_names) or None,
                dataset_labels=self.dataset_labels,
                dataset=lambda j, transform="train": (statistics_dataset(self.scenario, j) if transform == "test"
                                                      else self.scenario.train_stream[j].dataset),
                seed=int(self.seed),
            )
            log.info(
                "Experience %d/%d · %d classes %s · %d training images",
                i + 1, n, len(info.classes), _short(info.classes), len(experience.dataset),
            )
            repeated = self.loader.repeated_aug
            dataset = experience.dataset
            for s in self.module.strategies if self.train else ():  # a replay memory's samples join the experience's
                dataset = s.train_dataset(self.module, info, dataset)
            loader = self._loader(dataset, True, experience_seed(self.seed, i), repeated=repeated, resumable=True)
            # an experience shorter than the logging interval would log no loss at all (each Trainer restarts at 0)
            per_process = len(loader) if repeated else math.ceil(len(loader) / distributed.world_size())
            every = max(1, min(int(self.trainer_kwargs.get("log_every_n_steps") or 50), per_process))
            # Lightning would wrap the repeated-augmentation sampler in its own distributed one: it shards already
            callbacks = self._fit_callbacks(i)
            # always there: a signal writes the state of the step it stopped at (checkpoint_every_epochs or not)
            checkpoint = _EpochCheckpoint(self, i, self.checkpoint_every_epochs, loader)
            callbacks.append(checkpoint)
            epochs = _EpochTimes()
            trainer = self._trainer(i, callbacks=[RankSeeds(experience_seed(self.seed, i)), epochs, *callbacks],
                                    checkpoint=checkpoint, log_every_n_steps=every,
                                    **({"use_distributed_sampler": False} if repeated else {}))
            # every hook sees the module on the training device (Lightning moves it back to the CPU after fit)
            device = trainer.strategy.root_device
            self.module.to(device)
            # the hooks before fit (and SimpleCIL's, which has none) see this trainer and the network in the dtype
            # of trainer.precision (64-true: float64), as fit will leave it (module.as_step_input / outside_step)
            self.module.trainer = trainer
            trainer.precision_plugin.convert_module(self.module)
            cost = ExperienceCost(device)
            self.module.start_experience(info)
            if self.train:
                for s in self.module.strategies:
                    s.before_experience(self.module, info)
                cost.fit_started(self.module)
                partial = self.run_dir.epoch_checkpoint_path(i)
                if any(p.requires_grad for p in self.module.parameters()):  # e.g. SimpleCIL trains nothing
                    if partial.exists():  # a resume after a preemption or a signal: from the step saved on
                        log.info("  continuing experience %d from %s", i + 1, partial.name)
                        trainer.fit(self.module, train_dataloaders=loader, ckpt_path=str(partial), weights_only=True)
                    else:
                        trainer.fit(self.module, train_dataloaders=loader)
                self._check_stop(i)  # arrived in fit's last step or outside a step
                self.module.to(device)
                for s in self.module.strategies:
                    s.after_experience(self.module, info)
            else:
                cost.fit_started(self.module)
            if self.train:
                for lg in self.loggers:
                    lg.step_offset += trainer.global_step
            t_eval = time.perf_counter()
            evaluation = None
            if (i + 1) % self.eval_every == 0 or i == n - 1:
                evaluation = self.evaluate(i, trainer)
            t_end = time.perf_counter()
            # where the experience's time went: set-up, training and the strategies' hooks (prototypes, ridge,
            # alignment) / evaluation; _save adds the checkpoint's write
            spent = {"train": t_eval - t0, "evaluate": t_end - t_eval, "epochs": epochs.seconds}
            self.results.record(i, evaluation, t_end - t0,
                                {**cost.finish(self.module, self.module.strategies), "time_s": spent})
            for cb in callbacks:  # the per-epoch test numbers: last and best epoch (selected on the test set)
                if getattr(cb, "summary", None) and cb.summary() is not None:
                    self.results.epoch_selection[i] = cb.summary()
            distributed.assert_consistent(
                {"the network": self.module.state_dict(),
                 **{f"the state of strategy {s.name!r}": s.state_dict() for s in self.module.strategies}},
                when=f"after experience {i + 1}",
            )
            self._check_stop(i)
            self.results.rss_mib.append(rss_mib())
            if distributed.is_rank_zero():
                self._save(i, status="completed" if i == n - 1 else "running")
                if evaluation is not None:
                    self._report(i)
            distributed.barrier()  # no process runs ahead of what the run directory holds
            if self.on_experience_end is not None:
                self.on_experience_end(self, i)
        return self.results

    def _fit_callbacks(self, i: int) -> list:
        ema = []
        if self.ema_decay is not None:
            from cl_vit.ema import ModelEma

            ema = [ModelEma(self.ema_decay)]
        if not (self.epoch_eval and self.class_counts is not None):
            return ema
        from cl_vit.epoch_eval import ShotGroupEpochEval

        # a fixed generator: building the loader's iterator must not draw from the training RNG
        loader = self._loader(self._eval_dataset(i), train=False, seed=0)
        return [*ema, ShotGroupEpochEval(loader, self.class_counts, every=self.epoch_eval,
                                         shot_groups_record=self.results.meta.get("shot_groups"))]

    def _eval_dataset(self, i: int) -> ConcatDataset:
        test_stream = self.scenario.test_stream
        return ConcatDataset([_WithExperience(test_stream[j].dataset, j) for j in self.info.seen_eval_experiences(i)])

    def evaluate(self, i: int, trainer: L.Trainer | None = None) -> dict[str, dict[int, np.ndarray]]:
        """One pass over the union of the seen experiences' test data; sparse confusions per head and experience.

        Under DDP each process predicts its share; the shares are gathered and every process computes the same
        confusions from all of them."""
        seen = self.info.seen_eval_experiences(i)
        test_stream = self.scenario.test_stream
        parts = [test_stream[j].dataset for j in seen]
        union = ConcatDataset(parts)
        trainer = trainer or self._trainer(i)
        for cb in trainer.callbacks:
            if isinstance(cb, ExperienceProgressBar):
                numbers = [j + 1 for j in seen]
                cb.predict_text = (f"exp {i + 1}/{len(self.info.train_classes)} · evaluating {len(union)} test images "
                                   f"of experience{'s' if len(seen) > 1 else ''} "
                                   f"{_span(numbers)}")
        if len(self.info.eval_classes) > 1:  # task-incremental ("local") accuracy beside the task-agnostic one
            tasks = torch.full((self.info.n_classes,), -1, dtype=torch.long)
            for j, classes in enumerate(self.info.eval_classes):
                tasks[classes] = j
            self.module.task_of_class = tasks
        try:
            # sharded here, not by Lightning: the fit Trainer may have its distributed sampler off (data.repeated_aug)
            outputs = trainer.predict(self.module, dataloaders=self._loader(_Indexed(union), train=False, shard=True))
        finally:
            self.module.task_of_class = None
        merged = merge_predictions(distributed.all_gather_object(_stack_predictions(outputs)), len(union))
        exp = np.repeat(np.asarray(seen), [len(d) for d in parts])
        y = merged["y"]
        return {head: {j: M.confusion_entries(y[exp == j], preds[exp == j]) for j in seen}
                for head, preds in merged["preds"].items()}

    # -- saving and reporting --------------------------------------------------------------------------------------

    def checkpoint_state(self, i: int) -> dict:
        return {
            "experience": i,
            # this experience's row of results: a damaged results.json is rebuilt from the checkpoints
            "row": self.results.row(i),
            "module": self.module.state_dict(),
            "strategies": {s.name: s.state_dict() for s in self.module.strategies},
            "global_step": self.loggers[0].step_offset if self.loggers else 0,
            "class_order": self.info.class_order,
            "class_names": list(self.info.class_names),
            "class_counts": self.class_counts,
            **self.checkpoint_meta,
        }

    def _save(self, i: int, status: str) -> None:
        self._saving = True
        try:
            self._write(i, status)
        finally:
            self._saving = False

    def _write(self, i: int, status: str) -> None:
        rd = self.run_dir
        t0 = time.perf_counter()
        rd.save_checkpoint(i, self.checkpoint_state(i))  # first: results.json never names a missing checkpoint
        self.results.cost[i]["time_s"]["checkpoint"] = time.perf_counter() - t0  # recorded just before
        doc = self.results.to_json(status)
        rd.write_json("results.json", doc)
        self._saved = doc
        rd.write_file("accuracy_matrix.csv", matrix_csv(self.results.accuracy_matrix()))
        rd.prune_checkpoints(i, self.keep_checkpoints)

    def _report(self, i: int) -> None:
        R = self.results.accuracy_matrix()
        row = R[i]
        a_t = float(np.nanmean(row))
        log.info("  A_%d = %.4f · per experience: %s", i + 1, a_t, " ".join(f"{v:.3f}" for v in row[~np.isnan(row)]))
        local = self.results.accuracy_matrix(LOCAL)[i] if LOCAL in self.results.confusions else None
        if local is not None and np.any(~np.isnan(local)):
            log.info("  task-incremental (local) A_%d = %.4f", i + 1, float(np.nanmean(local)))
        # experiences are numbered from 1 wherever they are shown (console, figures, CSV, loggers); stored indexes
        # (results.json, checkpoint files) stay 0-based
        scalars = {f"eval/acc/exp_{j + 1}": float(v) for j, v in enumerate(row) if not np.isnan(v)}
        for lg in self.loggers:  # at the experience's last step (steps must grow in W&B), the experience beside them
            if lg is not self.logger:
                lg.log_metrics({**scalars, "eval/A_t": a_t, "experience": i + 1}, step=0)
        if self.logger is None:
            return
        tb = self.logger.experiment
        for tag, v in scalars.items():
            tb.add_scalar(tag, v, i + 1)
        tb.add_scalar("eval/A_t", a_t, i + 1)
        from cl_vit.plots import accuracy_matrix_figure, log_attention_maps

        tb.add_figure("eval/accuracy_matrix", accuracy_matrix_figure(R, title=f"after experience {i + 1}"), i + 1)
        log_attention_maps(tb, self.module, self.scenario, i + 1)  # models with get_attention_maps (Refiner-ViT)
        tb.flush()


def _stack_predictions(outputs) -> dict:
    """This process's predictions as numpy arrays: positions, labels and each head's predicted class."""
    outputs = outputs or []
    cat = lambda ts: torch.cat(ts).cpu().numpy() if ts else np.zeros(0, dtype=np.int64)  # noqa: E731
    heads = outputs[0]["preds"].keys() if outputs else ()
    return {
        "index": cat([o["exp"] for o in outputs]),
        "y": cat([o["y"] for o in outputs]),
        "preds": {h: cat([o["preds"][h] for o in outputs]) for h in heads},
    }


def merge_predictions(shares: list[dict], n: int) -> dict:
    """The predictions of every process in dataset order; each of the ``n`` samples must appear exactly once."""
    index = np.concatenate([s["index"] for s in shares]).astype(np.int64)
    counts = np.bincount(index, minlength=n) if index.size else np.zeros(n, dtype=np.int64)
    if len(counts) != n or not np.all(counts == 1):
        raise RuntimeError(
            f"evaluation must see each of the {n} test images once: {int(np.sum(counts == 0))} missed, "
            f"{int(np.sum(counts > 1))} seen more than once"
        )
    order = np.argsort(index, kind="stable")
    heads = next((list(s["preds"]) for s in shares if s["preds"]), [])
    return {
        "y": np.concatenate([s["y"] for s in shares])[order],
        "preds": {h: np.concatenate([s["preds"][h] for s in shares if h in s["preds"]])[order] for h in heads},
    }


def rss_mib() -> float:
    """This process's resident memory now (MiB); its peak so far where /proc is missing (macOS)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB elsewhere


def _span(numbers: list[int]) -> str:
    """``[1, 2, 3]`` -> ``1-3``; other lists as they are."""
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(map(str, numbers))


def _short(classes: list[int], k: int = 8) -> str:
    return str(classes) if len(classes) <= k else f"[{', '.join(map(str, classes[:k]))}, ...]"
