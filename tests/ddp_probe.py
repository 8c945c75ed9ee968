"""``python tests/ddp_probe.py <cl_vit.run overrides>``: cl_vit.run's command line with probe strategies registered.

tests/test_ddp.py and tests/test_replay.py run it with ``trainer=ddp`` on 2 CPU processes; Lightning re-runs this
script for rank 1, so the probes exist in every process. A probe gathers what each process saw the way a strategy
must under DDP and saves it in its state (hence in every experience checkpoint) for the test to check.
"""
import torch

from cl_vit import distributed
from cl_vit.run import main
from cl_vit.strategies import register_strategy
from cl_vit.strategies.base import Strategy
from cl_vit.strategies.replay import Replay


@register_strategy
class ProbeStats(Strategy):
    name = "probe_stats"

    def __init__(self):
        self.stats = {}
        self._first_draw = None

    def before_batch(self, module, batch):
        if self._first_draw is None:  # what the experience's first training step draws (drop path, Mixup)
            self._first_draw = torch.rand(4)
        return batch

    def after_experience(self, module, experience):
        in_fit, self._first_draw = self._first_draw, None
        counts = torch.zeros(experience.n_classes, dtype=torch.float64)
        local = 0
        for batch in experience.train_loader(train=False, shard=True):
            y = batch[1]
            counts += torch.bincount(y, minlength=experience.n_classes).double()
            local += len(y)
        self.stats[experience.index] = {
            # every training image once over all processes
            "counts": distributed.reduce_sum(module, counts),
            "mean_share": distributed.reduce_mean(module, torch.tensor(float(local))),
            "rank0": distributed.broadcast(module, torch.tensor(float(distributed.rank()))),
            "world_size": distributed.world_size(),
            # each process's first draw in the fit, and its first draw after the fit
            "draws": distributed.all_gather_object((in_fit, torch.rand(4))),
            "device": str(module.device),
        }

    def state_dict(self):
        return {"stats": self.stats}


@register_strategy
class ProbeDraws(Strategy):
    """Every replay memory draw of this process (experience, draw counter, memory size, positions drawn), gathered
    from all processes after each experience: {experience: [rank 0's draws, rank 1's draws, ...]}."""

    name = "probe_draws"
    seen: list = []

    def __init__(self):
        self.draws = {}
        if not hasattr(Replay.sample, "probed"):
            sample = Replay.sample

            def recorded(replay, module, n):
                before, size = replay.draws, len(replay)
                pos, batch = sample(replay, module, n)
                ProbeDraws.seen.append((replay._experience.index, before, size, n, pos.tolist()))
                return pos, batch

            recorded.probed = True
            Replay.sample = recorded

    def after_experience(self, module, experience):
        mine = [d for d in ProbeDraws.seen if d[0] == experience.index]
        self.draws[experience.index] = distributed.all_gather_object(mine)

    def state_dict(self):
        return {"draws": self.draws}


if __name__ == "__main__":
    main()
