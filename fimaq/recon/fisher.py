"""The Fisher estimator: gradients of the KL to the FP soft targets, captured at a unit's output."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.amp import autocast
from fimaq.config import FisherConfig
from fimaq.errors import FimaqError
from fimaq.parallel import Ranks
from fimaq.recon.batches import BatchMasks, LocalBatch, local_batch, whole_batch
from fimaq.recon.losses import FisherStats, inverse_gram
from fimaq.recon.units import Unit, unit_hook

log = logging.getLogger(__name__)


class FisherEstimator:
    """Grows the rank-k statistics ``G``, ``Delta``, ``M`` of one unit at a time.

    The driver owns it; the reconstruction module asks it to :meth:`refresh` when a callback says so.
    A refresh runs the whole model (the current unit as it trains: soft rounding, current scales,
    QDrop; every other unit as the caller left it) on the reconstruction images with
    ``KL(P || softmax(logits / T))`` (batchmean), and records the mean absolute gradient and the mean
    absolute output error at the unit.

    Args:
        net: the full model.
        images: the reconstruction images.
        targets: ``P = softmax(logits_FP / T)`` per image.
        cfg: Fisher settings.
        seed: seed of the ``num_samples`` subset.
        shard: ``(n_total, lo, hi)`` when ``images`` are this rank's rows ``[lo, hi)`` of ``n_total``
            (data parallel): the subset and its batches are global, each rank runs its members and the
            sums are reduced over ranks, giving the statistics of one process.
        precision: Lightning precision of the forward passes (``bf16-mixed``: autocast; the
            statistics are accumulated in float64).
        ranks: the processes the sums are reduced over (default: one).
    """

    def __init__(
        self,
        net: nn.Module,
        images: torch.Tensor,
        targets: torch.Tensor,
        cfg: FisherConfig,
        seed: int = 0,
        shard: tuple[int, int, int] | None = None,
        precision: str = "32-true",
        ranks: Ranks | None = None,
    ) -> None:
        self.precision = precision
        self.ranks = ranks or Ranks()
        self.net, self.images, self.targets, self.cfg = net, images, targets, cfg
        n, self.lo, self.hi = shard if shard is not None else (images.shape[0], 0, images.shape[0])
        self.n_total = n
        if cfg.num_samples is not None and cfg.num_samples < n:
            gen = torch.Generator().manual_seed(seed)
            self.indices = torch.randperm(n, generator=gen)[: cfg.num_samples].sort().values
        else:
            self.indices = torch.arange(n)
        self.unit: Unit | None = None
        self.masks: BatchMasks | None = None
        self.y_fp: torch.Tensor | None = None
        self.cols = slice(None)
        self.G: list[torch.Tensor] = []
        self.Delta: list[torch.Tensor] = []
        self.stats: FisherStats | None = None
        self.seconds = 0.0

    def start(self, unit: Unit, y_fp: torch.Tensor, masks: BatchMasks | None = None) -> None:
        """Begin a new unit (its FP output cache aligns with the images); forget the old statistics.

        ``masks``: the QDrop masks of the unit while it trains (refreshes draw them per global batch).
        """
        self.unit, self.y_fp, self.masks = unit, y_fp, masks
        self.G, self.Delta, self.stats = [], [], None
        self.cols = slice(None)
        if self.cfg.lowrank_tokens == "cls":
            if unit.has_cls_token and y_fp.ndim == 3:
                self.cols = slice(0, y_fp.shape[-1])  # the first token's channels of the flattened output
            else:
                log.info("%s has no class token: its low-rank Fisher uses all tokens", unit.name)

    def _batches(self, indices: torch.Tensor) -> Iterator[LocalBatch]:
        """This rank's part of each global batch of ``indices``."""
        for start in range(0, indices.numel(), self.cfg.batch_size):
            chunk = indices[start : start + self.cfg.batch_size]
            if self.ranks.world == 1:
                yield whole_batch(chunk)
            else:
                yield local_batch(chunk, self.lo, self.hi)

    def _output_grads(self, part: LocalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit output, dL/d output) for this rank's images of one global batch."""
        assert self.unit is not None
        device = next(self.net.parameters()).device
        idx, rows = part.rows, part if self.ranks.world > 1 else None
        masks = self.masks.of(rows) if self.masks is not None else nullcontext()
        seen: dict[str, torch.Tensor] = {}

        def hook(_m, _args, out):
            leaf = out.detach().requires_grad_(True)  # gradient stops here: nothing before it is needed
            seen["y"] = leaf
            return leaf

        with (
            torch.enable_grad(),
            unit_hook(self.unit.module, hook),
            masks,
            autocast(self.precision, device),
        ):
            logits = self.net(self.images[idx].to(device)).float()
            if "y" not in seen:
                raise FimaqError(f"unit {self.unit.name} did not run in the model's forward pass")
            log_q = F.log_softmax(logits / self.cfg.temperature, dim=-1)
            kl = F.kl_div(log_q, self.targets[idx].to(device), reduction="none").sum(-1)
            loss = (kl * part.weights.to(device)).sum() / part.total  # "batchmean" of the global batch
            (grad,) = torch.autograd.grad(loss, seen["y"])
        return seen["y"].detach(), grad

    @torch.no_grad()
    def refresh(self) -> FisherStats:
        """Add one rank: ``g_j = mean_n |dL/dy_n|``, ``delta_j = mean_n |y_hat_n - y_n|``; recompute ``M``."""
        assert self.unit is not None and self.y_fp is not None
        start = time.perf_counter()
        g_sum = d_sum = None
        for part in self._batches(self.indices):
            y_hat, grad = self._output_grads(part)
            w = part.weights.to(grad.device, torch.float64)
            g = w @ grad.abs().reshape(w.numel(), -1).double()
            err = (y_hat.float() - self.y_fp[part.rows].to(y_hat.device).float()).abs()
            d = w @ err.reshape(w.numel(), -1).double()
            g_sum = g if g_sum is None else g_sum + g
            d_sum = d if d_sum is None else d_sum + d
        g_sum, d_sum = self.ranks.sum(g_sum), self.ranks.sum(d_sum)
        n = self.indices.numel()
        g_row, d_row = (g_sum / n).float(), (d_sum / n).float()
        if not (torch.isfinite(g_row).all() and torch.isfinite(d_row).all()):
            raise FimaqError(
                f"unit {self.unit.name}: the Fisher refresh produced NaN/Inf gradients or errors"
            )
        self.G.append(g_row)
        self.Delta.append(d_row)
        G, Delta = torch.stack(self.G), torch.stack(self.Delta)
        M, cond = inverse_gram(Delta[:, self.cols], self.cfg.ridge)
        self.stats = FisherStats(G=G, Delta=Delta, M=M, cols=self.cols, condition=cond)
        self.seconds += time.perf_counter() - start
        return self.stats

    @torch.no_grad()
    def per_sample_grads(self) -> torch.Tensor:
        """Per-image ``dL/dy`` at the unit (flattened), for ``fisher_brecq``; over this rank's images."""
        assert self.unit is not None
        rows = []
        for part in self._batches(torch.arange(self.n_total)):
            _, grad = self._output_grads(part)
            rows.append(grad.reshape(part.weights.numel(), -1)[part.weights > 0].float())
        return torch.cat(rows)
