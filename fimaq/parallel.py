"""Data parallelism across processes, through Lightning: the launch and the collectives.

A data-parallel run (``--trainer.strategy ddp --trainer.devices N``) is started with Lightning
Fabric's :meth:`~lightning.fabric.Fabric.launch` (one process per device, each running the same
command) and every reduction goes through Fabric's collectives. Every rank holds a contiguous shard
of the calibration / reconstruction images, in rank order. :class:`Ranks` with no Fabric is the
single process: every method is then the identity.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy

from fimaq.errors import FimaqError


class Ranks:
    """The processes of a run and their collectives.

    Args:
        fabric: a launched Fabric (data parallel); ``None`` for one process.
    """

    def __init__(self, fabric: Fabric | None = None) -> None:
        self.fabric = fabric

    @classmethod
    def launch(cls, accelerator: str, devices: int, num_nodes: int = 1, backend: str | None = None) -> Ranks:
        """Start the other processes of a ``devices x num_nodes`` data-parallel run (once per process;
        a second call joins the running one) and return their collectives."""
        fabric = Fabric(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=DDPStrategy(process_group_backend=backend),
        )
        fabric.launch()
        return cls(fabric)

    @classmethod
    def of_trainer(cls, trainer: Any) -> Ranks:
        """The ranks of a Lightning Trainer's settings: one process, or a launched DDP run."""
        from lightning.pytorch.strategies import DDPStrategy as TrainerDDP

        if trainer.world_size <= 1:
            return cls()
        if not isinstance(trainer.strategy, TrainerDDP):
            raise FimaqError(
                f"fimaq runs data parallel with --trainer.strategy ddp, not {type(trainer.strategy).__name__}"
            )
        start = getattr(trainer.strategy, "_start_method", "popen")  # ddp_spawn/fork/notebook: not popen
        if start != "popen":
            raise FimaqError(
                f"fimaq runs data parallel with strategy 'ddp' (every process runs the script), not a "
                f"strategy that starts its processes by {start} (ddp_spawn, ddp_fork, ddp_notebook)"
            )
        return cls.launch(
            trainer.strategy.root_device.type,
            trainer.num_devices,
            trainer.num_nodes,
            trainer.strategy.process_group_backend,
        )

    @property
    def world(self) -> int:
        return 1 if self.fabric is None else self.fabric.world_size

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return None if self.fabric is None else self.fabric.strategy.process_group_backend

    def info(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        """``logger.info`` on rank 0 only."""
        if self.is_main:
            logger.info(msg, *args)

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (in place where the backend allows; use the result)."""
        return t if self.fabric is None else self.fabric.all_reduce(t, reduce_op="sum")

    def shard_bounds(self, n: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of ``n`` that this rank holds (contiguous, sizes differ by at most 1)."""
        return shard_bounds(n, self.world, self.rank)

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous shard of ``t`` along dim 0 (a copy: the rest can be freed)."""
        if self.world == 1:
            return t
        lo, hi = self.shard_bounds(t.shape[0])
        return t[lo:hi].clone()

    def shard_offsets(self, n_local: int, device: torch.device | str = "cpu") -> tuple[int, int, int]:
        """``(n_total, lo, hi)``: the global rows of this rank's ``n_local`` rows (shards in rank order)."""
        if self.world == 1:
            return n_local, 0, n_local
        counts = torch.zeros(self.world, dtype=torch.int64, device=device)
        counts[self.rank] = n_local
        counts = self.sum(counts)
        lo = int(counts[: self.rank].sum())
        return int(counts.sum()), lo, lo + n_local

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` concatenated along dim 0 in rank order (shards may differ in length)."""
        if self.fabric is None:
            return t
        n = torch.zeros(self.world, dtype=torch.int64, device=t.device)
        n[self.rank] = t.shape[0]
        n = self.sum(n)
        padded = t.new_zeros((int(n.max()), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = self.fabric.all_gather(padded)  # (world, rows, ...)
        return torch.cat([p[: int(k)] for p, k in zip(parts, n.tolist(), strict=True)])


def local_rank() -> int:
    """This process's rank among the run's processes on this machine (Lightning's ``LOCAL_RANK``;
    0 for one process)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def stop_local_ranks(signum: int) -> list[int]:
    """On the process that launched a data-parallel run (local rank 0): send ``signum`` to the other
    ranks it started, so that they stop with it instead of failing in their next collective once it
    is gone. Returns their PIDs (none elsewhere, or where ``/proc`` does not list processes)."""
    if os.environ.get("LOCAL_RANK") != "0" or not os.path.isdir("/proc"):
        return []
    me, stopped = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != me:  # the parent's PID
                continue
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if any(e.startswith(b"LOCAL_RANK=") and e != b"LOCAL_RANK=0" for e in env):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry), signum)
                stopped.append(int(entry))
    return stopped


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``world`` holds."""
    return rank * n // world, (rank + 1) * n // world
