"""Strategy plug-ins, registered by the name that selects them under ``strategy.`` in the config."""
from __future__ import annotations

from typing import Mapping

from cl_vit.errors import UserError
from cl_vit.strategies.base import ExperienceInfo, Strategy
from cl_vit.strategies.ewc import EWC
from cl_vit.strategies.featkd import FeatKD
from cl_vit.strategies.finetune import Finetune
from cl_vit.strategies.l2 import L2
from cl_vit.strategies.lwf import LwF

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (Finetune, L2, EWC, LwF, FeatKD)}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


def build_strategies(cfg: Mapping) -> list[Strategy]:
    """``{name: {kwargs}}`` -> strategy instances, in config order (several compose in one run)."""
    out = []
    for name, kwargs in (cfg or {}).items():
        if name not in STRATEGIES:
            raise UserError(f"strategy {name!r} is not known: choose from {sorted(STRATEGIES)} (configs/strategy/)")
        try:
            out.append(STRATEGIES[name](**dict(kwargs or {})))
        except TypeError as e:
            raise UserError(f"strategy.{name}: {e}; see configs/strategy/{name}.yaml for its options") from e
    if not out:
        out.append(Finetune())
    return out


# strategy modules register themselves with @register_strategy on import
from cl_vit.strategies import cos_reg, deit_lt, gcab, ldam, mixup  # noqa: E402,F401

__all__ = ["ExperienceInfo", "Strategy", "STRATEGIES", "register_strategy", "build_strategies"]
