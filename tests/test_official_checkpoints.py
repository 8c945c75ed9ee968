"""Released DeiT-LT checkpoints (val-iisc/DeiT-LT README "Results") load in their own layouts and evaluate.

The files are built here with the official keys and shapes (moco/builder.py MoCo around teacher_models/
resnet_cifar_paco.py resnet32 / resnet_imagenet_paco.py resnet50, saved as main.py L306-319 reads them:
``{"state_dict": {"module.<key>": tensor}}``; students as main.py L563-583 saves them: ``{"model", "model_ema",
"args": argparse.Namespace, ...}``), at toy sizes where the official shapes allow it.
"""
import argparse
import json
import pathlib

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from conftest import TINY_ANY_MODEL, compose
from data_gen import make_cifar

from cl_vit.errors import UserError
from cl_vit.models.teachers import load_teacher
from cl_vit.run import run


def paco_teacher_state(n_classes: int, kind: str, moco_dim: int = 32, queue: int = 64) -> dict:
    """A PaCo teacher's checkpoint: MoCo(encoder_q, encoder_k: resnet(num_classes=moco_dim) with the mlp fc head,
    linear/linear_k: Linear(feat_dim, n_classes), queue buffers), every key under DataParallel's ``module.``."""
    if kind == "cifar":
        enc = timm.create_model("resnet32_cifar", num_classes=moco_dim)
        feat = 64
        sd = {k.replace("linear.", "fc.3."): v for k, v in enc.state_dict().items()}  # resnet_cifar_paco names it fc
    else:
        enc = timm.create_model("resnet50", num_classes=moco_dim)
        feat = 2048
        sd = {k.replace("fc.", "fc.3."): v for k, v in enc.state_dict().items()}
    mlp = nn.Sequential(nn.Linear(feat, feat), nn.BatchNorm1d(feat))  # moco/builder.py: fc = [Linear, BN, ReLU, fc]
    sd.update({f"fc.{k}": v for k, v in mlp.state_dict().items()})
    linear = nn.Linear(feat, n_classes)
    state = {}
    for enc_name in ("encoder_q", "encoder_k"):
        state.update({f"{enc_name}.{k}": v.clone() for k, v in sd.items()})
    for lin_name in ("linear", "linear_k"):
        state.update({f"{lin_name}.{k}": v.clone() for k, v in linear.state_dict().items()})
    state.update(queue=torch.randn(queue, moco_dim), queue_l=torch.randint(0, n_classes, (queue,)),
                 queue_ptr=torch.zeros(1, dtype=torch.long))
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 400, "best_acc1": 0.8}


def test_paco_cifar_teacher_loads_and_predicts_as_the_official_inference(tmp_path):
    state = paco_teacher_state(10, "cifar")
    path = tmp_path / "paco_sam_ckpt_cf10_if100.pth.tar"
    torch.save(state, path)
    teacher = load_teacher(path)
    assert teacher.label_order == "dataset" and teacher.input_size == (3, 32, 32)
    # MoCo._inference: encoder_q up to its average pool (the hooked children[-2]), then `linear`
    sd = {k[len("module.encoder_q."):]: v for k, v in state["state_dict"].items() if k.startswith("module.encoder_q.")}
    enc = timm.create_model("resnet32_cifar", num_classes=32)
    enc.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=False)
    enc.eval()
    x = torch.randn(4, 3, 32, 32)
    w, b = state["state_dict"]["module.linear.weight"], state["state_dict"]["module.linear.bias"]
    expected = enc.forward_head(enc.forward_features(x), pre_logits=True) @ w.T + b
    assert torch.allclose(teacher.net(x), expected, atol=1e-5)


def test_paco_resnet50_teacher_loads(tmp_path):
    path = tmp_path / "imagenetlt_paco_sam.pth.tar"
    torch.save(paco_teacher_state(5, "imagenet", moco_dim=8, queue=16), path)
    teacher = load_teacher(path)
    assert teacher.input_size == (3, 224, 224) and teacher.n_classes == 5
    assert teacher.net(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_foreign_teacher_file_is_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(8, 3, 5, 5),
                               "module.linear.weight": torch.zeros(3, 8), "module.linear.bias": torch.zeros(3)}}, path)
    with pytest.raises(UserError, match="neither DeiT-LT's ResNet-32 nor its ResNet-50") as err:
        load_teacher(path)
    assert "\n" not in str(err.value)


def student_file(path, n_classes: int, img_size: int = 32):
    """A released student as main.py saves it, on a DeiT-Tiny of the official key layout (DeiT-B's keys)."""
    net = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=n_classes, img_size=img_size)
    ema = {k: v + 1.0 for k, v in net.state_dict().items()}  # the EMA main.py also keeps, never evaluated
    args = argparse.Namespace(output_dir=pathlib.PosixPath("/tmp/deit_out"), model="deit_base_distilled_patch16_224",
                              batch_size=128, cls_num_list=[5, 3, 1], map_targets=False)
    torch.save({"model": net.state_dict(), "model_ema": ema, "optimizer": {"state": {}, "param_groups": []},
                "epoch": 1199, "args": args, "best_acc_avg": 90.0}, path)
    return net


def test_released_student_loads_its_model_weights_and_evaluates_without_training(tmp_path, data_root):
    make_cifar(data_root, "cifar10", train_counts=[20] * 10, test_per_class=3)
    net = student_file(tmp_path / "student_best_checkpoint.pth", 10)
    over = [*TINY_ANY_MODEL, "benchmark=cifar10-lt", "benchmark.imbalance_ratio=10",
            "model.name=deit_tiny_distilled_patch16_224", f"model.checkpoint={tmp_path / 'student_best_checkpoint.pth'}",
            "model.patch_size=null", "benchmark.source_args.normalize=model", "train=false"]
    doc = run(compose(over, data_root), tmp_path / "eval")
    saved = torch.load(tmp_path / "eval" / "checkpoints" / "exp_000.pt", map_location="cpu", weights_only=True)
    weights = {k[len("net."):]: v for k, v in saved["module"].items() if k.startswith("net.")}
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items())  # "model", not "model_ema"; untrained
    assert set(doc["shot_accuracy"]["main"]) == {"count", "index"} and doc["shot_definition"] == "index"
    assert {"cls", "dist"} <= set(doc["heads"])
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["status"] == "completed"


def test_released_teacher_outputs_are_mapped_to_the_frequency_reindexed_labels(tmp_path):
    """ImageNet-LT with map_targets: the student's label k is the dataset's label dataset_labels[k]; the teacher's
    column for student label k is that one (DeiT-LT losses.py L99-101 maps the teacher's argmax by class_map)."""
    from data_gen import make_imagenet_lt

    from cl_vit.data import build_source
    from cl_vit.run import dataset_labels
    from cl_vit.strategies.base import ExperienceInfo
    from cl_vit.strategies.deit_lt import DeiTLT
    from cl_vit.streams import build_stream

    make_imagenet_lt(tmp_path, train_counts=[2, 6, 1, 4], test_per_class=1)
    source = build_source("imagenet-lt", tmp_path, n_classes=4, img_size=16)
    _, info = build_stream(source, n_experiences=1)
    labels = dataset_labels(source, info)
    assert labels == [1, 3, 0, 2]  # most frequent first: the dataset's labels 1 (6 images), 3 (4), 0 (2), 2 (1)
    torch.save(paco_teacher_state(4, "cifar"), tmp_path / "t.pth.tar")
    strategy = DeiTLT(teacher=str(tmp_path / "t.pth.tar"))
    strategy.teacher = load_teacher(tmp_path / "t.pth.tar")
    strategy.before_experience(None, ExperienceInfo(0, 1, [0, 1, 2, 3], [0, 1, 2, 3], 4, class_counts=[6, 4, 2, 1],
                                                    class_names=list(source.classes), dataset_labels=labels))
    x = torch.randn(3, 3, 32, 32)
    raw = strategy.teacher.net(x)
    assert torch.equal(strategy.teacher_logits(x), raw[:, labels].float())
    with pytest.raises(UserError, match="predicts in its dataset's own label order"):
        strategy.before_experience(None, ExperienceInfo(0, 1, [0, 1, 2, 3], [0, 1, 2, 3], 4, class_counts=[6, 4, 2, 1]))
