"""Reference numbers from the official InfLoRA and SD-LoRA code on tiny tensors, on a CPU.

    python scripts/golden_lora.py /path/to/InfLoRA /path/to/SD-Lora-CL

runs, unchanged, the official definitions tests/test_lora.py holds the suite to:

* InfLoRA (liangyanshuo/InfLoRA): ``Attention_LoRA`` (models/vit_inflora.py L175-272: attention with the summed
  key / value LoRA terms of tasks 0..t) and ``InfLoRA.update_DualGPM`` (methods/inflora.py L321-412: the old tasks'
  input subspaces), called on a stand-in ``self`` that carries the attributes it reads;
* SD-LoRA (WuYichen-97/SD-Lora-CL): ``_LoRA_qkv_timm_train`` and ``ParameterWrapper`` (backbone/lora.py L132-266:
  q and v of a ``qkv`` projection with two frozen, normalised earlier directions and the current one, each with its
  magnitude), forward and the gradient of the magnitudes.

Only those definitions are taken from the files (by name, through ``ast``): importing the files whole would pull in
timm 0.6's module layout, ipdb, sklearn and einops, none of which the definitions use. ``.cuda()`` is made an
identity (the SD-LoRA module moves its parts to the GPU in ``__init__``). Inputs come from ``torch.manual_seed`` and
are rebuilt the same way by the test; each case prints checksums (sum, sum of squares, a position-weighted sum).
"""
from __future__ import annotations

import argparse
import ast
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parameter import Parameter

#: the tiny geometry of every case: embedding width, heads, rank, tokens, batch
DIM, HEADS, RANK, TOKENS, BATCH = 8, 2, 2, 5, 2


def official(path: Path, *names: str) -> dict:
    """The named top-level classes / functions (or a class's method as ``Class.method``) of an official file."""
    tree = ast.parse(path.read_text())
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names:
            keep.append(node)
        for n in names:
            cls, _, meth = n.partition(".")
            if meth and isinstance(node, ast.ClassDef) and node.name == cls:
                keep += [m for m in node.body if isinstance(m, ast.FunctionDef) and m.name == meth]
    scope = {"torch": torch, "nn": nn, "F": F, "math": math, "np": np, "Parameter": Parameter, "print": lambda *a: None,
             "logging": SimpleNamespace(info=lambda *a: None)}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), scope)
    return scope


def checksums(t: torch.Tensor) -> list[float]:
    t = t.detach().double().flatten()
    return [t.sum().item(), (t * t).sum().item(), (t * torch.arange(1, t.numel() + 1, dtype=t.dtype)).sum().item()]


def draw_terms(names, tasks: int) -> list[dict]:
    """Per task, A (rank x d) and B (d x rank) of each slice, drawn in the order of ``names``."""
    return [{n: torch.randn(RANK, DIM) if n[0] == "A" else torch.randn(DIM, RANK) for n in names} for _ in range(tasks)]


def inflora_attention_case():
    """Seed 0: qkv / proj weights, A_k, B_k, A_v, B_v of tasks 0 and 1 (nonzero B), the input x."""
    torch.manual_seed(0)
    w = {"qkv.weight": torch.randn(3 * DIM, DIM), "qkv.bias": torch.randn(3 * DIM),
         "proj.weight": torch.randn(DIM, DIM), "proj.bias": torch.randn(DIM)}
    terms = draw_terms(("A_k", "B_k", "A_v", "B_v"), 2)
    x = torch.randn(BATCH, TOKENS, DIM)
    return w, terms, x


def sdlora_case():
    """Seed 1: qkv weights, A_q, B_q, A_v, B_v of tasks 0, 1 (frozen) and 2 (current), magnitudes, the input x and
    the output weights of the loss sum(out * g)."""
    torch.manual_seed(1)
    w = {"weight": torch.randn(3 * DIM, DIM), "bias": torch.randn(3 * DIM)}
    terms = draw_terms(("A_q", "B_q", "A_v", "B_v"), 3)
    alphas = [0.8, 0.6, 1.3]
    x = torch.randn(BATCH, TOKENS, DIM)
    g = torch.randn(BATCH, TOKENS, 3 * DIM)
    return w, terms, alphas, x, g


def dual_gpm_case():
    """Seed 2: per task (4) and layer (2) a d x d input covariance of rank 2 (layer 0) or 3 (layer 1)."""
    torch.manual_seed(2)
    out = []
    for _ in range(4):
        mats = []
        for k in (2, 3):
            z = torch.randn(40, k) @ torch.randn(k, DIM) + 0.05 * torch.randn(40, DIM)
            mats.append(z.T @ z / 40)
        out.append(mats)
    return out


#: DualGPM's thresholds in this case: lamb, lame, total_sessions
GPM = (0.9, 1.0, 4)
#: the weights W of the projector checksum sum(P * W)
def projector_weights() -> torch.Tensor:
    return torch.arange(DIM * DIM, dtype=torch.float64).reshape(DIM, DIM) / (DIM * DIM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inflora", type=Path)
    ap.add_argument("sdlora", type=Path)
    args = ap.parse_args()
    nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.cuda = lambda self, *a, **k: self

    # InfLoRA attention, task 1: both tasks' terms summed into k and v
    ns = official(args.inflora / "models/vit_inflora.py", "Attention_LoRA")
    w, terms, x = inflora_attention_case()
    attn = ns["Attention_LoRA"](DIM, num_heads=HEADS, qkv_bias=True, r=RANK, n_tasks=3)
    attn.qkv.weight.data, attn.qkv.bias.data = w["qkv.weight"], w["qkv.bias"]
    attn.proj.weight.data, attn.proj.bias.data = w["proj.weight"], w["proj.bias"]
    for t, tt in enumerate(terms):
        for n, v in tt.items():
            getattr(attn, f"lora_{n}")[t].weight.data = v.clone()
    with torch.no_grad():
        print("INFLORA_ATTENTION =", checksums(attn(x, task=1)))

    # InfLoRA DualGPM over three tasks
    ns = official(args.inflora / "methods/inflora.py", "InfLoRA.update_DualGPM")
    lamb, lame, total = GPM
    me = SimpleNamespace(lamb=lamb, lame=lame, total_sessions=total, feature_list=[], project_type=[], _cur_task=0)
    W = projector_weights()
    rows = []
    for t, mats in enumerate(dual_gpm_case()):
        me._cur_task = t
        # numpy arrays, as np.linalg.svd returned for the official torch 1.10 tensors (a newer torch wraps them back)
        ns["update_DualGPM"](me, [m.numpy() for m in mats])
        bases = [torch.as_tensor(np.asarray(f)).double() for f in me.feature_list]
        rows.append([(me.project_type[i], int(f.shape[1]), float((f @ f.T * W).sum())) for i, f in enumerate(bases)])
    print("INFLORA_DUAL_GPM =", rows)

    # SD-LoRA qkv, current task 2 of 3
    ns = official(args.sdlora / "backbone/lora.py", "_LoRA_qkv_timm_train", "ParameterWrapper")
    w, terms, alphas, x, g = sdlora_case()
    qkv = nn.Linear(DIM, 3 * DIM)
    qkv.weight.data, qkv.bias.data = w["weight"], w["bias"]

    def linear(weight):
        m = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        m.weight.data = weight.clone()
        return m

    saved_A = {f"saved_A_{t}": [linear(terms[t]["A_q"]), linear(terms[t]["A_v"])] for t in range(2)}
    saved_B = {f"saved_B_{t}": [linear(terms[t]["B_q"]), linear(terms[t]["B_v"])] for t in range(2)}
    wrap = ns["ParameterWrapper"]
    current = nn.ModuleList([wrap(nn.Parameter(torch.tensor([alphas[2]])))])
    prev = nn.ModuleList([wrap(nn.Parameter(torch.tensor([a]))) for a in alphas[:2]])
    layer = ns["_LoRA_qkv_timm_train"](qkv, linear(terms[2]["A_q"]), linear(terms[2]["B_q"]), linear(terms[2]["A_v"]),
                                       linear(terms[2]["B_v"]), 2, saved_A, saved_B, 0, RANK, current, prev)
    out = layer(x)
    (out * g).sum().backward()
    print("SDLORA_QKV =", checksums(out))
    print("SDLORA_MAGNITUDE_GRADS =", [p.param.grad.item() for p in (*prev, *current)])


if __name__ == "__main__":
    sys.exit(main())
