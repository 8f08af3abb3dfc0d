"""Data parallelism across processes: contiguous image shards, reductions, and row bookkeeping.

Every rank holds a contiguous shard of the calibration / reconstruction images, in rank order.
A global batch (a list of global image indices) is processed by each rank on the members it holds;
``positions`` say where those members sit in the global batch, so that random masks drawn for the
whole global batch (same generator, same seed on every rank) are sliced identically to one process.
A rank that holds no member of a batch runs one placeholder row with weight 0, so that every rank
draws the same random numbers and joins every collective. Without an initialised process group
every function is the single-process identity.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as td


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def info(logger: logging.Logger, msg: str, *args) -> None:
    """``logger.info`` on rank 0 only."""
    if is_main():
        logger.info(msg, *args)


def barrier() -> None:
    if world_size() > 1:
        td.barrier()


def shard_bounds(n: int, world: int | None = None, r: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``r`` of ``world`` holds (contiguous, sizes differ by <= 1)."""
    world = world_size() if world is None else world
    r = rank() if r is None else r
    return r * n // world, (r + 1) * n // world


def shard_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous shard of ``t`` along dim 0 (a copy: the rest can be freed)."""
    if world_size() == 1:
        return t
    lo, hi = shard_bounds(t.shape[0])
    return t[lo:hi].clone()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place; returns ``t``."""
    if world_size() > 1:
        td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def shard_offsets(n_local: int, device: torch.device | str = "cpu") -> tuple[int, int, int]:
    """``(n_total, lo, hi)``: the global row range of this rank's ``n_local`` rows (shards in rank order)."""
    world = world_size()
    if world == 1:
        return n_local, 0, n_local
    counts = torch.zeros(world, dtype=torch.int64, device=device)
    counts[rank()] = n_local
    all_reduce_sum(counts)
    lo = int(counts[: rank()].sum())
    return int(counts.sum()), lo, lo + n_local


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0 in rank order (shards may differ in length)."""
    world = world_size()
    if world == 1:
        return t
    t = t.contiguous()
    n = torch.zeros(world, dtype=torch.int64, device=t.device)
    n[rank()] = t.shape[0]
    all_reduce_sum(n)
    rows = int(n.max())
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    td.all_gather(parts, padded)
    return torch.cat([p[: int(k)] for p, k in zip(parts, n.tolist(), strict=True)])


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
    """The members of the global batch ``global_idx`` in this rank's shard ``[lo, hi)``."""
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
