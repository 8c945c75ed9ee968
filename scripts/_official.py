"""What the golden scripts share around an official checkout."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator


@contextlib.contextmanager
def in_checkout(official: Path, prefix: str) -> Iterator[Path]:
    """A fresh temporary folder for the official run's files, with the working directory in the checkout meanwhile
    (the official code reads its paths relative to it); the directory and the folder are restored and removed after,
    also when the run fails."""
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chdir(official)
        try:
            yield Path(tmp)
        finally:
            os.chdir(cwd)


def print_run(argv, doc: str, repo: str, prefix: str, run: Callable[[Path, Path], object],
              before: Callable[[Path], object] | None = None) -> None:
    """A one-run golden script's command line: ``OFFICIAL_CHECKOUT``; ``before(checkout)`` (the run-time patches),
    then ``run(checkout, folder)`` in a fresh :func:`in_checkout` folder on one torch thread, its numbers printed as
    ``OFFICIAL = {...}`` to paste into the test."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("official", type=Path, help=f"a checkout of {repo}")
    official = p.parse_args(argv).official.resolve()
    torch.set_num_threads(1)
    if before is not None:
        before(official)
    with in_checkout(official, prefix) as tmp:
        numbers = run(official, tmp)
    print(f"OFFICIAL = {numbers!r}")


def print_runs(argv, doc: str, repo: str, prefix: str, runs, run: Callable[[Path, Path, str], object],
               flag: str = "--run", before: Callable[[Path], object] | None = None) -> None:
    """A golden script's command line: ``OFFICIAL_CHECKOUT [flag NAME|all]``; ``before(checkout)`` once (the run-time
    patches), then for each chosen name ``run(checkout, folder, name)`` in a fresh :func:`in_checkout` folder on one
    torch thread, its numbers printed as ``'name': {...},`` lines to paste into the test's OFFICIAL."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("official", type=Path, help=f"a checkout of {repo}")
    p.add_argument(flag, default="all", choices=[*runs, "all"], help="which run; all by default")
    a = p.parse_args(argv)
    official = a.official.resolve()
    torch.set_num_threads(1)
    if before is not None:
        before(official)
    chosen = getattr(a, flag.lstrip("-"))
    for name in runs if chosen == "all" else [chosen]:
        with in_checkout(official, prefix) as tmp:
            numbers = run(official, tmp, name)
        print(f"{name!r}: {numbers!r},")


def cuda_streams_off() -> None:
    """torch.cuda's ``Stream``, ``stream`` and ``current_stream`` as stand-ins without effect: timm's PrefetchLoader
    runs its copies on a side stream, which a CPU run does not have."""
    import torch

    class Stream:
        def wait_stream(self, other):
            return None

    torch.cuda.Stream, torch.cuda.current_stream = Stream, lambda *a, **k: Stream()
    torch.cuda.stream = lambda s: contextlib.nullcontext()


def sibling(name: str) -> ModuleType:
    """The golden script ``scripts/<name>.py`` as a module (golden_coda.py's generated images and fixed batch order
    are shared by the others)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FLOAT32_TO_TENSOR: list = []


def float32_to_tensor() -> type:
    """torchvision's ``ToTensor`` as a subclass that makes float32 images whatever the default dtype (torchvision's
    follows it), so that a golden run in float64 reads the images the suite's loader makes; :func:`float64_input`
    casts them at the network's input, as Lightning's double precision casts the batch. One class per process."""
    if not _FLOAT32_TO_TENSOR:
        import torch
        import torchvision.transforms as transforms

        class Float32ToTensor(transforms.ToTensor):
            def __call__(self, pic):
                default = torch.get_default_dtype()
                torch.set_default_dtype(torch.float32)
                try:
                    return super().__call__(pic)
                finally:
                    torch.set_default_dtype(default)

        _FLOAT32_TO_TENSOR.append(Float32ToTensor)
    return _FLOAT32_TO_TENSOR[0]


def float64_input(net):
    """``net`` casting its input to the default dtype (float64 in the golden runs that set it), as Lightning's double
    precision casts the batch."""
    import torch

    forward = net.forward
    net.forward = lambda x: forward(x.to(torch.get_default_dtype()))
    return net
