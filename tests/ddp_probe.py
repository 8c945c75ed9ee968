"""``python tests/ddp_probe.py <cl_vit.run overrides>``: cl_vit.run's command line with a probe strategy registered.

tests/test_ddp.py runs it with ``trainer=ddp`` on 2 CPU processes; Lightning re-runs this script for rank 1, so the
probe exists in every process. The probe gathers statistics the way a strategy must under DDP and saves them in its
state (hence in every experience checkpoint) for the test to check.
"""
import torch

from cl_vit import distributed
from cl_vit.run import main
from cl_vit.strategies import register_strategy
from cl_vit.strategies.base import Strategy


@register_strategy
class ProbeStats(Strategy):
    name = "probe_stats"

    def __init__(self):
        self.stats = {}

    def after_experience(self, module, experience):
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
            "device": str(module.device),
        }

    def state_dict(self):
        return {"stats": self.stats}


if __name__ == "__main__":
    main()
