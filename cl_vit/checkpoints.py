"""Checkpoint files: tensors and plain values only, so that reading one runs no code.

Every checkpoint the suite reads (run directories, DeiT-LT teachers, ``model.checkpoint``) goes through ``load``:
``torch.load(weights_only=True)``, which refuses any pickled object other than tensors, numbers, strings, lists,
tuples and dicts. ``plain`` turns what a run saves into exactly those types before it is written.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cl_vit.errors import UserError

_PLAIN = (str, int, float, bool, type(None))


class CheckpointError(UserError):
    """A checkpoint that cannot be used: damaged (``DamagedCheckpoint``) or holding code (``UnsafeCheckpoint``)."""


class DamagedCheckpoint(CheckpointError):
    """Truncated, empty or not a torch checkpoint at all."""


class UnsafeCheckpoint(CheckpointError):
    """Holds pickled objects beyond tensors and plain values: loading it could run code."""


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy values turned into tensors and Python numbers; any other type is a ``TypeError`` that names
    where it sits (a strategy's ``state_dict`` must hold tensors and plain values only)."""
    if isinstance(obj, (torch.Tensor, *_PLAIN)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        return {k: plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    raise TypeError(f"{where} holds a {type(obj).__module__}.{type(obj).__name__}: a checkpoint holds tensors, "
                    "numbers, strings, lists and dicts only (weights_only loading refuses anything else)")


def load(path: str | Path, what: str = "checkpoint", allow: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; one-line errors for a damaged file or one that holds code.

    ``allow``: classes the file may also construct (released DeiT-LT files pickle their argparse.Namespace)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file would construct arbitrary objects
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        obj = f" ({found.group(1)})" if found else ""
        raise UnsafeCheckpoint(
            f"{what} {path} holds pickled objects other than tensors and plain values{obj}: loading it could run "
            "code, so it is refused; use a checkpoint written by cl_vit, or a .safetensors file"
        ) from e
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated zip, an empty file, something that is no checkpoint
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DamagedCheckpoint(f"{what} {path} cannot be read ({type(e).__name__}: {detail}): it is truncated or "
                                "damaged") from e
