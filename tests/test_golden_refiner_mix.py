"""Refiner-ViT's prefetcher order (``benchmark.source_args.augment.prefetcher``, on in the refiner-vit-*-imagenet
recipes) against the official loader: Mixup/CutMix on the uint8 batch as timm 0.4.8's FastCollateMixup, then
normalisation and random erasing on the mixed batch as Refiner-ViT's PrefetchLoader.

The numbers below were produced by the official code (zhoudaquan/Refiner_ViT @
b3e8cb0c41524af6f501785f47eda691c85f25e4, data/loader.py ``create_relabel_loader`` with the timm 0.4.8 it bundles), on
a CPU, with

    git clone https://github.com/zhoudaquan/Refiner_ViT /tmp/refgolden/Refiner_ViT
    python scripts/golden_refiner_mix.py /tmp/refgolden/Refiner_ViT

(the script says what it changes at run time: ``.cuda()``, the prefetcher's CUDA stream, the erasing's device). Per
run (the mixing mode; ``minmax``: CutMix's min-max box) and batch of 4 odd-sized uint8 images: checksums of the mixed
uint8 batch, of the soft targets and of the normalised, erased batch; the suite's ``strategy=mixup`` on the same uint8
batches followed by :class:`PrefetchStage`, from the same seeds, gives them exactly.
"""

import numpy as np
import pytest
import torch
from conftest import TINY, compose, script_module
from timm.data import Mixup

from cl_vit.data.transforms import PrefetchStage, deit_train_transform
from cl_vit.errors import UserError
from cl_vit.strategies import mixup as mixing
from cl_vit.strategies.mixup import MixupCutMix

golden = script_module("golden_refiner_mix")

# -- the official numbers (python scripts/golden_refiner_mix.py Refiner_ViT, at the commit above) ----------------------

OFFICIAL = {
    'batch':
    {'transform': ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToNumpy'],
     'mixed': [[298398.0, 35466098.0], [300959.0, 35972087.0], [300837.0, 35857729.0], [302132.0, 35668396.0]],
     'target': [[4.000000134110451, 272.0735064484179], [4.000000044703484, 217.01230995357037],
                [4.000000223517418, 234.6661684960127], [4.000000223517418, 458.3889787234366]],
     'input': [[437.5329554709606, 52148.566096322145], [539.2038288153708, 65678.29890685296],
               [568.369833458215, 70131.30631503928], [529.5790495038964, 59648.97309447918]]},
    'pair':
    {'transform': ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToNumpy'],
     'mixed': [[298398.0, 35238843.0], [300959.0, 35931108.0], [300837.0, 35986475.0], [302132.0, 35950002.0]],
     'target': [[4.0000001937150955, 260.49533012881875], [4.000000104308128, 258.7242955714464],
                [4.0, 221.00461407005787], [4.0000001937150955, 343.87318520620465]],
     'input': [[430.3222693693824, 47402.86788421264], [539.2038267455064, 64953.975870349444],
               [564.7180502596311, 71733.8346562339], [536.6671625170857, 65556.83461064985]]},
    'elem':
    {'transform': ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToNumpy'],
     'mixed': [[298241.0, 35223345.0], [301043.0, 35953712.0], [298448.0, 35568330.0], [302411.0, 35874756.0]],
     'target': [[4.000000052154064, 322.93123016133904], [4.000000063329935, 201.9746471606195],
                [4.000000044703484, 250.54307661950588], [4.000000134110451, 358.39818707481027]],
     'input': [[437.39792265510187, 47716.721875610296], [537.3859850508161, 65106.84228052944],
               [526.3579084663652, 65923.8026333861], [536.8797034383751, 63594.426492528524]]},
    'minmax':
    {'transform': ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToNumpy'],
     'mixed': [[298398.0, 35466098.0], [300959.0, 36293733.0], [300837.0, 35915829.0], [302132.0, 35668396.0]],
     'target': [[4.000000134110451, 272.0735064484179], [4.000000223517418, 225.78155036270618],
                [4.000000223517418, 234.6661684960127], [4.000000223517418, 458.3889787234366]],
     'input': [[437.5329554709606, 52148.566096322145], [531.9905788190663, 69451.70616902737],
               [569.732769658789, 71866.03976740036], [529.5790495038964, 59648.97309447918]]},
}


def suite_batches(name: str) -> dict:
    """The script's batches through ``strategy=mixup`` (uint8: mix_uint8) and the prefetcher stage, seeded where the
    official loader starts reading; the same numbers."""
    m = golden.MIX
    strategy = MixupCutMix(mixup=m["mixup_alpha"], cutmix=m["cutmix_alpha"], prob=m["prob"],
                           switch_prob=m["switch_prob"], label_smoothing=m["label_smoothing"], **golden.RUNS[name])
    strategy.mixup = Mixup(num_classes=golden.N_CLASSES, **strategy.args)
    stage = PrefetchStage(golden.MEAN, golden.STD, **golden.ERASE)
    x, y = golden.images()
    out = {"mixed": [], "target": [], "input": []}
    golden.seed_all()
    for b in range(golden.BATCHES):
        part = slice(b * golden.BATCH, (b + 1) * golden.BATCH)
        batch = strategy.before_batch(None, {"x": torch.from_numpy(x[part]), "y": torch.from_numpy(y[part])})
        assert batch["x"].dtype == torch.uint8
        out["mixed"].append(golden.checksums(batch["x"]))
        out["target"].append(golden.checksums(batch["y"]))
        out["input"].append(golden.checksums(stage(batch["x"])))
    return out


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_prefetcher_order_gives_the_official_batches(name):
    ours, theirs = suite_batches(name), OFFICIAL[name]
    for key in ("mixed", "target", "input"):
        assert ours[key] == theirs[key], key


def test_timm_1_box_would_differ():
    """The 0.4.8 box is what makes the CutMix batches agree: timm 1.0's box (one pixel more for odd sides, a min-max
    corner up to ``size - cut``) gives other mixed images."""
    from timm.data.mixup import cutmix_bbox_and_lam

    def timm_1_box(shape, lam, minmax=None, correct_lam=True):
        return cutmix_bbox_and_lam(shape, lam, ratio_minmax=minmax, correct_lam=correct_lam)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mixing, "cutmix_box_v048", timm_1_box)
        for name in ("batch", "minmax"):
            assert suite_batches(name)["mixed"] != OFFICIAL[name]["mixed"], name


def test_prefetcher_transform_stops_at_uint8():
    """With ``augment.prefetcher`` the per-image transform is the official one up to the conversion (no Normalize,
    no RandomErasing: timm/data/transforms_factory.py L110-112 at 0.4.8) and gives uint8 CHW tensors."""
    t = deit_train_transform(24, golden.MEAN, golden.STD, {"prefetcher": True, "re_prob": 0.25})
    names = [type(s).__name__ for s in t.transform.transforms]
    assert names[:-1] == OFFICIAL["batch"]["transform"][:-1] and names[-1] == "MaybePILToTensor"
    img = t(image=np.random.RandomState(0).randint(0, 256, (30, 28, 3), dtype=np.uint8))["image"]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 24, 24)
    default = [type(s).__name__ for s in deit_train_transform(24, golden.MEAN, golden.STD).transform.transforms]
    assert default[-2:] == ["Normalize", "RandomErasing"]  # DeiT's order (the DeiT-LT recipes) unchanged


def test_odd_batches_leave_the_last_image_unmixed():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, num_classes=3)
    x = torch.randint(0, 256, (3, 3, 5, 5), dtype=torch.uint8)
    np.random.seed(0)
    mixed, target = mixing.mix_uint8(mixup, x, torch.tensor([0, 1, 2]))
    assert torch.equal(mixed[2], x[2]) and not torch.equal(mixed[0], x[0])
    assert target.shape == (3, 3) and target[2].argmax() == 2 and float(target[2].max()) == pytest.approx(0.9 + 0.1 / 3)


def test_stage_rejects_normalised_images():
    with pytest.raises(UserError, match="augment.prefetcher=true expects uint8"):
        PrefetchStage(golden.MEAN, golden.STD)(torch.zeros(2, 3, 4, 4))


def test_prefetcher_needs_strategies_that_take_uint8(tmp_path, data_root):
    """A strategy that reads normalised images (here l2), or a mixing mode the collate path lacks, stops with one
    line before training."""
    from test_refiner_imagenet import make_imagenet

    from cl_vit.builder import build

    make_imagenet(data_root)
    base = ["experiment=refiner-vit-s-imagenet", *TINY[1:], "+model.depth=2", "benchmark.source_args.img_size=32",
            "data.num_workers=0"]
    source, _, _, module, _ = build(compose(base, data_root))
    assert isinstance(module.batch_stage, PrefetchStage) and module.batch_stage.re["probability"] == 0.25
    assert source.meta["transforms"]["augment"]["prefetcher"] is True
    assert module.batch_stage.mean == [127.5] * 3  # the model's mean 0.5, times 255 as the PrefetchLoader scales it
    with pytest.raises(UserError, match="strategy l2 expects normalised images"):
        build(compose([*base, "strategy=[mixup,l2]"], data_root))
    with pytest.raises(UserError, match="strategy.mixup.mode='half' is not supported on uint8 batches"):
        build(compose([*base, "strategy.mixup.mode=half"], data_root))
    off = build(compose([*base, "benchmark.source_args.augment.prefetcher=false"], data_root))[3]
    assert off.batch_stage is None
