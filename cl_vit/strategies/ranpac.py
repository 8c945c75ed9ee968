"""RanPAC (McDonnell et al., "RanPAC: Random Projections and Pre-trained Models for Continual Learning", NeurIPS
2023): adapt the pre-trained backbone in the first experience only, then freeze it; classify with a ridge regression
on randomly projected embeddings, h = ReLU(f W_rand), whose Gram matrix G = sum h h^T and Q = sum h y^T accumulate
over experiences, W = (G + lambda I)^-1 Q.

As the official code (RanPAC/RanPAC RanPAC.py, ``Learner``):

* first session (``_train`` L225-238): a parameter-efficient module added to the pre-trained ViT is trained together
  with a cosine classifier with a learnt scale (inc_net.py ``CosineLinear`` L9-48), nothing else of the backbone;
  then the backbone is frozen for good. The module is SSF on ImageNet-R and AdaptFormer (64-dim bottleneck) on
  CIFAR-100 (args/imagenetr_publish.csv and args/cifar224_publish.csv row 7; ``petl``, cl_vit/models/petl.py): the
  SSF backbone freezes all but ``ssf_scale`` / ``ssf_shift`` (RanPAC.py L184-185, L226-227), the adapter backbone all
  but the adapters (petl/vision_transformer_adapter.py L404-409). ``petl=null`` trains the backbone parameters
  selected by ``params`` instead (every one by default; LayerNorm affine + biases is the suite's earlier stand-in).
  The optimiser is plain momentum SGD over every parameter of the network, weight decay on all of them (L231;
  recipes: ``optimizer.filter_bias_and_bn=false``, ``optimizer.nesterov=false``), momentum 0.9, lr 0.01, cosine to 0
  stepped once per epoch (L232, L279; ``scheduler.name=cosine_epoch``), 20 epochs, batch 48 (args/*_publish.csv:
  body_lr 0.01, tuned_epoch 20, batch_size 48, weight_decay 5e-4, min_lr 0);
* ``setup_RP`` (L246-260): W_rand ~ N(0, 1) of shape D x M, M = 10000 (args/*_publish.csv column M); M = 0 means
  no projection (the features themselves, no ReLU);
* ``replace_fc`` (L91-126), after every experience: Q += H^T Y, G += H^T H over the experience's training images,
  lambda chosen by ``optimise_ridge_parameter`` (L138-150) on *this experience's* data alone: lambda in
  10^-8 ... 10^8, fit on the first 80% of the (shuffled) images, the one with the least mean squared error on the
  remaining 20%; then ``W = solve(G + lambda I, Q)``, float32 as there.

The Gram matrix and the ridge come from the training images under the test transform (``statistics_transform=test``;
RanPAC.py L167 ``mode="test"``). Not here: the VPT first session (the official cars and OmniBenchmark rows).

State: the projection and the ridge weights live in the classifier (``net.head.W_rand``, ``net.head.rp_weight``),
G, Q and the chosen lambdas in the strategy's state; both are in every experience checkpoint.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cl_vit.errors import ConfigError
from cl_vit.models.petl import PETL_PARAMS, add_adaptformer, add_ssf
from cl_vit.strategies.base import ExperienceInfo, Strategy, register_strategy
from cl_vit.strategies.embeddings import (check_statistics_transform, embedding_dim, experience_embeddings, freeze,
                                          replace_classifier)
from cl_vit.strategies.selection import freeze_unselected, select_parameters

#: RanPAC.py L139: ``ridges = 10.0 ** np.arange(-8, 9)``
RIDGES = tuple(float(r) for r in 10.0 ** np.arange(-8, 9))


def ridge_solution(G: torch.Tensor, Q: torch.Tensor, ridge: float) -> torch.Tensor:
    """W (classes x M) with W^T = (G + ridge I)^-1 Q (``torch.linalg.solve``, better conditioned than an inverse)."""
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * eye, Q).T


def choose_ridge(H: torch.Tensor, Y: torch.Tensor, ridges: Sequence[float] = RIDGES, fit_fraction: float = 0.8
                 ) -> float:
    """The ridge of least validation MSE: fit on the first ``int(N * 0.8)`` rows, validate on the rest (L140-148)."""
    n_fit = int(H.shape[0] * fit_fraction)
    G, Q = H[:n_fit].T @ H[:n_fit], H[:n_fit].T @ Y[:n_fit]
    losses = [F.mse_loss(H[n_fit:] @ ridge_solution(G, Q, r).T, Y[n_fit:]).item() for r in ridges]
    return float(ridges[int(np.argmin(losses))])


class RandomProjectionHead(nn.Module):
    """The first session's trainable cosine classifier, then (``use_rp``) ``ReLU(f W_rand) W^T``."""

    def __init__(self, in_features: int, n_classes: int, M: int):
        super().__init__()
        self.in_features, self.out_features, self.M = in_features, n_classes, M
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        stdv = 1.0 / in_features ** 0.5  # CosineLinear.reset_parameters
        nn.init.uniform_(self.weight, -stdv, stdv)
        self.register_buffer("W_rand", torch.zeros(in_features, M))
        self.register_buffer("rp_weight", torch.zeros(n_classes, M or in_features))
        self.register_buffer("use_rp", torch.zeros((), dtype=torch.bool))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.W_rand.to(x.dtype)) if self.M > 0 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.use_rp):  # float32 as the official code: a 10000-wide product in bf16 loses the ridge solution
            dtype = torch.promote_types(self.rp_weight.dtype, torch.float32)  # float64 under trainer.precision=64-true
            with torch.autocast(x.device.type, enabled=False):
                return self.features(x.to(dtype)) @ self.rp_weight.to(dtype).T
        return self.sigma * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


@register_strategy
class RanPAC(Strategy):
    name = "ranpac"

    def __init__(self, M: int = 10000, first_session: bool = True, params: Sequence[str] | None = None,
                 ridges: Sequence[float] = RIDGES, fit_fraction: float = 0.8, petl: str | None = None,
                 adapter_bottleneck: int = 64, statistics_transform: str = "test"):
        if isinstance(M, bool) or not isinstance(M, int) or M < 0:
            raise ConfigError("strategy.ranpac.M", M, "an integer >= 0 (0: no random projection)")
        if not ridges or any(not isinstance(r, (int, float)) or r <= 0 for r in ridges):
            raise ConfigError("strategy.ranpac.ridges", ridges, "a list of positive numbers")
        if not 0 < fit_fraction < 1:
            raise ConfigError("strategy.ranpac.fit_fraction", fit_fraction, "a number in (0, 1)")
        if petl is not None and petl not in PETL_PARAMS:
            raise ConfigError("strategy.ranpac.petl", petl, f"one of {list(PETL_PARAMS)} or null (train `params`)")
        if petl is not None and params is not None:
            raise ConfigError("strategy.ranpac.params", params, f"null with petl={petl} (it trains its own modules)")
        if isinstance(adapter_bottleneck, bool) or not isinstance(adapter_bottleneck, int) or adapter_bottleneck < 1:
            raise ConfigError("strategy.ranpac.adapter_bottleneck", adapter_bottleneck, "an integer >= 1")
        self.M, self.first_session = M, bool(first_session)
        self.petl, self.adapter_bottleneck = petl, adapter_bottleneck
        params = PETL_PARAMS[petl] if petl else ("*",) if params is None else params
        self.patterns = [params] if isinstance(params, str) else list(params)
        self.statistics_transform = check_statistics_transform(statistics_transform, self.name)
        self.ridges, self.fit_fraction = [float(r) for r in ridges], float(fit_fraction)
        self.G: torch.Tensor | None = None
        self.Q: torch.Tensor | None = None
        self.chosen: list[float] = []
        self.head: RandomProjectionHead | None = None
        self._params: list[str] = []

    def setup(self, module) -> None:
        self.head = RandomProjectionHead(embedding_dim(module.net), module.n_classes, self.M)
        replace_classifier(module.net, self.head)
        if self.first_session and self.petl == "ssf":  # without a first session, the plain backbone ("ncm" rows)
            add_ssf(module.net)
        elif self.first_session and self.petl == "adaptformer":
            add_adaptformer(module.net, self.adapter_bottleneck)
        if self.first_session:
            self._params = list(select_parameters(module.net, self.patterns, key="strategy.ranpac.params"))

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        if self.first_session and experience.index == 0 and self.G is None:
            freeze_unselected(module.net, self._params)  # the selection and the cosine classifier
        else:
            freeze(module.net)  # the runner skips the fit

    def after_experience(self, module, experience: ExperienceInfo) -> None:
        freeze(module.net)
        gen = torch.Generator().manual_seed(torch.initial_seed() % (2**63 - 1))  # same on every process and resume
        if self.G is None:
            dim = self.M or self.head.in_features
            with torch.no_grad():
                if self.M > 0:
                    self.head.W_rand.copy_(torch.randn(self.head.in_features, self.M, generator=gen))
                self.head.use_rp.fill_(True)
            wide = torch.promote_types(self.head.W_rand.dtype, torch.float32)  # float64 under 64-true
            self.G, self.Q = torch.zeros(dim, dim, dtype=wide), torch.zeros(dim, module.n_classes, dtype=wide)
        feats, labels = experience_embeddings(module, experience, self.statistics_transform)
        with torch.no_grad():
            H = self.head.features(feats.to(self.head.W_rand.device, self.G.dtype)).cpu()
            Y = F.one_hot(labels, module.n_classes).to(H.dtype)
            self.Q += H.T @ Y
            self.G += H.T @ H
            order = torch.randperm(len(H), generator=gen)  # the official loader shuffles before the 80/20 split
            ridge = choose_ridge(H[order], Y[order], self.ridges, self.fit_fraction)
            self.head.rp_weight.copy_(ridge_solution(self.G, self.Q, ridge))
        self.chosen.append(ridge)

    def state_dict(self) -> dict:
        return {"G": self.G, "Q": self.Q, "ridges": list(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        self.G, self.Q = state.get("G"), state.get("Q")
        self.chosen = list(state.get("ridges", []))

    def __repr__(self) -> str:
        return f"RanPAC(M={self.M}, first_session={self.first_session}, petl={self.petl}, params={self.patterns})"
