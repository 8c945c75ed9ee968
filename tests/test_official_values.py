"""Each long-tailed / Refiner-ViT recipe carries the official values cited in its comment (compose only, no data).

The expected values are read off the official scripts (val-iisc/DeiT-LT sh/*.sh and arguments.py at HEAD bc36970,
val-iisc/Saddle-LongTail, zhoudaquan/Refiner_ViT scripts/*.yaml); the file and line are in each recipe's comment.
"""
import pytest
from conftest import compose

# (recipe, per-GPU batch, GPUs, epochs, DRW epoch, imbalance ratio): sh/train_*.sh
DEIT_LT = [
    ("deit-lt-cifar10-lt", 128, 2, 1200, 1100, 100),
    ("deit-lt-cifar10-lt-r50", 128, 2, 1200, 1100, 50),
    ("deit-lt-cifar100-lt", 128, 2, 1200, 1100, 100),
    ("deit-lt-imagenet-lt", 128, 4, 1400, 1200, None),
    ("deit-lt-inat2018", 128, 4, 1000, 900, None),
]


@pytest.mark.parametrize("recipe,batch,gpus,epochs,drw,ratio", DEIT_LT)
def test_deit_lt_recipes_match_the_official_scripts(recipe, batch, gpus, epochs, drw, ratio):
    cfg = compose([f"experiment={recipe}"])
    assert cfg.data.batch_size == batch and cfg.trainer.devices == gpus
    assert cfg.trainer.accumulate_grad_batches == 4                       # --accum-iter 4
    assert cfg.optimizer.lr == pytest.approx(5e-4 * batch * gpus / 512)   # main.py L220, accumulation not counted
    assert cfg.optimizer.lr * cfg.scheduler.min_lr_ratio == pytest.approx(1e-5)  # --min-lr 1e-5
    assert cfg.trainer.max_epochs == epochs and cfg.strategy.deit_lt.drw_start_epoch == drw
    assert cfg.benchmark.imbalance_ratio == ratio
    assert cfg.data.repeated_aug is True and cfg.data.repeats == 3         # arguments.py L218-220, samplers.py L16
