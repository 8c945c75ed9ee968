"""Refiner-ViT on ImageNet-1k: benchmark=imagenet, the refiner-vit-{s,m,l}-imagenet recipes, the cos_reg term, the
dense (token-label) loss."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, compose
from data_gen import write_jpeg

from cl_vit.errors import UserError
from cl_vit.run import run
from cl_vit.strategies.cos_reg import cos_reg_loss
from cl_vit.strategies.token_label import dense_target_loss


def make_imagenet(data_root, train_per_class=(3, 2, 2), val_per_class=1, size=(40, 32)):
    """ILSVRC-2012 folders: imagenet/train/<wnid>/<wnid>_<k>.JPEG and imagenet/val/<wnid>/ILSVRC2012_val_<k>.JPEG."""
    import numpy as np

    rng = np.random.RandomState(0)
    wnids = [f"n0{1440764 + 7 * c:07d}" for c in range(len(train_per_class))]
    for c, (wnid, n) in enumerate(zip(wnids, train_per_class)):
        for k in range(n):
            write_jpeg(data_root / "imagenet" / "train" / wnid / f"{wnid}_{k}.JPEG",
                       rng.randint(0, 255, (*size, 3), dtype=np.uint8))
        for k in range(val_per_class):
            write_jpeg(data_root / "imagenet" / "val" / wnid / f"ILSVRC2012_val_{c:04d}{k}.JPEG",
                       rng.randint(0, 255, (*size, 3), dtype=np.uint8))
    return wnids


def test_imagenet_source_reads_the_ilsvrc_folders(data_root):
    from cl_vit.data import build_source

    wnids = make_imagenet(data_root)
    src = build_source("imagenet", data_root, img_size=16)
    assert src.classes == sorted(wnids) and len(src.train) == 7 and len(src.test) == 3
    assert src.train[0][0].shape == (3, 16, 16)
    with pytest.raises(UserError, match="imagenet not found at"):
        build_source("imagenet", data_root / "nowhere")


# scripts/refiner_{s,m,l}.yaml: (model, drop_path L24, batch L5, img_size L29, cos_reg pairs: 2 where
# cos_reg_component L13 > 0, main.py L581-582 building SoftTargetCrossEntropyCosReg() with its default n_comn=2)
# and the evaluation crop fraction: the model's default_cfg crop_pct (models/refined_transformer.py L37, L42, L47);
# the dense loss's weight where relabel / return_dense are true (L97-98, dense_weight L101), else 0
OFFICIAL = [("s", "refiner_vit_s", 0.1, 32, 224, 2, 0.9, 0), ("m", "refiner_vit_m", 0.2, 32, 224, 2, 1.0, 0),
            ("l", "refiner_vit_l", 0.2, 12, 448, 0, 1.13, 0.5)]


@pytest.mark.parametrize("size,model,drop_path,batch,img,n_cos,crop_pct,dense", OFFICIAL)
def test_refiner_recipes_carry_the_official_values(size, model, drop_path, batch, img, n_cos, crop_pct, dense):
    cfg = compose([f"experiment=refiner-vit-{size}-imagenet"])
    assert cfg.benchmark.source_args.test_crop_pct == crop_pct
    assert (cfg.model.name, cfg.model.drop_path_rate, cfg.data.batch_size) == (model, drop_path, batch)
    assert cfg.benchmark.source_args.img_size == img and cfg.benchmark.name == "imagenet"
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.weight_decay) == ("adamw", 5e-4, 0.05)
    # epochs 300 (L25) + cooldown_epochs 10 (L12), timm's cosine stepped per epoch from warmup_lr to min_lr
    assert (cfg.trainer.max_epochs, cfg.scheduler.cooldown_epochs, cfg.scheduler.warmup_epochs) == (310, 10, 5)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_lr, cfg.scheduler.min_lr) == ("timm_cosine", 1e-6, 1e-5)
    assert cfg.data.drop_last  # data/loader.py L220: drop_last=is_training
    mix = cfg.strategy.mixup
    assert (mix.mixup, mix.cutmix, mix.label_smoothing) == (0.8, 1.0, 0.1)
    aug = cfg.benchmark.source_args.augment
    assert (aug.auto_augment, aug.re_prob) == ("rand-m9-mstd0.5-inc1", 0.25)
    assert cfg.ema.decay == 0.99996
    assert (cfg.strategy.cos_reg.n_components if "cos_reg" in cfg.strategy else 0) == n_cos
    assert (cfg.strategy.token_label.dense_weight if "token_label" in cfg.strategy else 0) == dense
    assert bool(cfg.model.return_dense) == bool(dense)
    if dense:  # main.py L233: --cls-weight 1.0, which no yaml changes
        assert cfg.strategy.token_label.cls_weight == 1.0
    # the model configs alone carry the official drop_path too
    assert compose([f"model={model}"]).model.drop_path_rate == drop_path


# the learning rate each epoch of the S / M / L recipes trains at: the bundled timm 0.4.8's create_scheduler with
# scripts/refiner_s.yaml's values (lr 5e-4, epochs 300, warmup 5 from 1e-6, min_lr 1e-5, cooldown 10; 310 epochs),
# stepped step(epoch + 1) after each epoch as main.py L646 does, read at the start of each epoch:
#   cd Refiner_ViT && python -c "import sys, argparse, torch; sys.path.insert(0, '.'); from timm.scheduler import \
#   create_scheduler; a = argparse.Namespace(epochs=300, sched='cosine', min_lr=1e-5, decay_rate=0.1, warmup_lr=1e-6, \
#   warmup_epochs=5, lr_cycle_limit=1, lr_cycle_mul=1.0, lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, seed=42, \
#   cooldown_epochs=10); o = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4); s, n = \
#   create_scheduler(a, o); lr = []; [(lr.append(o.param_groups[0]['lr']), s.step(e + 1)) for e in range(n)]; \
#   print(n, {e: lr[e] for e in (0, 1, 4, 5, 6, 150, 298, 299, 300, 309)})"
OFFICIAL_EPOCHS = 310
OFFICIAL_LR = {0: 1e-06, 1: 0.0001008, 4: 0.0004002, 5: 0.0004996642360148705, 6: 0.0004995165484649266,
               150: 0.000255, 298: 1.0053732548662853e-05, 299: 1.0013433505449525e-05, 300: 1e-05, 309: 1e-05}


def test_refiner_recipe_schedule_is_the_official_per_epoch_lr():
    from cl_vit.module import TimmTrainCosine

    cfg = compose(["experiment=refiner-vit-s-imagenet"])
    s = cfg.scheduler
    assert cfg.trainer.max_epochs == OFFICIAL_EPOCHS
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optimizer.lr)
    schedule = TimmTrainCosine(opt, cfg.trainer.max_epochs - s.cooldown_epochs, s.warmup_epochs, s.warmup_lr, s.min_lr)
    ours = {}
    for epoch in range(cfg.trainer.max_epochs):
        for batch in range(3):  # set at an epoch's first batch only
            schedule.set_rate(epoch, batch, 3, 1)
            ours.setdefault(epoch, set()).add(opt.param_groups[0]["lr"])
    assert all(len(v) == 1 for v in ours.values())
    np.testing.assert_allclose([ours[e].pop() for e in OFFICIAL_LR], list(OFFICIAL_LR.values()), rtol=1e-12, atol=0)


def test_cooldown_epochs_must_fit_in_max_epochs_and_need_timm_cosine(tmp_path, data_root):
    with pytest.raises(UserError, match="scheduler.cooldown_epochs=4 is not allowed: an integer from 0 to"):
        run(compose(["scheduler.name=timm_cosine", "scheduler.cooldown_epochs=4", *TINY[:1], "trainer.max_epochs=4",
                     *TINY[2:]], data_root), tmp_path / "run")
    with pytest.raises(UserError, match="scheduler.cooldown_epochs=1 is not allowed: 0 unless scheduler.name=timm"):
        run(compose(["scheduler.cooldown_epochs=1", *TINY], data_root), tmp_path / "run2")


def test_runs_from_before_the_timm_cosine_keys_are_the_same_setting(tmp_path):
    """configs/config.yaml's scheduler gained warmup_lr, min_lr (null) and cooldown_epochs (0): a run made without
    them did what those defaults do (cl_vit.runs.ADDED_KEYS)."""
    from omegaconf import OmegaConf

    from cl_vit.runs import Run

    today = OmegaConf.to_container(compose(TINY), resolve=False)
    before = {**today, "scheduler": {k: v for k, v in today["scheduler"].items()
                                     if k not in ("warmup_lr", "min_lr", "cooldown_epochs")}}
    other = {**today, "scheduler": {**today["scheduler"], "cooldown_epochs": 1}}
    key = lambda c: Run(path=tmp_path, config=c, results={}, stream=None).setting_key()  # noqa: E731
    assert key(before) == key(today) != key(other)


def test_refiner_recipe_trains_on_generated_imagenet_jpegs(tmp_path, data_root):
    make_imagenet(data_root, train_per_class=(4, 4, 4))
    over = ["experiment=refiner-vit-s-imagenet", *TINY[1:], "model=refiner_vit_s", "+model.depth=4",
            "benchmark.source_args.img_size=32", "data.batch_size=6", "data.num_workers=0",
            "data.persistent_workers=false", "trainer.precision=32-true", "strategy.cos_reg.n_components=3",
            "scheduler.cooldown_epochs=0",
            "logger=tensorboard"]
    doc = run(compose(over, data_root), tmp_path / "run")
    assert doc["status"] == "completed" and doc["strategy"] == ["mixup", "cos_reg"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert "train/loss/cos_reg" in acc.Tags()["scalars"]


def test_cos_reg_is_the_official_term():
    """loss/cross_entropy.py SoftTargetCrossEntropyCosReg: 0.1 * sum_i CosineSimilarity(dim=1)(a_i, a_i+1) .mean()
    / n, transcribed, on maps as the model passes them on."""
    torch.manual_seed(0)
    maps = [torch.rand(2, 3, 5, 5).softmax(-1) for _ in range(5)]
    n = 3
    cos = torch.nn.CosineSimilarity(dim=1)
    total = 0
    for i in range(n):
        total += cos(maps[i], maps[i + 1])
    expected = 0.1 * total.mean() / n
    assert torch.allclose(cos_reg_loss(maps, n), expected)
    assert torch.allclose(cos_reg_loss([maps[0]] * 4, 3), torch.tensor(0.1))  # identical maps: cosine 1
    with pytest.raises(UserError, match="needs 6 attention maps"):
        cos_reg_loss(maps, 5)


def test_cos_reg_reads_the_maps_the_blocks_pass_on(data_root):
    """The hooks see every block's passed-on map (a share block's is the one it received), in training only."""
    from cl_vit.run import build

    cfg = compose(["model=refiner_vit_tiny", "strategy=cos_reg", "strategy.cos_reg.n_components=3", *TINY[1:]],
                  data_root)
    _, scenario, _, module, _ = build(cfg)
    strategy = module.strategies[0]
    x = torch.randn(4, 1, 8, 8)
    module.net.train()
    module.net(x)
    assert len(strategy._maps) == 4 and torch.equal(strategy._maps[0], strategy._maps[1])  # block 1 shares block 0's
    loss = strategy.training_loss(module, {}, {})["cos_reg"]
    assert loss.requires_grad and strategy._maps == []
    module.net.eval()
    module.net(x)
    assert strategy._maps == []
    with pytest.raises(UserError, match="use model=refiner_vit_s/m/l"):
        build(compose(["model=vit_micro", "strategy=cos_reg", *TINY[1:]], data_root))


@pytest.mark.parametrize("size,millions", [("m", 55.0), ("l", 80.6)])
def test_refiner_m_and_l_recipes_dry_run_on_the_real_layout(size, millions, tmp_path, data_root):
    make_imagenet(data_root)
    stream = run(compose([f"experiment=refiner-vit-{size}-imagenet", "dry_run=true", "data.num_workers=0",
                          "data.persistent_workers=false"], data_root), tmp_path / size)
    assert stream["model"] == f"refiner_vit_{size}" and len(stream["experiences"]) == 1
    assert abs(stream["n_params"] / 1e6 - millions) < 1.5  # the official size, with a 3-class head here


@pytest.mark.parametrize("img,crop_pct", [(224, 0.9), (448, 1.13), (32, 0.9)])
def test_evaluation_crop_is_timms(img, crop_pct):
    """test_crop_pct gives timm's evaluation transform (what main.py's loader runs with the model's crop_pct):
    bicubic resize of the shorter side to floor(img / crop_pct), centre crop (zero-padded when 1.13 leaves the side
    short), the same tensor."""
    import numpy as np
    from PIL import Image
    from timm.data.transforms_factory import transforms_imagenet_eval

    from cl_vit.data.transforms import deit_eval_transform

    rgb = np.random.default_rng(0).integers(0, 256, (img + 37, img + 11, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    ours = deit_eval_transform(img, mean, std, crop_pct=crop_pct)(image=rgb)["image"]
    timm_tf = transforms_imagenet_eval(img, crop_pct=crop_pct, interpolation="bicubic", mean=mean, std=std)
    assert torch.equal(ours, timm_tf(Image.fromarray(rgb)))
    deit = deit_eval_transform(img, mean, std)(image=rgb)["image"]  # DeiT's 256/224 crops something else
    assert deit.shape == ours.shape and not torch.equal(deit, ours)


def test_crop_pct_needs_the_deit_evaluation():
    from cl_vit.data.transforms import check_pipelines

    assert check_pipelines("deit", "deit", test_crop_pct=0.9)["test_crop_pct"] == 0.9
    with pytest.raises(UserError, match="test_crop_pct=0.9 sets the crop fraction of test_transform=deit"):
        check_pipelines("default", "default", test_crop_pct=0.9)


def test_dense_target_loss_is_the_official_term():
    """loss/cross_entropy.py RelabelCrossEntropy's dense term with a soft (mixed) target: every patch row of the dense
    logits against its image's target, soft-target cross-entropy averaged over all B x N rows, transcribed."""
    torch.manual_seed(0)
    b, n, c = 3, 5, 4
    dense, target = torch.randn(b, n, c), torch.rand(b, c).softmax(1)
    rows = target[:, None].expand(b, n, c).reshape(b * n, c)
    expected = (-rows * F.log_softmax(dense.reshape(b * n, c), -1)).sum(-1).mean()
    everything = torch.ones(c, dtype=torch.bool)
    torch.testing.assert_close(dense_target_loss(dense, target, everything, "ce"), expected, rtol=1e-6, atol=0)
    # hard labels, with a per-sample mask (FT++): each image's rows keep its own classes
    y = torch.tensor([0, 2, 3])
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    logits = dense.masked_fill(~mask[:, None], float("-inf")).reshape(b * n, c)
    expected = F.cross_entropy(logits, y.repeat_interleave(n))
    torch.testing.assert_close(dense_target_loss(dense, y, mask, "ce"), expected, rtol=1e-6, atol=0)


def test_token_label_trains_the_dense_head_as_the_official_run(data_root):
    """With model.return_dense the training outputs are the class token's logits and the dense ones apart (official
    training forward), the evaluation's x_cls + 0.5 x max over patches; the strategy adds dense_weight x the dense
    term, scales the class-token term by cls_weight, and refuses a model without the dense head in one line."""
    from cl_vit.module import net_outputs
    from cl_vit.run import build

    cfg = compose(["model=refiner_vit_tiny", "+model.return_dense=true", "strategy=token_label",
                   "strategy.token_label.dense_weight=0.25", "strategy.token_label.cls_weight=0.5", *TINY[1:]],
                  data_root)
    _, _, _, module, _ = build(cfg)
    net, strategy = module.net, module.strategies[0]
    assert strategy.cls_loss_weight == 0.5
    x = torch.randn(4, 1, 8, 8)
    net.train()
    out = net_outputs(net, x)
    tokens = net.forward_features(x)
    n_patches = tokens.shape[1] - net.num_prefix_tokens
    assert out["dense_logits"].shape == (4, n_patches, net.num_classes)
    torch.testing.assert_close(out["logits"], net.head(tokens[:, 0]))
    torch.testing.assert_close(out["dense_logits"], net.aux_head(tokens[:, 1:]))
    y = torch.rand(4, net.num_classes).softmax(1)
    module.seen_mask.fill_(True)
    term = strategy.training_loss(module, {"x": x, "y": y}, out)["token_label"]
    torch.testing.assert_close(term, 0.25 * dense_target_loss(out["dense_logits"], y, module.loss_mask(y), "ce"))
    net.eval()
    evaluated = net_outputs(net, x)
    assert "dense_logits" not in evaluated
    tokens = net.forward_features(x)
    dense = net.aux_head(tokens[:, 1:])
    torch.testing.assert_close(evaluated["logits"], net.head(tokens[:, 0]) + 0.5 * dense.max(1)[0])
    torch.testing.assert_close(evaluated["logits"], net(x))
    with pytest.raises(UserError, match="use model=refiner_vit_s/m/l with model.return_dense=true") as err:
        build(compose(["model=refiner_vit_tiny", "strategy=token_label", *TINY[1:]], data_root))
    assert "\n" not in str(err.value)
