"""Config checks run before anything is built: a bad value fails with one line naming the key and what is allowed."""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Mapping

from omegaconf import DictConfig, OmegaConf

from cl_vit.errors import ConfigError, UserError
from cl_vit.hardware import SUITE_TRAINER_KEYS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_GROUPS = ("benchmark", "model", "strategy", "trainer", "logger", "experiment")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
#: sections the suite reads key by key: a key added there with ``+`` is read by nothing (the top level is one too)
FIXED_SECTIONS = ("data", "scheduler", "loss", "ema")


def group_options(group: str) -> list[str]:
    # sub-folders hold families of options (experiment=closer-look-digits/l2)
    root = CONFIG_DIR / group
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def check_group_choices(argv: list[str]) -> None:
    """Unknown options of a config group (``benchmark=nope``, ``strategy=[l2,nope]``) fail in one line listing what
    exists.

    Hydra would say so too, over several lines; sweeps (``a,b``, ``[a,b],[c]``) are left to Hydra, which parses each
    argument here too, so that a sweep of lists is not mistaken for one list.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.split("=", 1)[0].lstrip("+~") not in CONFIG_GROUPS:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # malformed: Hydra's own message follows
            continue
        if override.is_sweep_override():  # Hydra reports per job
            continue
        key, value = override.key_or_group, override.value()
        for v in value if isinstance(value, list) else [value]:
            if v in (None, "null", "") and key == "experiment":
                continue
            if str(v) not in group_options(key):
                raise ConfigError(key, v, f"one of {group_options(key)} (files in configs/{key}/)")


def closest_keys(cfg, key: str) -> tuple[int, str]:
    """``(depth, hint)`` for a key the config lacks: how far its path goes into the config, and the closest keys at
    the level where it leaves it."""
    parts, node, depth = key.split("."), cfg, 0
    while depth < len(parts) - 1 and OmegaConf.is_dict(node) and parts[depth] in node:
        node, depth = node[parts[depth]], depth + 1
    prefix = ".".join(parts[:depth])
    keys = sorted(str(k) for k in node.keys()) if OmegaConf.is_dict(node) else []
    close = [f"{prefix}.{k}" if prefix else k for k in difflib.get_close_matches(parts[depth], keys, n=3, cutoff=0.6)]
    return depth, f"did you mean {' or '.join(close)}?" if close else f"{prefix or 'the top level'} has {', '.join(keys)}"


def _keyword_names(fn) -> set[str] | None:
    """The keyword arguments ``fn`` takes; None when it takes any (``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}


def _check_accepted(keys, accepted: set[str] | None, section: str, owner: str) -> None:
    for key in keys:
        if accepted is not None and key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(f'{section}.{c}' for c in close)}?" if close else \
                f"{owner} takes {', '.join(sorted(accepted))}"
            raise UserError(f"{section}.{key} is not an argument of {owner}: {hint}")


def check_override_keys(argv: list[str]) -> None:
    """Overrides of keys the config lacks fail in one line with the closest keys, before anything runs.

    ``trainer.max_epoch=3`` (no such key) and ``+max_epochs=3`` (added where nothing reads it) are refused here;
    ``+trainer.<key>`` and ``+strategy.<name>.<key>`` are checked against the class that takes them (:func:`validate`).
    The config is composed with the command line's config-group choices (each value of a swept group in turn).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    groups, keys = [], []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # malformed: Hydra's own message follows
            return
        name = override.key_or_group
        if name.startswith("hydra") or override.is_delete():
            continue
        if name.split("/")[0].lstrip("+") in CONFIG_GROUPS and "." not in name:
            values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
            groups.append((arg.split("=", 1)[0], values))
        else:
            keys.append((name, override.is_add() or override.is_force_add()))
    if not keys:
        return
    choices = [[f"{g}={_override_value(vals[0])}" for g, vals in groups]]
    for i, (g, vals) in enumerate(groups):  # every value of a swept group, the others at their first
        for v in vals[1:]:
            choices.append([*choices[0][:i], f"{g}={_override_value(v)}", *choices[0][i + 1:]])
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfgs = [compose(config_name="config", overrides=c) for c in choices]
    except Exception:  # a config that does not compose: Hydra says why
        return
    for key, added in keys:
        present = [c for c, cfg in zip(choices, cfgs) if _has_key(cfg, key)]
        if present and len(present) < len(cfgs):  # Hydra would stop at the first run of the sweep that lacks it
            raw = _raw(cfgs[choices.index(present[0])], key)
            via = raw.split("${oc.select:", 1)[1].split(",", 1)[0] if "${oc.select:" in raw else None
            fix = f"++{via}=... sets it for those runs only" if via else "run those choices in a sweep of their own"
            raise UserError(f"{key} exists only with {' '.join(present[0])}, and a sweep sets it in every run: {fix}")
        if present:
            continue
        section = key.rsplit(".", 1)[0] if "." in key else ""
        depth, hint = max(closest_keys(cfg, key) for cfg in cfgs)
        if not added:
            add = "" if hint.startswith("did you mean") else f" (to add a key that no config has: +{key}=...)"
            raise UserError(f"{key} is not a config key: {hint}{add}")
        if section in ("", *FIXED_SECTIONS) or depth == 0:  # a new top-level section: no component reads it
            raise UserError(f"+{key}: nothing reads {key} ({hint})")


def _has_key(cfg, key: str) -> bool:
    """Whether ``key`` is in ``cfg``, a mandatory value (``???``, e.g. configs/model/custom.yaml's _target_) too."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False) if parent else cfg
    return OmegaConf.is_dict(node) and leaf in node.keys()  # `in node` is False for a ??? value


def _raw(cfg, key: str) -> str:
    """The value of ``key`` as written, interpolations unresolved."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return str(OmegaConf.to_container(node, resolve=False).get(leaf))


def _override_value(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(map(str, v)) + "]"
    return "null" if v is None else str(v)


def _get(cfg, key):
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def _int(cfg, key, lo=None, allow_none=False):
    v = _get(cfg, key)
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or (lo is not None and v < lo):
        raise ConfigError(key, v, f"an integer >= {lo}" + (" or null" if allow_none else ""))


def _number(cfg, key, lo=None, positive=False):
    v = _get(cfg, key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (positive and v <= 0) or (lo is not None and v < lo):
        raise ConfigError(key, v, "a number > 0" if positive else f"a number >= {lo}")


def _choice(cfg, key, choices):
    v = _get(cfg, key)
    if v not in choices:
        raise ConfigError(key, v, f"one of {list(choices)}")


def validate(cfg: DictConfig) -> None:
    """Check the values a run reads; raises :class:`ConfigError` on the first bad one."""
    from cl_vit.module import LOSSES
    from cl_vit.loading import TARGET
    from cl_vit.strategies import STRATEGIES

    _int(cfg, "seed", 0)
    _int(cfg, "eval_every", 1)
    if _get(cfg, "epoch_eval") is not None:
        _int(cfg, "epoch_eval", 0)
    _int(cfg, "trainer.max_epochs", 1)
    _choice(cfg, "trainer.precision", PRECISIONS)
    if _get(cfg, "compile") not in (None, True, False):
        raise ConfigError("compile", _get(cfg, "compile"), "true or false")
    from cl_vit.distributed import check_strategy

    check_strategy(str(_get(cfg, "trainer.strategy") or "auto"))
    _int(cfg, "data.batch_size", 1)
    _int(cfg, "data.eval_batch_size", 1)
    _int(cfg, "data.num_workers", 0)
    _choice(cfg, "data.repeated_aug", (True, False, None))
    _int(cfg, "data.repeats", 1, allow_none=True)
    if _get(cfg, "ema.decay") is not None:
        decay = _get(cfg, "ema.decay")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise ConfigError("ema.decay", decay, "null (off) or a number in [0, 1], e.g. 0.99996")
    _choice(cfg, "loss.name", LOSSES)
    _number(cfg, "optimizer.lr", positive=True)
    _number(cfg, "optimizer.weight_decay", lo=0)
    from timm.optim import list_optimizers

    _choice(cfg, "optimizer.name", list_optimizers())
    _choice(cfg, "scheduler.name", ("cosine", "cosine_epoch", "constant", "multistep", "coda_cosine",
                                    "coda_cosine_formula", "deit_cosine", "timm_cosine"))
    for key in ("scheduler.warmup_lr", "scheduler.min_lr"):  # deit_cosine's and timm_cosine's absolute rates
        if _get(cfg, key) is not None:
            _number(cfg, key, lo=0)
    cooldown = _get(cfg, "scheduler.cooldown_epochs")
    if cooldown and _get(cfg, "scheduler.name") != "timm_cosine":
        raise ConfigError("scheduler.cooldown_epochs", cooldown,
                          "0 unless scheduler.name=timm_cosine, the one schedule with a cool-down")
    if cooldown is not None:
        epochs = _get(cfg, "trainer.max_epochs")
        if isinstance(cooldown, bool) or not isinstance(cooldown, int) or cooldown < 0 or (
                isinstance(epochs, int) and cooldown >= epochs):
            raise ConfigError("scheduler.cooldown_epochs", cooldown,
                              f"an integer from 0 to trainer.max_epochs - 1 ({epochs}): the epochs at min_lr after "
                              "the cosine, counted in trainer.max_epochs (scheduler.name=timm_cosine)")
    rho = _get(cfg, "optimizer.sam_rho")
    if rho is not None:
        _number(cfg, "optimizer.sam_rho", lo=0)
        if rho and str(_get(cfg, "trainer.precision")).startswith("16"):
            raise ConfigError("trainer.precision", _get(cfg, "trainer.precision"),
                              "32-true or bf16-mixed with optimizer.sam_rho (SAM's two passes cannot run under a "
                              "16-bit gradient scaler)")
        if rho and (_get(cfg, "trainer.accumulate_grad_batches") or 1) > 1:
            raise ConfigError("trainer.accumulate_grad_batches", _get(cfg, "trainer.accumulate_grad_batches"),
                              "1 with optimizer.sam_rho (SAM re-evaluates one batch per step)")
    milestones, values = _get(cfg, "optimizer.sam_rho_milestones"), _get(cfg, "optimizer.sam_rho_values")
    if (milestones or values) and (not rho or len(milestones or ()) != len(values or ())):
        raise ConfigError("optimizer.sam_rho_values", list(values or ()),
                          "one value per optimizer.sam_rho_milestones epoch, with optimizer.sam_rho set (the first rho)")
    _number(cfg, "scheduler.warmup_epochs", lo=0)
    _int(cfg, "benchmark.n_experiences", 1, allow_none=True)
    _choice(cfg, "skip_corrupt", (True, False))
    _choice(cfg, "data.verify", ("header", "decode", "none"))
    _choice(cfg, "data.pin_memory", (True, False, "auto"))
    ratio = _get(cfg, "benchmark.imbalance_ratio")
    if ratio is not None:
        _number(cfg, "benchmark.imbalance_ratio", lo=1)
    cutoffs = _get(cfg, "benchmark.shot_index_cutoffs")
    if cutoffs is not None and (len(cutoffs) != 2 or not all(isinstance(c, int) and not isinstance(c, bool)
                                                              for c in cutoffs) or not 0 <= cutoffs[0] <= cutoffs[1]):
        raise ConfigError("benchmark.shot_index_cutoffs", list(cutoffs), "null or [a, b] with integers 0 <= a <= b")
    _choice(cfg, "benchmark.remainder", ("error", "last"))

    logger_cfg = _get(cfg, "logger")
    check_loggers(logger_names(OmegaConf.to_container(logger_cfg) if OmegaConf.is_config(logger_cfg) else logger_cfg))
    import lightning

    _check_accepted([k for k in (_get(cfg, "trainer") or {}) if k not in SUITE_TRAINER_KEYS],
                    _keyword_names(lightning.Trainer.__init__), "trainer", "lightning.Trainer")
    for name, kwargs in (_get(cfg, "strategy") or {}).items():
        if name not in STRATEGIES and TARGET not in (kwargs or {}):
            raise ConfigError("strategy", name, f"one of {sorted(STRATEGIES)}, or strategy.{name}.{TARGET}=module.Class")
        if TARGET not in (kwargs or {}):
            _check_accepted([k for k in (kwargs or {})], _keyword_names(STRATEGIES[name].__init__),
                            f"strategy.{name}", f"the {name} strategy (configs/strategy/{name}.yaml)")
    _check_erasing_once(cfg)


def _check_erasing_once(cfg) -> None:
    """DeiT's random erasing belongs to the train transform (train_transform=deit, augment.re_prob) or, for sources
    without one, to the deit_lt strategy's batch (random_erasing): never both."""
    args = _get(cfg, "benchmark.source_args")
    batch_prob = _get(cfg, "strategy.deit_lt.random_erasing")
    if not args or args.get("train_transform") != "deit" or not batch_prob:
        return
    from cl_vit.data.transforms import deit_augment

    augment = args.get("augment")
    re_prob = deit_augment(OmegaConf.to_container(augment) if OmegaConf.is_config(augment) else augment)["re_prob"]
    if re_prob > 0:
        raise ConfigError("strategy.deit_lt.random_erasing", batch_prob,
                          f"0 when benchmark.source_args.train_transform=deit already erases in the transform "
                          f"(augment.re_prob={re_prob}); erase in one place only")


# -- loggers (cl_vit/loggers.py builds them) ---------------------------------------------------------------------

LOGGERS = ("tensorboard", "csv", "wandb", "mlflow")
#: the package each logger needs beyond the install's own (the `loggers` extra of setup.cfg)
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def logger_names(logger_cfg: Mapping | None) -> list[str]:
    """The loggers a config asks for: ``{tensorboard: {}, csv: {}}``; a config saved before loggers composed says
    ``{name: tensorboard}`` (or ``none``)."""
    logger_cfg = dict(logger_cfg or {})
    if isinstance(logger_cfg.get("name"), str):
        return [] if logger_cfg["name"] == "none" else [logger_cfg["name"]]
    return list(logger_cfg)


def check_loggers(names) -> None:
    """Every logger known and its package importable, before anything runs; one line otherwise."""
    import importlib.util

    from cl_vit.errors import ConfigError, UserError

    for name in names:
        if name not in LOGGERS:
            raise ConfigError("logger", name, f"one of {list(LOGGERS)}, or several: logger=[tensorboard,csv]")
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"logger={name} needs the {PACKAGES[name]} package: pip install -e \".[loggers]\"")
