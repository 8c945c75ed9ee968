"""DeiT-LT's student input pipeline (``benchmark.source_args.train_transform=deit``): timm's create_transform at the
student's size (RandomResizedCrop + flip, RandAugment, random erasing) behind the sources' albumentations interface,
DeiT's evaluation resize + crop, the default pipelines left as they were, erasing in one place only, and the DeiT-LT
recipes dry-run on generated data in the real formats."""
from __future__ import annotations

import json
import random

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from conftest import TINY, compose
from data_gen import make_cifar, make_imagenet_lt, make_inat
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import RandAugment
from torchvision import transforms as T

from cl_vit.config import validate
from cl_vit.data import build_source
from cl_vit.data.base import ImageFileDataset
from cl_vit.data.transforms import (
    DecodeRandomResizedCrop,
    DecodeResizeCenterCrop,
    PILTransform,
    deit_train_transform,
    imagenet_transforms,
    posterize,
)
from cl_vit.errors import ConfigError, UserError
from cl_vit.run import run

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
LOCAL = [*TINY, "data.num_workers=0", "data.persistent_workers=false"]


def _seed(s: int) -> None:
    """The three generators timm's transforms draw from (crop and erasing: random; RandAugment: numpy too)."""
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _samples(dataset, idx, seed):
    _seed(seed)
    return [dataset[i][0] for i in idx]


@pytest.fixture
def cifar(data_root):
    make_cifar(data_root, "cifar10", train_counts=[4] * 10, test_per_class=1)
    return data_root


# -- the pipeline ---------------------------------------------------------------------------------------------------


def test_deit_pipeline_is_timms_create_transform_at_the_students_size(cifar):
    src = build_source("cifar10", cifar, img_size=64, normalize="imagenet", train_transform="deit",
                       test_transform="deit")
    idx = range(6)
    got = _samples(src.train, idx, 0)
    assert all(x.shape == (3, 64, 64) and x.dtype == torch.float32 for x in got)
    # DeiT-LT datasets.py build_transform_deit's call, on the PIL image, under the same seed: the same tensors
    deit = create_transform(input_size=64, is_training=True, color_jitter=0.3, auto_augment="rand-m9-mstd0.5-inc1",
                            interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
    _seed(0)
    want = [deit(Image.fromarray(src.train.images[i])) for i in idx]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # seeded: the same seed gives the same images, another seed other images
    assert all(torch.equal(a, b) for a, b in zip(got, _samples(src.train, idx, 0)))
    assert not any(torch.equal(a, b) for a, b in zip(got, _samples(src.train, idx, 1)))
    assert src.meta["transforms"]["train"] == "deit" and src.meta["transforms"]["augment"]["re_prob"] == 0.25
    # evaluation: shorter side to int(256 / 224 * 64) = 73, bicubic, centre 64 crop (build_transform_deit)
    evaluate = T.Compose([T.Resize(73, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64), T.ToTensor(),
                          T.Normalize(MEAN, STD)])
    assert torch.equal(src.test[3][0], evaluate(Image.fromarray(src.test.images[3])))
    # CIFAR at its own 32 pixels: DeiT pads and crops instead of RandomResizedCrop, and evaluates the image as it is
    small = build_source("cifar10", cifar, img_size=32, normalize="imagenet", train_transform="deit",
                         test_transform="deit")
    assert isinstance(small.train.transform.transform.transforms[0], T.RandomCrop)
    assert small.train[0][0].shape == (3, 32, 32)
    plain = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
    assert torch.equal(small.test[0][0], plain(Image.fromarray(small.test.images[0])))


def test_randaugment_changes_the_images(cifar):
    """Same seeds with and without RandAugment (no erasing): the crops and flips match, RandAugment changes most
    images."""
    src = build_source("cifar10", cifar, img_size=48, normalize="imagenet")
    with_ra = deit_train_transform(48, MEAN, STD, {"re_prob": 0})
    without = deit_train_transform(48, MEAN, STD, {"re_prob": 0, "auto_augment": None, "color_jitter": None})
    ra = [t for t in with_ra.transform.transforms if isinstance(t, RandAugment)]
    assert len(ra) == 1 and ra[0].num_layers == 2
    assert {op.name for op in ra[0].ops} >= {"PosterizeIncreasing", "SolarizeIncreasing", "Rotate", "ShearX"}
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra[0].ops)
    assert not any(isinstance(t, RandAugment) for t in without.transform.transforms)
    changed = 0
    for i in range(16):
        img = src.train.images[i]
        _seed(i)
        a = with_ra(image=img)["image"]
        _seed(i)
        b = without(image=img)["image"]
        changed += not torch.equal(a, b)
    assert changed >= 8


def test_posterize_keeps_deit_lts_pillow_semantics():
    """At the top magnitude (reached by rand-m9-mstd0.5's noise) PosterizeIncreasing keeps 0 bits: DeiT-LT's Pillow 9.5
    gives a black image, newer Pillow raises; the pipeline keeps the former."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(posterize(img, 3)), np.asarray(ImageOps.posterize(img, 3)))
    assert posterize(img, 8) is img
    assert not np.asarray(posterize(img, 0)).any()
    t = deit_train_transform(16, MEAN, STD, {"auto_augment": "rand-m10-n1-mstd0-inc1", "re_prob": 0})
    ra = next(s for s in t.transform.transforms if isinstance(s, RandAugment))
    ra.ops = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    ra.ops[0].prob = 1.0
    out = t(image=np.asarray(img))["image"]
    black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1).expand(3, 16, 16)
    assert torch.allclose(out, black)


def test_default_pipelines_are_unchanged(cifar, data_root):
    """Without train_transform (or with ``default``) the sources keep their albumentations pipelines: LDAM-DRW's
    pad-crop-flip for CIFAR (written out here as it stands on main), the crop-before-decode for file lists."""
    ldam = A.Compose([A.PadIfNeeded(40, 40, border_mode=cv2.BORDER_CONSTANT, fill=0), A.RandomCrop(32, 32),
                      A.HorizontalFlip(p=0.5), A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0), ToTensorV2()])
    to_tensor = A.Compose([A.Normalize(mean=MEAN, std=STD, max_pixel_value=255.0), ToTensorV2()])
    for kwargs in ({}, {"train_transform": "default", "test_transform": "default"}):
        src = build_source("cifar10", cifar, img_size=32, normalize="imagenet", **kwargs)
        assert isinstance(src.train.transform, A.Compose) and src.meta["transforms"] == {"train": "default",
                                                                                          "test": "default"}
        # albumentations 2 draws from each Compose's own generator, not from the global seeds
        src.train.transform.set_random_seed(3)
        ldam.set_random_seed(3)
        got = [src.train[i][0] for i in range(8)]
        assert all(torch.equal(g, ldam(image=src.train.images[i])["image"]) for i, g in enumerate(got))
        assert torch.equal(src.test[2][0], to_tensor(image=src.test.images[2])["image"])

    make_imagenet_lt(data_root, train_counts=[3, 2], test_per_class=1)
    src = build_source("imagenet-lt", data_root, n_classes=2, img_size=16)
    assert isinstance(src.train.decode, DecodeRandomResizedCrop) and isinstance(src.test.decode, DecodeResizeCenterCrop)
    decode, transform = imagenet_transforms(16, MEAN, STD, True)
    same = ImageFileDataset(src.train.samples, transform, decode=decode)
    src.train.transform.set_random_seed(4)
    transform.set_random_seed(4)
    assert all(torch.equal(a, b) for a, b in zip(_samples(src.train, range(5), 4), _samples(same, range(5), 4)))


def test_file_list_sources_take_the_deit_pipeline(data_root):
    make_imagenet_lt(data_root, train_counts=[3, 2], test_per_class=1)
    make_inat(data_root, train_counts=[2, 1], val_per_class=1)
    for name in ("imagenet-lt", "inat2018"):
        src = build_source(name, data_root, n_classes=2, img_size=40, train_transform="deit", test_transform="deit")
        assert src.train.decode is None and isinstance(src.train.transform, PILTransform)  # the whole image
        assert src.train[0][0].shape == src.test[0][0].shape == (3, 40, 40)
        assert src.meta["transforms"]["train"] == "deit"


def test_bad_pipeline_options_fail_in_one_line(cifar, data_root):
    with pytest.raises(ConfigError, match="train_transform='randaug' is not allowed: one of"):
        build_source("cifar10", cifar, train_transform="randaug")
    with pytest.raises(ConfigError, match=r"augment\.reprob"):
        build_source("cifar10", cifar, train_transform="deit", augment={"reprob": 0.25})
    with pytest.raises(UserError, match="use it with benchmark.source_args.train_transform=deit"):
        build_source("cifar10", cifar, augment={"re_prob": 0.25})
    make_imagenet_lt(data_root, train_counts=[2, 2], test_per_class=1)
    with pytest.raises(UserError, match="test_resize='squash' applies to test_transform=default") as err:
        build_source("imagenet-lt", data_root, n_classes=2, test_transform="deit", test_resize="squash")
    assert "\n" not in str(err.value)


def test_random_erasing_happens_once():
    """The recipes erase in the source's transform (DeiT's --reprob); erasing the batch as well is refused."""
    for recipe in ("deit-lt-cifar10-lt", "deit-lt-cifar100-lt", "deit-lt-imagenet-lt", "deit-lt-inat2018"):
        cfg = compose([f"experiment={recipe}"])
        validate(cfg)
        args = cfg.benchmark.source_args
        assert args.train_transform == args.test_transform == "deit" and args.augment.re_prob == 0.25
        assert cfg.strategy.deit_lt.random_erasing == 0
    with pytest.raises(ConfigError, match="strategy.deit_lt.random_erasing=0.25 is not allowed"):
        validate(compose(["experiment=deit-lt-cifar10-lt", "strategy.deit_lt.random_erasing=0.25"]))
    validate(compose(["experiment=deit-lt-cifar10-lt", "strategy.deit_lt.random_erasing=0.25",
                      "benchmark.source_args.augment.re_prob=0"]))
    # digits has no train transform: its recipe erases the batch
    assert compose(["experiment=deit-lt-digits-lt"]).strategy.deit_lt.random_erasing == 0.25


# -- the recipes on generated data ------------------------------------------------------------------------------------


def _dry_run(recipe, teacher, data_root, tmp_path, monkeypatch, *overrides):
    """Dry run of a recipe; returns the stream document and the source it built."""
    import cl_vit.run as run_module

    built = {}
    real_build = run_module.build

    def spy(*args, **kwargs):
        out = real_build(*args, **kwargs)
        built["source"] = out[0]
        return out

    monkeypatch.setattr(run_module, "build", spy)
    cfg = compose([f"experiment={recipe}", f"strategy.deit_lt.teacher={teacher}", "dry_run=true", *LOCAL,
                   *overrides], data_root)
    stream = run(cfg, tmp_path / recipe)
    monkeypatch.undo()
    return stream, built["source"]


def _teacher(recipe, data_root, run_dir, *overrides):
    """A teacher trained by its recipe on the generated data, cut to one small batch."""
    run(compose([f"experiment={recipe}", *LOCAL, "trainer.limit_train_batches=1", "data.batch_size=16", *overrides],
                data_root), run_dir)
    return run_dir


def _check_student_source(source, n_train):
    assert source.meta["transforms"]["train"] == source.meta["transforms"]["test"] == "deit"
    assert source.train[0][0].shape == source.test[0][0].shape == (3, 224, 224)
    assert len(source.train) == n_train


@pytest.fixture(scope="module")
def cifar10_lt(tmp_path_factory):
    """Generated CIFAR-10 (100 images a class, so that ratio 100 keeps one of the last class) and a teacher trained
    on its long-tailed version by experiment=teacher-cifar10-lt."""
    root = tmp_path_factory.mktemp("cifar10-lt")
    make_cifar(root / "data", "cifar10", train_counts=[100] * 10, test_per_class=1)
    return root / "data", _teacher("teacher-cifar10-lt", root / "data", root / "teacher")


def test_cifar_lt_recipes_dry_run_with_the_deit_pipeline(cifar10_lt, tmp_path, monkeypatch):
    data_root, t10 = cifar10_lt
    doc = json.loads((t10 / "results.json").read_text())
    assert doc["source"]["transforms"] == {"train": "default", "test": "default"}  # Saddle-LongTail's weak crops
    for recipe, ratio in (("deit-lt-cifar10-lt", 100), ("deit-lt-cifar10-lt-r50", 50)):
        stream, source = _dry_run(recipe, t10, data_root, tmp_path, monkeypatch)
        counts = [int(100 * (1 / ratio) ** (i / 9)) for i in range(10)]
        assert stream["model"] == "deit_base_distilled_patch16_224" and 85e6 < stream["n_params"] < 87e6
        _check_student_source(source, sum(counts))
    make_cifar(data_root, "cifar100", train_counts=[100] * 100, test_per_class=1)
    t100 = _teacher("teacher-cifar100-lt", data_root, tmp_path / "t100")
    stream, source = _dry_run("deit-lt-cifar100-lt", t100, data_root, tmp_path, monkeypatch)
    _check_student_source(source, sum(int(100 * 0.01 ** (i / 99)) for i in range(100)))


def test_deit_lt_trains_on_the_deit_pipeline_reproducibly_with_workers(cifar10_lt, tmp_path):
    """The CIFAR-10-LT recipe scaled down (a DeiT-Tiny student at 48 pixels, two batches) trains through DataLoader
    workers on the DeiT pipeline, Mixup/CutMix and the teacher; the same seed gives the same run."""
    data_root, t10 = cifar10_lt
    small = ["model.name=deit_tiny_distilled_patch16_224", "benchmark.source_args.img_size=48", "trainer.devices=1",
             "trainer.accumulate_grad_batches=1", "trainer.precision=32-true", "trainer.limit_train_batches=2",
             "data.batch_size=8", "data.num_workers=2"]
    docs = []
    for name in ("a", "b"):
        cfg = compose(["experiment=deit-lt-cifar10-lt", f"strategy.deit_lt.teacher={t10}", *TINY, *small], data_root)
        docs.append(run(cfg, tmp_path / name))
    assert docs[0]["source"]["transforms"]["train"] == "deit"
    assert docs[0]["confusion"] == docs[1]["confusion"]
    weights = [torch.load(tmp_path / n / "checkpoints" / "exp_000.pt", weights_only=False)["module"] for n in "ab"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_imagenet_lt_and_inat_recipes_dry_run_with_the_deit_pipeline(data_root, tmp_path, monkeypatch):
    """Three classes of generated data; the teacher is the CIFAR teacher recipe trained on them (the recipes' own
    ResNet-50 teachers need ImageNet-sized runs)."""
    make_imagenet_lt(data_root, train_counts=[4, 2, 1], test_per_class=1)
    make_inat(data_root, train_counts=[1, 3, 2], val_per_class=1)
    for recipe, benchmark, n_train in (("deit-lt-imagenet-lt", "imagenet-lt", 7), ("deit-lt-inat2018", "inat2018", 6)):
        three = "+benchmark.source_args.n_classes=3"
        teacher = _teacher("teacher-cifar10-lt", data_root, tmp_path / f"teacher-{benchmark}", f"benchmark={benchmark}",
                           three)
        stream, source = _dry_run(recipe, teacher, data_root, tmp_path, monkeypatch, three)
        assert stream["model"] == "deit_base_distilled_patch16_224"
        _check_student_source(source, n_train)
