"""Backbones. Every model the suite defines is a timm model, registered on import; any timm name works too."""
from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import timm
from timm.models._helpers import clean_state_dict
import torch
import torch.nn as nn

from cl_vit import loading
from cl_vit.errors import UserError
from cl_vit.loading import TARGET, resolve_target
from cl_vit.models import micro  # noqa: F401  (registers vit_micro_patch2_8)
from cl_vit.models import refiner  # noqa: F401  (registers refiner_vit_*)
from cl_vit.models import teachers  # noqa: F401  (registers resnet32_cifar, resnet50_ldam)
from cl_vit.models import distilled  # noqa: E402  (last: registers <backbone>_distilled for the suite's backbones)

#: model config keys that are not timm keyword arguments
RESERVED = ("name", "pretrained", "checkpoint", "checkpoint_head", "pretrained_tag", "distilled", TARGET)

#: attribute of a built model recording where its weights came from ("timm:arch.tag", "checkpoint:PATH"); absent
#: when it was initialised at random. Regularisers anchor at these weights in the first experience.
WEIGHTS_ATTR = "cl_vit_weights"


def weights_origin(net: nn.Module) -> str | None:
    """Where ``net``'s initial weights came from, or None for a random initialisation."""
    return getattr(net, WEIGHTS_ATTR, None)


def _create(name: str, pretrained: bool, num_classes: int, kwargs: dict, optional: dict, factory=None) -> nn.Module:
    """timm.create_model (or a ``model._target_`` factory), offering the benchmark's input geometry only to models
    that take it (a CNN has no img_size): a TypeError naming an offered keyword drops that keyword and tries again."""
    optional = dict(optional)
    while True:
        try:
            if factory is not None:
                return factory(num_classes=num_classes, **kwargs, **optional)
            return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs, **optional)
        except TypeError as e:
            bad = [k for k in optional if f"'{k}'" in str(e)]
            if bad:
                for k in bad:
                    optional.pop(k)
                continue
            for k in kwargs:
                if f"'{k}'" in str(e):
                    raise UserError(f"model.{k} is not accepted by model {name!r}: remove it (~model.{k})") from e
            raise


def build_model(cfg: dict, num_classes: int, in_chans: int, img_size: int) -> nn.Module:
    """A timm model from the ``model`` config group, with a head over ``num_classes`` classes.

    Every key of the group other than ``RESERVED`` that is not null is a timm keyword argument; ``img_size`` and
    ``in_chans`` default to the benchmark's. ``model.checkpoint=PATH`` loads local weights after creation;
    ``model.pretrained=true`` uses timm's own download and fails offline with a line saying how to give weights.
    ``model.distilled=true`` gives the backbone a DIST token and head (cl_vit.models.distilled); timm's
    ``deit_*_distilled`` models are students as they come.
    """
    cfg = dict(cfg)
    name = cfg.get("name")
    if name in refiner.RENAMED:
        raise UserError(f"model.name={name} is now {refiner.RENAMED[name]}: a ViT twin with every block refined, not "
                        "an official Refiner-ViT (model=refiner_vit_s, _m, _l are those)")
    factory = None
    if cfg.get(TARGET):  # a researcher's own model: a class or function taking num_classes (and img_size, in_chans)
        factory = resolve_target(f"model.{TARGET}", cfg[TARGET])
        name = str(cfg[TARGET])
    elif not name or not timm.is_model(name):
        stem = str(name).split("_")[0] if name else ""
        close = timm.list_models(f"*{stem}*")[:5] if stem else []
        hint = f" (close: {', '.join(close)})" if close else ""
        raise UserError(f"model.name={name!r} is not a timm model{hint}: see timm.list_models() or configs/model/")
    kwargs = {k: v for k, v in cfg.items() if k not in RESERVED and v is not None}
    optional = {k: v for k, v in (("img_size", img_size), ("in_chans", in_chans)) if k not in kwargs}
    pretrained = bool(cfg.get("pretrained")) and not cfg.get("checkpoint") and factory is None
    if pretrained and cfg.get("pretrained_tag"):
        name = f"{name}.{cfg['pretrained_tag']}"
    key, file = pretrained_file(kwargs) if pretrained else (None, None)  # a local file timm's pretrained load reads
    if file is not None:
        check_pretrained_file(file, key)
    elif pretrained:
        check_pretrained_available(name)
    if kwargs.get("checkpoint_path"):  # timm.create_model loads it after building, pretrained or not
        check_pretrained_file(str(kwargs["checkpoint_path"]), "model.checkpoint_path")
    try:
        model = _create(name, pretrained, num_classes, kwargs, optional, factory)
    except UserError:
        raise
    except Exception as e:
        if pretrained:
            raise UserError(
                f"could not fetch pretrained weights for {name!r} ({type(e).__name__}): offline, download them "
                "elsewhere and pass model.checkpoint=PATH (.safetensors, .pth or .bin)"
            ) from e
        raise
    if cfg.get("distilled") or distilled.is_distilled(model):
        model = distilled.distill(model)
    if cfg.get("checkpoint"):
        # checkpoint_head=false: the checkpoint's classifier is not loaded even where its shape fits (a backbone
        # pre-trained on other classes that happen to be as many)
        load_checkpoint(model, cfg["checkpoint"], head=cfg.get("checkpoint_head", True) is not False)
        setattr(model, WEIGHTS_ATTR, f"checkpoint:{Path(cfg['checkpoint']).expanduser()}")
    elif file is not None:
        setattr(model, WEIGHTS_ATTR, f"checkpoint:{Path(file).expanduser()}")
    elif pretrained:
        pc = getattr(model, "pretrained_cfg", None) or {}
        arch, tag = pc.get("architecture", name.split(".")[0]), pc.get("tag")
        setattr(model, WEIGHTS_ATTR, f"timm:{arch}.{tag}" if tag else f"timm:{arch}")
    return model


# -- pretrained weights: fail at once, in one line, when they cannot be had ------------------------------------------

_HOW = ("download the weights where the hub is reachable and pass model.checkpoint=PATH (.safetensors, .pth or "
        ".bin), or point HF_HOME at a Hugging Face cache that holds them")


def _hf_cache_dir() -> str:
    # read at call time: huggingface_hub's constants are frozen when it is imported
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return os.path.join(home, "hub")


def _hf_cached_file(repo_id: str, filename: str | None) -> str | None:
    """The local path of a Hugging Face hub file in the cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    found = (try_to_load_from_cache(repo_id, n, cache_dir=_hf_cache_dir()) for n in names)
    return next((p for p in found if isinstance(p, str)), None)


def _hf_cached(repo_id: str, filename: str | None) -> bool:
    return _hf_cached_file(repo_id, filename) is not None


def weights_file(net: nn.Module) -> Path | None:
    """The file ``net``'s initial weights were read from: ``model.checkpoint``, or timm's cached download (Hugging
    Face cache, else torch.hub's checkpoints folder); None for a random initialisation or a file no longer there."""
    origin = weights_origin(net)
    if origin is None:
        return None
    if origin.startswith("checkpoint:"):
        path = Path(origin.split(":", 1)[1])
        return path if path.is_file() else None
    pc = getattr(net, "pretrained_cfg", None) or {}
    if pc.get("file"):
        return Path(pc["file"]) if Path(pc["file"]).is_file() else None
    if pc.get("hf_hub_id"):
        try:
            found = _hf_cached_file(pc["hf_hub_id"], pc.get("hf_hub_filename"))
        except ImportError:
            found = None
        if found:
            return Path(found)
    if pc.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(pc["url"]).path).name
        return path if path.is_file() else None
    return None


def weights_record(net: nn.Module) -> dict | None:
    """What results.json records about the initial weights: origin (``timm:arch.tag`` or ``checkpoint:PATH``), the
    timm tag, the file and its sha256 (None where the file cannot be found)."""
    origin = weights_origin(net)
    if origin is None:
        return None
    from cl_vit.data.download import sha256_of

    path = weights_file(net)
    tag = (getattr(net, "pretrained_cfg", None) or {}).get("tag") if origin.startswith("timm:") else None
    return {"origin": origin, "tag": tag, "file": str(path) if path else None,
            "sha256": sha256_of(path) if path else None}


def _reachable(url: str, timeout: float = 4.0) -> bool:
    """A TCP connection to ``url``'s host (or the HTTPS proxy) within ``timeout`` seconds, name lookup included:
    huggingface_hub and urllib retry for minutes when the network is down."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    parsed = urlparse(proxy or url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def pretrained_file(kwargs: dict) -> tuple[str | None, str | None]:
    """(config key, path) of the local weights file that timm's pretrained load would read
    (``model.pretrained_cfg_overlay.file`` before ``model.pretrained_cfg.file``), or (None, None) when it reads from
    its hub or URL."""
    for key in ("pretrained_cfg_overlay", "pretrained_cfg"):
        cfg = kwargs.get(key)
        if isinstance(cfg, Mapping) and cfg.get("file"):
            return f"model.{key}.file", str(cfg["file"])
    return None, None


def check_pretrained_file(file: str, key: str = "model.pretrained_cfg_overlay.file") -> None:
    """Raise a one-line error unless ``file`` exists and holds weights only: it is read here as every checkpoint is
    (``loading.load_weights``: safetensors, or ``torch.load(weights_only=True)``) before timm reads it, so a file
    that would construct other objects is refused whatever timm version is installed. ``.npz`` files (the original
    ViT releases, which timm reads with ``numpy.load``, pickles refused) are left to timm."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={file!r} does not exist: give the path of a .safetensors/.pth/.bin file (or use "
                        "model.checkpoint=PATH)")
    if path.suffix != ".npz":
        loading.load_weights(path, key)


def check_pretrained_available(name: str) -> None:
    """Raise a one-line UserError unless timm can load ``name``'s pretrained weights now: they exist in timm, and
    they are cached locally or their host answers (HF_HUB_OFFLINE=1 means it does not)."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name.split('.')[0]}.*")]
        raise UserError(f"model.pretrained_tag of {name!r} is not a timm tag: choose from {tags[:8]}") from e
    cfg = cfg.to_dict() if cfg is not None else {}
    hub_id, url, file = cfg.get("hf_hub_id"), cfg.get("url"), cfg.get("file")
    if not (hub_id or url or file or cfg.get("state_dict")):
        raise UserError(f"timm has no pretrained weights for {name!r} (model.pretrained=true): pick a tagged model "
                        f"(timm.list_pretrained('{name.split('.')[0]}*')) or pass model.checkpoint=PATH")
    if file or cfg.get("state_dict"):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if hub_id:
        try:
            if _hf_cached(hub_id, cfg.get("hf_hub_filename")):
                return
        except ImportError:  # no huggingface_hub: timm falls back to the URL
            hub_id = None
    if not hub_id and url and (Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name).is_file():
        return
    where = f"hf-hub:{hub_id}" if hub_id else url
    if offline:
        raise UserError(f"pretrained weights for {name!r} ({where}) are not in the local cache and HF_HUB_OFFLINE is "
                        f"set: {_HOW}")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if hub_id else url
    if not _reachable(endpoint):
        raise UserError(f"pretrained weights for {name!r} ({where}) are not cached and {urlparse(endpoint).hostname} "
                        f"cannot be reached: {_HOW}")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    cls = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return (cls,) if isinstance(cls, str) else tuple(cls)


def _backbone_state(state: dict) -> dict:
    """The network's weights from a cl_vit experience checkpoint (``module`` -> ``net.*``) or a Lightning
    checkpoint (``state_dict`` -> ``net.*``); other files pass through."""
    if isinstance(state.get("module"), dict):
        state = state["module"]
    if any(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return state


def load_checkpoint(model: nn.Module, path: str | Path, head: bool = True) -> None:
    """Load local weights (.safetensors, .pth, .pt, .bin) into ``model``.

    timm's ``load_state_dict`` reads the file (unwrapping ``state_dict``/``model`` keys, and the ``net.`` prefix of
    cl_vit and Lightning checkpoints is dropped, so a run's ``checkpoints/exp_XXX.pt`` initialises a new run); the
    model family's ``checkpoint_filter_fn`` adapts foreign layouts (resampled position embeddings, ViT -> Refiner-ViT); a classifier
    whose shape differs from the benchmark's, or any classifier with ``head=False``, is left at its initialisation.
    Anything else missing is an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model.checkpoint={str(path)!r} does not exist: give the path of a .safetensors/.pth/.bin file")
    try:
        # weights_only, DeiT-LT's pickled arguments allowed (teachers.OFFICIAL_SAFE_GLOBALS): a received file runs no
        # code. A cl_vit experience checkpoint also holds the run's model config under "model", which timm's reader
        # would take for the weights: its "module" is read directly. Otherwise the trained weights, not an EMA kept
        # beside them (DeiT-LT's students carry a never-evaluated "model_ema").
        raw = loading.load_weights(path, "model.checkpoint", allow=teachers.OFFICIAL_SAFE_GLOBALS)
        if isinstance(raw, dict) and isinstance(raw.get("module"), dict):
            state = raw["module"]
        else:  # unwrapped as timm's load_state_dict(use_ema=False) would
            key = next((k for k in ("state_dict", "model") if isinstance(raw, dict) and k in raw), None)
            state = clean_state_dict(raw[key] if key else raw)
    except loading.CheckpointError:
        raise
    except Exception as e:
        raise UserError(f"model.checkpoint {path.name} could not be read ({type(e).__name__}: {e}): give a "
                        ".safetensors, .pth or .bin file of model weights") from e
    state = _backbone_state(state)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    heads = _classifier_prefixes(model)
    is_head = lambda k: any(k.startswith(f"{h}.") for h in heads)  # noqa: E731
    state = {k: v for k, v in state.items() if not (is_head(k) and (not head or k in own and own[k].shape != v.shape))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_head(k)]
    if missing or unexpected:
        raise UserError(
            f"model.checkpoint {path.name} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); check model.name"
        )
