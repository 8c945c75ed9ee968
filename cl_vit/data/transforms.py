"""albumentations pipelines (OpenCV on uint8 arrays): the suite's image transforms."""
from __future__ import annotations

from typing import Sequence

import albumentations as A
from albumentations.pytorch import ToTensorV2


def normalize_to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()]


def resize_pipeline(img_size: int, mean: Sequence[float], std: Sequence[float]) -> A.Compose:
    """Resize to a square ``img_size`` and normalise: the evaluation pipeline of small, already-centred images."""
    return A.Compose([A.Resize(img_size, img_size), *normalize_to_tensor(mean, std)])
