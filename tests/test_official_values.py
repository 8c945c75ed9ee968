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
    # timm's cosine as main.py L234 builds it: --warmup-epochs 5, --warmup-lr 1e-6, --min-lr 1e-5 (arguments.py)
    assert cfg.scheduler.name == "deit_cosine" and cfg.scheduler.warmup_epochs == 5
    assert (cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == (1e-6, 1e-5)
    assert cfg.trainer.max_epochs == epochs and cfg.strategy.deit_lt.drw_start_epoch == drw
    assert cfg.benchmark.imbalance_ratio == ratio
    assert cfg.data.repeated_aug is True and cfg.data.repeats == 3         # arguments.py L218-220, samplers.py L16


def saddle_adjust_rho(epoch, rho_steps):
    """val-iisc/Saddle-LongTail imnet_train_sam.py adjust_rho (L444-458), --rho_schedule step, transcribed."""
    epoch = epoch + 1
    if epoch <= 5:
        return rho_steps[0]
    if epoch > 75:
        return rho_steps[3]
    if epoch > 60:
        return rho_steps[2]
    return rho_steps[1]


@pytest.mark.parametrize("recipe,lr,wd,mean", [("teacher-imagenet-lt", 0.2, 2e-4, None),
                                               ("teacher-inat2018", 0.1, 1e-4, [0.466, 0.471, 0.380])])
def test_imagenet_lt_and_inat_teachers_match_saddle_longtail(recipe, lr, wd, mean):
    from cl_vit.optim.sam import rho_at

    cfg = compose([f"experiment={recipe}"])
    o = cfg.optimizer
    assert (cfg.model.name, cfg.trainer.max_epochs, cfg.data.batch_size) == ("resnet50_ldam", 90, 256)
    assert (o.name, o.lr, o.momentum, o.weight_decay) == ("momentum", lr, 0.9, wd)
    assert (cfg.strategy.ldam_drw.max_margin, cfg.strategy.ldam_drw.scale, cfg.strategy.ldam_drw.drw_start_epoch) == (
        0.3, 30.0, 60)
    assert cfg.scheduler.name == "cosine_epoch" and cfg.scheduler.min_lr_ratio == 0 and cfg.scheduler.warmup_epochs == 0
    steps = [0.05, 0.1, 0.5, 0.5]  # run.sh L27, L35 --rho_steps
    assert [rho_at(e, o.sam_rho, o.sam_rho_milestones, o.sam_rho_values) for e in range(90)] == [
        saddle_adjust_rho(e, steps) for e in range(90)]
    args = cfg.benchmark.source_args
    assert args.train_transform == args.test_transform == "torchvision"
    assert (list(args.mean) if mean else args.normalize) == (mean or "imagenet")
