"""Decoding images: EXIF orientation applied once, the PIL backend against the official torchvision transforms, and
what verify=header / verify=decode / a mid-run decode find in damaged files."""
from __future__ import annotations

import io
import random

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cl_vit.data.base import CorruptImage, ImageFileDataset, read_image, read_image_pil
from cl_vit.data.transforms import DecodeRandomResizedCrop, DecodeResizeCenterCrop, imagenet_transforms
from cl_vit.data.verify import decode_problem, header_problem, verify_images
from cl_vit.errors import UserError


def disc(h: int = 304, w: int = 400, radius: int = 100, block: int = 8) -> np.ndarray:
    """An off-centre disc with a corner mark, constant on ``block``-pixel squares: such an image survives JPEG
    encoding rotated or not with the same decoded pixels (each 8x8 block holds its mean only), so a file and its
    rotated twin can be compared exactly."""
    yy, xx = np.mgrid[0:h:block, 0:w:block] + block / 2
    small = np.zeros((h // block, w // block, 3), np.uint8)
    small[...] = (20, 40, 200)
    small[(yy - h / 2) ** 2 + (xx - w / 2 - 40) ** 2 < radius ** 2] = (230, 200, 30)
    small[:3, :5] = (0, 255, 0)  # shows flips
    return np.repeat(np.repeat(small, block, 0), block, 1)


def rotated_and_twin(tmp_path, orientation: int):
    """``rot.jpg``: the disc's pixels with EXIF ``orientation``; ``twin.jpg``: those pixels turned as PIL's
    ImageOps.exif_transpose turns them, stored without a tag."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(disc()).save(tmp_path / "rot.jpg", quality=95, subsampling=0, exif=exif)
    ImageOps.exif_transpose(Image.open(tmp_path / "rot.jpg")).save(tmp_path / "twin.jpg", quality=95, subsampling=0)
    return str(tmp_path / "rot.jpg"), str(tmp_path / "twin.jpg")


def _seeded(fn, seed=0):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_orientation_gives_the_crops_of_the_pre_rotated_twin(tmp_path, orientation):
    """Every decode path (full, reduced JPEG decode, training and evaluation crops, both backends) gives equal
    pixels for a tagged file and its pre-rotated twin (the bug: size from the untagged header, pixels rotated)."""
    rot, twin = rotated_and_twin(tmp_path, orientation)
    paths = {
        "read_image": read_image,
        "pil": lambda p: np.asarray(read_image_pil(p)),
        "eval 224": DecodeResizeCenterCrop(224),
        "eval 64 (reduced decode)": DecodeResizeCenterCrop(64),
        "eval squash": DecodeResizeCenterCrop(96, "squash"),
        "eval pil bicubic": DecodeResizeCenterCrop(224, interpolation="bicubic", backend="pil"),
        "train": DecodeRandomResizedCrop(48, scale=(0.05, 1.0)),
        "train pil": DecodeRandomResizedCrop(224, backend="pil"),
    }
    for name, decode in paths.items():
        for seed in range(3 if name.startswith("train") else 1):
            a, b = _seeded(lambda: decode(rot), seed), _seeded(lambda: decode(twin), seed)
            assert a.shape == b.shape, name
            assert np.array_equal(a, b), (name, int(np.abs(a.astype(int) - b).max()))
    if orientation in (5, 6, 7, 8):  # the disc of the tagged file stays round in the centre crop
        crop = DecodeResizeCenterCrop(224)(rot)
        yellow = (crop[..., 0] > 128) & (crop[..., 2] < 128)
        rows, cols = np.flatnonzero(yellow.any(1)), np.flatnonzero(yellow.any(0))
        assert abs((rows[-1] - rows[0]) - (cols[-1] - cols[0])) <= 4


def _seeded_all(fn, seed=0):
    np.random.seed(seed)  # timm's RandAugment draws its ops with numpy
    return _seeded(fn, seed)


@pytest.mark.parametrize("orientation", [3, 6])  # 6: stored and displayed sizes differ (the crop geometry)
def test_exif_orientation_ignore_gives_the_official_loaders_stored_pixels_on_every_decode_path(tmp_path, orientation):
    """exif_orientation=ignore: every decode path sees what the official loaders' Image.open(p).convert("RGB")
    gives (the stored pixels), with sizes and crops decided on the stored image; apply (the default) does not."""
    from torchvision import transforms as T

    from cl_vit.data.transforms import decode_options, imagenet_style_datasets

    rot, _ = rotated_and_twin(tmp_path, orientation)
    stored = str(tmp_path / "stored.jpg")  # the same scan data without the tag
    Image.fromarray(disc()).save(stored, quality=95, subsampling=0)
    with Image.open(rot) as im:
        official = np.asarray(im.convert("RGB"))
    assert official.shape == disc().shape
    assert np.array_equal(read_image(rot, orientation=1), official)
    assert np.array_equal(np.asarray(read_image_pil(rot, exif=False)), official)
    assert np.array_equal(read_image(stored), official)  # so the opencv crops of ``stored`` are the references
    opencv = {
        "eval 224": lambda e: DecodeResizeCenterCrop(224, exif_orientation=e),
        "eval 64 (reduced decode)": lambda e: DecodeResizeCenterCrop(64, exif_orientation=e),
        "eval squash": lambda e: DecodeResizeCenterCrop(96, "squash", exif_orientation=e),
        "train": lambda e: DecodeRandomResizedCrop(48, scale=(0.05, 1.0), exif_orientation=e),
    }
    for name, make in opencv.items():
        for seed in range(3 if name == "train" else 1):
            a = _seeded(lambda: make("ignore")(rot), seed)
            assert np.array_equal(a, _seeded(lambda: make("apply")(stored), seed)), name
            b = _seeded(lambda: make("apply")(rot), seed)
            assert a.shape != b.shape or not np.array_equal(a, b), name
    image = Image.fromarray(official)
    pil = {  # backend=pil against torchvision's transforms on the official loader's image
        "train pil": (DecodeRandomResizedCrop(224, backend="pil", exif_orientation="ignore"), T.RandomResizedCrop(224)),
        "eval pil": (DecodeResizeCenterCrop(224, interpolation="bicubic", backend="pil", exif_orientation="ignore"),
                     T.Compose([T.Resize(256, T.InterpolationMode.BICUBIC), T.CenterCrop(224)])),
    }
    for name, (ours, ref) in pil.items():
        for seed in range(2):
            a = _seeded(lambda: ours(rot), seed)
            assert np.array_equal(a, _seeded(lambda: np.asarray(ref(image)), seed)), name
    for pipeline in ("deit", "torchvision"):  # the full-decode pipelines
        for exif in ("ignore", "apply"):
            datasets = imagenet_style_datasets([(rot, 0)], [(rot, 0)], 96, (0.5,) * 3, (0.25,) * 3,
                                               train_transform=pipeline, test_transform=pipeline,
                                               decode=decode_options(exif_orientation=exif))
            for ds in datasets:
                a = _seeded_all(lambda: ds[0][0])
                ref = _seeded_all(lambda: ds.transform(image=official)["image"])
                assert torch.equal(a, ref) == (exif == "ignore"), (pipeline, exif)


def test_exif_orientation_is_recorded_and_a_bad_value_is_one_line(tmp_path):
    from data_gen import make_imagenet_lt

    from cl_vit.data import build_source
    from cl_vit.errors import ConfigError

    make_imagenet_lt(tmp_path, [3, 2])
    default = build_source("imagenet-lt", tmp_path, n_classes=2, img_size=16)
    assert default.meta["transforms"]["decode"]["exif_orientation"] == "apply"
    src = build_source("imagenet-lt", tmp_path, n_classes=2, img_size=16, exif_orientation="ignore")
    assert src.meta["transforms"]["decode"]["exif_orientation"] == "ignore"
    assert src.train.decode.exif_orientation == src.test.decode.exif_orientation == "ignore"
    with pytest.raises(ConfigError) as e:
        build_source("imagenet-lt", tmp_path, n_classes=2, img_size=16, exif_orientation="rotate")
    assert str(e.value).count("\n") == 0 and "benchmark.source_args.exif_orientation='rotate'" in str(e.value)
    assert "'apply', 'ignore'" in str(e.value)


def _photo_jpeg(path, h: int, w: int, seed: int, quality: int = 90) -> None:
    """Real JPEG bytes (PIL's encoder, 4:2:0) of a smooth, photo-like image with edges."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 16, w // 20, 3)).astype(np.uint8)
    img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    img[h // 3: h // 2, w // 4: w // 2] = (250, 10, 10)  # a hard edge, where resampling filters differ most
    Image.fromarray(img).save(path, quality=quality)


# The official transforms, built as GT-RIPL/CODA-Prompt dataloaders/utils.py L42-56 (ImageNet_R: train
# RandomResizedCrop(224) + flip, test Resize(256) + CenterCrop(224), ToTensor, Normalize((0,0,0), (1,1,1))) and as
# RanPAC utils/data.py L20-43 (@012927f; RevisitingCIL utils/data.py L69-87 @a2e6b71): RandomResizedCrop(224,
# scale=(0.05, 1)), test Resize(256, BICUBIC) + CenterCrop(224), on images loaded as PIL RGB (CODA-Prompt
# dataloaders/dataloader.py L368-374 jpg_image_to_array; RanPAC utils/data_manager.py L172-180 pil_loader).
OFFICIAL = {
    "coda": dict(interpolation="bilinear", scale=(0.08, 1.0)),
    "ranpac": dict(interpolation="bicubic", scale=(0.05, 1.0)),
}


@pytest.mark.parametrize("recipe", list(OFFICIAL))
def test_pil_backend_equals_the_official_torchvision_transform_on_jpeg_bytes(tmp_path, recipe):
    """backend=pil gives the official tensors to float rounding: the uint8 crops are the same PIL operations, and
    only the division by 255 differs in the last bit (torchvision divides, albumentations multiplies by 1/255):
    tolerance 1e-6 on a 0-1 scale, far below one grey level (0.004). backend=opencv is farther off (reduced decode,
    OpenCV resize): the reason the option exists."""
    from torchvision import transforms as T

    opt = OFFICIAL[recipe]
    mode = getattr(T.InterpolationMode, opt["interpolation"].upper())
    official_test = T.Compose([T.Resize(256, interpolation=mode), T.CenterCrop(224), T.ToTensor(),
                               T.Normalize((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))])
    official_crop = T.RandomResizedCrop(224, scale=opt["scale"])
    options = dict(backend="pil", crop_scale=opt["scale"], test_interpolation=opt["interpolation"])
    decode, transform = imagenet_transforms(224, (0, 0, 0), (1, 1, 1), False, **options)
    test_ds = ImageFileDataset([], transform, decode=decode)
    train_decode, _ = imagenet_transforms(224, (0, 0, 0), (1, 1, 1), True, **options)
    fast, _ = imagenet_transforms(224, (0, 0, 0), (1, 1, 1), False, test_interpolation=opt["interpolation"])
    for i, (h, w) in enumerate([(375, 500), (500, 333), (1200, 900), (260, 240)]):
        path = tmp_path / f"{i}.jpg"
        _photo_jpeg(path, h, w, seed=i)
        with Image.open(path) as im:
            image = im.convert("RGB")
        ref = official_test(image)
        test_ds.samples = [(str(path), 0)]
        ours = test_ds[0][0]
        assert ours.shape == ref.shape == (3, 224, 224)
        assert (ours - ref).abs().max().item() <= 1e-6
        torch.manual_seed(i)
        ref_crop = np.asarray(official_crop(image))
        torch.manual_seed(i)
        assert np.array_equal(train_decode(str(path)), ref_crop)
        opencv = torch.from_numpy(fast(str(path)).astype(np.float32) / 255).permute(2, 0, 1)
        assert (opencv - ref).abs().max().item() > 0.02


def _jpeg_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur((rng.random((300, 400, 3)) * 255).astype(np.uint8), (31, 31), 10)
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _encoded(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(disc(64, 96)).save(buf, fmt)
    return buf.getvalue()


def test_verify_finds_truncated_webp_and_bmp_by_header_and_damaged_scans_by_decoding(tmp_path):
    good = {"jpg": _jpeg_bytes(), "png": _encoded("PNG"), "webp": _encoded("WEBP"), "bmp": _encoded("BMP")}
    for ext, data in good.items():
        (tmp_path / f"good.{ext}").write_bytes(data)
        assert header_problem(str(tmp_path / f"good.{ext}")) is None
        assert decode_problem(str(tmp_path / f"good.{ext}")) is None, ext
    (tmp_path / "webp_named.jpg").write_bytes(good["webp"][: len(good["webp"]) // 2])
    (tmp_path / "short.bmp").write_bytes(good["bmp"][: len(good["bmp"]) - 500])
    assert "truncated" in header_problem(str(tmp_path / "webp_named.jpg"))
    assert "truncated" in header_problem(str(tmp_path / "short.bmp"))
    damaged = []
    for seed in range(4):  # 100 random bytes over the middle of the scan data: end markers intact
        data = bytearray(good["jpg"])
        mid = len(data) // 2
        data[mid: mid + 100] = np.random.default_rng(seed).integers(0, 256, 100, dtype=np.uint8).tobytes()
        damaged.append(tmp_path / f"garbage_{seed}.jpg")
        damaged[-1].write_bytes(bytes(data))
        assert header_problem(str(damaged[-1])) is None
        assert cv2.imread(str(damaged[-1])) is not None  # OpenCV alone decodes it to a damaged image
    png = bytearray(good["png"])
    png[len(png) // 2] ^= 0xFF  # PNG checks a CRC per chunk
    damaged.append(tmp_path / "flipped.png")
    damaged[-1].write_bytes(bytes(png))
    samples = [(str(tmp_path / f"good.{e}"), 0) for e in good] + [(str(p), 0) for p in damaged]
    kept, skipped = verify_images(samples, mode="decode", skip_corrupt=True)
    assert kept == samples[:4]
    assert [s["path"] for s in skipped] == [str(p) for p in damaged]
    with pytest.raises(UserError, match="garbage_0.jpg has damaged image data|garbage_0.jpg cannot be decoded"):
        verify_images(samples, mode="decode")


def test_a_file_that_fails_mid_run_raises_corrupt_image_with_its_path_through_the_worker(tmp_path):
    bad = tmp_path / "dir with space (1)" / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"<html>not found</html>")
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg_bytes())
    for backend in ("opencv", "pil"):
        decode, transform = imagenet_transforms(32, (0, 0, 0), (1, 1, 1), False, backend=backend)
        ds = ImageFileDataset([(str(good), 0), (str(bad), 1)], transform, decode=decode)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1)
        with pytest.raises(CorruptImage) as e:
            list(loader)
        assert e.value.path == str(bad) and "Traceback" not in str(e.value) and "skip_corrupt=true" in str(e.value)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_jpeg_bytes()[:3000])
    with pytest.raises(CorruptImage) as e:  # PIL refuses what OpenCV would fill with grey
        read_image_pil(truncated)
    assert e.value.path == str(truncated)


@pytest.mark.parametrize("test_resize,resize", [("squash", 224), ("crop", 256)])
def test_cifar_at_224_with_pil_backend_is_ranpac_and_revisitingcil_transform(tmp_path, test_resize, resize):
    """CIFAR upscaled to 224 as RanPAC (utils/data.py L20-43, iCIFAR224: Resize(224, BICUBIC) + CenterCrop(224)) and
    RevisitingCIL (utils/data.py L69-87: Resize(256, BICUBIC) + CenterCrop(224)) transform it, on the PIL image of
    the array (torchvision's CIFAR100 dataset returns Image.fromarray): equal to float rounding."""
    from torchvision import transforms as T

    from cl_vit.data import build_source
    from data_gen import make_cifar

    make_cifar(tmp_path, "cifar100", train_counts=[1] * 100, test_per_class=1)
    src = build_source("cifar100", tmp_path, img_size=224, normalize="coda", train_transform="coda",
                       test_transform="coda", backend="pil", crop_scale=[0.05, 1.0], test_interpolation="bicubic",
                       test_resize=test_resize)
    official = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          T.ToTensor()])
    for i in (0, 57):
        ours, _ = src.test[i]
        ref = official(Image.fromarray(src.test.images[i]))
        assert (ours - ref).abs().max().item() <= 1e-6
    crop = T.RandomResizedCrop(224, scale=(0.05, 1.0))
    torch.manual_seed(3)
    ref = np.asarray(crop(Image.fromarray(src.train.images[5])))
    torch.manual_seed(3)
    assert np.array_equal(np.asarray(src.train.transform.geometry(Image.fromarray(src.train.images[5]))), ref)
    assert src.meta["transforms"]["decode"] == {"backend": "pil", "crop_scale": [0.05, 1.0],
                                                "train_interpolation": "bilinear", "test_interpolation": "bicubic"}


@pytest.mark.parametrize("experiment,expected", [
    # CODA-Prompt's torchvision defaults on PIL images (benchmark=imagenet-r, cifar100-coda)
    ("coda-prompt-imagenet-r", ("pil", [0.08, 1.0], "bilinear", "bilinear", "crop")),
    ("coda-prompt-cifar100", ("pil", [0.08, 1.0], "bilinear", "bilinear", "squash")),
    # RanPAC utils/data.py L20-43, RevisitingCIL utils/data.py L69-93
    ("ranpac-imagenet-r", ("pil", [0.05, 1.0], "bilinear", "bicubic", "crop")),
    ("simplecil-imagenet-r", ("pil", [0.05, 1.0], "bilinear", "bicubic", "crop")),
    ("ranpac-cifar100", ("pil", [0.05, 1.0], "bilinear", "bicubic", "squash")),
    ("simplecil-cifar100", ("pil", [0.05, 1.0], "bilinear", "bicubic", "crop")),
])
def test_recipes_bring_their_official_crop_scale_interpolation_and_backend(experiment, expected):
    from conftest import compose

    args = compose([f"experiment={experiment}"]).benchmark.source_args
    keys = ("backend", "crop_scale", "train_interpolation", "test_interpolation", "test_resize")
    assert tuple(list(v) if k == "crop_scale" else v for k, v in ((k, args[k]) for k in keys)) == expected


@pytest.mark.parametrize("experiment,expected", [
    # official loaders open files with PIL without exif_transpose (the config comments cite each line)
    ("benchmark=imagenet-r", "ignore"), ("experiment=ranpac-imagenet-r-coda", "ignore"),
    ("experiment=refiner-vit-l-imagenet", "ignore"), ("experiment=deit-lt-inat2018", "ignore"),
    ("experiment=teacher-inat2018", "ignore"), ("experiment=gcab-imagenet100", "ignore"),
    # the suite's own benchmarks keep the default
    ("benchmark=imagenet-lt", "apply"), ("benchmark=tiny-imagenet", "apply"),
])
def test_recipes_bring_their_official_exif_orientation(experiment, expected):
    from conftest import compose

    args = compose([experiment]).benchmark.source_args
    assert args.get("exif_orientation", "apply") == expected
