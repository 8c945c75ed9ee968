"""Sources + a protocol -> an Avalanche class-incremental scenario.

A protocol is data: the class order (a named rule, a list, or a file under ``tasks/``) and how many classes each
experience takes. Labels are remapped to their position in the class order, so experience ``t`` holds a contiguous
label range and ``class_order[k]`` names the source label behind stream label ``k`` (recorded in results.json).

Avalanche's ``class_incremental_benchmark`` silently drops classes left over when the count does not divide the
number of experiences; here that is an error, or, with ``remainder="last"``, the last experience takes them.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from cl_vit.loading import defer_import, import_deferring

# avalanche.benchmarks imports its GEM plug-in, which imports qpsolvers, which warns on import when no QP solver is
# installed; the suite never solves a QP (no GEM), so a normal run's console stays clean
warnings.filterwarnings("ignore", message=r"no QP solver found", category=UserWarning, module=r"qpsolvers")
# and qpsolvers probes every solver on import, JAX's among them (~2 s of CPU): its code runs when GEM first uses it
defer_import("qpsolvers")
# and its confusion-matrix metric imports wandb for a W&B plot: imported when that plot is drawn
import_deferring("avalanche", "wandb")

from avalanche.benchmarks.scenarios.dataset_scenario import DatasetExperience  # noqa: E402
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario, EagerCLStream  # noqa: E402
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from cl_vit.data.base import Source  # noqa: E402
from cl_vit.data.protocol import experience_sizes, resolve_class_order  # noqa: E402
from cl_vit.errors import UserError  # noqa: E402



@dataclass
class StreamInfo:
    """What the runner, the metrics and the results need to know about a stream."""

    n_classes: int
    #: classes (stream labels) of each training experience
    train_classes: list[list[int]]
    #: classes (stream labels) of each evaluation experience; equal to ``train_classes`` except in joint runs
    eval_classes: list[list[int]]
    #: source label of each stream label
    class_order: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    #: how the order was chosen (rule, seed or file), for the record
    class_order_rule: str = ""

    def seen_eval_experiences(self, i: int) -> list[int]:
        """Evaluation experiences whose classes are all seen after training experience ``i``."""
        seen = {c for exp in self.train_classes[: i + 1] for c in exp}
        return [j for j, cls in enumerate(self.eval_classes) if set(cls) <= seen]

    def to_dict(self) -> dict:
        return {
            "n_classes": self.n_classes,
            "class_order": self.class_order,
            "class_order_rule": self.class_order_rule,
            "class_names": self.class_names,
            "experiences": self.train_classes,
            "eval_experiences": self.eval_classes,
        }

    @classmethod
    def from_scenario(cls, scenario) -> "StreamInfo":
        """Read the protocol off any Avalanche classification scenario (labels kept as they are)."""
        train = [sorted(int(c) for c in e.classes_in_this_experience) for e in scenario.train_stream]
        test = [sorted(int(c) for c in e.classes_in_this_experience) for e in scenario.test_stream]
        n = 1 + max(c for exp in train + test for c in exp)
        return cls(n, train, test, list(range(n)), [str(c) for c in range(n)], "scenario")


# -- building the scenario ---------------------------------------------------------------------------------------


class RemappedDataset(Dataset):
    """A view of a dataset whose labels are replaced by their position in the class order."""

    def __init__(self, dataset: Dataset, mapping: np.ndarray):
        self.dataset = dataset
        self.mapping = mapping
        self.targets = mapping[np.asarray(dataset.targets, dtype=np.int64)].tolist()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x = self.dataset[i][0]
        return x, self.targets[i]


def under_test_transform(train: Dataset, test: Dataset) -> Dataset | None:
    """The training images as the test split reads them (its ``transform`` and ``decode``), in the same order; None
    when the datasets do not expose a ``transform`` (a foreign dataset: the runner falls back to Avalanche's eval
    transform group). SimpleCIL, RanPAC and SLCA compute their statistics from this view, as their official loaders
    re-read the training images in test mode."""
    if not (hasattr(train, "transform") and hasattr(test, "transform")):
        return None
    view = copy.copy(train)
    view.transform = test.transform
    if hasattr(train, "decode") or hasattr(test, "decode"):
        view.decode = getattr(test, "decode", None)
    return view


def build_stream(
    source: Source,
    *,
    n_experiences: int | None = None,
    classes_per_experience=None,
    class_order="identity",
    seed: int = 0,
    remainder: str = "error",
    joint: bool = False,
) -> tuple[CLScenario, StreamInfo]:
    """The class-incremental scenario of ``source`` under a protocol.

    ``joint=True`` trains once on all the training data and evaluates per original experience (the upper bound).
    """
    n = source.n_classes
    order, rule = resolve_class_order(class_order, n, seed)
    sizes = experience_sizes(n, n_experiences, classes_per_experience, remainder)
    for split, targets in (("train", source.train_targets), ("test", source.test_targets)):
        missing = sorted(set(range(n)) - set(np.unique(targets).tolist()))
        if missing:
            names = [source.classes[c] for c in missing[:5]]
            raise UserError(f"the {split} split of {source.name} has no samples of classes {names}: check the data")
    mapping = np.empty(n, dtype=np.int64)
    mapping[np.asarray(order)] = np.arange(n)
    train = RemappedDataset(source.train, mapping)
    test = RemappedDataset(source.test, mapping)
    identity = list(range(n))
    if joint:
        train_sc = class_incremental_benchmark({"train": train}, class_order=identity, num_classes_per_exp=[n])
        test_sc = class_incremental_benchmark({"test": test}, class_order=identity, num_classes_per_exp=sizes)
        scenario = CLScenario([train_sc.train_stream, test_sc.test_stream])
    else:
        scenario = class_incremental_benchmark(
            {"train": train, "test": test}, class_order=identity, num_classes_per_exp=sizes
        )
    statistics = under_test_transform(source.train, source.test)
    if statistics is not None:  # split on demand (statistics_dataset), as the training stream is split
        scenario.cl_vit_statistics = (RemappedDataset(statistics, mapping), [n] if joint else sizes)
    bounds = np.cumsum([0] + sizes)
    eval_classes = [list(range(bounds[k], bounds[k + 1])) for k in range(len(sizes))]
    info = StreamInfo(
        n_classes=n,
        train_classes=[identity] if joint else eval_classes,
        eval_classes=eval_classes,
        class_order=order,
        class_names=[source.classes[c] for c in order],
        class_order_rule=rule,
    )
    return scenario, info


def statistics_dataset(scenario, index: int):
    """Training experience ``index``'s images under the test transform, the same samples in the same order: for a
    suite-built scenario its source's training images through the test transform, split into experiences as the
    training stream is (once, on the first call: runs that never ask pay nothing); for a foreign scenario Avalanche's
    eval transform group of the experience."""
    stream = getattr(scenario, "cl_vit_statistics_stream", None)
    if stream is None and getattr(scenario, "cl_vit_statistics", None) is not None:
        data, sizes = scenario.cl_vit_statistics
        stream = class_incremental_benchmark({"statistics": data}, class_order=list(range(sum(sizes))),
                                             num_classes_per_exp=sizes).statistics_stream
        scenario.cl_vit_statistics_stream = stream
    if stream is not None:
        return stream[index].dataset
    return scenario.train_stream[index].dataset.eval()


def describe(scenario, info: StreamInfo) -> dict:
    """Per experience: classes and train/test sizes (what ``dry_run`` prints and writes as stream.json)."""
    exps = []
    for k, e in enumerate(scenario.train_stream):
        exps.append({"classes": info.train_classes[k], "n_train": len(e.dataset)})
    for k, e in enumerate(scenario.test_stream):
        if k < len(exps) and info.train_classes[k] == info.eval_classes[k]:
            exps[k]["n_test"] = len(e.dataset)
    out = {"experiences": exps}
    if info.train_classes != info.eval_classes:
        out["eval_experiences"] = [
            {"classes": info.eval_classes[k], "n_test": len(e.dataset)} for k, e in enumerate(scenario.test_stream)
        ]
    return out
