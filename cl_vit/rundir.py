"""The run directory on disk: its layout, atomic writes, the lock, temporary files and file modes.

Layout::

    RUN_DIR/
      config.yaml            the resolved config of the run
      stream.json            the protocol: classes and train/test sizes of every experience, parameter count
      results.json           schema-versioned results (rewritten after every experience, atomically)
      accuracy_matrix.csv    rows = trained up to experience i, columns = evaluated experience j
      checkpoints/exp_XXX.pt network, masks, strategy state and log step after experience XXX
      tensorboard/           TensorBoard events

Every file is written to a temporary file in the same folder and renamed into place, so a run killed at any moment
leaves each file either as it was or complete; a temporary file left by a killed process is removed when the run
directory is next written (``RunDirectory.remove_stale_temporaries``). Files get the mode the process's umask gives a
new file (0644 under the usual 022), as ``open`` would, so a group sharing a results folder can read them.

This is the lowest layer of results: it imports nothing of the suite but ``errors`` and ``loading`` (the one
reader of checkpoints). What the results of a stream are lives in ``cl_vit.stream_results``; reading runs back
(``load_run``, grouping, recovery on resume, ``Run.restore``) in ``cl_vit.runs``.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cl_vit import loading
from cl_vit.errors import ConfigError, UserError

_PLAIN = (str, int, float, bool, type(None))


class _Writes:
    """A file that remembers the first error of a write: torch.save reports a failed write (a full disk) as an
    unrelated RuntimeError, and the OSError behind it is what the user needs to see."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self.f.flush()


#: the temporary files of ``_atomic_write``: ``.<name>.<8 random characters>.tmp`` (tempfile.mkstemp)
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask (mkstemp's own 0600 would hide results from
    the group that shares a results folder)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as f:
            writes = _Writes(f)
            try:
                write(writes)
                f.flush()
                os.fsync(f.fileno())
            except Exception as e:
                err = writes.error or (e if isinstance(e, OSError) else None)
                if err is None:
                    raise
                raise OSError(err.errno, err.strerror, str(path)) from e  # the file that could not be written
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def open_partial(path: str | Path, append: bool):
    """A file written bit by bit and renamed by its writer once complete (a download's ``.part``, resumable across
    processes, so not a temporary file of ours): opened to append or anew, with the umask's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), _new_file_mode())
    with os.fdopen(fd, "ab" if append else "wb") as f:
        yield f


def write_in_place(path: str | Path, data: str) -> None:
    """Write a file that is not a result and cannot be renamed into place: a kernel interface such as
    ``/proc/self/clear_refs``."""
    with open(path, "w") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, dumps(obj))


def dumps(obj: Any) -> str:
    """JSON with one line per top-level key. An indented dump goes through json's pure-Python encoder, whose time
    along a long stream grows with every confusion entry of results.json (rewritten after each experience); each
    value here is encoded compactly by the C encoder."""
    enc = functools.partial(json.dumps, allow_nan=False, default=_json_default, separators=(", ", ": "))
    if not isinstance(obj, dict) or not obj:
        return enc(obj) + "\n"
    return "{\n" + ",\n".join(f" {enc(str(k))}: {enc(v)}" for k, v in obj.items()) + "\n}\n"


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")

def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy values turned into tensors and Python numbers; any other type is a ``TypeError`` that names
    where it sits (a strategy's ``state_dict`` must hold tensors and plain values only, so that every checkpoint
    loads with ``weights_only=True``)."""
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


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    config_path = property(lambda self: self.path / "config.yaml")
    results_path = property(lambda self: self.path / "results.json")
    stream_path = property(lambda self: self.path / "stream.json")
    matrix_csv_path = property(lambda self: self.path / "accuracy_matrix.csv")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")

    def checkpoint_path(self, i: int) -> Path:
        return self.checkpoint_dir / f"exp_{i:03d}.pt"

    def epoch_checkpoint_path(self, i: int) -> Path:
        """Experience ``i`` part-trained: its state at the last epoch boundary (``checkpoint_every_epochs``), removed
        once the experience's own checkpoint is written."""
        return self.checkpoint_dir / f"exp_{i:03d}.epoch.pt"

    def save_epoch_checkpoint(self, i: int, state: dict) -> Path:
        path = self.epoch_checkpoint_path(i)
        state = plain(state, f"checkpoint {path.name}")
        _atomic_write(path, lambda f: torch.save(state, f))
        return path

    @staticmethod
    def check_keep(keep) -> None:
        """``keep_checkpoints``: all, last or a count of at least 1."""
        if str(keep) in ("all", "last") or (str(keep).isdigit() and int(keep) >= 1):
            return
        raise ConfigError("keep_checkpoints", keep, "all, last or the number of last checkpoints to keep (>= 1)")

    def prune_checkpoints(self, i: int, keep: str | int) -> list[Path]:
        """After experience ``i`` is saved: drop its epoch checkpoint, and the experience checkpoints that ``keep``
        does not hold ("all"; "last"; N: the last N). Returns what was removed."""
        removed = []
        if self.epoch_checkpoint_path(i).exists():
            self.epoch_checkpoint_path(i).unlink()
            removed.append(self.epoch_checkpoint_path(i))
        n = None if str(keep) == "all" else 1 if str(keep) == "last" else int(keep)
        if n is not None:
            for k in range(0, i + 1 - n):
                if self.checkpoint_path(k).exists():
                    self.checkpoint_path(k).unlink()
                    removed.append(self.checkpoint_path(k))
        return removed

    def has_results(self) -> bool:
        return self.results_path.exists()

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.path / name, obj)

    def write_file(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def save_checkpoint(self, i: int, state: dict) -> Path:
        path = self.checkpoint_path(i)
        state = plain(state, f"checkpoint {path.name}")  # loadable with weights_only=True
        _atomic_write(path, lambda f: torch.save(state, f))
        return path

    def load_checkpoint(self, i: int) -> dict:
        """The checkpoint after experience ``i`` (weights_only); ``DamagedCheckpoint`` when it cannot be read."""
        return loading.load_checkpoint(self.checkpoint_path(i), "checkpoint")

    def read_results(self) -> dict | None:
        """results.json, None when there is none yet; ``DamagedResults`` when it cannot be read."""
        if not self.has_results():
            return None
        try:
            doc = json.loads(self.results_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
            raise DamagedResults(f"{self.results_path} cannot be read ({type(e).__name__}: {e})") from e
        if not isinstance(doc, dict) or "completed_experiences" not in doc:
            raise DamagedResults(f"{self.results_path} cannot be read (not a cl_vit results document)")
        return doc

    def remove_stale_temporaries(self) -> list[Path]:
        """Remove the temporary files that a process killed in the middle of a write left behind (call it while
        holding the lock: no live writer then has one open). Returns what was removed."""
        removed = []
        for folder in (self.path, self.checkpoint_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if _TEMPORARY.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def lock(self) -> "RunLock":
        """Hold this run directory for this process (``RunLock``); a second live process is refused in one line."""
        return RunLock(self.path)


class DamagedResults(UserError):
    """results.json is truncated or not JSON."""


class RunLock:
    """An advisory lock (``fcntl.flock``) on ``RUN_DIR/.lock`` for as long as one process writes the run.

    The kernel drops the lock when its process ends, however it ends (a SIGKILL leaves no stale lock behind); the
    file itself stays and says which process held it last."""

    def __init__(self, path: Path):
        import fcntl

        path.mkdir(parents=True, exist_ok=True)
        self.file = path / ".lock"
        self._fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise UserError(f"{path} is being written by another process ({holder or 'pid unknown'}): wait for it "
                            "to end or stop it; one run directory takes one process at a time") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def remove_if_unused(self) -> None:
        """Remove the lock file, and the run directory with it when nothing else was written there."""
        try:
            if [p.name for p in self.file.parent.iterdir()] == [self.file.name]:
                self.file.unlink()
                self.file.parent.rmdir()
        except OSError:  # another process took it meanwhile, or it is gone: leave it
            pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()

