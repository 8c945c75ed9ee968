"""What the golden scripts share around an official checkout."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
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
