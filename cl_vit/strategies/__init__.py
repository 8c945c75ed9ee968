"""Strategy plug-ins, registered by the name that selects them under ``strategy.`` in the config.

Every module of this package is imported here, so a strategy is added by adding its file (a class decorated with
``@register_strategy``) and its ``configs/strategy/<name>.yaml``. A class outside the package runs by Hydra's
convention: ``strategy.<name>._target_: mypkg.MyStrategy``, the other keys being its keyword arguments.
"""
from __future__ import annotations

from typing import Mapping

from cl_vit.errors import UserError
from cl_vit.loading import TARGET, import_submodules, resolve_target
from cl_vit.strategies.base import STRATEGIES, ExperienceInfo, Strategy, register_strategy

import_submodules(__name__, __path__)

def strategy_class(name: str, kwargs: Mapping | None) -> type[Strategy]:
    """The class that ``strategy.<name>`` selects: its ``_target_`` when given, else the registered one."""
    target = (kwargs or {}).get(TARGET)
    if target is None:
        if name not in STRATEGIES:
            raise UserError(f"strategy {name!r} is not known: choose from {sorted(STRATEGIES)} (configs/strategy/), "
                            f"or give strategy.{name}.{TARGET}=module.Class")
        return STRATEGIES[name]
    return resolve_target(f"strategy.{name}.{TARGET}", target, Strategy)


def build_strategies(cfg: Mapping) -> list[Strategy]:
    """``{name: {kwargs}}`` -> strategy instances, in config order (several compose in one run)."""
    out = []
    for name, kwargs in (cfg or {}).items():
        cls = strategy_class(name, kwargs)
        kwargs = {k: v for k, v in dict(kwargs or {}).items() if k != TARGET}
        try:
            strategy = cls(**kwargs)
        except TypeError as e:
            raise UserError(f"strategy.{name}: {e}; see configs/strategy/{name}.yaml for its options") from e
        if cls is not STRATEGIES.get(name):
            strategy.name = name  # logs and checkpoints key a foreign strategy by its config name
        out.append(strategy)
    if not out:
        out.append(STRATEGIES["finetune"]())
    return out


__all__ = ["ExperienceInfo", "Strategy", "STRATEGIES", "register_strategy", "build_strategies", "strategy_class"]
