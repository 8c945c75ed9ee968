"""A stream's protocol as data: the class order (tasks/ files, seeded rules) and the classes per experience.

Below the streams (``cl_vit.streams`` builds the Avalanche scenario from them) so that a source can use the same rules
(Long-Tailed-CIL's validation split is made per task, in the stream's order).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from cl_vit.errors import ConfigError, UserError
from cl_vit.loading import read_yaml

TASKS_DIR = Path(__file__).resolve().parent.parent.parent / "tasks"
CLASS_ORDER_RULES = ("identity", "seeded", "coda")


def load_class_order_file(name: str | Path) -> list[int]:
    """A class order from ``tasks/<name>`` (or a path): YAML/JSON with a ``class_order`` list, or a bare list."""
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = TASKS_DIR / name
    if not path.exists():
        raise UserError(f"class order file {name} not found (looked in {TASKS_DIR}): give a path or a file in tasks/")
    data = read_yaml(path)
    if isinstance(data, dict):
        data = data.get("class_order")
    if not isinstance(data, list):
        raise UserError(f"class order file {path} must hold a list of class ids (or a mapping with key class_order)")
    return [int(c) for c in data]


def resolve_class_order(spec, n_classes: int, seed: int) -> tuple[list[int], str]:
    """``spec``: "identity"; "seeded" (Python ``random.seed(seed); random.shuffle``, as CODA-Prompt shuffles);
    "coda" (identity for seed 0, seeded otherwise: CODA-Prompt's trials); "file:NAME" (tasks/NAME); "numpy:SEED"
    (``np.random.seed(SEED); np.random.permutation``: PyCIL / LAMDA-PILOT's order, numpy:1993); or a list."""
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, str)):
        order, rule = [int(c) for c in spec], "list"
    elif spec == "identity" or (spec == "coda" and seed == 0):
        order, rule = list(range(n_classes)), "identity"
    elif spec in ("seeded", "coda"):
        order = list(range(n_classes))
        random.Random(seed).shuffle(order)  # same sequence as random.seed(seed); random.shuffle(order)
        rule = f"seeded({seed})"
    elif isinstance(spec, str) and spec.startswith("file:"):
        order, rule = load_class_order_file(spec[5:]), spec
    elif isinstance(spec, str) and spec.startswith("numpy:") and spec[6:].isdigit():
        # sun-hailong/LAMDA-PILOT utils/data_manager.py L155-157: np.random.seed(seed); np.random.permutation(n)
        order, rule = np.random.RandomState(int(spec[6:])).permutation(n_classes).tolist(), spec
    else:
        raise ConfigError("benchmark.class_order", spec,
                          f"one of {CLASS_ORDER_RULES}, 'file:NAME', 'numpy:SEED' or a list of ids")
    if sorted(order) != list(range(n_classes)):
        raise UserError(
            f"class order ({rule}) is not a permutation of the {n_classes} classes of the source: "
            "fix the list so that every class id appears exactly once"
        )
    return order, rule


def experience_sizes(n_classes: int, n_experiences=None, classes_per_experience=None, remainder: str = "error"):
    """Classes per experience; every class is kept (explicit error or remainder rule, never a silent drop)."""
    if classes_per_experience is not None and not isinstance(classes_per_experience, int):
        sizes = [int(s) for s in classes_per_experience]
        if sum(sizes) != n_classes or min(sizes) < 1:
            raise ConfigError("benchmark.classes_per_experience", sizes, f"positive sizes that sum to {n_classes}")
        return sizes
    if classes_per_experience is not None:
        if classes_per_experience < 1:
            raise ConfigError("benchmark.classes_per_experience", classes_per_experience, "an integer >= 1")
        n_experiences, per = None, int(classes_per_experience)
        full, left = divmod(n_classes, per)
        sizes = [per] * full
    else:
        n = int(n_experiences or 1)
        if not 1 <= n <= n_classes:
            raise ConfigError("benchmark.n_experiences", n_experiences, f"an integer from 1 to {n_classes}")
        per, left = divmod(n_classes, n)
        sizes = [per] * n
    if left:
        if remainder == "error":
            raise UserError(
                f"{n_classes} classes do not divide into experiences of {per} classes ({left} left over): set "
                "benchmark.n_experiences to a divisor, or benchmark.remainder=last to give the leftovers to the last one"
            )
        if remainder != "last":
            raise ConfigError("benchmark.remainder", remainder, "'error' or 'last'")
        if sizes and n_experiences:
            sizes[-1] += left
        else:
            sizes.append(left)
    return sizes
