"""Global minibatches over sharded images, and QDrop masks that do not depend on the sharding.

Data parallel, every rank holds a contiguous shard of the reconstruction images and a global batch
(a list of global image indices) is processed by each rank on the members it holds.
:class:`LocalBatch` says where those members sit in the global batch, so that random masks drawn
for the whole global batch (same generator, same seed on every rank) are sliced exactly as one
process would use them. A rank that holds no member of a batch runs one placeholder row with
weight 0, so that every rank draws the same random numbers and joins every collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fimaq.quant.ste import bernoulli_mask, mask_from_bytes, random_bytes


@dataclass
class LocalBatch:
    """This rank's part of a global batch.

    Attributes:
        rows: local row indices into the rank's shard.
        positions: where each row sits in the global batch.
        weights: 1.0 per real row, 0.0 for the placeholder row of a rank with no member.
        total: the global batch size.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    weights: torch.Tensor
    total: int

    @property
    def real(self) -> int:
        """Rows of this rank that belong to the batch (0 for a placeholder)."""
        return int(self.weights.sum())


def local_batch(global_idx: torch.Tensor, lo: int, hi: int) -> LocalBatch:
    """The members of the global batch ``global_idx`` in the shard ``[lo, hi)``."""
    mine = (global_idx >= lo) & (global_idx < hi)
    positions = mine.nonzero().flatten()
    if positions.numel() == 0:  # placeholder: any local row, weight 0
        return LocalBatch(
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            torch.zeros(1),
            global_idx.numel(),
        )
    rows = global_idx[positions] - lo
    return LocalBatch(rows, positions, torch.ones(positions.numel()), global_idx.numel())


def whole_batch(idx: torch.Tensor) -> LocalBatch:
    """The global batch ``idx`` held entirely by one process."""
    n = idx.numel()
    return LocalBatch(idx, torch.arange(n), torch.ones(n), n)


class BatchMasks:
    """QDrop masks (a :data:`fimaq.layers.mode.MaskFn`) for this rank's rows of the global batch.

    While :meth:`of` names a :class:`LocalBatch`, a mask is drawn for the whole global batch and the
    local rows are taken, so every rank consumes the generator exactly like one process holding the
    whole batch. Dim 0 may hold ``k`` rows per image (Swin windows): image-major, as
    ``window_partition`` lays them out. Otherwise (one process) the mask is drawn as asked.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.rows: LocalBatch | None = None

    @contextmanager
    def of(self, rows: LocalBatch | None) -> Iterator[None]:
        """Draw for the global batch of ``rows`` while the block runs (``None``: the whole batch)."""
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous

    def __call__(
        self,
        shape: torch.Size,
        p: float,
        device: torch.device,
        dtype: torch.dtype | None = torch.float32,
        order: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        if self.rows is None:
            return bernoulli_mask(shape, p, self.generator, device, dtype, order)
        count = self.rows.positions.numel()
        k = shape[0] // count
        full = random_bytes((self.rows.total * k, *shape[1:]), self.generator, device)
        pos = self.rows.positions.to(device)
        idx = (pos[:, None] * k + torch.arange(k, device=device)).flatten()
        return mask_from_bytes(full.index_select(0, idx), p, dtype, order)
