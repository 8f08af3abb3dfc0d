"""Progress bars: Lightning's TQDM bar, cleared when a stage stops on an exception or an interruption
(so the line that says why is the last one printed), and a bar that names the unit being
reconstructed (``blocks.3 [5/14]``) instead of the epoch."""

from __future__ import annotations

from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar; on an exception (an interruption included) its open bars are closed at
    once instead of when the process exits, after the error line."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        for name in ("train", "val", "test", "predict"):
            try:
                bar = getattr(self, f"{name}_progress_bar")
            except TypeError:  # (Lightning's way of saying that this bar was never opened)
                continue
            bar.leave = False
            bar.close()


class UnitProgressBar(ProgressBar):
    """Lightning's bar with a fixed description.

    Args:
        description: text shown left of the bar.
        refresh_rate: update every this many steps.
    """

    def __init__(self, description: str, refresh_rate: int = 10) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.description = description

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.description)

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {k.rsplit("/", 1)[-1]: v for k, v in items.items()}
