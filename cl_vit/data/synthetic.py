"""A procedurally generated, learnable image source, written to disk as a folder of image files per class.

Each class is a sinusoidal grating with its own orientation, frequency and colour; every image draws a random phase
and additive noise. The images go to ``<data_root>/synthetic/<variant>/{train,test}/<class>/<i>.png`` and are read
back through the same folder-loading code that the real datasets use, so tests exercise the real I/O path.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np

from cl_vit.data.base import ImageFileDataset, Source, scan_image_folder
from cl_vit.data.transforms import resize_pipeline
from cl_vit.rundir import atomic_write_text

MEAN = STD = (0.5, 0.5, 0.5)


def render_class_image(label: int, n_classes: int, size: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One RGB uint8 image of class ``label``: a grating whose (angle, frequency, colour) identify the class."""
    angle = np.pi * label / n_classes
    freq = 1.5 + (label % 3)  # cycles per image; with the angle this separates neighbouring classes
    hue = (label * 0.61803398875) % 1.0  # golden-ratio hues spread any number of classes over the colour wheel
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0.0, 1 / 3, 2 / 3])))
    yy, xx = np.mgrid[0:size, 0:size] / size
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    img = 127.5 + 110.0 * wave[..., None] * colour[None, None, :]
    img = img + rng.normal(0.0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(root: Path, n_classes: int, n_train: int, n_test: int, size: int, noise: float, seed: int, fmt: str):
    """Write the images into a temporary folder next to ``root`` and rename it into place (never half-written)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        rng = np.random.default_rng(seed)
        for split, n in (("train", n_train), ("test", n_test)):
            for c in range(n_classes):
                folder = tmp / split / f"class_{c:03d}"
                folder.mkdir(parents=True)
                for i in range(n):
                    img = render_class_image(c, n_classes, size, rng, noise)
                    cv2.imwrite(str(folder / f"{i:05d}.{fmt}"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        spec = dict(n_classes=n_classes, n_train=n_train, n_test=n_test, size=size, noise=noise, seed=seed, fmt=fmt)
        atomic_write_text(tmp / "spec.json", json.dumps(spec))
        try:
            os.rename(tmp, root)
        except OSError:  # another process generated it first: theirs is identical
            if not (root / "spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_synthetic(
    data_root: str | Path,
    n_classes: int = 10,
    n_train: int = 40,
    n_test: int = 10,
    size: int = 16,
    noise: float = 25.0,
    seed: int = 0,
    fmt: str = "png",
    img_size: int | None = None,
    **_,
) -> Source:
    if fmt not in ("png", "jpg"):
        raise ValueError(f"synthetic fmt must be png or jpg, got {fmt!r}")
    variant = f"c{n_classes}-n{n_train}-{n_test}-s{size}-noise{noise:g}-seed{seed}-{fmt}"
    root = Path(data_root).expanduser() / "synthetic" / variant
    if not (root / "spec.json").exists():
        generate(root, n_classes, n_train, n_test, size, noise, seed, fmt)
    img_size = img_size or size
    transform = resize_pipeline(img_size, MEAN, STD)
    train, classes = scan_image_folder(root / "train")
    test, _ = scan_image_folder(root / "test", classes)
    return Source(
        name="synthetic",
        train=ImageFileDataset(train, transform),
        test=ImageFileDataset(test, transform),
        classes=classes,
        in_chans=3,
        img_size=img_size,
        meta={"root": str(root), "variant": variant},
    )
