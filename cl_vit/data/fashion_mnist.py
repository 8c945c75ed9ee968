"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017) from its four IDX files, and its long-tailed version.

The folder is the first of these that exists:

    <data_root>/fashion-mnist/            the official *-ubyte.gz files (python -m cl_vit.data.download fashion-mnist)
    <data_root>/FashionMNIST/raw/         torchvision's layout (gzipped or already decompressed)
    /usr/share/datasets/fashion-mnist/    Debian's package dataset-fashion-mnist

Each file is checked by the size and sha256 of its decompressed content: Debian recompresses the archives, so their
.gz bytes differ from the official ones while the IDX content is identical (the official .gz md5s are checked by the
download command instead).
"""
from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cl_vit.data.base import Source, TensorImageDataset
from cl_vit.data.longtail import longtail_subset
from cl_vit.data.transforms import check_pipelines, deit_train_transform
from cl_vit.errors import ConfigError, UserError

#: decompressed size and sha256 of each IDX file (the content of the official archives; torchvision's FashionMNIST
#: lists the archives' md5s, which cl_vit.data.download checks)
FILES = {
    "train-images-idx3-ubyte": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
# zalandoresearch/fashion-mnist README, "Labels"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
NORMALIZATIONS = {
    # Avalanche's SplitFMNIST default transforms (benchmarks/classic/cfashion_mnist.py): Normalize((0.2860,), (0.3530,))
    "fmnist": (0.2860, 0.3530),
    # [-1, 1], as cl_vit.data.digits scales the 8x8 digits (for transfer between the two)
    "half": (0.5, 0.5),
}
LAYOUT = "the four IDX files train-{images-idx3,labels-idx1}-ubyte[.gz], t10k-{images-idx3,labels-idx1}-ubyte[.gz]"


def candidate_folders(data_root: str | Path) -> list[Path]:
    root = Path(data_root).expanduser()
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", DEBIAN_DIR]


def _file_of(folder: Path, name: str) -> Path | None:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return path
    return None


def find_folder(data_root: str | Path) -> Path:
    """The first candidate folder holding any of the four files; an incomplete one is an error naming what lacks."""
    from cl_vit.data.download import missing_dataset_error

    for folder in candidate_folders(data_root):
        found = {name: _file_of(folder, name) for name in FILES}
        if not any(found.values()):
            continue
        lacking = [f"{n}.gz" for n, p in found.items() if p is None]
        if lacking:
            raise UserError(f"Fashion-MNIST folder {folder} lacks {', '.join(lacking)}: expected {LAYOUT}; download "
                            f"them with python -m cl_vit.data.download fashion-mnist --root {Path(data_root).expanduser()}")
        return folder
    root = Path(data_root).expanduser()
    raise missing_dataset_error("fashion-mnist", root / "fashion-mnist", LAYOUT, root)


def read_checked(path: Path, expected: tuple[int, str] | None) -> bytes:
    """The decompressed content of an IDX file, checked against its expected size and sha256."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"Fashion-MNIST file {path} cannot be read ({type(e).__name__}: {e}): it is corrupt; delete "
                        "it and download again") from e
    if expected is not None:
        size, sha = expected
        if len(data) != size:
            raise UserError(f"Fashion-MNIST file {path} holds {len(data)} bytes, expected {size}: it is truncated or "
                            "another file; delete it and download again")
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise UserError(f"Fashion-MNIST file {path} has sha256 {got} (of its decompressed content), not the "
                            f"official {sha}: it is corrupt or another dataset; delete it and download again")
    return data


def parse_idx(data: bytes, path: Path | str = "IDX file") -> np.ndarray:
    """An IDX array of unsigned bytes (magic 0x0000 08 D, then D big-endian int32 dimensions, then the data)."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise UserError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4].hex()}, expected 00000801 "
                        "or 00000803)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise UserError(f"{path} declares shape {dims} but holds {len(data) - offset} bytes of data: it is truncated")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_fashion_mnist(data_root: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Path]:
    """``(x_train, y_train, x_test, y_test, folder)``: images ``[N, 28, 28]`` uint8, labels int64."""
    folder = find_folder(data_root)
    arrays = {}
    for name, expected in FILES.items():
        path = _file_of(folder, name)
        arrays[name] = parse_idx(read_checked(path, expected), path)
    out = []
    for split in ("train", "t10k"):
        x, y = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"].astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"Fashion-MNIST {split} files in {folder} hold images {x.shape} and labels {y.shape}: "
                            "expected [N, 28, 28] and [N]")
        if y.size and (y.min() < 0 or y.max() >= len(CLASSES)):
            raise UserError(f"Fashion-MNIST {split} labels in {folder} fall outside 0..{len(CLASSES) - 1}")
        out += [x, y]
    return (*out, folder)


class NormalizedByteImages(TensorImageDataset):
    """uint8 images ``[N, 1, H, W]`` kept as bytes (a quarter of float32's memory), scaled per item."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int], mean: float, std: float):
        super().__init__(images, targets)
        self.mean, self.std = float(mean), float(std)

    def __getitem__(self, i):
        return (self.images[i].float() / 255.0 - self.mean) / self.std, self.targets[i]


class AugmentedByteImages(TensorImageDataset):
    """uint8 images ``[N, 1, H, W]`` through a PIL pipeline (cl_vit.data.transforms.PILTransform) per item."""

    def __getitem__(self, i):
        return self.transform(image=self.images[i, 0].numpy())["image"], self.targets[i]


def _resize(x: np.ndarray, img_size: int) -> torch.Tensor:
    t = torch.from_numpy(np.array(x, dtype=np.uint8)).unsqueeze(1)  # frombuffer arrays are read-only
    if img_size == t.shape[-1]:
        return t.clone()
    # area averaging when shrinking (what a camera at lower resolution sees), bilinear when enlarging
    mode = {"mode": "area"} if img_size < t.shape[-1] else {"mode": "bilinear", "align_corners": False}
    out = torch.cat([F.interpolate(c.float(), size=(img_size, img_size), **mode) for c in t.split(10000)])
    return out.round_().clamp_(0, 255).to(torch.uint8)


def build_fashion_mnist(data_root: str | Path, img_size: int = 28, normalize: str = "fmnist",
                        imbalance_ratio: float | None = None, n_max: int | None = None,
                        train_transform: str = "default", augment: dict | None = None, **_) -> Source:
    """The 60,000 / 10,000 official split, 10 classes, one channel; ``img_size`` resizes once at load time.

    With ``imbalance_ratio`` the training set follows LDAM-DRW's exponential profile (cl_vit.data.longtail, numpy
    seed 0), its head class ``n_max`` images (default 6,000: all of them); the test set stays balanced.
    ``train_transform=deit``: DeiT-LT's student pipeline per image (RandAugment, random erasing; at 32 px or less
    pad-4 random crop + flip as build_transform_deit for CIFAR; cl_vit.data.transforms), ``augment`` its options;
    ``default`` trains on the images as they are."""
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ConfigError("benchmark.source_args.img_size", img_size, "a positive integer (28 is the original size)")
    if normalize not in NORMALIZATIONS:
        raise ConfigError("benchmark.source_args.normalize", normalize, f"one of {sorted(NORMALIZATIONS)}")
    if train_transform not in ("default", "deit"):
        raise ConfigError("benchmark.source_args.train_transform", train_transform, "default or deit")
    x_tr, y_tr, x_te, y_te, folder = load_fashion_mnist(data_root)
    mean, std = NORMALIZATIONS[normalize]
    meta = {"root": str(folder), "img_size": img_size, "normalization": {"mean": [mean], "std": [std]},
            "check": "size and sha256 of each decompressed IDX file"}
    name = "fashion-mnist"
    if imbalance_ratio is not None:
        if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, (int, float)) or imbalance_ratio < 1:
            raise ConfigError("benchmark.imbalance_ratio", imbalance_ratio, "a number >= 1 (LDAM-DRW: 10, 50, 100)")
        if n_max is not None and (isinstance(n_max, bool) or not isinstance(n_max, int) or not 1 <= n_max <= 6000):
            raise ConfigError("benchmark.source_args.n_max", n_max, "an integer from 1 to 6000 (images of the head class)")
        keep, counts = longtail_subset(y_tr, imbalance_ratio, seed=0, n_max=n_max)
        x_tr, y_tr = x_tr[keep], y_tr[keep]
        name = "fashion-mnist-lt"
        meta.update(imbalance_ratio=imbalance_ratio, train_counts=counts,
                    profile="LDAM-DRW exponential profile, per-class indices shuffled by numpy seed 0, first n_i kept")
    elif n_max is not None:
        raise UserError("benchmark.source_args.n_max caps the head class of the long-tailed profile: use it with "
                        "benchmark.imbalance_ratio (source fashion-mnist-lt), or remove it")
    meta.update(n_train=int(len(y_tr)), n_test=int(len(y_te)), transforms=check_pipelines(train_transform, "default",
                                                                                        augment))
    train_images = _resize(x_tr, img_size)
    if train_transform == "deit":
        tf = deit_train_transform(img_size, [mean], [std], augment, resize_im=img_size > 32)
        train = AugmentedByteImages(train_images, y_tr, tf)
    else:
        train = NormalizedByteImages(train_images, y_tr, mean, std)
    return Source(
        name=name,
        train=train,
        test=NormalizedByteImages(_resize(x_te, img_size), y_te, mean, std),
        classes=list(CLASSES),
        in_chans=1,
        img_size=img_size,
        meta=meta,
    )


def build_fashion_mnist_lt(data_root, imbalance_ratio: float = 100, **kw) -> Source:
    return build_fashion_mnist(data_root, imbalance_ratio=imbalance_ratio, **kw)
