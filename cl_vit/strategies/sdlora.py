"""SD-LoRA (Wu et al., "SD-LoRA: Scalable Decoupled Low-Rank Adaptation for Class Incremental Learning", ICLR 2025),
as its official code implements it (WuYichen-97/SD-Lora-CL @ 8bacded, backbone/lora.py, models/sdlora.py):

* per task t a rank-r term on the queries and on the values of every block's ``qkv`` (``LoRA_ViT_timm`` L331-353,
  ``_LoRA_qkv_timm_train`` L132-195); the update of the newest task T is alpha_T B_T A_T, every earlier one
  alpha_t B_t A_t / (||B_t|| ||A_t||): a fixed direction of unit size times a learnt magnitude (L183-191);
* the magnitudes alpha_t are one scalar per task for the whole network, every layer and both slices sharing it
  (``wrapped_param`` / ``wrapped_param_prev`` L326-328, handed to every layer L348-350);
* task T trains A_T, B_T (kaiming / zero init, L378-384), every magnitude alpha_0..alpha_T and the classifier
  (models/sdlora.py L114-118: SGD over ``self._network.parameters()``, the earlier A_t, B_t frozen, L168-178);
* each task starts its magnitudes anew at 0.8: ``update_network`` (models/sdlora.py L68-90) builds the network again
  for every task after the first, with ``wrapped_param_prev`` all 0.8, and nothing loads the values learnt before
  (``save_wrap_param`` is never called). ``carry_magnitudes=true`` keeps them instead (the paper's Algorithm 1
  reading, where alpha is learnt continually).

Where the paper (Eq. 3) and the code differ, the code is the default: an earlier direction is normalised by
||B|| ||A|| (``direction_norm=factors``; ``product``: ||B A||, the paper), the newest one trains unnormalised. The
orthogonality loss the code computes (``compute_ortho_loss`` L432-445) is not added to the training loss (models/
sdlora.py L235-236) and is not here; neither are the SD-LoRA-RR / -KD variants (rank=... per run only).
"""
from __future__ import annotations

import torch

from cl_vit.errors import ConfigError
from cl_vit.models.lora import DIRECTION_NORMS
from cl_vit.strategies.base import ExperienceInfo, register_strategy
from cl_vit.strategies.lora import LoRAStrategy


@register_strategy
class SDLoRA(LoRAStrategy):
    name = "sdlora"
    targets = ("q", "v")

    def __init__(self, rank: int = 10, magnitude_init: float = 0.8, carry_magnitudes: bool = False,
                 direction_norm: str = "factors"):
        super().__init__(rank)
        if isinstance(magnitude_init, bool) or not isinstance(magnitude_init, (int, float)):
            raise ConfigError("strategy.sdlora.magnitude_init", magnitude_init, "a number")
        if direction_norm not in DIRECTION_NORMS:
            raise ConfigError("strategy.sdlora.direction_norm", direction_norm, " or ".join(DIRECTION_NORMS))
        self.magnitude_init, self.carry_magnitudes = float(magnitude_init), bool(carry_magnitudes)
        self.direction_norm = direction_norm

    def lora_options(self) -> dict:
        return {"decoupled": True, "magnitude_init": self.magnitude_init, "direction_norm": self.direction_norm}

    def trainable(self, task: int) -> list[str]:
        terms = [f"layers.{i}.{task}.{m}_{s}" for i, sl in enumerate(self.lora.slices) for s in sl for m in "AB"]
        return terms + [f"magnitude.{t}" for t in range(task + 1)]

    def before_experience(self, module, experience: ExperienceInfo) -> None:
        super().before_experience(module, experience)
        if not self.carry_magnitudes:
            with torch.no_grad():
                for alpha in self.lora.magnitude:
                    alpha.fill_(self.magnitude_init)

    def __repr__(self) -> str:
        return (f"SDLoRA(rank={self.rank}, magnitude_init={self.magnitude_init}, "
                f"carry_magnitudes={self.carry_magnitudes}, direction_norm={self.direction_norm})")
