"""InfLoRA (Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024), as its
official code implements it (liangyanshuo/InfLoRA @ e08b00e, methods/inflora.py, models/vit_inflora.py):

* per task t a rank-r term B_t A_t on the keys and on the values of every block's attention (``Attention_LoRA``
  L175-262: k += x (sum_t B_t A_t)^T, v likewise, each term with weight 1); only B_t of the current task and the
  current task's classifier train (``_train`` L93-108), A_t never does;
* A_t is designed before the task trains (L116-158): C = the mean of x x^T over every token of the task's training
  images at the attention's input (``cur_matrix``, vit_inflora.py L236-238, under the model as it stands, whose new
  B_t is 0), projected away from the old tasks' input subspace M (``remove``: C - M M^T C) or onto its complement
  (``retain``: M M^T C, M then spanning the free space), A_t = the top r left singular vectors of that matrix,
  transposed, / sqrt(3). The first task uses C itself. Keys and values get the same A_t;
* after the task trains, the subspace M of every layer is extended with the new task's input representation, the
  DualGPM rule (``update_DualGPM`` L321-412; the threshold rises linearly from ``lamb`` to ``lame`` over the tasks,
  L322): kept as a basis of the old subspace while it has at most d/2 dimensions, then as a basis of its complement.

One departure, where the code cannot run: when the first task's subspace already has more than d/2 dimensions the
official code stores that subspace as ``retain`` and then fails its own assertion (L333-338, L410); here it stores
the complement, as the rule does for every later task. Not here: InfLoRA-b5 / InfLoRA+CA (other files), the k-means
keys of ``clustering`` (L248-263; nothing reads them for the published accuracy).

State: the bases M and their kinds per adapted projection, and the number of tasks (cl_vit/strategies/lora.py).
"""
from __future__ import annotations

import math

import torch

from cl_vit import distributed
from cl_vit.errors import ConfigError
from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.embeddings import check_statistics_transform
from cl_vit.strategies.lora import LoRAStrategy

REMOVE, RETAIN = "remove", "retain"


@torch.no_grad()
def input_covariances(module, experience: ExperienceInfo, transform: str) -> list[torch.Tensor]:
    """Per adapted projection, the mean over all tokens of the training images of x x^T at its input (d x d, float32,
    CPU); under DDP the sums and counts of every process's share are added."""
    from cl_vit.module import as_step_input, modes_kept, outside_step

    net, lora = module.net, module.net.lora
    projections = [net.get_submodule(n) for n in lora.names]
    sums = [None] * len(projections)
    count = torch.zeros((), dtype=torch.float64)

    def keep(i, m, args):
        nonlocal count
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        g = x.T @ x
        sums[i] = g if sums[i] is None else sums[i] + g
        if i == 0:  # the official running mean divides by images x tokens
            count += x.shape[0]

    hooks = [p.register_forward_pre_hook(lambda m, a, i=i: keep(i, m, a)) for i, p in enumerate(projections)]
    device = next(net.parameters()).device
    try:
        with modes_kept(net), outside_step(module):
            net.eval()  # methods/inflora.py L116-119: the statistics pass of an eval-mode network (as all its training)
            for batch in experience.train_loader(train=False, shard=distributed.world_size() > 1,
                                                 transform=transform):
                net.forward_features(as_step_input(module, batch[0].to(device)))
    finally:
        for h in hooks:
            h.remove()
    dims = [p.in_features for p in projections]
    mats = {str(i): s if s is not None else torch.zeros(d, d, device=device)
            for i, (s, d) in enumerate(zip(sums, dims))}
    mats = distributed.reduce_sum(module, {**mats, "count": count})
    n = float(mats.pop("count"))
    return [mats[str(i)].float().cpu() / max(n, 1.0) for i in range(len(projections))]


def design_down_projection(cov: torch.Tensor, basis: torch.Tensor | None, kind: str | None, rank: int) -> torch.Tensor:
    """A (rank x d): the top ``rank`` left singular vectors of ``cov`` with the old tasks' subspace removed (or the
    free space retained), / sqrt(3) (methods/inflora.py L122-158)."""
    if basis is not None:
        proj = basis @ basis.T
        cov = cov - proj @ cov if kind == REMOVE else proj @ cov
    U = torch.linalg.svd(cov, full_matrices=False)[0]
    return U[:, :rank].T / math.sqrt(3)


def _energy(S: torch.Tensor) -> torch.Tensor:
    return S.double() ** 2


def dual_gpm_update(bases: list, kinds: list, covs: list[torch.Tensor], threshold: float) -> tuple[list, list]:
    """One DualGPM step (methods/inflora.py ``update_DualGPM`` L321-412) on every layer: returns the new (bases, kinds).

    ``bases[i]`` (d x k, orthonormal columns) spans the old tasks' input subspace (``remove``) or its complement
    (``retain``); empty lists before the first task."""
    bases, kinds = list(bases), list(kinds)
    for i, act in enumerate(covs):
        d = act.shape[0]
        U, S, _ = torch.linalg.svd(act, full_matrices=False)
        total = float(_energy(S).sum())
        if i >= len(bases):  # the first task (L324-338)
            ratio = _energy(S) / total
            r = int((torch.cumsum(ratio, 0) < threshold).sum())
            if r < d / 2:
                bases.append(U[:, :max(r, 1)])
                kinds.append(REMOVE)
            else:  # the free space: see the module docstring
                bases.append(U[:, max(r, 1):])
                kinds.append(RETAIN)
            continue
        M = bases[i]
        if kinds[i] == REMOVE:  # L341-368: add the new directions the old basis misses
            Uh, Sh, _ = torch.linalg.svd(act - M @ (M.T @ act), full_matrices=False)
            ratio = (_energy(Sh) / total).tolist()
            acc = (total - float(_energy(Sh).sum())) / total
            r = 0
            for v in ratio:
                if acc >= threshold:
                    break
                acc += v
                r += 1
            if r:
                bases[i] = torch.cat((M, Uh[:, :r]), dim=1)[:, :d]
        else:  # L369-396: remove from the free space what the new task uses
            Uh, Sh, _ = torch.linalg.svd(M @ (M.T @ act), full_matrices=False)
            ratio = (_energy(Sh) / total).tolist()
            acc = float(_energy(Sh).sum()) / total
            r = 0
            for v in ratio:
                if acc < 1 - threshold:
                    break
                acc -= v
                r += 1
            if r:
                Ur = Uh[:, :r]
                rest = torch.linalg.svd(M - Ur @ (Ur.T @ M))[0]
                bases[i] = rest[:, :M.shape[1] - r]
    for i, M in enumerate(bases):  # L401-408: past d/2 old dimensions, keep the complement instead
        if kinds[i] == REMOVE and M.shape[1] > M.shape[0] / 2:
            bases[i] = torch.linalg.svd(M)[0][:, M.shape[1]:]
            kinds[i] = RETAIN
    return bases, kinds


@register_strategy
class InfLoRA(LoRAStrategy):
    name = "inflora"
    targets = ("k", "v")

    def __init__(self, rank: int = 10, lamb: float = 0.98, lame: float = 1.0, statistics_transform: str = "train"):
        super().__init__(rank)
        for key, value in (("lamb", lamb), ("lame", lame)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"strategy.inflora.{key}", value, "a number in (0, 1]")
        self.lamb, self.lame = float(lamb), float(lame)
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.bases: list[torch.Tensor] = []
        self.kinds: list[str] = []

    def trainable(self, task: int) -> list[str]:
        return [f"layers.{i}.{task}.B_{s}" for i, sl in enumerate(self.lora.slices) for s in sl]

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        super().before_experience(module, experience)
        t = experience.index
        covs = input_covariances(module, experience, self.statistics_transform)
        with torch.no_grad():
            for i, cov in enumerate(covs):
                basis = self.bases[i] if t > 0 and i < len(self.bases) else None
                a = design_down_projection(cov, basis, self.kinds[i] if basis is not None else None, self.rank)
                for s in self.lora.slices[i]:
                    param = self.lora.layers[i][t][f"A_{s}"]
                    param.copy_(a.to(param.device, param.dtype))

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        covs = input_covariances(module, experience, self.statistics_transform)
        # L322: the threshold of task t (0-based) of T
        threshold = (self.lame - self.lamb) * experience.index / experience.n_experiences + self.lamb
        self.bases, self.kinds = dual_gpm_update(self.bases, self.kinds, covs, threshold)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "bases": [b.clone() for b in self.bases], "kinds": list(self.kinds)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.bases = [b.float().cpu() for b in state.get("bases", [])]
        self.kinds = list(state.get("kinds", []))

    def __repr__(self) -> str:
        return (f"InfLoRA(rank={self.rank}, lamb={self.lamb}, lame={self.lame}, "
                f"statistics_transform={self.statistics_transform})")
