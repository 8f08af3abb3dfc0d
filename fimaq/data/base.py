"""What fimaq's stages need of a data module, and the model it serves."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from fimaq.config import check_model_kwargs
from fimaq.errors import FimaqError, require_int


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
        self.arch = arch
        self.model_kwargs = check_model_kwargs(model_kwargs)

    def _keep_settings(
        self,
        calib_size: int,
        recon_size: int,
        batch_size: int,
        val_batch_size: int,
        seed: int,
        num_workers: int,
        max_images: int | None = None,
        note: str = "",
    ) -> None:
        """Check and keep the set sizes, batch sizes, seed and workers that fimaq's data modules take
        (``max_images``: how many training images the calibration and reconstruction sets draw from,
        ``note`` says which)."""
        for name, value in (("calib_size", calib_size), ("recon_size", recon_size)):
            require_int(name, value, 1, max_images, note=note)
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            require_int(name, value, 1)
        require_int("num_workers", num_workers, 0)
        self.calib_size, self.recon_size = calib_size, recon_size
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.seed, self.num_workers = seed, num_workers

    def check_model(self, num_classes: int) -> None:
        """Refuse, before any work, data whose labels a model with ``num_classes`` outputs cannot
        score. A data module that knows its class count sets ``num_classes``; the base checks it."""
        have = getattr(self, "num_classes", None)
        if isinstance(have, int) and have > num_classes:
            raise FimaqError(
                f"the data has {have} classes but the model has num_classes={num_classes}: "
                f"{self.class_names(num_classes)}give the model's num_classes in --model.model_kwargs"
            )

    def class_names(self, start: int) -> str:
        """``"classes beyond the model's: a, b; "`` for the classes from index ``start`` on, where the
        data module knows their names (else empty)."""
        return ""

    def calibration_tensors(self) -> tuple[Tensor, Tensor]:
        """Calibration images (already transformed) and labels."""
        raise NotImplementedError

    def reconstruction_tensors(self) -> tuple[Tensor, Tensor]:
        """Reconstruction images (already transformed) and labels; the first rows are the calibration
        images."""
        raise NotImplementedError


class InMemoryDataModule(PTQDataModule):
    """A :class:`PTQDataModule` whose splits are in-memory tensors: the loaders of every split.

    Subclasses set ``batch_size``, ``val_batch_size``, ``num_workers`` and ``seed`` and implement
    ``train_tensors``, ``val_tensors``, ``calibration_tensors`` and ``reconstruction_tensors``.
    """

    batch_size: int
    val_batch_size: int
    num_workers: int
    seed: int

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def val_tensors(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _loader(self, tensors: tuple[Tensor, Tensor], batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) loader over the training split, for training the float model."""
        return self._loader(self.train_tensors(), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Loader over the validation images, in fixed order."""
        return self._loader(self.val_tensors(), self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader` (there is no separate test split)."""
        return self.val_dataloader()

    def calib_dataloader(self) -> DataLoader:
        """Loader over the calibration set, not shuffled."""
        return self._loader(self.calibration_tensors(), self.batch_size, shuffle=False)

    def recon_dataloader(self) -> DataLoader:
        """Loader over the reconstruction set, not shuffled."""
        return self._loader(self.reconstruction_tensors(), self.batch_size, shuffle=False)
