"""Data sources. ``build_source(name, data_root=..., **args)`` returns a :class:`Source`.

A source is registered here by name; the benchmark config names it in ``benchmark.source`` and passes
``benchmark.source_args``.
"""
from __future__ import annotations

from typing import Callable

from cl_vit.data.base import ImageFileDataset, Source, TensorImageDataset, scan_image_folder
from cl_vit.data.cifar import build_cifar10, build_cifar10_lt, build_cifar100, build_cifar100_lt
from cl_vit.data.digits import build_digits, build_digits_lt
from cl_vit.data.fashion_mnist import build_fashion_mnist, build_fashion_mnist_lt
from cl_vit.data.filelist import build_imagenet_lt, build_inat2018
from cl_vit.data.imagenet import build_imagenet, build_imagenet100
from cl_vit.data.imagenet_r import build_imagenet_r
from cl_vit.data.synthetic import build_synthetic
from cl_vit.data.tiny_imagenet import build_tiny_imagenet
from cl_vit.errors import UserError
from cl_vit.loading import TARGET, resolve_target

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
    "fashion-mnist": build_fashion_mnist,
    "fashion-mnist-lt": build_fashion_mnist_lt,
    "imagenet": build_imagenet,
    "imagenet100": build_imagenet100,
    "tiny-imagenet": build_tiny_imagenet,
}


def register_source(name: str):
    def wrap(fn):
        SOURCES[name] = fn
        return fn

    return wrap


def build_source(name: str, data_root: str, **args) -> Source:
    """The source ``benchmark.source`` names, or a researcher's own one: ``benchmark.source_args._target_`` is a
    function or class taking ``data_root`` and the other source_args that returns a :class:`Source`."""
    if args.get(TARGET):
        target = args.pop(TARGET)
        source = resolve_target(f"benchmark.source_args.{TARGET}", target)(data_root=data_root, **args)
        if not isinstance(source, Source):
            raise UserError(f"benchmark.source_args.{TARGET}={target!r} returned {type(source).__name__}, not a "
                            "cl_vit.data.Source")
        return source
    if name not in SOURCES:
        raise UserError(f"benchmark.source={name!r} is not a known source: choose one of {sorted(SOURCES)}")
    return SOURCES[name](data_root=data_root, **args)


__all__ = ["Source", "SOURCES", "build_source", "register_source", "ImageFileDataset", "TensorImageDataset",
           "scan_image_folder"]
