"""CNN teachers for DeiT-LT, registered with timm, and the loader of a trained teacher.

- ``resnet32_cifar``: the ResNet-32 of LDAM-DRW (kaidic/LDAM-DRW models/resnet_cifar.py, used unchanged by
  val-iisc/Saddle-LongTail and val-iisc/DeiT-LT teacher_models/resnet_cifar.py): a 3x3 stem to 16 channels, three
  stages of five basic blocks (16, 32, 64 channels, stride 1, 2, 2) with parameter-free "option A" shortcuts (stride-2
  subsampling and zero channel padding), global average pooling; ``use_norm=True`` gives the cosine classifier
  (``NormedLinear``) that the LDAM loss is trained with. About 0.46M parameters at 10 classes.
- ``resnet50_ldam``: timm's resnet50 with its ``fc`` replaced by ``NormedLinear`` (Saddle-LongTail imnet_train_sam.py
  swaps torchvision's ``fc`` the same way for LDAM); plain ``resnet50`` is timm's own, for cross-entropy teachers.

``load_teacher(path)`` rebuilds a teacher trained by this suite (``python -m cl_vit.run experiment=teacher-...``) from
its run directory or one of its ``checkpoints/exp_XXX.pt``: each checkpoint carries the model config, the input size,
the class list and the per-class training counts, so a distillation strategy can refuse a teacher of other classes.
It also reads DeiT-LT's released PaCo + SAM teachers (``paco_sam_ckpt_cf10_if100.pth.tar``, ``imagenetlt_paco_sam.pth.tar``
...) in their own layout: val-iisc/DeiT-LT moco/builder.py ``MoCo`` around teacher_models/resnet_cifar_paco.py
``resnet32`` or resnet_imagenet_paco.py ``resnet50``, saved under DataParallel's ``module.`` prefix (main.py L306-319).
Their inference (``MoCo._inference``) is ``linear(avgpool(encoder_q(x)))``: the query encoder up to its average pool,
then the plain ``linear`` classifier; the contrastive head ``encoder_q.fc``, the key encoder and the queue are unused.
Such a teacher predicts in its dataset's own label order (``label_order="dataset"``), which the strategy maps to the
stream's labels (ImageNet-LT / iNaturalist students are re-indexed by frequency, as DeiT-LT's losses.py L99-101 maps
the teacher's argmax through ``class_map``).
"""
from __future__ import annotations

import argparse
import pathlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers.helpers import get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import Bottleneck, ResNet

from cl_vit import loading
from cl_vit.errors import UserError
from cl_vit.models.cfgs import mirror_cfgs

__all__ = ["NormedLinear", "ResNetCifar", "Teacher", "load_teacher"]


class NormedLinear(nn.Module):
    """Cosine classifier: logits are cosines between the normalised feature and each class's normalised weight.

    Stored as ``[in_features, out_features]`` and initialised as LDAM-DRW (uniform(-1, 1), columns renormalised), so
    that their checkpoints load as they are.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class _PadShortcut(nn.Module):
    """LDAM-DRW's option-A shortcut: subsample by 2 and zero-pad the channels (planes // 4 on each side)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(planes, **dd)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.shortcut = _PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@contextmanager
def _batchnorm_statistics_kept(module: nn.Module):
    """BatchNorm running statistics (and batch counts) of ``module`` as they were on entry, on exit."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[t.clone() for t in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
    try:
        yield
    finally:  # also when torch stops the recomputation early (it raises once it has what it needs)
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)


def checkpoint_blocks(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Gradient checkpointing block by block, whose recomputation during backward leaves BatchNorm running
    statistics as the one forward pass left them (torch's checkpoint alone would update them twice per batch)."""
    for blk in blocks:
        x = torch.utils.checkpoint.checkpoint(
            blk, x, use_reentrant=False, context_fn=lambda b=blk: (nullcontext(), _batchnorm_statistics_kept(b)))
    return x


class ResNetCifar(nn.Module):
    """LDAM-DRW's ``ResNet_s`` with timm's model interface. Attribute names follow theirs (``conv1``, ``layer1..3``,
    ``linear``) so that a Saddle-LongTail / LDAM-DRW state dict loads without renaming. Its features
    (``feature_info``, ``forward_intermediates``, ``features_only``) are the outputs of the three stages."""

    def __init__(self, depths=(5, 5, 5), widths=(16, 32, 64), num_classes: int = 10, in_chans: int = 3,
                 use_norm: bool = False, global_pool: str = "avg", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if global_pool not in ("avg", ""):
            raise ValueError(f"ResNetCifar pools by average only (global_pool={global_pool!r})")
        self.num_classes, self.use_norm, self.in_chans = num_classes, use_norm, in_chans
        self.num_features = self.head_hidden_size = widths[-1]
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(widths[0], **dd)
        in_planes, layers, self.feature_info = widths[0], [], []
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1, **dd))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=planes, reduction=2 ** i, module=f"layer{i + 1}"))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = self._classifier(num_classes, **dd)
        for m in self.modules():  # LDAM-DRW's _weights_init: Kaiming-normal conv and linear weights
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        dd = dict(device=device, dtype=dtype)
        if self.use_norm:
            return NormedLinear(self.num_features, num_classes, **dd)
        return nn.Linear(self.num_features, num_classes, **dd)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.linear = self._classifier(num_classes, **get_device_dtype(self))

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^conv1|bn1", "blocks": r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's forward_intermediates: the output of each stage in ``indices`` (NCHW)."""
        assert output_fmt == "NCHW", "ResNetCifar gives NCHW features only"
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        x = F.relu(self.bn1(self.conv1(x)))
        intermediates = []
        stages = [self.layer1, self.layer2, self.layer3]
        for i, stage in enumerate(stages[:max_index + 1] if stop_early else stages):
            x = checkpoint_blocks(stage, x) if self.grad_checkpointing and torch.is_grad_enabled() else stage(x)
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last one ``indices`` needs (and the classifier)."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for i in range(max_index + 1, len(self.feature_info)):
            setattr(self, f"layer{i + 1}", nn.Identity())
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            for stage in (self.layer1, self.layer2, self.layer3):
                x = checkpoint_blocks(stage, x)
            return x
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # average pooling as ResNet_s.forward (resnet_cifar.py L121), which rounds differently from x.mean((2, 3))
        x = F.avg_pool2d(x, [x.shape[-2], x.shape[-1]]).flatten(1)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ResNetLDAM(ResNet):
    """timm's ResNet with the LDAM cosine classifier as its ``fc`` (:class:`NormedLinear`), and gradient
    checkpointing that leaves BatchNorm statistics as one forward pass does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.num_classes > 0:  # after timm's own init, which the classifier replaces
            self.fc = NormedLinear(self.num_features, self.num_classes, **get_device_dtype(self))

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if num_classes > 0:
            self.fc = NormedLinear(self.num_features, num_classes, **get_device_dtype(self))

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        if not torch.jit.is_scripting() and self.grad_checkpointing and torch.is_grad_enabled():
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = checkpoint_blocks(stage, x)
            return x
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _cfg(**kwargs) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bicubic", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010),
            "first_conv": "conv1", "classifier": "linear", **kwargs}


# mean/std: the CIFAR statistics of LDAM-DRW and Saddle-LongTail's training transforms
default_cfgs = generate_default_cfgs({"resnet32_cifar.untrained": _cfg()})
# resnet50's own cfgs: pretrained=True starts from those weights, the LDAM classifier at its initialisation
default_cfgs["resnet50_ldam"] = mirror_cfgs("resnet50")


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 for 32x32 inputs (LDAM-DRW); ``use_norm=True`` for the LDAM cosine classifier."""
    return build_model_with_cfg(ResNetCifar, "resnet32_cifar", pretrained,
                                feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2)), **kwargs)


def _ldam_filter(state_dict: dict, model: ResNetLDAM) -> dict:
    """resnet50 weights for resnet50_ldam: a plain Linear classifier (it has a bias; NormedLinear has none) is not
    loaded, the cosine classifier stays at its initialisation; resnet50_ldam's own weights load as they are."""
    if "fc.bias" not in state_dict:
        return state_dict
    out = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
    if isinstance(model.fc, NormedLinear):
        out["fc.weight"] = model.fc.weight.detach().clone()
    return out


@register_model
def resnet50_ldam(pretrained: bool = False, **kwargs) -> ResNetLDAM:
    """timm's resnet50 with a ``NormedLinear`` classifier (the LDAM teachers of Saddle-LongTail, 224x224 inputs),
    initialised as torchvision's ``resnet50()`` that imnet_train_sam.py L137 builds: Kaiming-normal (fan_out) convs,
    BatchNorm weight 1 / bias 0 everywhere. timm zero-initialises each block's last BatchNorm by default
    (``zero_init_last``), torchvision does not (``zero_init_residual=False``)."""
    args = dict(block=Bottleneck, layers=(3, 4, 6, 3), zero_init_last=False)
    return build_model_with_cfg(ResNetLDAM, "resnet50_ldam", pretrained, pretrained_filter_fn=_ldam_filter,
                                **dict(args, **kwargs))


# -- loading a trained teacher -----------------------------------------------------------------------------------


@dataclass
class Teacher:
    net: nn.Module
    #: the class of each output, by name ("names" order); for a released teacher ("dataset" order) the dataset's own
    #: label ids "0", "1", ...
    class_names: list[str]
    class_counts: list[int]
    #: (channels, height, width) the teacher was trained on
    input_size: tuple[int, int, int]
    model: dict = field(default_factory=dict)
    path: str = ""
    #: "names": outputs follow ``class_names`` (a cl_vit teacher); "dataset": output i is label i of the dataset's own
    #: files, before any re-indexing (DeiT-LT's released teachers)
    label_order: str = "names"

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def state_dict(self) -> dict:
        """Everything to rebuild the teacher (kept in the student's checkpoints, so that resume needs no file)."""
        return {"net": self.net.state_dict(), "class_names": self.class_names, "class_counts": self.class_counts,
                "input_size": list(self.input_size), "model": self.model, "path": self.path,
                "label_order": self.label_order}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Teacher":
        loading.check_file_config(state["model"], "the teacher saved in this run's checkpoint", prefix="model")
        net = _build_net(state["model"], len(state["class_names"]), state["input_size"])
        net.load_state_dict(state["net"])
        return cls(_freeze(net), list(state["class_names"]), list(state["class_counts"]),
                   tuple(state["input_size"]), dict(state["model"]), state.get("path", ""),
                   state.get("label_order", "names"))


def _freeze(net: nn.Module) -> nn.Module:
    net.eval()
    net.requires_grad_(False)
    return net


def _build_net(model_cfg: dict, n_classes: int, input_size) -> nn.Module:
    from cl_vit.models import build_model

    # the teacher's own weights follow; never fetch or load its initialisation again
    cfg = {k: v for k, v in model_cfg.items() if k not in ("checkpoint", "pretrained", "pretrained_tag")}
    return build_model(cfg, n_classes, in_chans=int(input_size[0]), img_size=int(input_size[-1]))


def teacher_checkpoint(path: str | Path) -> Path:
    """The checkpoint file behind ``path``: the file itself, or a run directory's last experience checkpoint."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = sorted((path / "checkpoints").glob("exp_*.pt"))
        if not found:
            raise UserError(
                f"teacher {path} holds no checkpoints/exp_*.pt: give the run directory of a finished teacher run "
                "(python -m cl_vit.run experiment=teacher-<benchmark>) or its checkpoint file"
            )
        return found[-1]
    if not path.is_file():
        raise UserError(
            f"teacher {path} does not exist: give the run directory of a teacher run "
            "(python -m cl_vit.run experiment=teacher-<benchmark>) or its checkpoints/exp_XXX.pt"
        )
    return path


#: what DeiT-LT's and PaCo's checkpoints pickle besides tensors (main.py saves its argparse arguments, output_dir a
#: Path); allowed to torch.load(weights_only=True), nothing else is
OFFICIAL_SAFE_GLOBALS = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                         pathlib.PureWindowsPath]


def read_official(file: str | Path) -> dict:
    """A teacher checkpoint read with weights_only (its argparse arguments allowed); one line if it cannot be."""
    return loading.load_checkpoint(file, "teacher checkpoint", allow=OFFICIAL_SAFE_GLOBALS)


def _paco_teacher(state: dict, file: Path) -> Teacher:
    """A released PaCo + SAM teacher (see the module docstring): ResNet-32 (CIFAR, 32x32) or ResNet-50 (224x224)."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state["state_dict"].items()}
    linear_w, conv1 = sd.get("linear.weight"), sd.get("encoder_q.conv1.weight")
    if linear_w is None or conv1 is None or linear_w.ndim != 2:
        raise UserError(f"teacher checkpoint {file} is not a DeiT-LT PaCo teacher (no encoder_q.conv1 / linear weights)")
    n_classes, width = (int(d) for d in linear_w.shape)
    if tuple(conv1.shape) == (16, 3, 3, 3) and width == 64:  # resnet_cifar_paco.py resnet32
        model, size, head = {"name": "resnet32_cifar", "use_norm": False}, 32, "linear"
    elif tuple(conv1.shape) == (64, 3, 7, 7) and width == 2048:  # resnet_imagenet_paco.py resnet50 (torchvision's)
        model, size, head = {"name": "resnet50"}, 224, "fc"
    else:
        raise UserError(f"teacher checkpoint {file}: encoder conv1 {tuple(conv1.shape)} with {width} features is neither "
                        "DeiT-LT's ResNet-32 nor its ResNet-50 teacher")
    net = _build_net(model, n_classes, (3, size, size))
    weights = {k[len("encoder_q."):]: v for k, v in sd.items()
               if k.startswith("encoder_q.") and not k.startswith("encoder_q.fc.")}
    weights.update({f"{head}.weight": sd["linear.weight"], f"{head}.bias": sd["linear.bias"]})
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"teacher checkpoint {file} does not fit {model['name']}: "
                        f"{str(e).splitlines()[0][:200]}") from e
    return Teacher(_freeze(net), [str(i) for i in range(n_classes)], [], (3, size, size), model, str(file),
                   label_order="dataset")


def load_teacher(path: str | Path) -> Teacher:
    """Rebuild a teacher, frozen and in eval mode: one trained by this suite (with its classes and per-class counts),
    or a released DeiT-LT PaCo teacher file."""
    file = teacher_checkpoint(path)
    state = read_official(file)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict) and any(
            k.split(".", 1)[-1].startswith("encoder_q.") or k.startswith("encoder_q.") for k in state["state_dict"]):
        return _paco_teacher(state, file)
    needed = ("module", "model", "input_size", "class_names", "class_counts")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise UserError(
            f"teacher checkpoint {file} is not a cl_vit teacher (it lacks the model config, class list and counts): "
            "train the teacher with python -m cl_vit.run experiment=teacher-<benchmark>"
        )
    names = list(state["class_names"])
    if not isinstance(state["model"], dict):
        raise UserError(f"teacher checkpoint {file} holds no model config (a dict under 'model'): train the teacher "
                        "with python -m cl_vit.run experiment=teacher-<benchmark>")
    loading.check_file_config(state["model"], f"teacher checkpoint {file}", prefix="model")
    net = _build_net(state["model"], len(names), state["input_size"])
    weights = {k[len("net."):]: v for k, v in state["module"].items() if k.startswith("net.")}
    net.load_state_dict(weights)
    return Teacher(_freeze(net), names, [int(c) for c in state["class_counts"]], tuple(state["input_size"]),
                   dict(state["model"]), str(file))
