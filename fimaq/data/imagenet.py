"""ImageNet (or any ImageFolder tree) for post-training quantization of timm ViTs.

``root/train`` provides the calibration and reconstruction images (seeded subsets, passed through
timm's training transform with reproducible randomness), ``root/val`` the evaluation images (timm's
eval transform: resize by ``crop_pct``, centre crop, normalise). Images are decoded with PIL.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import fimaq  # noqa: F401  (torchvision shim before torchvision / timm)
from fimaq.data.base import PTQDataModule
from fimaq.errors import FimaqError, require_int

log = logging.getLogger(__name__)


def pil_rgb_loader(path: str) -> Image.Image:
    """Decode one image file to RGB with PIL.

    Args:
        path: Image file path.

    Returns:
        The decoded RGB image.

    Raises:
        FimaqError: The file cannot be read or is not a valid image.
    """
    try:
        with open(path, "rb") as handle, Image.open(handle) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise FimaqError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def resolve_timm_data_config(arch: str, model_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Data config (input size, interpolation, crop, mean/std) of a timm arch, ideally without building it.

    Args:
        arch: timm model name.
        model_kwargs: Model overrides; only ``img_size`` (int or ``(h, w)``) changes the data config.

    Returns:
        Keyword arguments for ``timm.data.create_transform``.

    Raises:
        FimaqError: ``arch`` is not a timm model name or ``img_size`` is malformed.
    """
    import timm
    from timm.data import resolve_data_config, resolve_model_data_config

    if not timm.is_model(arch):
        raise FimaqError(f"unknown arch '{arch}': not a timm model name")
    kwargs = dict(model_kwargs or {})
    args: dict[str, Any] = {}
    if kwargs.get("img_size") is not None:
        size = kwargs["img_size"]
        if isinstance(size, int):
            size = (size, size)
        if not (
            isinstance(size, (tuple, list))
            and len(size) == 2
            and all(isinstance(s, int) and s > 0 for s in size)
        ):
            raise FimaqError(f"model_kwargs.img_size must be a positive int or (height, width), got {size!r}")
        args["input_size"] = (3, int(size[0]), int(size[1]))  # PIL images are decoded to RGB
    pretrained_cfg = timm.get_pretrained_cfg(arch)
    if pretrained_cfg is not None:
        return dict(resolve_data_config(args=args, pretrained_cfg=pretrained_cfg.to_dict()))
    log.info("no pretrained config for %s: building the model once to read its data config", arch)
    from fimaq.models import create_fp_model

    model = create_fp_model(arch, model_kwargs=kwargs, weights_follow=True)  # only its data config
    return dict(resolve_model_data_config(model, args=args))


def _empty_class_folders(folder: Path) -> list[str]:
    """The class folders under ``folder`` without an image file ImageFolder would take."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        return []
    empty = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if not any(f.is_file() and f.name.lower().endswith(IMG_EXTENSIONS) for f in sub.rglob("*")):
            empty.append(sub.name)
    return empty


class _SeededTransformSubset(Dataset):
    """Items ``indices`` of an ImageFolder through a random transform seeded per item.

    Each item reseeds torch's and Python's global generators from ``seed`` and its dataset index, so
    the result is independent of iteration order, batching and worker processes.
    """

    def __init__(
        self, folder: Any, indices: list[int], transform: Callable[[Any], Tensor], seed: int
    ) -> None:
        self.folder = folder
        self.indices = indices
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Tensor, int]:
        index = self.indices[item]
        path, target = self.folder.samples[index]
        image = self.folder.loader(path)
        item_seed = self.seed * 1_000_003 + index
        torch.manual_seed(item_seed)
        random.seed(item_seed)
        return self.transform(image), target


class ImageNetDataModule(PTQDataModule):
    """ImageNet-style data module: seeded calibration/reconstruction subsets of ``train``, eval on ``val``."""

    def __init__(
        self,
        root: str,
        arch: str = "deit_small_patch16_224",
        model_kwargs: dict | None = None,
        calib_size: int = 128,
        recon_size: int = 1024,
        batch_size: int = 32,
        val_batch_size: int = 100,
        seed: int = 3407,
        num_workers: int = 4,
        val_limit: int | None = None,
        synthetic: bool = False,
        synthetic_steps: int = 20,
        synthetic_lr: float = 0.5,
        synthetic_size: int | None = None,
    ) -> None:
        """Check the folder layout and options; the folders are scanned in :meth:`setup`.

        Args:
            root: Directory holding ``train`` and ``val`` in torchvision ImageFolder layout.
            arch: timm model name whose pretrained data config defines the transforms.
            model_kwargs: Model overrides; only ``img_size`` is used here.
            calib_size: Number of training images used for calibration.
            recon_size: Number of training images used for block reconstruction.
            batch_size: Batch size of the calibration and reconstruction loaders.
            val_batch_size: Batch size of the validation loader.
            seed: Seed of the subset permutations and of the training-transform randomness.
            num_workers: Worker processes of every data loader.
            val_limit: Evaluate on a seeded subset of this many validation images (``None``: all).
            synthetic: Calibrate and reconstruct on images synthesised from the float model
                (docs/synthetic.md); validation still uses the real images, so ``root`` must still
                hold ``train`` and ``val`` (its train classes are still checked against the model).
            synthetic_steps: Adam steps per chunk (``batch_size`` images) of synthetic images.
            synthetic_lr: Adam's initial learning rate for the synthetic images (cosine decay).
            synthetic_size: Synthetic images optimised from noise (default: ``calib_size``); the
                reconstruction rows beyond them are seeded shifted copies of them.
        """
        super().__init__(arch, model_kwargs, synthetic, synthetic_steps, synthetic_lr, synthetic_size)
        self._keep_settings(calib_size, recon_size, batch_size, val_batch_size, seed, num_workers)
        if val_limit is not None:
            require_int("val_limit", val_limit, 1, note=" or null")
        root_path = Path(root).expanduser()
        if not root_path.is_dir():
            raise FimaqError(f"ImageNet root not found: {root_path}")
        missing = [split for split in ("train", "val") if not (root_path / split).is_dir()]
        if missing:
            raise FimaqError(
                f"ImageNet root {root_path} lacks the {' and '.join(missing)} folder(s) (ImageFolder layout)"
            )
        self.save_hyperparameters()
        self.root = root_path
        self.val_limit = val_limit
        self.data_config = resolve_timm_data_config(arch, self.model_kwargs)
        self._train_set: Any = None
        self.num_classes: int | None = None  # the train classes, once scanned
        self._val_set: Any = None
        self._calib_indices: list[int] = []
        self._recon_indices: list[int] = []
        self._val_indices: list[int] = []
        self._calib: tuple[Tensor, Tensor] | None = None
        self._recon: tuple[Tensor, Tensor] | None = None

    def train_transform(self) -> Callable[[Any], Tensor]:
        """timm's training transform (random resized crop, flip, colour jitter, normalise) for the arch."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=True)

    def eval_transform(self) -> Callable[[Any], Tensor]:
        """timm's eval transform (resize by ``crop_pct``, centre crop, normalise) for the arch."""
        from timm.data import create_transform

        return create_transform(**self.data_config, is_training=False)

    def _scan(self, split: str, transform: Callable[[Any], Tensor] | None) -> Any:
        from torchvision.datasets import ImageFolder

        folder = self.root / split
        try:
            dataset = ImageFolder(str(folder), transform=transform, loader=pil_rgb_loader)
        except (FileNotFoundError, RuntimeError) as exc:
            empty = _empty_class_folders(folder)
            if empty:
                shown = ", ".join(empty[:5]) + (f" (and {len(empty) - 5} more)" if len(empty) > 5 else "")
                raise FimaqError(
                    f"class folder(s) under {folder} hold no images: {shown} (every class folder needs at "
                    "least one image; remove the empty ones)"
                ) from None
            raise FimaqError(
                f"no images found under {folder} (ImageFolder layout: {folder}/<class>/<image>)"
            ) from exc
        if len(dataset) == 0:
            raise FimaqError(f"no images found under {folder}")
        return dataset

    def _label_val_like_train(self, train_set: Any, val_set: Any) -> None:
        """Label the val images by the train classes' names (ImageFolder numbers each split's own
        folders, so a val/ that lacks a class would shift the labels of the classes after it)."""
        extra = sorted(set(val_set.classes) - set(train_set.classes))
        if extra:
            raise FimaqError(
                f"{self.root / 'val'} has class folder(s) that {self.root / 'train'} lacks: "
                f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''} (val images are labelled by "
                "the names of the train classes)"
            )
        if val_set.classes == train_set.classes:
            return
        index = train_set.class_to_idx
        val_set.samples = [(path, index[val_set.classes[t]]) for path, t in val_set.samples]
        val_set.imgs = val_set.samples
        val_set.targets = [t for _, t in val_set.samples]
        val_set.classes, val_set.class_to_idx = list(train_set.classes), dict(index)
        held = len(set(val_set.targets))
        log.info("%s holds %d of the %d train classes", self.root / "val", held, len(index))

    def setup(self, stage: str | None = None) -> None:
        """Scan ``train`` and ``val`` once and draw the seeded subsets; later calls are no-ops.

        Args:
            stage: Lightning stage name (ignored).
        """
        if self._train_set is not None:
            return
        train_set = self._scan("train", None)
        val_set = self._scan("val", self.eval_transform())
        self._label_val_like_train(train_set, val_set)
        self.num_classes = len(train_set.classes)
        n_train = len(train_set)
        for name, value in (("calib_size", self.calib_size), ("recon_size", self.recon_size)):
            if value > n_train:
                raise FimaqError(f"{name}={value} exceeds the {n_train} images under {self.root / 'train'}")
        perm = np.random.RandomState(self.seed).permutation(n_train)
        self._calib_indices = [int(i) for i in perm[: self.calib_size]]
        self._recon_indices = [int(i) for i in perm[: self.recon_size]]
        n_val = len(val_set)
        if self.val_limit is None or self.val_limit >= n_val:
            if self.val_limit is not None:
                log.warning("val_limit=%d >= %d val images: evaluating on all of them", self.val_limit, n_val)
            self._val_indices = list(range(n_val))
        else:
            chosen = np.random.RandomState(self.seed).permutation(n_val)[: self.val_limit]
            self._val_indices = sorted(int(i) for i in chosen)
        self._train_set, self._val_set = train_set, val_set
        if rank_zero_only.rank == 0:
            log.info(
                "%s: %d train / %d val images (%d classes); calib %d, recon %d, eval %d; transforms of %s %s",
                self.root,
                n_train,
                n_val,
                len(train_set.classes),
                self.calib_size,
                self.recon_size,
                len(self._val_indices),
                self.arch,
                self.data_config,
            )

    def check_model(self, num_classes: int) -> None:
        """Scan the folders (once) and refuse more train classes than the model has outputs."""
        self.setup()
        super().check_model(num_classes)

    def class_names(self, start: int) -> str:
        extra = self._train_set.classes[start:]
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        return f"class folder(s) beyond the model's: {', '.join(extra[:5])}{more}; "

    def _materialise(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        subset = _SeededTransformSubset(self._train_set, indices, self.train_transform(), self.seed)
        loader = DataLoader(subset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
        images: list[Tensor] = []
        labels: list[Tensor] = []
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                for batch_images, batch_labels in loader:
                    images.append(batch_images)
                    labels.append(batch_labels.to(torch.int64))
        finally:
            random.setstate(py_state)
        return torch.cat(images).contiguous(), torch.cat(labels).contiguous()

    def calibration_tensors(self) -> tuple[Tensor, Tensor]:
        """Calibration images (training transform, reproducible) and labels, built once then cached."""
        synthetic = self.synthetic_tensors(self.calib_size)
        if synthetic is not None:
            return synthetic
        self.setup()
        if self._calib is None:
            if self._recon is not None:
                self._calib = (self._recon[0][: self.calib_size], self._recon[1][: self.calib_size])
            else:
                self._calib = self._materialise(self._calib_indices)
        return self._calib

    def reconstruction_tensors(self) -> tuple[Tensor, Tensor]:
        """Reconstruction images (training transform, reproducible) and labels, built once then cached.

        The first ``calib_size`` rows equal the calibration images.
        """
        synthetic = self.synthetic_tensors(self.recon_size)
        if synthetic is not None:
            return synthetic
        self.setup()
        if self._recon is None:
            self._recon = self._materialise(self._recon_indices)
        return self._recon

    def calib_dataloader(self) -> DataLoader:
        """Loader over the materialised calibration tensors, not shuffled."""
        return DataLoader(
            TensorDataset(*self.calibration_tensors()), batch_size=self.batch_size, shuffle=False
        )

    def recon_dataloader(self) -> DataLoader:
        """Loader over the materialised reconstruction tensors, not shuffled."""
        return DataLoader(
            TensorDataset(*self.reconstruction_tensors()), batch_size=self.batch_size, shuffle=False
        )

    def val_dataloader(self) -> DataLoader:
        """Loader over the (optionally seeded-subset) val split with the eval transform."""
        self.setup()
        dataset: Dataset = self._val_set
        if len(self._val_indices) != len(self._val_set):
            dataset = Subset(self._val_set, self._val_indices)
        return DataLoader(
            dataset,
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def test_dataloader(self) -> DataLoader:
        """Same as :meth:`val_dataloader`."""
        return self.val_dataloader()
