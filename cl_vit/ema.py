"""Model EMA (``ema.decay``): an exponential moving average of the network's weights, timm's ``ModelEmaV3``.

Updated after every optimiser step with a constant decay (``ModelEmaV3.update(model)`` without a step, as timm's
ModelEma in DeiT-LT's and Refiner-ViT's main.py); at the end of each experience the average replaces the network's
weights, so the evaluation, the checkpoint and the next experience see the EMA model. Off by default: DeiT-LT keeps an
EMA (decay 0.99996) but evaluates and selects the model itself; Refiner-ViT's recipes (decay 0.99996) turn it on.
"""
from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from timm.utils import ModelEmaV3


class ModelEma(Callback):
    def __init__(self, decay: float):
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"ema.decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.ema: ModelEmaV3 | None = None
        self._step = -1
        self._restored: dict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        # one average per experience, started from the network as the experience starts (the previous average)
        self.ema = ModelEmaV3(pl_module.net, decay=self.decay, foreach=False)
        if self._restored is not None:  # a resume inside the experience: the average so far
            self.ema.module.load_state_dict(self._restored)
            self._restored = None
        self._step = trainer.global_step

    # part of the checkpoint written inside an experience (cl_vit.runner: checkpoint_every_epochs, a signal)
    def state_dict(self) -> dict:
        return {"average": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state.get("average")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._step:  # an optimiser step happened (not a gradient-accumulation batch)
            self._step = trainer.global_step
            self.ema.update(pl_module.net)

    def on_fit_end(self, trainer, pl_module) -> None:  # also when a resume finds the training done
        pl_module.net.load_state_dict(self.ema.module.state_dict())
