"""Global minibatches over sharded images, and QDrop masks that do not depend on the sharding.

Data parallel, every rank holds a contiguous shard of the reconstruction images and a global batch
(a list of global image indices) is processed by each rank on the members it holds.
:class:`LocalBatch` says where those members sit in the global batch, so that random masks drawn
for the whole global batch (same generator, same seed on every rank) are sliced exactly as one
process would use them. A rank that holds no member of a batch runs one placeholder row with
weight 0, so that every rank draws the same random numbers and joins every collective.

The QDrop draws of a unit come from one stream of random bytes per unit (:class:`ByteStream`): it
draws as much at once as the largest step so far has used, so a training step draws its masks with
one random-number call (and one comparison turns them into float masks on the eager path) however
many quantizers it runs, instead of a few operations per quantizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from fimaq.quant.ste import drop_threshold, mask_from_bytes, random_bytes


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


class ByteStream:
    """Uniform random bytes from ``generator``, drawn in chunks and handed out in order.

    A request takes the next ``n`` bytes and skips to the next multiple of eight. Each scope
    (:meth:`BatchMasks.of`: a training step, a Fisher refresh batch) starts a new chunk, as large as
    the largest scope has used so far (or the request): the draws of a step then depend only on the
    generator's state and the step's requests, whether taken one by one or all at once (the compiled
    step). A float request converts the rest of the chunk to 0/1 masks in one comparison.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.chunk = 0  # bytes the largest scope used
        self.used = 0  # bytes the current scope has used
        self.fresh = False  # the next request starts a new chunk
        self.bytes: torch.Tensor | None = None
        self.cursor = 0
        self.floats: tuple[int, int, torch.Tensor] | None = None  # (start, threshold, 0/1 floats)

    def begin_scope(self) -> None:
        self.fresh, self.used = True, 0

    def end_scope(self) -> None:
        self.chunk, self.used, self.fresh = max(self.chunk, self.used), 0, False

    def _take(self, n: int, device: torch.device) -> int:
        size = aligned(n)
        buf = self.bytes
        short = buf is None or buf.device != torch.device(device) or self.cursor + size > buf.numel()
        if self.fresh or short:
            self.bytes = random_bytes((max(size, self.chunk),), self.generator, device)
            self.cursor, self.floats, self.fresh = 0, None, False
        start = self.cursor
        self.cursor += size
        self.used += size
        return start

    def raw(self, n: int, device: torch.device) -> torch.Tensor:
        """The next ``n`` bytes (``uint8``)."""
        start = self._take(n, device)
        return self.bytes[start : start + n]

    def mask(self, n: int, p: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The 0/1 mask ``byte < 256 p`` of the next ``n`` bytes as ``dtype`` (float, or ``uint8``)."""
        start = self._take(n, device)
        byte = self.bytes[start : start + n]
        if not dtype.is_floating_point:
            return mask_from_bytes(byte, p, dtype)
        threshold = drop_threshold(p)
        floats = self.floats
        if floats is None or floats[0] > start or floats[1] != threshold or floats[2].dtype != dtype:
            rest = self.bytes[start:]
            out = torch.empty(rest.shape, dtype=dtype, device=rest.device)
            # (every byte is below 256, and 256 is not a uint8 to compare with)
            out = out.fill_(1) if threshold > 255 else torch.lt(rest, threshold, out=out)
            floats = self.floats = (start, threshold, out)
        return floats[2][start - floats[0] : start - floats[0] + n]


def aligned(n: int) -> int:
    """``n`` bytes rounded up to whole 64-bit draws."""
    return (n + 7) // 8 * 8


class BatchMasks:
    """QDrop masks (a :data:`fimaq.layers.mode.MaskFn`) for this rank's rows of the global batch.

    While :meth:`of` names a :class:`LocalBatch`, a mask is drawn for the whole global batch and the
    local rows are taken, so every rank consumes the generator exactly like one process holding the
    whole batch. Dim 0 may hold ``k`` rows per image (Swin windows): image-major, as
    ``window_partition`` lays them out. Otherwise (one process) the mask is drawn as asked.

    :meth:`recording` and :meth:`replaying` serve the masks of one pass again to a second pass over
    the same batch; inside a ``torch.compile`` trace the masks are cut from the step's bytes
    (:meth:`traced_bytes`), the same values as drawn one by one.
    """

    def __init__(self, generator: torch.Generator | None) -> None:
        self.generator = generator
        self.stream = ByteStream(generator)
        self.rows: LocalBatch | None = None
        self._served: list[torch.Tensor] | None = None
        self._replay: list[torch.Tensor] | None = None
        self._traced: tuple[torch.Tensor, int] | None = None

    @contextmanager
    def of(self, rows: LocalBatch | None) -> Iterator[None]:
        """Draw for the global batch of ``rows`` while the block runs (``None``: the whole batch)."""
        previous, self.rows = self.rows, rows
        self.stream.begin_scope()
        try:
            yield
        finally:
            self.rows = previous
            self.stream.end_scope()

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Keep every mask drawn in the block, in order (for :meth:`replaying`)."""
        self._served = []
        try:
            yield self._served
        finally:
            self._served = None

    @contextmanager
    def replaying(self, served: list[torch.Tensor]) -> Iterator[None]:
        """Serve ``served`` again, in order, instead of drawing (a second pass over the same batch)."""
        self._replay = list(served)
        try:
            yield
        finally:
            self._replay = None

    def traced_bytes(self, data: torch.Tensor | None) -> None:
        """The bytes a compiled step cuts its masks from (its scope's, drawn at once; None: none)."""
        self._traced = (data, 0) if data is not None else None

    def __call__(
        self,
        shape: torch.Size,
        p: float,
        device: torch.device,
        dtype: torch.dtype | None = torch.float32,
        order: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        if self._replay is not None:
            mask = self._replay.pop(0)
            assert mask.shape == tuple(shape), "a replayed pass asked for other masks"
            return mask
        mask = self._draw(tuple(shape), p, device, dtype, order)
        if self._served is not None:
            self._served.append(mask)
        return mask

    def _draw(self, shape, p, device, dtype, order) -> torch.Tensor:
        full_shape, idx = shape, None
        if self.rows is not None:
            count = self.rows.positions.numel()
            k = shape[0] // count
            full_shape = (self.rows.total * k, *shape[1:])
            pos = self.rows.positions.to(device)
            idx = (pos[:, None] * k + torch.arange(k, device=device)).flatten()
        n = math.prod(full_shape)
        if torch.compiler.is_compiling() and self._traced is not None:
            data, at = self._traced
            self._traced = (data, at + aligned(n))
            full = data[at : at + n].view(full_shape)
            dtype, order = dtype if dtype is not None else torch.float32, None  # (floats, fused)
        elif idx is None:  # one process: the stream's masks as they are
            if dtype is None:
                return self.stream.raw(n, device).view(shape)
            return self.stream.mask(n, p, device, dtype).view(shape)
        else:
            full = self.stream.raw(n, device).view(full_shape)
        part = full if idx is None else full.index_select(0, idx)
        return mask_from_bytes(part, p, dtype, order)
