"""StepClock: the mean wall time of a reconstruction step, Fisher refreshes excluded."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class StepClock(Callback):
    """Times each step from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, loss,
    backward, optimizer). Placed after :class:`fimaq.callbacks.FisherRefresh`, whose refreshes run in
    ``on_train_batch_start``, so they are not counted. No device synchronisation: on a GPU the
    per-step times are host times, their mean over many steps the device's pace."""

    def __init__(self) -> None:
        self.started = 0.0
        self.total = 0.0
        self.steps = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self.total += time.perf_counter() - self.started
        self.steps += 1

    @property
    def mean_seconds(self) -> float:
        return self.total / max(1, self.steps)
