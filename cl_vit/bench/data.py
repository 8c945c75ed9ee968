"""Training-pipeline throughput on ImageNet-R-shaped JPEGs: the suite's loader vs torchvision's ImageFolder.

Both read the same JPEG folder (``<wnid>/art_<i>.jpg``) and produce normalised 3x224x224 float batches through a DataLoader with the same batch
size, workers and shuffling:

* cl_vit: ``ImageFileDataset`` with ``imagenet_transforms`` (RandomResizedCrop decided on the JPEG header, reduced
  DCT decode with OpenCV, flip + normalise with albumentations on uint8);
* baseline: ``torchvision.datasets.ImageFolder`` with ``RandomResizedCrop(224)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize`` (PIL decode), the transform CODA-Prompt uses for ImageNet-R.

A second row per case times the albumentations pipeline on fully decoded images (no reduced decode), to show what
each part contributes. Two cases: ImageNet-R-like sizes (shorter side 250-900 px) and large photos (1000-1600 px,
where the reduced decode matters most). Images/s = images of one pass over the folder / its median wall time, the
three loaders alternating.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from cl_vit.bench import interleaved, row, scratch

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_jpegs(root: Path, n_classes: int, per_class: int, seed: int = 0, short_side=(250, 900),
               noise: float = 10.0) -> None:
    """Photo-like JPEGs (smooth colour fields plus noise, quality 90): JPEG decode cost depends on size and
    content, so the images are neither flat nor pure noise."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        make_class_jpegs(root / f"n{c:08d}", per_class, rng, short_side, noise)


def make_class_jpegs(folder: Path, per_class: int, rng: np.random.Generator, short_side=(250, 900),
                     noise: float = 10.0) -> None:
    """One class folder of :func:`make_jpegs` (``art_<i>.jpg``)."""
    folder.mkdir(parents=True)
    for i in range(per_class):
        short = int(rng.integers(*short_side))
        long_ = int(short * rng.uniform(1.0, 1.6))
        h, w = (short, long_) if rng.random() < 0.6 else (long_, short)
        coarse = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        img += rng.normal(0, noise, img.shape)
        cv2.imwrite(str(folder / f"art_{i}.jpg"), np.clip(img, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])


def _pil_rgb(path: str):
    """torchvision's ``pil_loader`` (``Image.open(...).convert("RGB")``) without the formats no file may be opened as
    (``decode_check.pil_formats``)."""
    from PIL import Image

    from cl_vit.data.decode_check import pil_formats

    with open(path, "rb") as f:
        return Image.open(f, formats=pil_formats()).convert("RGB")


def _loaders(root: Path, batch_size: int, workers: int):
    import albumentations as A
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from cl_vit.data.base import ImageFileDataset, scan_image_folder
    from cl_vit.data.transforms import imagenet_train_pipeline, imagenet_transforms

    samples, _ = scan_image_folder(root)
    decode, transform = imagenet_transforms(224, MEAN, STD, train=True)
    ours = ImageFileDataset(samples, transform, decode=decode)
    full = ImageFileDataset(samples, imagenet_train_pipeline(224, MEAN, STD))
    assert isinstance(full.transform, A.Compose)
    # torchvision's pil_loader, with PIL's formats limited as every decode of the suite (never EPS: Ghostscript)
    tv = ImageFolder(str(root), transform=T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                                                      T.ToTensor(), T.Normalize(MEAN, STD)]), loader=_pil_rgb)
    kw = dict(batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
              generator=torch.Generator().manual_seed(0))
    return {name: DataLoader(ds, **kw) for name, ds in (("cl_vit", ours), ("albumentations_full_decode", full),
                                                        ("torchvision", tv))}


def _epoch(loader) -> int:
    n = 0
    for x, _ in loader:
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        n += len(x)
    return n


#: (case, short side range, noise, images per class); 8 classes (4 with --quick)
CASES = (("jpeg 250-900px", (250, 900), 10.0, 16),
         ("jpeg 1000-1600px", (1000, 1600), 3.0, 4))


def run(quick: bool = False) -> dict:
    n_classes = 4 if quick else 8
    workers = min(2, os.cpu_count() or 1)
    rows = []
    for case, short_side, noise, per_class in CASES:
        per_class = max(2, per_class // 2) if quick else per_class
        with scratch("cl_vit-bench-data-") as tmp:
            make_jpegs(tmp / "imagenet-r", n_classes, per_class, short_side=short_side, noise=noise)
            loaders = _loaders(tmp / "imagenet-r", batch_size=16, workers=workers)
            n_images = n_classes * per_class
            times = interleaved({k: (lambda ld=ld: _epoch(ld)) for k, ld in loaders.items()},
                                repeats=2 if quick else 5, warmup=1)
            ips = {k: n_images / t for k, t in times.items()}
            rows += [
                row(f"{case}, cl_vit", "images/s", ips["cl_vit"], ips["torchvision"],
                    aim=">= 1.5x torchvision ImageFolder", higher_is_better=True, target=1.5, workers=workers,
                    images=n_images),
                row(f"{case}, alb. full decode", "images/s", ips["albumentations_full_decode"],
                    ips["torchvision"], higher_is_better=True, workers=workers, images=n_images),
            ]
    notes = [f"batch 16, {workers} DataLoader workers, medians of interleaved passes; baseline = torchvision "
             "ImageFolder + RandomResizedCrop(224)/RandomHorizontalFlip/ToTensor/Normalize (PIL decode)"]
    return {"name": "data", "device": "cpu", "rows": rows, "notes": notes}
