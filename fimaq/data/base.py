"""What fimaq's stages need of a data module, and the model it serves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from fimaq.config import check_model_kwargs
from fimaq.data.synthetic import SYNTHETIC_FILE, shifted_views, synthesize_images
from fimaq.errors import FimaqError, require_int


class PTQDataModule(L.LightningDataModule):
    """Base of fimaq's data modules: calibration and reconstruction tensors beside the usual loaders.

    ``arch`` and ``model_kwargs`` are the model's: the command line links them from ``--model.arch``
    and ``--model.model_kwargs``, so that input size and transforms follow the model. A data module of
    your own subclasses this class and accepts both arguments.

    With ``synthetic`` the calibration and reconstruction images are optimised from noise by the float
    model (:mod:`fimaq.data.synthetic`, docs/synthetic.md) instead of read from the data: the stages
    call :meth:`use_synthetic` with the model first, and ``calibration_tensors`` and
    ``reconstruction_tensors`` return :meth:`synthetic_tensors` when it is not None (a data module of
    your own does the same). Validation still uses the real images.

    Args:
        arch: timm model name of the model the images are for.
        model_kwargs: the model's ``timm.create_model`` overrides (``img_size``, ``in_chans``, ...).
        synthetic: calibrate and reconstruct on images synthesised from the float model.
        synthetic_steps: Adam steps per chunk of synthetic images.
        synthetic_lr: Adam's initial learning rate for the synthetic images (cosine decay).
        synthetic_size: images optimised from noise (default: ``calib_size``); the rows of the
            reconstruction set beyond them are seeded shifted copies of them.
    """

    def __init__(
        self,
        arch: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        synthetic: bool = False,
        synthetic_steps: int = 20,
        synthetic_lr: float = 0.5,
        synthetic_size: int | None = None,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.model_kwargs = check_model_kwargs(model_kwargs)
        if not isinstance(synthetic, bool):
            raise FimaqError(f"synthetic must be true or false, got {synthetic!r}")
        require_int("synthetic_steps", synthetic_steps, 0)
        lr_ok = isinstance(synthetic_lr, (int, float)) and not isinstance(synthetic_lr, bool)
        if not (lr_ok and 0 < synthetic_lr < float("inf")):
            raise FimaqError(f"synthetic_lr must be a positive number, got {synthetic_lr!r}")
        if synthetic_size is not None:
            require_int("synthetic_size", synthetic_size, 1, note=" or null")
        self.synthetic, self.synthetic_steps, self.synthetic_lr = synthetic, synthetic_steps, synthetic_lr
        self.synthetic_size = synthetic_size
        self._optimised: tuple[Tensor, Tensor] | None = None  # the synthetic images made from noise
        self._synthetic: tuple[Tensor, Tensor] | None = None  # and their shifted views, if more are needed

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

    def use_synthetic(
        self,
        model: nn.Module,
        reconstruction: bool = False,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        fingerprint: Mapping[str, Any] | None = None,
        write_cache: bool = True,
    ) -> bool:
        """With ``synthetic``: synthesise the calibration images (``reconstruction``: and the
        reconstruction images) from ``model`` computing in float; without: nothing.

        Args:
            model: the float network (quantizers, if any, are switched off while it synthesises).
            reconstruction: also the reconstruction images (the calibration images are their first rows).
            cache_dir: the run folder: the images and the progress are kept in ``SYNTHETIC_FILE``
                there, so that an interrupted synthesis resumes and a finished one is reused.
            progress: show a progress bar.
            fingerprint: what identifies the model's weights (a cache of another model is not reused).
            write_cache: False: read the cache but do not write it (data-parallel ranks other than 0).

        Returns:
            Whether it added images to those it held (synthesised, read from the cache, or views).
        """
        if not self.synthetic:
            return False
        calib_size, recon_size = getattr(self, "calib_size", None), getattr(self, "recon_size", None)
        if not isinstance(calib_size, int) or (reconstruction and not isinstance(recon_size, int)):
            raise FimaqError(f"{type(self).__name__} keeps no calib_size/recon_size: synthetic needs both")
        n = max(calib_size, recon_size) if reconstruction else calib_size
        if self._synthetic is not None and self._synthetic[0].shape[0] >= n:
            return False
        seed, optimised = getattr(self, "seed", 0), min(n, self.synthetic_size or calib_size)
        if self._optimised is not None and self._optimised[0].shape[0] >= optimised:
            images, labels = self._optimised
            self._synthetic = shifted_views(images[:optimised], labels[:optimised], n, seed)
            return True
        self._optimised = synthesize_images(
            model,
            optimised,
            seed=seed,
            steps=self.synthetic_steps,
            lr=self.synthetic_lr,
            batch_size=getattr(self, "batch_size", 32),
            progress=progress,
            state_path=None if cache_dir is None else Path(cache_dir) / SYNTHETIC_FILE,
            fingerprint=fingerprint,
            write_state=write_cache,
        )
        self._synthetic = shifted_views(*self._optimised, n, seed)
        return True

    def synthetic_tensors(self, num_images: int) -> tuple[Tensor, Tensor] | None:
        """The first ``num_images`` synthetic images and their target classes with ``synthetic``
        (after :meth:`use_synthetic`), None without."""
        if not self.synthetic:
            return None
        have = 0 if self._synthetic is None else self._synthetic[0].shape[0]
        if have < num_images:
            raise FimaqError(
                f"synthetic=true: {num_images} images are needed but {have} were synthesised; the stages "
                "synthesise them from the model (from Python: call use_synthetic(model) first)"
            )
        images, labels = self._synthetic  # type: ignore[misc]
        return images[:num_images], labels[:num_images]

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
