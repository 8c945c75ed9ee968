"""How many images a coreset of 5,000 holds after each task, with ``strategy.replay.rebuild=memory`` and ``draws``,
on the task sizes of ImageNet-R (24,000 training images, 10 tasks of 20 classes) and CIFAR-100 (50,000, 10 of 10);
with the path of a GT-RIPL/CODA-Prompt checkout, beside the official coreset code itself (dataloaders/dataloader.py
``append_coreset`` L128-137 and ``update_coreset`` L139-160 on the same label lists, images replaced by their ids):

    git clone https://github.com/GT-RIPL/CODA-Prompt /tmp/coda/CODA-Prompt
    python scripts/replay_coreset_sizes.py [/tmp/coda/CODA-Prompt]

Each line: after each task, (entries, distinct images, entries of past classes). Only labels are involved: no
network, no data files.
"""
import sys
from pathlib import Path

import numpy as np

from cl_vit.strategies.base import ExperienceInfo
from cl_vit.strategies.replay import Replay

MEMORY = 5000
SETTINGS = {"imagenet-r": (120, 10, 20), "cifar100": (500, 10, 10)}  # images per class, tasks, classes per task


class Labels:
    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def task_labels(per_class, n_tasks, cpt):
    return [[t * cpt + k // per_class for k in range(cpt * per_class)] for t in range(n_tasks)]


def suite(per_class, n_tasks, cpt, rebuild, seed=0):
    replay, tasks = Replay(memory_size=MEMORY, rebuild=rebuild), [Labels(y) for y in task_labels(per_class, n_tasks, cpt)]
    out = []
    for t in range(n_tasks):
        info = ExperienceInfo(index=t, n_experiences=n_tasks, classes=list(range(t * cpt, (t + 1) * cpt)),
                              seen_classes=list(range((t + 1) * cpt)), n_classes=n_tasks * cpt,
                              dataset=lambda j, transform="train": tasks[j], seed=seed)
        replay.train_dataset(None, info, tasks[t])
        replay.after_experience(None, info)
        out.append((len(replay), len({(int(e), int(i)) for e, i in zip(replay.exp, replay.idx)}),
                    int((replay.labels < t * cpt).sum())))
    return out


def official(checkout, per_class, n_tasks, cpt, seed=0):
    sys.path.insert(0, str(Path(checkout)))
    from dataloaders.dataloader import iDataset

    ds = iDataset.__new__(iDataset)  # the dataset's state as the coreset code reads it, images as ids
    labels = task_labels(per_class, n_tasks, cpt)
    ds.train, ds.seed, ds.class_mapping = True, seed, {c: c for c in range(n_tasks * cpt)}
    ds.coreset = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    np.random.seed(seed)
    out, start = [], 0
    for t in range(n_tasks):
        ds.data, ds.targets = np.arange(start, start + len(labels[t])), np.asarray(labels[t])
        start += len(labels[t])
        ds.append_coreset(only=False)  # trainer.py L182
        ds.update_coreset(MEMORY, np.arange((t + 1) * cpt))  # learners/default.py L137-138
        ids, y = ds.coreset
        out.append((len(ids), len(set(ids.tolist())), int((y < t * cpt).sum())))
    return out


if __name__ == "__main__":
    for name, (per_class, n_tasks, cpt) in SETTINGS.items():
        for rebuild in ("memory", "draws"):
            print(f"{name:10s} rebuild={rebuild:6s}", suite(per_class, n_tasks, cpt, rebuild))
        if len(sys.argv) > 1:
            print(f"{name:10s} official     ", official(sys.argv[1], per_class, n_tasks, cpt))
