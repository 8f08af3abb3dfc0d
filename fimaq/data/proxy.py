"""A harder offline proxy: coloured digits composited onto natural-photo crops (ten classes, 32x32 RGB).

On plain scikit-learn digits a 4-block DeiT is already at FP accuracy after calibration at W4/A4, and
every reconstruction loss lands within one validation digit of the others at W3/A3. This data set
keeps the labels and the offline guarantee of the digits but gives the images natural-image
statistics: the background is a random crop of one of the two photos scikit-learn ships
(``china.jpg`` and ``flower.jpg``, 427x640 RGB), so patch tokens carry texture, colour and edges
unrelated to the class, and the digit has to be told apart from them.

The recipe of one image (every draw from one seeded ``torch.Generator``, so a split is a pure
function of its seed):

* background: a square crop of side 32..112 px at a random position inside a random tile of the
  split's region (below) of a random photo, flipped
  horizontally and vertically with probability 1/2 each, resized to the output size (bilinear with
  antialiasing), then colour-jittered (brightness x0.7..1.3, contrast x0.5..1.2 about the crop mean,
  saturation x0.5..1.5 about the grey value);
* digit: the 8x8 digit's ink (0..16 scaled to 0..1) as an alpha mask, scaled so its 8x8 frame spans
  22..28 px, rotated by -10..10 degrees and placed at a random position with the unrotated frame
  inside the image (bilinear resampling). A wider range (16..28 px, -20..20 degrees) was tried first:
  a ViT of this size then needs far more than the training budget to learn the placements;
* colour: a random RGB colour shifted so that its luminance differs from the crop's mean luminance by
  0.25..0.55 (towards the side with more room), drawn with opacity 0.8..1.0;
* noise: Gaussian pixel noise with a standard deviation of 0..0.04; values clipped to [0, 1] and
  normalised to [-1, 1] like the digits.

Splits: the digits are split exactly as in :class:`~fimaq.data.DigitsDataModule` (the same stratified
1347/450 split), and the backgrounds come from disjoint regions of the photos. Each photo is cut into
a 3x4 grid of tiles (about 142x160 px); the tiles with ``(row + col + photo) % 4 == 1`` (three per
photo, spread over both photos' content: roof and sky, tree and water, foliage, petals and the
blurred leaves) hold the validation backgrounds, the other nine the training ones, and every crop
lies inside one tile. (A split into left and right columns was tried first: the right side of both
photos is mostly sky and blurred leaves, so validation backgrounds were plainer than training ones.)
The
training split renders every training digit once (seed ``TRAIN_RENDER_SEED``); the validation split
renders every validation digit ``val_copies`` times (seed ``VAL_RENDER_SEED``), so a validation
image is worth 100 / (450 * val_copies) points of top-1. :meth:`ProxyDataModule.render_train` renders
the training digits again with any seed (fresh composites per epoch for training a float model).

Decoding the JPEGs goes through Pillow; the images are bit-reproducible for a given Pillow/libjpeg.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from fimaq.data.base import InMemoryDataModule
from fimaq.data.digits import NUM_CLASSES, NUM_TRAIN, SPLIT_SEED, TEST_FRACTION
from fimaq.errors import FimaqError, require_int

log = logging.getLogger(__name__)

PHOTO_HEIGHT, PHOTO_WIDTH = 427, 640
TILE_ROWS, TILE_COLS = 3, 4
CROP_MIN, CROP_MAX = 32, 112
DIGIT_MIN, DIGIT_MAX = 22 / 32, 28 / 32  # digit frame side, as a fraction of the image side
MAX_ROTATION = math.radians(10.0)
TRAIN_RENDER_SEED = 1
VAL_RENDER_SEED = 2
LUMA = (0.299, 0.587, 0.114)


def load_photos() -> Tensor:
    """The two photos scikit-learn ships, as float32 ``(2, 3, 427, 640)`` in ``[0, 1]``."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    photos = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    if tuple(photos.shape) != (2, 3, PHOTO_HEIGHT, PHOTO_WIDTH):
        raise FimaqError(f"unexpected scikit-learn sample images of shape {tuple(photos.shape)}")
    return photos.contiguous()


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def is_val_tile(photo: int, row: int, col: int) -> bool:
    """Whether a tile of a photo holds validation backgrounds (else training ones)."""
    return (row + col + photo) % 4 == 1


def tiles(region: str) -> Tensor:
    """The tiles of a region as rows (photo, x0, y0, x1, y1) in photo pixels, end-exclusive.

    Args:
        region: ``"train"`` or ``"val"``.
    """
    if region not in ("train", "val"):
        raise FimaqError(f"region must be 'train' or 'val', got {region!r}")
    ys = [round(i * PHOTO_HEIGHT / TILE_ROWS) for i in range(TILE_ROWS + 1)]
    xs = [round(j * PHOTO_WIDTH / TILE_COLS) for j in range(TILE_COLS + 1)]
    rows = [
        (p, xs[c], ys[r], xs[c + 1], ys[r + 1])
        for p in range(2)
        for r in range(TILE_ROWS)
        for c in range(TILE_COLS)
        if is_val_tile(p, r, c) == (region == "val")
    ]
    return torch.tensor(rows, dtype=torch.long)


def _backgrounds(
    photos: Tensor, region: str, n: int, size: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Random crops of the photos from one region, flipped, resized and colour-jittered.

    Returns:
        Images ``(n, 3, size, size)`` in ``[0, 1]`` and boxes ``(n, 4)`` (photo, x0, y0, side).
    """
    region_tiles = tiles(region)
    tile = region_tiles[torch.randint(0, len(region_tiles), (n,), generator=gen)]
    photo, tx0, ty0, tx1, ty1 = tile.unbind(1)
    side = torch.randint(CROP_MIN, CROP_MAX + 1, (n,), generator=gen)
    x0 = tx0 + (torch.rand(n, generator=gen) * (tx1 - tx0 - side + 1)).long()
    y0 = ty0 + (torch.rand(n, generator=gen) * (ty1 - ty0 - side + 1)).long()
    flips = torch.rand(n, 2, generator=gen) < 0.5
    bright = _uniform(n, 0.7, 1.3, gen).view(n, 1, 1, 1)
    contrast = _uniform(n, 0.5, 1.2, gen).view(n, 1, 1, 1)
    saturation = _uniform(n, 0.5, 1.5, gen).view(n, 1, 1, 1)
    crops = []
    for i in range(n):
        p, x, y, s = int(photo[i]), int(x0[i]), int(y0[i]), int(side[i])
        crop = photos[p : p + 1, :, y : y + s, x : x + s]
        crops.append(
            F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        )
    bg = torch.cat(crops)
    bg = torch.where(flips[:, 0].view(n, 1, 1, 1), bg.flip(3), bg)
    bg = torch.where(flips[:, 1].view(n, 1, 1, 1), bg.flip(2), bg)
    bg = bg * bright
    bg = (bg - bg.mean(dim=(1, 2, 3), keepdim=True)) * contrast + bg.mean(dim=(1, 2, 3), keepdim=True)
    grey = (bg * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    bg = ((bg - grey) * saturation + grey).clamp(0.0, 1.0)
    return bg, torch.stack([photo, x0, y0, side], dim=1)


def _digit_alpha(digits: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Each 8x8 digit (ink in ``[0, 1]``) scaled, rotated and placed in a ``size`` x ``size`` mask."""
    n = len(digits)
    scale = _uniform(n, DIGIT_MIN, DIGIT_MAX, gen)  # frame side / image side
    angle = _uniform(n, -MAX_ROTATION, MAX_ROTATION, gen)
    # the frame's centre in normalised coordinates, at least half a frame from the border
    centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * (1 - scale).unsqueeze(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output coordinates p -> digit coordinates q = R(-angle) (p - centre) / scale
    a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1) / scale.view(n, 1, 1)
    b = -(a @ centre.unsqueeze(2))
    grid = F.affine_grid(torch.cat([a, b], 2), [n, 1, size, size], align_corners=False)
    return F.grid_sample(
        digits.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def composite(
    digits: Tensor, photos: Tensor, region: str, seed: int, img_size: int = 32, clutter: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Render digits onto photo crops from one region (the module docstring gives the recipe).

    Args:
        digits: Digit ink ``(N, 8, 8)`` in ``[0, 1]``.
        photos: The photos from :func:`load_photos`.
        region: ``"train"`` or ``"val"`` (the photo tiles the crops come from, see :func:`tiles`).
        seed: Seed of every random draw.
        img_size: Output side length.
        clutter: Scale of the background's texture about its mean colour: 1 is the recipe, 0 a flat
            background of the crop's mean colour (an easier start for training; the splits use 1).

    Returns:
        Images ``(N, 3, img_size, img_size)`` normalised to ``[-1, 1]`` and background boxes ``(N, 4)``
        (photo index, x0, y0, side) in photo pixels.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(digits)
    bg, boxes = _backgrounds(photos, region, n, img_size, gen)
    bg_mean = bg.mean(dim=(2, 3), keepdim=True)
    bg = bg_mean + clutter * (bg - bg_mean)
    alpha = _digit_alpha(digits, img_size, gen) * _uniform(n, 0.8, 1.0, gen).view(n, 1, 1, 1)
    luma = torch.tensor(LUMA)
    base = torch.rand(n, 3, generator=gen)
    bg_luma = (bg.mean(dim=(2, 3)) * luma).sum(1)
    delta = _uniform(n, 0.25, 0.55, gen)
    target = torch.where(bg_luma < 0.5, bg_luma + delta, bg_luma - delta)
    colour = (base + (target - (base * luma).sum(1)).unsqueeze(1)).clamp(0.0, 1.0)
    sigma = _uniform(n, 0.0, 0.04, gen).view(n, 1, 1, 1)
    noise = torch.randn(n, 3, img_size, img_size, generator=gen) * sigma
    x = (bg * (1 - alpha) + colour.view(n, 3, 1, 1) * alpha + noise).clamp(0.0, 1.0)
    return ((x - 0.5) / 0.5).contiguous(), boxes


class ProxyDataModule(InMemoryDataModule):
    """Lightning data module over the composited digits (1347 train / ``450 * val_copies`` val images).

    Same interface as :class:`~fimaq.data.DigitsDataModule`: calibration and reconstruction sets are
    drawn from the training split with one seeded permutation, so the calibration images are the
    first rows of the reconstruction images.
    """

    def __init__(
        self,
        arch: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        img_size: int | None = None,
        val_copies: int = 2,
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
                there sets the images' size; ``in_chans`` must be 3 if given.
            img_size: Side length of the RGB images (at least 8); default: the model's, else 32.
            val_copies: Renderings of each of the 450 validation digits (different crops and draws).
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
        model_size = self.model_kwargs.get("img_size")
        if img_size is None:
            img_size = 32 if model_size is None else model_size
        elif model_size is not None and model_size != img_size:
            raise FimaqError(f"data img_size={img_size} differs from the model's img_size={model_size}")
        if self.model_kwargs.get("in_chans", 3) != 3:
            raise FimaqError(
                f"the proxy images are RGB; the model has in_chans={self.model_kwargs['in_chans']}"
            )
        require_int("img_size", img_size, 8)
        require_int("val_copies", val_copies, 1)
        split = " (digits train split)"
        self._keep_settings(
            calib_size, recon_size, batch_size, val_batch_size, seed, num_workers, NUM_TRAIN, split
        )
        self.save_hyperparameters()
        self.img_size = img_size
        self.val_copies = val_copies
        self.num_classes = NUM_CLASSES
        self._digits: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._photos: Tensor | None = None
        self._sets: dict[str, tuple[Tensor, Tensor]] = {}
        self._boxes: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        """Build all tensors once; later calls are no-ops.

        Args:
            stage: Lightning stage name (ignored: every split is built together).
        """
        if self._sets:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        ink = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
        )
        train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
        self._digits = (ink[train_idx], labels[train_idx], ink[val_idx], labels[val_idx])
        self._photos = load_photos()
        train_x, self._boxes["train"] = composite(
            self._digits[0], self._photos, "train", TRAIN_RENDER_SEED, self.img_size
        )
        train_y = self._digits[1].clone()
        val_ink = self._digits[2].repeat(self.val_copies, 1, 1)
        val_x, self._boxes["val"] = composite(val_ink, self._photos, "val", VAL_RENDER_SEED, self.img_size)
        val_y = self._digits[3].repeat(self.val_copies)
        perm = torch.from_numpy(np.random.RandomState(self.seed).permutation(len(train_idx)))
        calib_idx, recon_idx = perm[: self.calib_size], perm[: self.recon_size]
        self._sets = {
            "train": (train_x, train_y),
            "val": (val_x, val_y),
            "calib": (train_x[calib_idx].contiguous(), train_y[calib_idx].contiguous()),
            "recon": (train_x[recon_idx].contiguous(), train_y[recon_idx].contiguous()),
        }
        if rank_zero_only.rank == 0:
            log.info(
                "proxy: %d train, %d val, %d calib, %d recon images of 3x%dx%d",
                len(train_x),
                len(val_x),
                self.calib_size,
                self.recon_size,
                self.img_size,
                self.img_size,
            )

    def _set(self, name: str) -> tuple[Tensor, Tensor]:
        self.setup()
        return self._sets[name]

    def render_train(self, seed: int, clutter: float = 1.0) -> tuple[Tensor, Tensor]:
        """The training digits rendered again with another seed (training-region backgrounds).

        Args:
            seed: Seed of the rendering; ``TRAIN_RENDER_SEED`` reproduces :meth:`train_tensors`.
            clutter: Background texture scale (see :func:`composite`); 1 is the splits' recipe.

        Returns:
            Images and labels in split order.
        """
        self.setup()
        assert self._digits is not None and self._photos is not None
        images, _ = composite(self._digits[0], self._photos, "train", seed, self.img_size, clutter)
        return images, self._digits[1].clone()

    def background_boxes(self, split: str) -> Tensor:
        """The background crop of every image of a split: ``(N, 4)`` rows (photo, x0, y0, side).

        Args:
            split: ``"train"`` or ``"val"``.
        """
        self.setup()
        if split not in self._boxes:
            raise FimaqError(f"split must be 'train' or 'val', got {split!r}")
        return self._boxes[split]

    def train_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the training split (images, labels) in split order."""
        return self._set("train")

    def val_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the validation/test images and labels (the 450 digits, ``val_copies`` times)."""
        return self._set("val")

    def calibration_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the calibration images and labels (the first rows of the reconstruction set)."""
        synthetic = self.synthetic_tensors(self.calib_size)
        if synthetic is not None:
            return synthetic
        return self._set("calib")

    def reconstruction_tensors(self) -> tuple[Tensor, Tensor]:
        """Return the reconstruction images and labels in permutation order."""
        synthetic = self.synthetic_tensors(self.recon_size)
        if synthetic is not None:
            return synthetic
        return self._set("recon")
