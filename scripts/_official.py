"""What the golden scripts share around an official checkout."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator


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


def sibling(name: str) -> ModuleType:
    """The golden script ``scripts/<name>.py`` as a module (golden_coda.py's generated images and fixed batch order
    are shared by the others)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
