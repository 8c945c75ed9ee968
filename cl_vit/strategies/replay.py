"""Experience replay: a memory of past training samples that joins the training of later experiences, composable
with any other strategy (``strategy=[replay,l2]``).

The memory holds *indices* (experience, position in that experience's training dataset), labels and, for DER++,
logits; images are read back from the stream (``ExperienceInfo.dataset``) under the training transform each time
they are replayed. So the experience checkpoint carries a few tensors, a resumed run replays the same samples, and
every process under DDP holds the same memory.

What fills it (``policy``):

- ``coreset``: a class-balanced coreset of ``memory_size`` samples, rebuilt at the end of every experience:
  ``memory_size // n_seen`` per seen class, the remainder one each to the latest classes (``remainder=latest``, as
  GT-RIPL/CODA-Prompt dataloaders/dataloader.py ``update_coreset`` L139-160 and the closer-look code's copy,
  shaunak27/data-free-continual-learning dataloaders/dataloader.py L140-161) or dropped (``remainder=none``, as
  Mammoth utils/buffer.py ``fill_buffer`` L765). A past class keeps the first samples of its list (``rebuild=memory``,
  Mammoth fill_buffer L778-781: with herding, the best-ranked) or, as CODA-Prompt rebuilds its coreset from the
  training set that ``append_coreset`` built (``rebuild=draws``, dataloader.py L128-160), samples chosen at random
  among its draws that joined the experience's training (``mix=resample``; a sample drawn twice can be kept twice,
  and a class drawn fewer times than its share keeps fewer); a new class's samples are chosen at random or by herding
  (``selection``, Mammoth fill_buffer L818-840: greedily the sample that brings the mean of the chosen L2-normalised
  embeddings closest to the class mean, embeddings of the images under the test transform; or ``icarl``, the herding
  iteration of iCaRL's and DyTox's code, which may pick a sample again: :func:`icarl_order`).
- ``reservoir``: reservoir sampling over the stream of training samples, updated at every step (Vitter; Mammoth
  utils/buffer.py ``ReservoirSampling`` L114-133, ``add_data`` L466-485).

How its samples reach training (``mix``):

- ``resample`` (CODA-Prompt trainer.py L182 ``append_coreset(only=False)``, dataloader.py L128-137): the
  experience's training set plus as many draws, with replacement, from the memory.
- ``append`` (Mammoth utils/buffer.py ``icarl_replay`` L54-62, iCaRL): the training set plus the memory, once each.
- ``batch`` (Mammoth models/er.py L53-57): every step, ``batch_size`` memory samples drawn without replacement are
  concatenated to the batch (the reservoir policy needs this: the memory changes during the experience).

Every random choice is a function of (the run's seed, experience, draw, process): a resumed run draws the same
numbers, and under DDP each process replays its own draws from the same memory. Reservoir updates are gathered from
every process (in rank order) so that the memory stays the same everywhere.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, default_collate

from cl_vit import distributed
from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy

POLICIES = ("coreset", "reservoir")
SELECTIONS = ("random", "herding", "icarl")
MIXES = ("resample", "append", "batch")
REMAINDERS = ("latest", "none")
REBUILDS = ("memory", "draws")
HERDING_VIEWS = ("test", "train")
#: what a draw is for: each its own random numbers
RESAMPLE, BATCH, RESERVOIR, CORESET = range(4)


def draw_seed(*parts: int) -> int:
    """A seed that is a function of ``parts`` only (run seed, purpose, experience, draw, process)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed(*parts))


def herding_order(feats: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` samples herding picks from ``feats`` (N x D, rows already normalised as wanted): step i takes
    the sample s minimising || mu - (sum of the chosen + f_s) / (i + 1) ||, each sample at most once (Mammoth
    utils/buffer.py fill_buffer L821-840)."""
    feats = feats.double()
    mu = feats.mean(0)
    chosen: list[int] = []
    total = torch.zeros_like(mu)
    free = torch.ones(len(feats), dtype=torch.bool)
    for i in range(min(k, len(feats))):
        cost = (mu[None] - (feats + total[None]) / (i + 1)).norm(dim=1).masked_fill(~free, float("inf"))
        j = int(cost.argmin())
        chosen.append(j)
        total += feats[j]
        free[j] = False
    return torch.tensor(chosen, dtype=torch.long)


def icarl_order(feats: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` samples iCaRL's herding iteration ranks in ``feats`` (N x D, the embeddings as computed), as
    DyTox's code runs it (arthurdouillard/dytox continual/rehearsal.py ``icarl_selection`` L230-252, after iCaRL's
    own): each embedding L2-normalised (norm + 1e-8), ``mu`` their mean; the running target starts at ``mu``, each
    iteration takes the sample of largest dot product with it and moves it by ``mu - f``. A sample taken again is not
    counted again but still moves the target, which is where it departs from :func:`herding_order` (which never
    takes a sample twice); after 1000 iterations without ``k`` distinct samples the rest rank last. Computed in numpy
    in the embeddings' own dtype, as the official code (float32 there), so that near ties break alike."""
    d = feats.detach().cpu().numpy().T
    d = d / (np.linalg.norm(d, axis=0) + 1e-8)
    mu = np.mean(d, axis=1)
    rank = np.zeros(d.shape[1])
    target, picked, tries = mu, 0, 0
    while picked < min(k, d.shape[1]) and tries < 1000:
        j = int(np.argmax(np.dot(target, d)))
        tries += 1
        if rank[j] == 0:
            picked += 1
            rank[j] = picked
        target = target + mu - d[:, j]
    rank[rank == 0] = 10000
    return torch.from_numpy(rank.argsort()[:k].copy()).long()


def class_quota(available: dict[int, int], memory_size: int, remainder: str = "latest") -> dict[int, int]:
    """Samples per class for a class-balanced memory of ``memory_size`` over the classes of ``available`` (class ->
    samples on hand, classes in the order seen): ``memory_size // n`` each, at most what a class has; with
    ``remainder="latest"`` the remainder goes one each to the latest classes that have more (CODA-Prompt
    dataloader.py L140-153)."""
    classes = list(available)
    per, extra = divmod(memory_size, max(1, len(classes)))
    if remainder == "none":
        extra = 0
    quota = {}
    for c in reversed(classes):
        if extra > 0 and available[c] > per:
            quota[c], extra = per + 1, extra - 1
        else:
            quota[c] = min(available[c], per)
    return {c: quota[c] for c in classes}


def reservoir_slots(n_seen: int, n_new: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Reservoir sampling for ``n_new`` arriving samples after ``n_seen``: each one's memory slot, or -1 (not
    kept). Sample t (0-based over the stream) fills slot t while t < size, else replaces a slot drawn uniformly in
    [0, t] when the draw is < size (Mammoth ReservoirSampling L126-133)."""
    t = torch.arange(n_seen, n_seen + n_new, dtype=torch.float64)
    draw = (torch.rand(n_new, generator=gen, dtype=torch.float64) * (t + 1)).floor().long()
    slots = torch.where(t < size, t.long(), draw)
    return torch.where(slots < size, slots, torch.full_like(slots, -1))


class MemoryDataset(Dataset):
    """Memory samples read from the stream: items as the stream's, (x, y, task); ``keyed``: (x, y, task, -1), to
    join a keyed training set (-1: not a sample of the experience's own data)."""

    def __init__(self, dataset_of, exp: torch.Tensor, idx: torch.Tensor, transform: str = "train",
                 keyed: bool = False):
        self.exp, self.idx, self.keyed = exp.tolist(), idx.tolist(), keyed
        self._datasets = {j: dataset_of(j, transform=transform) for j in sorted(set(self.exp))}

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, k):
        item = self._datasets[self.exp[k]][self.idx[k]]
        return (*item[:3], -1) if self.keyed else item


class _Keyed(Dataset):
    """Items (x, y, task, key): the training step sees which samples of the experience's own data it trains on
    (reservoir updates); key = the position among the first ``n_own`` items, which are the experience's own (a
    memory concatenated after them), -1 for the others."""

    def __init__(self, dataset, n_own: int):
        self.dataset, self.n_own = dataset, n_own

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        item = self.dataset[k]
        return item[0], item[1], item[2] if len(item) > 2 else 0, k if k < self.n_own else -1


@register_strategy
class Replay(Strategy):
    """ER: a replay memory (see the module's text); the classification loss of the module covers its samples."""

    name = "replay"
    #: replayed samples bring past classes back into the loss: their classifier rows train (loss.mask_old_logits
    #: masks the past classes for the current experience's samples only, ContinualModule.training_step)
    reads_old_logits = True
    #: per-sample logits kept with the memory (DER++)
    keeps_logits = False

    def __init__(self, memory_size: int = 2000, policy: str = "coreset", selection: str = "random",
                 mix: str = "resample", batch_size: int = 32, remainder: str = "latest", rebuild: str = "memory",
                 herding_view: str = "test"):
        key = f"strategy.{self.name}"
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise ConfigError(f"{key}.memory_size", memory_size, "a whole number >= 1 (samples kept)")
        for k, v, allowed in (("policy", policy, POLICIES), ("selection", selection, SELECTIONS),
                              ("mix", mix, MIXES), ("remainder", remainder, REMAINDERS),
                              ("rebuild", rebuild, REBUILDS), ("herding_view", herding_view, HERDING_VIEWS)):
            if v not in allowed:
                raise ConfigError(f"{key}.{k}", v, f"one of {list(allowed)}")
        if policy == "reservoir" and mix != "batch":
            raise ConfigError(f"{key}.mix", mix, "batch with policy=reservoir (the memory changes every step)")
        if policy == "reservoir" and selection != "random":
            raise ConfigError(f"{key}.selection", selection, "random with policy=reservoir")
        if rebuild == "draws" and (policy, mix) != ("coreset", "resample"):
            raise ConfigError(f"{key}.rebuild", rebuild, "memory unless policy=coreset and mix=resample (draws rebuilds "
                              "the coreset from the samples resampled into the experience)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{key}.batch_size", batch_size, "a whole number >= 1")
        self.memory_size, self.policy, self.selection = memory_size, policy, selection
        self.mix, self.batch_size, self.remainder, self.rebuild = mix, batch_size, remainder, rebuild
        #: the images herding embeds (the network in eval mode): under the ``test`` transform (Mammoth) or the
        #: ``train`` augmentation (DyTox's main.py L625-627)
        self.herding_view = herding_view
        self.exp = torch.zeros(0, dtype=torch.long)
        self.idx = torch.zeros(0, dtype=torch.long)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.logits: torch.Tensor | None = None
        #: the run's seed (ExperienceInfo.seed)
        self.seed = 0
        #: reservoir: samples of the stream offered to the memory so far
        self.n_seen = 0
        #: memory draws in this experience (every draw a function of it: a resume mid-experience draws the same)
        self.draws = 0
        self._experience: ExperienceInfo | None = None
        self._datasets: dict = {}
        #: mix=resample: the memory positions drawn into this experience's training set (a function of the seed and
        #: the experience, so a resumed run draws them again)
        self._drawn = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.idx)

    # -- the experience's data ---------------------------------------------------------------------------------------

    def train_dataset(self, module, experience: ExperienceInfo, dataset):
        self._experience, self.draws, self._datasets = experience, 0, {}
        self._drawn = torch.zeros(0, dtype=torch.long)
        self.seed = experience.seed
        n_own = len(experience.dataset(experience.index))
        if self.policy == "reservoir":
            return _Keyed(dataset, n_own)
        if not len(self) or self.mix == "batch":
            return dataset
        keyed = isinstance(dataset, _Keyed)  # another strategy's reservoir reads the keys
        if self.mix == "resample":
            draw = torch.randint(len(self), (n_own,), generator=generator(self.seed, RESAMPLE, experience.index))
            self._drawn = draw
            return ConcatDataset([dataset, MemoryDataset(experience.dataset, self.exp[draw], self.idx[draw],
                                                         keyed=keyed)])
        return ConcatDataset([dataset, MemoryDataset(experience.dataset, self.exp, self.idx, keyed=keyed)])

    def sample(self, module, n: int) -> tuple[torch.Tensor, dict]:
        """``n`` memory samples drawn without replacement (fewer when it holds fewer, Mammoth buffer.py L523-529),
        collated and on the module's device: (their memory positions, {"x", "y"})."""
        from cl_vit.module import as_step_input

        gen = generator(self.seed, BATCH, self._experience.index, self.draws, distributed.rank())
        self.draws += 1
        pos = torch.randperm(len(self), generator=gen)[: min(n, len(self))]
        x, y, *_ = default_collate([self._item(int(k)) for k in pos])
        return pos, {"x": as_step_input(module, x.to(module.device)), "y": torch.as_tensor(y).to(module.device)}

    def _item(self, k: int):
        """Memory sample ``k`` read from the stream under the training transform (reservoir: the memory changes during
        the experience, so it is read by position each time)."""
        j = int(self.exp[k])
        if j not in self._datasets:
            self._datasets[j] = self._experience.dataset(j)
        return self._datasets[j][int(self.idx[k])]

    def before_batch(self, module, batch: dict) -> dict:
        if self.mix != "batch":
            return batch
        if len(self):
            _, mem = self.sample(module, self.batch_size)
            current = batch
            # "key" keeps naming the first rows only: the batch's own samples
            batch = {**batch, "x": torch.cat([batch["x"], mem["x"].to(batch["x"].dtype)]),
                     "y": torch.cat([batch["y"], mem["y"]])}
            if self.policy == "reservoir":  # the memory takes the batch's own samples, not the replayed ones
                self.add(current["key"], current["y"][: len(current["key"])])
        elif self.policy == "reservoir":
            self.add(batch["key"], batch["y"][: len(batch["key"])])
        return batch

    # -- filling the memory ------------------------------------------------------------------------------------------

    def add(self, keys: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        """Reservoir update with this step's training samples of every process (rank order)."""
        own = keys >= 0  # not the samples a concatenated memory added
        part = (keys[own].cpu(), labels[own].cpu(), None if logits is None else logits[own].detach().float().cpu())
        parts = distributed.all_gather_object(part)
        keys = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        logits = None if logits is None else torch.cat([p[2] for p in parts])
        slots = reservoir_slots(self.n_seen, len(keys), self.memory_size,
                                generator(self.seed, RESERVOIR, self._experience.index, self.draws))
        self.draws += 1
        self.n_seen += len(keys)
        grow = int(min(self.n_seen, self.memory_size)) - len(self)
        if grow > 0:
            self.exp = torch.cat([self.exp, torch.zeros(grow, dtype=torch.long)])
            self.idx = torch.cat([self.idx, torch.zeros(grow, dtype=torch.long)])
            self.labels = torch.cat([self.labels, torch.zeros(grow, dtype=torch.long)])
            if logits is not None:
                old = self.logits if self.logits is not None else torch.zeros(0, logits.shape[1])
                self.logits = torch.cat([old, torch.zeros(grow, logits.shape[1])])
        keep = slots >= 0
        for slot, k, y, i in zip(slots[keep].tolist(), keys[keep].tolist(), labels[keep].tolist(),
                                 keep.nonzero().flatten().tolist()):
            self.exp[slot], self.idx[slot], self.labels[slot] = self._experience.index, k, y
            if logits is not None:
                self.logits[slot] = logits[i]

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        if self.policy == "coreset":
            self.update_coreset(module, experience)

    def update_coreset(self, module, experience: ExperienceInfo) -> None:
        targets = torch.as_tensor(list(experience.dataset(experience.index).targets), dtype=torch.long)
        # where each past class's samples come from: its memory list, or its draws in this experience's training set
        source = self._drawn if self.rebuild == "draws" else torch.arange(len(self))
        available = {c: int((self.labels[source] == c).sum()) for c in experience.seen_classes
                     if c not in experience.classes}
        available.update({c: int((targets == c).sum()) for c in experience.classes})
        quota = class_quota(available, self.memory_size, self.remainder)
        feats = None
        if self.selection != "random":
            from cl_vit.strategies.embeddings import experience_embeddings

            feats, _ = experience_embeddings(module, experience, self.herding_view)
        if self.selection == "herding":
            feats = feats / feats.norm(dim=1, keepdim=True)  # Mammoth fill_buffer L804-805 (normalize_features)
        order = icarl_order if self.selection == "icarl" else herding_order
        gen = generator(experience.seed, CORESET, experience.index)
        exp, idx, labels = [], [], []
        for c, k in quota.items():
            if c in experience.classes:
                where = (targets == c).nonzero().flatten()
                pick = (order(feats[where], k) if feats is not None
                        else torch.randperm(len(where), generator=gen)[:k])
                exp.append(torch.full((len(pick),), experience.index, dtype=torch.long))
                idx.append(where[pick])
            else:
                where = source[self.labels[source] == c]
                where = where[torch.randperm(len(where), generator=gen)[:k]] if self.rebuild == "draws" else where[:k]
                exp.append(self.exp[where])
                idx.append(self.idx[where])
            labels.append(torch.full((len(idx[-1]),), c, dtype=torch.long))
        self.exp, self.idx, self.labels = torch.cat(exp), torch.cat(idx), torch.cat(labels)
        if not len(self):
            raise UserError(f"strategy.{self.name}.memory_size={self.memory_size} keeps no sample of "
                            f"{len(quota)} classes: raise it")

    # -- checkpoint --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"exp": self.exp.clone(), "idx": self.idx.clone(), "labels": self.labels.clone(),
                 "n_seen": int(self.n_seen), "draws": int(self.draws)}
        if self.logits is not None:
            state["logits"] = self.logits.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.exp, self.idx, self.labels = state["exp"].long(), state["idx"].long(), state["labels"].long()
        self.n_seen, self.draws = int(state["n_seen"]), int(state["draws"])
        self.logits = state.get("logits")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(memory_size={self.memory_size}, policy={self.policy!r}, "
                f"selection={self.selection!r}, mix={self.mix!r}, batch_size={self.batch_size}, "
                f"rebuild={self.rebuild!r}, herding_view={self.herding_view!r})")
