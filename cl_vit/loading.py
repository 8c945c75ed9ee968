"""Reading files without running what they hold: the one module through which the suite loads anything that could
carry code.

- Checkpoints: ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples, dicts) or safetensors.
- Data pickles (CIFAR's python archives): an unpickler that admits the builtin containers, bytes, str, numbers and
  numpy arrays, nothing else.
- YAML: the safe loader only.
- Import paths (``_target_``): resolved only from the user's own config and command line, through Hydra's target
  policy (its blocklist of execution-capable targets). A config that came from a file (a checkpoint's model config,
  a teacher file, a run directory's config.yaml) may not name code unless the user passed ``trust_code=true``
  (``trust_code``); even then the target goes through Hydra's policy.
- The suite's own modules (strategy and bench plug-ins) are imported by name from the package, never from a file.

``tests/test_safety.py`` walks the package and fails on ``torch.load``, ``pickle``, ``yaml.load``, Hydra's
``get_object``/``get_class``/``get_method``/``instantiate``, ``eval``/``exec`` and ``import_module`` anywhere else.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import io
import pickle
import pkgutil
import re
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Sequence

from cl_vit.errors import UserError

TARGET = "_target_"


class CheckpointError(UserError):
    """A checkpoint that cannot be used: damaged (``DamagedCheckpoint``) or holding code (``UnsafeCheckpoint``)."""


class DamagedCheckpoint(CheckpointError):
    """Truncated, empty or not a torch checkpoint at all."""


class UnsafeCheckpoint(CheckpointError):
    """Holds pickled objects beyond tensors and plain values: loading it could run code."""


class UnsafeFile(UserError):
    """A data file (a pickle) that would construct objects other than plain values and arrays."""


class CodeFromFile(UserError):
    """A config read from a file names code to import (``_target_``) and the user did not pass ``trust_code=true``."""


# -- checkpoints -------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path, what: str = "checkpoint", allow: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; one-line errors for a damaged file or one that holds code.

    ``allow``: classes the file may also construct (released DeiT-LT files pickle their argparse.Namespace)."""
    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file would construct arbitrary objects
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(e))  # torch 2.5 / 2.6+ wording
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


def load_weights(path: str | Path, what: str = "checkpoint", allow: Sequence[type] = ()) -> Any:
    """A weights file as stored: a safetensors file's tensors, or a torch file read as ``load_checkpoint`` does."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise DamagedCheckpoint(f"{what} {path} cannot be read ({type(e).__name__}): it is truncated or "
                                    "damaged") from e
    return load_checkpoint(path, what, allow)


# -- data pickles ------------------------------------------------------------------------------------------------

#: what a data pickle may construct besides builtin containers, bytes, str and numbers: numpy arrays and dtypes
#: (numpy 1 and 2 spell their reconstructors under numpy.core / numpy._core), and the latin-1 bytes of protocol 2
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _Refused(pickle.UnpicklingError):
    """A global that a data pickle may not construct (its dotted name is the message)."""


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise _Refused(f"{module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 keeps the old names as a deprecated alias of numpy._core
            import numpy

            if int(numpy.__version__.split(".")[0]) >= 2:
                module = "numpy._core" + module[len("numpy.core"):]
        return getattr(importlib.import_module(module), name)


def load_pickle(path: str | Path, what: str = "data file", encoding: str = "ASCII") -> Any:
    """A data pickle holding only builtin containers, bytes, str, numbers and numpy arrays; anything else is refused
    in one line before it is constructed (nothing it names is imported or called)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return _DataUnpickler(io.BytesIO(data), encoding=encoding).load()
    except _Refused as e:
        raise UnsafeFile(f"{what} {path} would construct {e} when read: a data file holds arrays and plain values "
                         "only, so it is refused; download the archive again from its official source") from None


# -- YAML --------------------------------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> Any:
    """A YAML file through the safe loader (the C one where PyYAML has it: a 24,000-entry split file in ~1 s)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)  # noqa: S506  (a safe loader)


# -- import paths ------------------------------------------------------------------------------------------------

_TRUST = [False]


def code_trusted() -> bool:
    """Whether configs read from files may name code (``trust_code=true`` for this run)."""
    return _TRUST[-1]


@contextlib.contextmanager
def trust_code(flag: bool) -> Iterator[None]:
    """Within the block, configs read from files may (``True``) or may not (``False``) name code to import."""
    _TRUST.append(bool(flag))
    try:
        yield
    finally:
        _TRUST.pop()


def _targets(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict) or hasattr(obj, "items") and hasattr(obj, "keys"):
        found = []
        for k, v in obj.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            found += [(key, v)] if k == TARGET else _targets(v, key)
        return found
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _targets(v, f"{prefix}[{i}]")]
    return []


def _interpolations(obj: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _interpolations(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _interpolations(v, f"{prefix}[{i}]")]
    return [(prefix, obj)] if isinstance(obj, str) and "${" in obj else []


def as_command_flag(error: Exception, flag: str = "--trust-code") -> Exception:
    """``error`` as a command with its own ``flag`` for ``trust_code=true`` reports it (the probes' command lines)."""
    if isinstance(error, CodeFromFile):
        return CodeFromFile(str(error).replace("trust_code=true", flag))
    return error


def check_file_config(cfg: Any, where: str, trusted: bool | None = None, prefix: str = "") -> None:
    """Refuse, in one line, a config read from ``where`` (a file) that names code to import (``_target_`` at any
    depth; ``prefix``: where ``cfg`` sits in the config, for the message), unless ``trusted`` (default:
    ``trust_code`` of this run).

    An interpolation (``${...}`` in a value, escaped or not) is refused as well: OmegaConf resolves it when the
    config is used, after this check, and it can then name code (``${oc.create:'{_target_: ...}'}`` makes one of a
    string; ``${oc.env:PL_GLOBAL_SEED}`` reads otherwise once the run has seeded). A config the suite writes is
    resolved (config.yaml, a checkpoint's model config), so it holds none."""
    if (code_trusted() if trusted is None else trusted):
        return
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):  # its values as written, interpolations unresolved
        cfg = OmegaConf.to_container(cfg, resolve=False)
    found = _targets(cfg, prefix)
    if found:
        key, value = found[0]
        raise CodeFromFile(f"{where} names code to import ({key}={value!r}): a file the suite reads may not choose "
                           "code to run, so it is refused; if you trust whoever wrote it, pass trust_code=true")
    found = _interpolations(cfg, prefix)
    if found:
        key, value = found[0]
        raise CodeFromFile(f"{where} holds an interpolation ({key}={value!r}), resolved only when the config is used, "
                           "where it could name code to import: a config the suite writes holds resolved values, so "
                           "it is refused; if you trust whoever wrote it, pass trust_code=true")


def resolve_target(key: str, target: str, base: type | None = None):
    """The object that ``key=target`` names (``module.attr``), checked by Hydra's target policy (targets that run
    commands or code, such as ``os.system`` or ``builtins.eval``, are refused) and to be a ``base`` subclass when
    given. Only for targets from the user's own config and command line (``check_file_config`` guards the rest)."""
    from hydra.utils import instantiate

    try:
        obj = instantiate({TARGET: "hydra.utils.get_object", "path": str(target)})
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "blocklist" in str(e) or "cannot be" in str(e):
            raise UserError(f"{key}={target!r} is refused by Hydra's target policy ({msg.strip()}): name a class or "
                            "function of your own") from None
        raise UserError(f"{key}={target!r} cannot be imported ({msg}): give an importable module.attr (is its "
                        "folder on PYTHONPATH?)") from None
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise UserError(f"{key}={target!r} is not a {base.__module__}.{base.__qualname__} subclass")
    if base is None and not callable(obj):
        raise UserError(f"{key}={target!r} is not callable: give a class or a function")
    return obj


class LazyModule:
    """A library imported at its first attribute access; its name is written in the suite's own code (albumentations
    takes a quarter of a second to import, and the default run never uses it)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self._name), attr)


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a library until one of its attributes is read; then imports it and forwards.

    Python's own import statement reads only ``__spec__`` of a module already in ``sys.modules`` (importlib's
    ``LazyLoader`` module loads on that read in Python 3.11, so ``import qpsolvers`` in another library would load it
    at once)."""

    def __init__(self, spec):
        super().__init__(spec.name)
        self.__spec__ = spec
        self.__file__ = spec.origin

    def __getattr__(self, attr: str):
        real = sys.modules.get(self.__name__)
        if real is None or real is self:
            if real is self:
                del sys.modules[self.__name__]
            try:
                real = importlib.import_module(self.__name__)
            except BaseException:
                if real is self:
                    sys.modules.setdefault(self.__name__, self)
                raise
        return getattr(real, attr)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused for a block that imports libraries. Each of its full collections
    walks every object there is, and the objects that importing torch, timm, Lightning and avalanche-lib creates
    trigger eight of them (~1 s of CPU in ``python -m cl_vit.run``, with little garbage found). After the block the
    collector runs as before, with the block's objects in its oldest generation (``gc.freeze`` then ``unfreeze``)
    rather than in the youngest, whose next collection would walk them all at once. Nested blocks leave it to the
    outermost; objects someone else froze stay frozen."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def import_deferring(library: str, optional: str) -> None:
    """Import ``library`` with ``optional``, a library it imports but may never use, deferred (see ``defer_import``)
    for the time of that import only: the modules of ``library`` hold a stand-in that imports ``optional`` at the
    first read of one of its attributes, and ``sys.modules`` does not, so any later ``import optional`` (its own
    code's included) imports the real one as usual. timm (its summary writer) and avalanche-lib (its confusion
    matrix's W&B plot) import wandb (~0.5 s of CPU), which a run without logger=wandb never uses."""
    spec = None
    if library not in sys.modules and optional not in sys.modules:
        spec = importlib.util.find_spec(optional)
    if spec is None:
        importlib.import_module(library)
        return
    stand_in = sys.modules[optional] = _Deferred(spec)
    try:
        importlib.import_module(library)
    finally:
        if sys.modules.get(optional) is stand_in:
            del sys.modules[optional]


def defer_import(name: str) -> None:
    """Let library ``name`` run its code at the first read of one of its attributes, not when another library
    imports it. Nothing changes for a library already imported or not installed. For imports the suite cannot avoid
    and the default run never uses: avalanche-lib's GEM plug-in imports qpsolvers, whose solver probe imports JAX
    (~2 s of CPU)."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is not None:
        sys.modules[name] = _Deferred(spec)


def import_submodules(package: str, path: Sequence[str]) -> None:
    """Import every module of one of the suite's own packages (its plug-ins register themselves on import)."""
    for m in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{m.name}")


def import_own(name: str):
    """One of the suite's own modules by its dotted name (``cl_vit.bench.runner``); no other module."""
    if not (name == "cl_vit" or name.startswith("cl_vit.")):
        raise ValueError(f"{name} is not a module of cl_vit")
    return importlib.import_module(name)
