"""Diagnostics of the closer-look miniature (docs/miniatures.md): how good the backbone's features are for the
digits before any continual training, and what moved in a run whose backbone was meant to stay fixed.

    python -m cl_vit.experiments.closer_look_probe --checkpoint outputs/pretrain-fmnist-8/checkpoints/exp_000.pt
    python -m cl_vit.experiments.closer_look_probe --drift RUN_DIR [RUN_DIR ...]

1. Linear probe: the frozen backbone's pre-logits features of split-digits' training split (eval mode), a
   multinomial logistic regression (scikit-learn) fitted on them, accuracy on the test split over all 10 classes;
   for the checkpoint and for random initialisations (``--seeds``), the same model config as the runs.
2. Drift: for each run directory, the relative change ``||w_last - w_0|| / ||w_0||`` from the run's initial weights
   (its ``model.checkpoint``, or its first experience's checkpoint when it started at random) to its last
   experience, per group of the backbone: qkv, other trained weights, and BatchNorm running statistics (buffers that
   change in training mode even where every parameter is frozen).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

MODEL = {"name": "refiner_vit_tiny", "checkpoint_head": False}


def features(net, images: torch.Tensor) -> np.ndarray:
    net.eval()
    with torch.no_grad():
        return torch.cat([net.forward_head(net.forward_features(x), pre_logits=True)
                          for x in images.split(256)]).numpy()


def linear_probe(checkpoint: str | None, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from cl_vit.data import build_source
    from cl_vit.models import build_model

    torch.manual_seed(seed)
    net = build_model({**MODEL, "checkpoint": checkpoint}, 10, 1, 8)
    src = build_source("digits", data_root="")
    x_tr, x_te = src.train.images, src.test.images
    scaler = StandardScaler().fit(features(net, x_tr))
    clf = LogisticRegression(max_iter=3000).fit(scaler.transform(features(net, x_tr)), src.train_targets)
    return float(clf.score(scaler.transform(features(net, x_te)), src.test_targets))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from cl_vit.models import _backbone_state

    from cl_vit.loading import load_checkpoint

    state = load_checkpoint(path)
    return _backbone_state(state)


def drift(run_dir: Path) -> dict[str, float]:
    from cl_vit.loading import read_yaml

    cfg = read_yaml(run_dir / "config.yaml")
    ckpts = sorted((run_dir / "checkpoints").glob("exp_*.pt"))
    start = cfg["model"].get("checkpoint")
    w0 = _weights(Path(start)) if start else _weights(ckpts[0])
    w1 = _weights(ckpts[-1])
    groups: dict[str, list[str]] = {"qkv": [], "other params": [], "BN running stats": []}
    for k in w1:
        if k.startswith("head.") or k not in w0 or not w1[k].is_floating_point():
            continue
        kind = ("BN running stats" if k.endswith(("running_mean", "running_var")) else
                "qkv" if ".attn.qkv." in k else "other params")
        groups[kind].append(k)
    out = {}
    for kind, keys in groups.items():
        if keys:
            a = torch.cat([w0[k].flatten().float() for k in keys])
            b = torch.cat([w1[k].flatten().float() for k in keys])
            out[kind] = float((b - a).norm() / a.norm().clamp_min(1e-12))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cl_vit.experiments.closer_look_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="backbone to probe beside random initialisations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--drift", nargs="+", type=Path, default=[], metavar="RUN_DIR")
    args = p.parse_args(argv)
    if args.checkpoint:
        print("| backbone | linear-probe accuracy on digits, 10 classes (%) |\n| --- | ---: |")
        for name, ckpt in (("pre-trained on Fashion-MNIST 8x8", args.checkpoint), ("random init", None)):
            accs = [100 * linear_probe(ckpt, s) for s in (args.seeds if ckpt is None else args.seeds[:1])]
            spread = f" ± {np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
            print(f"| {name} | {np.mean(accs):.2f}{spread} |")
    if args.drift:
        print("\n| run | qkv | other params | BN running stats |\n| --- | ---: | ---: | ---: |")
        for run in args.drift:
            d = drift(run)
            print(f"| {run} | " + " | ".join(f"{d[k]:.3f}" if k in d else "—"
                                            for k in ("qkv", "other params", "BN running stats")) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
