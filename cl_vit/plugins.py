"""Hydra's ``_target_`` convention for a researcher's own classes: a strategy, model or data source defined outside
the package runs from the config (``strategy.<name>._target_``, ``model._target_``,
``benchmark.source_args._target_``) without registering anything."""
from __future__ import annotations

from cl_vit.errors import UserError

TARGET = "_target_"


def resolve_target(key: str, target: str, base: type | None = None):
    """The object that ``key=target`` names (``module.attr``), checked to be a ``base`` subclass when given."""
    from hydra.utils import get_object

    try:
        obj = get_object(str(target))
    except Exception as e:
        raise UserError(f"{key}={target!r} cannot be imported ({str(e).splitlines()[0]}): give an importable "
                        "module.attr (is its folder on PYTHONPATH?)") from None
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise UserError(f"{key}={target!r} is not a {base.__module__}.{base.__qualname__} subclass")
    if base is None and not callable(obj):
        raise UserError(f"{key}={target!r} is not callable: give a class or a function")
    return obj
