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


# The run-level settings of each official launch (docs/recipes.md "Run-level settings against the official launch"):
# (recipe, processes, per-process batch, precision, repeated augmentation, gradient clipping). The recipes state the
# processes of the official launch, the batch per process and the lr as the official code scales it for them.
RUN_LEVEL = [
    # torch.distributed.launch --nproc_per_node=2 (sh/train_c10_if100.sh L1) / 4 (sh/train_imagenetlt.sh L1);
    # engine.py L163 autocast + NativeScaler (main.py L225-228); --clip-grad None (arguments.py L86-91)
    ("deit-lt-cifar10-lt", 2, 128, "16-mixed", True, None),
    ("deit-lt-imagenet-lt", 4, 128, "16-mixed", True, None),
    # train.sh 0,1 (README L47); cifar_dytox.yaml L16 no_amp; main.py L117-119 + continual/samplers.py L108-111
    ("dytox-cifar100", 2, 128, "32-true", True, None),
    # README: python3 main.py, one process (samplers.py L79 RandomSampler); no_amp true / false
    # (cifar_GCAB_FDC.yaml L16, tiny_GCAB_FDC.yaml L16, ImageNet_GCAB_FDC.yaml L19); continual/scaler.py L43
    ("gcab-cifar100", 1, 128, "32-true", False, 10000),
    ("gcab-tiny-imagenet", 1, 128, "32-true", False, 10000),
    ("gcab-imagenet100", 1, 128, "16-mixed", False, 10000),
    # one process with DataParallel over GPUID='0 1 2 3' (experiments/cifar-100.sh L10, learners/prompt.py L87-88):
    # the loader's batch 128 is the global batch; no autocast, no clipping
    ("coda-prompt-cifar100", 1, 128, "32-true", False, None),
    ("l2p-imagenet-r", 1, 128, "32-true", False, None),
    ("dualprompt-cifar100", 1, 128, "32-true", False, None),
    ("er-cifar100", 1, 128, "32-true", False, None),
    # DataParallel over "device": ["0","1"] (exps/slca/slca_cifar.json), batch 128 global (models/slca.py L21)
    ("slca-cifar100", 1, 128, "32-true", False, None),
]


@pytest.mark.parametrize("recipe,gpus,batch,precision,repeated,clip", RUN_LEVEL)
def test_recipes_state_the_official_launch(recipe, gpus, batch, precision, repeated, clip):
    cfg = compose([f"experiment={recipe}"])
    assert (cfg.trainer.devices, cfg.data.batch_size, cfg.trainer.precision) == (gpus, batch, precision)
    assert cfg.data.repeated_aug is repeated and cfg.trainer.gradient_clip_val == clip
    assert cfg.ema.decay is None and not cfg.trainer.get("sync_batchnorm")


@pytest.mark.parametrize("recipe,gpus", [("dytox-cifar100", 2), ("gcab-cifar100", 1), ("gcab-imagenet100", 1)])
def test_dytox_and_gcab_lr_is_scaled_by_the_official_processes(recipe, gpus):
    # DyTox main.py L516-518 / GCAB-CFDC main.py L358-360: 5e-4 x batch x world size / 512
    cfg = compose([f"experiment={recipe}"])
    assert cfg.optimizer.lr == pytest.approx(5e-4 * cfg.data.batch_size * gpus / 512)


# trainer.tf32 against the torch each official code ran on: TF32 matmuls were torch's default up to 1.11, full fp32
# from 1.12 (RanPAC README L16: 1.13.1; SLCA README L27: 1.12.0; LAMDA-PILOT README L132: 2.0.1; SD-Lora-CL
# requirements.txt L21: 2.4.1; RevisitingCIL README L76: 1.11.0; InfLoRA README L21: 1.10.0; GCAB-CFDC
# requirements.txt L80: 1.11.0)
TF32 = {**{r: False for r in ("ranpac-cifar100", "ranpac-imagenet-r", "ranpac-imagenet-r-coda", "slca-cifar100",
                              "slca-imagenet-r", "slca-imagenet-r-coda", "aper-cifar100", "aper-imagenet-r",
                              "ease-cifar100", "ease-imagenet-r", "sdlora-cifar100", "sdlora-imagenet-r")},
        **{r: True for r in ("simplecil-cifar100", "simplecil-imagenet-r", "inflora-cifar100", "inflora-imagenet-r",
                             "gcab-cifar100", "gcab-imagenet100")}}


@pytest.mark.parametrize("recipe", sorted(TF32))
def test_fp32_matmuls_follow_the_official_torch(recipe):
    assert compose([f"experiment={recipe}"]).trainer.tf32 is TF32[recipe]
