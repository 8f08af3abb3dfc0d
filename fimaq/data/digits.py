"""scikit-learn's 8x8 handwritten digits as a tiny, offline image data set for ViT quantization.

The data ships inside the scikit-learn wheel, so tests and demos run without network access. The
preprocessing below is a fixed recipe (stratified 75/25 split, bilinear upsampling, channel repeat,
normalisation to [-1, 1]) so that checkpoints trained on it and tensors derived from it are
bit-reproducible.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from fimaq.data.base import InMemoryDataModule
from fimaq.errors import FimaqError, require_int

log = logging.getLogger(__name__)

NUM_SAMPLES = 1797
NUM_TRAIN = 1347
NUM_VAL = NUM_SAMPLES - NUM_TRAIN
NUM_CLASSES = 10
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def _prepare_images(images: np.ndarray, img_size: int, in_chans: int) -> Tensor:
    """Turn raw 0..16 digit images into normalised float32 tensors.

    Args:
        images: Array of shape ``(N, 8, 8)`` with values in ``[0, 16]``.
        img_size: Output side length; bilinear upsampling is skipped when it is 8.
        in_chans: Number of output channels (the grey channel is repeated).

    Returns:
        Contiguous float32 tensor of shape ``(N, in_chans, img_size, img_size)`` in ``[-1, 1]``.
    """
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 16.0
    if img_size != 8:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    x = x.repeat(1, in_chans, 1, 1)
    x = (x - 0.5) / 0.5
    return x.contiguous().to(torch.float32)


class DigitsDataModule(InMemoryDataModule):
    """Lightning data module over scikit-learn's ``load_digits`` (1347 train / 450 val images).

    Calibration and reconstruction sets are drawn from the training split with one seeded
    permutation, so the calibration images are exactly the first rows of the reconstruction images.
    """

    def __init__(
        self,
        arch: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        img_size: int | None = None,
        in_chans: int | None = None,
        calib_size: int = 128,
        recon_size: int = 1024,
        batch_size: int = 32,
        val_batch_size: int = 256,
        seed: int = 3407,
        num_workers: int = 0,
        synthetic: bool = False,
        synthetic_steps: int = 20,
        synthetic_lr: float = 0.5,
        synthetic_size: int | None = None,
    ) -> None:
        """Validate and store the options; tensors are built lazily in :meth:`setup`.

        Args:
            arch: The model's timm name (linked from ``--model.arch``).
            model_kwargs: The model's overrides (linked from ``--model.model_kwargs``): ``img_size``
                and ``in_chans`` there set the images' size and channels.
            img_size: Side length the 8x8 digits are upsampled to (at least 8); default: the model's
                ``img_size``, else 32.
            in_chans: Channels of the produced images, 1 (grey) or 3 (grey repeated); default: the
                model's ``in_chans``, else 3.
            calib_size: Number of training images used for calibration (1..1347).
            recon_size: Number of training images used for block reconstruction (1..1347).
            batch_size: Batch size of the train, calibration and reconstruction loaders.
            val_batch_size: Batch size of the validation and test loaders.
            seed: Seed of the calibration/reconstruction permutation and the train shuffle.
            num_workers: Worker processes of every data loader.
            synthetic: Calibrate and reconstruct on images synthesised from the float model
                (docs/synthetic.md); validation still uses the real images.
            synthetic_steps: Adam steps per chunk (``batch_size`` images) of synthetic images.
            synthetic_lr: Adam's initial learning rate for the synthetic images (cosine decay).
            synthetic_size: Synthetic images optimised from noise (default: ``calib_size``); the
                reconstruction rows beyond them are seeded shifted copies of them.
        """
        super().__init__(arch, model_kwargs, synthetic, synthetic_steps, synthetic_lr, synthetic_size)
        img_size = self._from_model("img_size", img_size, 32)
        in_chans = self._from_model("in_chans", in_chans, 3)
        require_int("img_size", img_size, 8)
        if in_chans not in (1, 3):
            raise FimaqError(f"in_chans must be 1 or 3, got {in_chans!r}")
        split = " (digits train split)"
        self._keep_settings(
            calib_size, recon_size, batch_size, val_batch_size, seed, num_workers, NUM_TRAIN, split
        )
        self.save_hyperparameters()
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = NUM_CLASSES
        self._train: tuple[Tensor, Tensor] | None = None
        self._val: tuple[Tensor, Tensor] | None = None
        self._calib: tuple[Tensor, Tensor] | None = None
        self._recon: tuple[Tensor, Tensor] | None = None

    def _from_model(self, key: str, value: int | None, default: int) -> int:
        """An image setting from the model's kwargs unless given here (then both must agree)."""
        model_value = self.model_kwargs.get(key)
        if value is None:
            return default if model_value is None else model_value
        if model_value is not None and model_value != value:
            raise FimaqError(f"data {key}={value} differs from the model's {key}={model_value}")
        return value

    def setup(self, stage: str | None = None) -> None:
        """Build all tensors once; later calls are no-ops.

        Args:
            stage: Lightning stage name (ignored: every split is built together).
        """
        if self._train is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images, targets = digits.images, digits.target
        train_idx, test_idx = train_test_split(
            np.arange(len(targets)),
            test_size=TEST_FRACTION,
            random_state=SPLIT_SEED,
            stratify=targets,
        )
        labels = torch.from_numpy(targets.astype(np.int64))
        train_x = _prepare_images(images[train_idx], self.img_size, self.in_chans)
        train_y = labels[torch.from_numpy(train_idx)].contiguous()
        val_x = _prepare_images(images[test_idx], self.img_size, self.in_chans)
        val_y = labels[torch.from_numpy(test_idx)].contiguous()
        perm = torch.from_numpy(np.random.RandomState(self.seed).permutation(len(train_idx)))
        calib_idx, recon_idx = perm[: self.calib_size], perm[: self.recon_size]
        self._train = (train_x, train_y)
        self._val = (val_x, val_y)
        self._calib = (train_x[calib_idx].contiguous(), train_y[calib_idx].contiguous())
        self._recon = (train_x[recon_idx].contiguous(), train_y[recon_idx].contiguous())
        if rank_zero_only.rank == 0:
            log.info(
                "digits: %d train, %d val, %d calib, %d recon images of %dx%dx%d",
                len(train_x),
                len(val_x),
                self.calib_size,
                self.recon_size,
                self.in_chans,
                self.img_size,
                self.img_size,
            )

    def _built(self) -> tuple[tuple[Tensor, Tensor], ...]:
        self.setup()
        assert self._train is not None and self._val is not None
        assert self._calib is not None and self._recon is not None
        return self._train, self._val, self._calib, self._recon

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the full training split (images, labels) in split order."""
        return self._built()[0]

    def val_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the 450 validation/test images and labels."""
        return self._built()[1]

    def calibration_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the calibration images and labels (the first rows of the reconstruction set)."""
        synthetic = self.synthetic_tensors(self.calib_size)
        if synthetic is not None:
            return synthetic
        return self._built()[2]

    def reconstruction_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the reconstruction images and labels in permutation order."""
        synthetic = self.synthetic_tensors(self.recon_size)
        if synthetic is not None:
            return synthetic
        return self._built()[3]
