"""Config checks run before anything is built: a bad value fails with one line naming the key and what is allowed."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl_vit.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_GROUPS = ("benchmark", "model", "strategy", "trainer", "logger", "experiment")
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")


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
                                    "coda_cosine_formula"))
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
    _choice(cfg, "logger.name", ("tensorboard", "none"))
    for name, kwargs in (_get(cfg, "strategy") or {}).items():
        if name not in STRATEGIES and TARGET not in (kwargs or {}):
            raise ConfigError("strategy", name, f"one of {sorted(STRATEGIES)}, or strategy.{name}.{TARGET}=module.Class")
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
