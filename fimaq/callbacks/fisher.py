"""FisherRefresh: decides when the statistics are refreshed; the module's estimator does the work."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
from lightning.pytorch.callbacks import Callback


class FisherRefresh(Callback):
    """Call ``pl_module.refresh_fisher()`` before the optimisation steps in ``steps``.

    Args:
        steps: 0-based step indices (``FisherConfig.refresh_steps``: mode ``q`` every
            ``iters // k`` steps, mode ``qf`` the first k steps).
    """

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = sorted(set(steps))
        self.fired: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step in self.steps and step not in self.fired:
            pl_module.refresh_fisher()
            self.fired.append(step)
