"""Data sources. ``build_source(name, data_root=..., **args)`` returns a :class:`Source`.

A source is registered here by name; the benchmark config names it in ``benchmark.source`` and passes
``benchmark.source_args``.
"""
from __future__ import annotations

from typing import Callable

from cl_vit.data.base import ImageFileDataset, Source, TensorImageDataset, scan_image_folder
from cl_vit.data.cifar import build_cifar10, build_cifar10_lt, build_cifar100, build_cifar100_lt
from cl_vit.data.digits import build_digits, build_digits_lt
from cl_vit.data.filelist import build_imagenet_lt, build_inat2018
from cl_vit.data.imagenet import build_imagenet
from cl_vit.data.imagenet_r import build_imagenet_r
from cl_vit.data.synthetic import build_synthetic
from cl_vit.errors import UserError

SOURCES: dict[str, Callable[..., Source]] = {
    "digits": build_digits,
    "digits-lt": build_digits_lt,
    "synthetic": build_synthetic,
    "imagenet-r": build_imagenet_r,
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "cifar10-lt": build_cifar10_lt,
    "cifar100-lt": build_cifar100_lt,
    "imagenet-lt": build_imagenet_lt,
    "inat2018": build_inat2018,
    "imagenet": build_imagenet,
}


def register_source(name: str):
    def wrap(fn):
        SOURCES[name] = fn
        return fn

    return wrap


def build_source(name: str, data_root: str, **args) -> Source:
    if name not in SOURCES:
        raise UserError(f"benchmark.source={name!r} is not a known source: choose one of {sorted(SOURCES)}")
    return SOURCES[name](data_root=data_root, **args)


__all__ = ["Source", "SOURCES", "build_source", "register_source", "ImageFileDataset", "TensorImageDataset",
           "scan_image_folder"]
