"""Fine-tuning: the classification loss alone (a lower bound of forgetting-prone learning).

The loss itself belongs to the module (``loss.name`` ce or bce; ``loss.mask_old_logits`` for CODA-Prompt's FT++),
so ``finetune`` adds nothing; the ``ftpp`` and ``joint`` configs set those protocol switches around it.
"""
from cl_vit.strategies.base import Strategy, register_strategy


@register_strategy
class Finetune(Strategy):
    name = "finetune"
    uint8_batches = True
