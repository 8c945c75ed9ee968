"""``strategy=cos_reg``: Refiner-ViT's attention-map diversity term (zhoudaquan/Refiner_ViT).

The official loss (loss/cross_entropy.py L22-36, ``SoftTargetCrossEntropyCosReg``, used when
``cos_reg_component > 0``, main.py L296, L581) adds

    0.1 * sum_{i < n} mean(cos(A_i, A_{i+1})) / n

to the classification loss, where ``A_i`` is the attention map block i passes on (models/refined_transformer.py
L430-434: ``atten_list`` collects every block's returned map; a share block returns the map it received) and the cosine
runs over the heads (``CosineSimilarity(dim=1)`` on [B, H, N, N]); n = 2, the loss's default ``n_comn``:
main.py L582 builds it without arguments, and ``cos_reg_component`` (12 in scripts/refiner_{s,m}.yaml, 0 in
refiner_l.yaml) only switches the term on (main.py L296, L735). In the shared layout a share block passes on the map
it received, so the first pair is one map twice (cosine 1, no gradient) and the second compares the first two attend
blocks' maps. Penalising similar consecutive maps keeps the blocks' attention diverse. The maps are read from the
training forward pass by forward hooks on the blocks (no second pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl_vit.errors import UserError
from cl_vit.strategies.base import Strategy, register_strategy


def cos_reg_loss(maps: list[torch.Tensor], n: int, weight: float = 0.1) -> torch.Tensor:
    """``weight * sum_{i < n} mean(cos_heads(maps[i], maps[i + 1])) / n`` (the official term, see the module doc)."""
    if len(maps) < n + 1:
        raise UserError(f"strategy.cos_reg.n_components={n} needs {n + 1} attention maps, the model passes on "
                        f"{len(maps)}: lower it or use a deeper model")
    total = sum(F.cosine_similarity(maps[i], maps[i + 1], dim=1).mean() for i in range(n))
    return weight * total / n


@register_strategy
class CosReg(Strategy):
    name = "cos_reg"
    uint8_batches = True

    def __init__(self, n_components: int = 2, weight: float = 0.1):
        if int(n_components) < 1:
            raise UserError(f"strategy.cos_reg.n_components={n_components} must be >= 1 (remove the strategy for none)")
        self.n, self.weight = int(n_components), float(weight)
        self._maps: list[torch.Tensor] = []
        self._hooks = []

    def setup(self, module) -> None:
        blocks = getattr(module.net, "blocks", None)
        if blocks is None or not all(hasattr(b, "is_share") for b in blocks) or module.net.layout != "shared":
            raise UserError("strategy cos_reg regularises the attention maps Refiner-ViT passes between blocks: use "
                            "model=refiner_vit_s/m/l (layout shared)")
        for blk in blocks:
            self._hooks.append(blk.register_forward_hook(self._keep))

    def _keep(self, block, inputs, output) -> None:
        if block.training and output[1] is not None:
            self._maps.append(output[1])

    def training_loss(self, module, batch: dict, outputs: dict) -> dict[str, torch.Tensor]:
        maps, self._maps = self._maps, []
        return {"cos_reg": cos_reg_loss(maps, self.n, self.weight)}
