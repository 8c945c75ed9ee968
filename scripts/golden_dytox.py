"""DyTox's forward and loss from the official code (arthurdouillard/dytox) on a tiny case, on a CPU.

    python scripts/golden_dytox.py /path/to/dytox

builds the suite's DyTox network at its second task (:func:`tiny_case`: a micro-ViT whose last block becomes the
task-attention block, two tasks of 3 and 2 classes, the teacher frozen at the end of the first, every trainable weight
then moved so that student and teacher differ), copies its weights into the official ``continual.dytox.DyTox``
(teacher and student) and runs the official ``continual.engine.forward`` with the official criterion
(``continual.losses.bce_with_logits``) and the CIFAR options (``auto_kd``, ``distillation_tau`` 1, ``head_div`` 0.1,
``head_div_mode tr``, ``ind_clf 1-1``). It prints what tests/test_golden_dytox.py asserts the suite reproduces: the
logits, the divergence head's logits and the three loss terms, and the exemplars the official ``icarl_selection``
(continual/rehearsal.py, the ``icarl_all`` rehearsal) picks from the embeddings of :func:`herding_case`. Nothing of the official code is copied or changed on
disk; at run time this script only

* makes ``.cuda()`` an identity (the official classifiers are moved to the GPU when built), and imports the modules
  of the ``continual`` package without its ``__init__`` (which imports continual/vit.py, whose timm model
  registrations timm 1.0 rejects; that ViT is not used);
* gives the official model the suite's encoder: its ``patch_embed`` and ``pos_drop`` are identities, ``pos_embed`` a
  zero, and its one SAB runs the suite's SABs (``sab_features``), so the comparison covers the task tokens, the
  task-attention block, the classifiers, the divergence head, the distillation and the loss weighting.
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from cl_vit.models import build_model
from cl_vit.models.gated import sab_features
from cl_vit.module import classification_loss
from cl_vit.strategies.base import ExperienceInfo
from cl_vit.strategies.dytox import DyTox

N_CLASSES = 6
#: the stream labels of the two tasks (class 5 never seen); the official labels are their positions in this order
TASKS = [[2, 0, 4], [1, 3]]
Y = [2, 0, 1, 3, 3, 4]


def tiny_case():
    """(module, strategy, x, y): the suite's DyTox at the start of its second task, student moved off the teacher."""
    torch.manual_seed(0)
    net = build_model({"name": "vit_micro_patch2_8"}, N_CLASSES, 1, 8)
    module = SimpleNamespace(net=net, n_classes=N_CLASSES, loss_name="bce", device=torch.device("cpu"))
    strategy = DyTox()
    strategy.setup(module)
    seen: list[int] = []
    for i, classes in enumerate(TASKS):
        seen += classes
        info = ExperienceInfo(index=i, n_experiences=len(TASKS), classes=classes, seen_classes=list(seen),
                              n_classes=N_CLASSES)
        if i:
            strategy.after_experience(module, prev)
        strategy.before_experience(module, info)
        prev = info
        with torch.no_grad():  # training moves every trainable weight
            for p in module.net.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
    strategy.on_fit_start(module)
    module.net.train()
    x = torch.randn(len(Y), 1, 8, 8)
    return module, strategy, x, torch.tensor(Y)


def herding_case() -> tuple[torch.Tensor, int]:
    """(features, k): 30 embeddings of 16 dimensions, a shared direction plus a rank-3 part plus noise (as a class's
    embeddings are: iCaRL's herding iteration then picks a sample again, where greedy herding without repeats
    departs from it), and 20 to pick."""
    gen = torch.Generator().manual_seed(3)
    common = 6 * torch.randn(1, 16, generator=gen)
    low = torch.randn(30, 3, generator=gen) @ torch.randn(3, 16, generator=gen)
    return common + low + 0.1 * torch.randn(30, 16, generator=gen), 20


def suite_terms(module, strategy, x, y) -> tuple[dict, dict]:
    """The outputs and the loss terms the module sums in a training step (ContinualModule.training_step)."""
    out = module.net.forward_outputs(x)
    seen = torch.zeros(N_CLASSES, dtype=torch.bool)
    seen[[c for cs in TASKS for c in cs]] = True
    terms = {"cls": strategy.cls_loss_weight * classification_loss(out["logits"], y, seen, module.loss_name)}
    terms.update(strategy.training_loss(module, {"x": x, "y": y}, out))
    return out, terms


class _SuiteSABs(nn.Module):
    """The official SAB interface ((x, attn, v) out) over the suite's encoder."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return sab_features(self.backbone, x), None, None


def official_model(dytox, net, tokens, heads, backbone):
    from continual.convit import Block, ClassAttention

    dim, hidden = net.embed_dim, net.hidden_dim
    tab = Block(dim, net.tab.attn.num_heads, mlp_ratio=hidden / dim, qkv_bias=net.tab.attn.q.bias is not None,
                norm_layer=functools.partial(nn.LayerNorm, eps=net.tab.norm1.eps), attention_type=ClassAttention)
    tab.load_state_dict(net.tab.state_dict())
    transformer = SimpleNamespace(
        embed_dim=dim, patch_embed=nn.Identity(), pos_embed=nn.Parameter(torch.zeros(1)), pos_drop=nn.Identity(),
        blocks=nn.ModuleList([_SuiteSABs(backbone), tab]), local_up_to_layer=1,
        cls_token=nn.Parameter(tokens[0].detach().clone()))
    model = dytox.DyTox(transformer, nb_classes=len(heads[0].fc.bias), individual_classifier="1-1", head_div=True,
                        head_div_mode="tr")
    for t in range(1, len(heads)):
        model.add_model(len(heads[t].fc.bias))
    with torch.no_grad():
        for t, (tok, head) in enumerate(zip(tokens, heads)):
            model.task_tokens[t].copy_(tok)
            model.head[t].norm.load_state_dict(head.norm.state_dict())
            model.head[t].head.load_state_dict(head.fc.state_dict())
        if net.head_div is not None and model.head_div is not None:
            model.head_div.norm.load_state_dict(net.head_div.norm.state_dict())
            model.head_div.head.load_state_dict(net.head_div.fc.state_dict())
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official", help="a checkout of github.com/arthurdouillard/dytox")
    official = parser.parse_args().official
    sys.path.insert(0, official)
    nn.Module.cuda = lambda self, *a, **k: self
    # continual/__init__.py imports continual/vit.py, whose timm model registrations timm 1.0 rejects (the ViT there is
    # not used): the package's modules are imported without running its __init__
    package = types.ModuleType("continual")
    package.__path__ = [str(Path(official) / "continual")]
    sys.modules["continual"] = package
    from continual import dytox, engine
    from continual.losses import bce_with_logits
    from continual.rehearsal import icarl_selection

    module, strategy, x, y = tiny_case()
    net, teacher = module.net, strategy.teacher
    student = official_model(dytox, net, list(net.tokens), list(net.heads), copy.deepcopy(net.backbone))
    old = official_model(dytox, teacher, list(teacher.tokens), list(teacher.heads), copy.deepcopy(teacher.backbone))
    student.train()
    old.eval()
    order = [c for cs in TASKS for c in cs]
    targets = torch.tensor([order.index(c) for c in Y])
    args = SimpleNamespace(auto_kd=True, distillation_tau=1.0, kd=0.0, head_div=0.1)
    with torch.no_grad():
        out = student(x)
        loss, kd, div = engine.forward(x, targets, student, old, bce_with_logits, None, args)
    torch.set_printoptions(precision=8)
    print("LOGITS =", [[round(v, 8) for v in row] for row in out["logits"].tolist()])
    print("DIV =", [[round(v, 8) for v in row] for row in out["div"].tolist()])
    print("TERMS =", {"cls": float(loss), "kd": float(kd), "div": float(div)})
    feats, k = herding_case()
    print("ICARL =", [int(i) for i in icarl_selection(feats.numpy(), k)])
    _, terms = suite_terms(module, strategy, x, y)
    print("suite:", {k: float(v) for k, v in terms.items()})


if __name__ == "__main__":
    main()
