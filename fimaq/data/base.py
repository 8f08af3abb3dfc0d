"""What fimaq's stages need of a data module, and the model it serves."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import Tensor

from fimaq.errors import FimaqError


class PTQDataModule(L.LightningDataModule):
    """Base of fimaq's data modules: calibration and reconstruction tensors beside the usual loaders.

    ``arch`` and ``model_kwargs`` are the model's: the command line links them from ``--model.arch``
    and ``--model.model_kwargs``, so that input size and transforms follow the model. A data module of
    your own subclasses this class and accepts both arguments.

    Args:
        arch: timm model name of the model the images are for.
        model_kwargs: the model's ``timm.create_model`` overrides (``img_size``, ``in_chans``, ...).
    """

    def __init__(self, arch: str | None = None, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise FimaqError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})

    def calibration_tensors(self) -> tuple[Tensor, Tensor]:
        """Calibration images (already transformed) and labels."""
        raise NotImplementedError

    def reconstruction_tensors(self) -> tuple[Tensor, Tensor]:
        """Reconstruction images (already transformed) and labels; the first rows are the calibration
        images."""
        raise NotImplementedError
