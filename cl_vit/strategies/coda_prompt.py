"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023), as its official code implements it (GT-RIPL/CODA-Prompt models/zoo.py
``CodaPrompt`` L12-198, learners/prompt.py): in blocks 0-4 a prompt is a weighted sum of M components P_m (each
``length`` tokens), the weight of component m being cos(q * A_m, K_m) for the frozen model's query q, a key K_m and
an attention vector A_m; the first half of the prompt's tokens are prefix keys, the second half prefix values.

The pool of M components is split evenly over the experiences: experience t trains components [t M/T, (t+1) M/T)
(those before are used but detached, those after are not used), which are initialised by Gram-Schmidt against the
earlier ones when the experience starts (``process_task_count`` / ``gram_schmidt``, L51-131; the code's
"reinit in the spirit of continual learning"). Optional orthogonality loss mu * ||X X^T - I||^2 (mean) on K, A and P
(L178-184; mu = 0 in the published runs). Only the prompt components and the classifier train; the loss is the
cross-entropy over the current experience's classes (learners/prompt.py L29-34; configs/strategy/coda_prompt.yaml
sets ``loss.mask_old_logits``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError, UserError
from cl_vit.strategies.base import register_strategy
from cl_vit.strategies.prompting import PromptStrategy

log = logging.getLogger("cl_vit")


def gram_schmidt(vv: torch.Tensor, s: int, f: int) -> torch.Tensor:
    """zoo.py ``gram_schmidt``: rows [0, s) kept, rows [s, f) drawn from N(0, I) and orthogonalised against all rows
    before them, then normalised; rows from f on are zero. 3-D tensors are flattened per row."""
    shape = vv.shape
    vv = vv.reshape(shape[0], -1).T
    uu = torch.zeros_like(vv)
    uu[:, :s] = vv[:, :s]
    for k in range(s, f):
        vk = torch.randn_like(vv[:, k])
        prev = uu[:, :k]
        prev = prev[:, (prev * prev).sum(0) >= 1e-8]  # zero rows have no direction to remove (the official redraws)
        uu[:, k] = vk - prev @ ((prev.T @ vk) / (prev * prev).sum(0))
    uu[:, s:f] = uu[:, s:f] / uu[:, s:f].norm(dim=0, keepdim=True)
    return uu.T.reshape(shape)


def ortho_penalty(t: torch.Tensor) -> torch.Tensor:
    """zoo.py L197-198: mean squared deviation of t t^T from the identity."""
    return ((t @ t.T - torch.eye(t.shape[0], device=t.device, dtype=t.dtype)) ** 2).mean()


class CodaPromptPool(nn.Module):
    def __init__(self, emb_d: int, pool_size: int, length: int, ortho_mu: float, layers=(0, 1, 2, 3, 4)):
        super().__init__()
        self.pool_size, self.length, self.ortho_mu, self.layers = pool_size, length, ortho_mu, list(layers)
        for e in self.layers:  # zoo.py L22-39: the full pool allocated up front, filled task by task
            setattr(self, f"e_p_{e}", nn.Parameter(torch.zeros(pool_size, length, emb_d)))
            setattr(self, f"e_k_{e}", nn.Parameter(torch.zeros(pool_size, emb_d)))
            setattr(self, f"e_a_{e}", nn.Parameter(torch.zeros(pool_size, emb_d)))
        self.register_buffer("task_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("n_tasks", torch.ones((), dtype=torch.long))

    def span(self) -> tuple[int, int]:
        pt = self.pool_size // int(self.n_tasks)
        return int(self.task_count) * pt, (int(self.task_count) + 1) * pt

    def start_task(self, index: int, n_tasks: int) -> None:
        if self.pool_size < n_tasks:
            raise UserError(f"CODA-Prompt splits its {self.pool_size} components over the {n_tasks} experiences: "
                            f"set strategy.coda_prompt.pool_size to at least {n_tasks}")
        self.n_tasks.fill_(n_tasks)
        self.task_count.fill_(index)
        s, f = self.span()
        names = ("p", "k", "a") if index == 0 else ("k", "a", "p")  # the official order of the draws
        with torch.no_grad():
            for e in self.layers:
                for n in names:
                    param = getattr(self, f"e_{n}_{e}")
                    param.copy_(gram_schmidt(param.detach(), s, f))

    def frozen_rows(self) -> dict[str, list[int]]:
        """The earlier experiences' components: used (detached) but never trained again (L149-153)."""
        s, _ = self.span()
        return {f"e_{n}_{e}": list(range(s)) for e in self.layers for n in ("p", "k", "a")} if s else {}

    def forward(self, query: torch.Tensor, layer: int, train: bool = False):
        if layer not in self.layers:
            return None, query.new_zeros(())
        K, A, p = (getattr(self, f"e_{n}_{layer}") for n in ("k", "a", "p"))
        s, f = self.span()
        if train:  # L149-157: earlier components used but frozen, later ones unused
            K, A, p = (torch.cat((t[:s].detach(), t[s:f])) for t in (K, A, p))
        else:
            K, A, p = K[:f], A[:f], p[:f]
        a_query = torch.einsum("bd,kd->bkd", query, A)
        weights = torch.einsum("bkd,kd->bk", F.normalize(a_query, dim=2), F.normalize(K, dim=1))
        P = torch.einsum("bk,kld->bld", weights, p)
        i = self.length // 2
        loss = query.new_zeros(())
        if train and self.ortho_mu > 0:
            loss = self.ortho_mu * (ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(p.reshape(p.shape[0], -1)))
        return (P[:, :i], P[:, i:]), loss


@register_strategy
class CodaPrompt(PromptStrategy):
    name = "coda_prompt"

    def __init__(self, pool_size: int = 100, length: int = 8, ortho_mu: float = 0.0, first_session: bool = False):
        for key, value in (("pool_size", pool_size), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (key == "length" and value < 2):
                raise ConfigError(f"strategy.coda_prompt.{key}", value, "an integer >= 1 (length >= 2)")
        if isinstance(ortho_mu, bool) or not isinstance(ortho_mu, (int, float)) or ortho_mu < 0:
            raise ConfigError("strategy.coda_prompt.ortho_mu", ortho_mu, "a number >= 0")
        self.pool_size, self.length, self.ortho_mu = pool_size, length, float(ortho_mu)
        self._set_first_session("coda_prompt", first_session)

    def make_prompt(self, emb_d: int, depth: int) -> nn.Module:
        if self.pool_size > emb_d:
            log.warning("CODA-Prompt: %d components with %d-dimensional keys; Gram-Schmidt makes at most %d of them "
                        "orthogonal, the rest are normalised round-off: set strategy.coda_prompt.pool_size <= %d",
                        self.pool_size, emb_d, emb_d, emb_d)
        # zoo.py L46: blocks 0-4
        return CodaPromptPool(emb_d, self.pool_size, self.length, self.ortho_mu, [b for b in range(5) if b < depth])

    def __repr__(self) -> str:
        return (f"CodaPrompt(pool_size={self.pool_size}, length={self.length}, ortho_mu={self.ortho_mu}, "
                f"first_session={self.first_session})")
