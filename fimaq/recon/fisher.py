"""The Fisher estimator: gradients of the KL to the FP soft targets, captured at a unit's output."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.amp import autocast
from fimaq.config import FisherConfig
from fimaq.errors import FimaqError
from fimaq.layers.mode import quant_mode
from fimaq.parallel import Ranks
from fimaq.recon.batches import BatchMasks, LocalBatch, local_batch, whole_batch
from fimaq.recon.losses import FisherStats, inverse_gram
from fimaq.recon.units import StopForward, Unit, first_tensor, unit_hook

log = logging.getLogger(__name__)


@dataclass
class Shortcut:
    """How a refresh starts at the unit instead of running the model from the images.

    The unit's input over the images is already cached (``x_in``, aligned with the images), so the
    earlier units (``before``) are not run: each returns zeros of the shape and dtype it would return
    (``outputs``), the cheap code between units runs on those, and the unit receives its cached input.
    """

    x_in: torch.Tensor
    before: list[nn.Module]
    outputs: list[tuple[torch.Size, torch.dtype]]


def _placeholder(shape: torch.Size, dtype: torch.dtype, *args, **kwargs) -> torch.Tensor:
    x = first_tensor((*args, *kwargs.values()))
    return torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device)


@contextmanager
def _skipping(shortcut: Shortcut, unit: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """While the block runs, the earlier units return placeholders and ``unit`` gets its cached input
    for the images ``rows``."""
    x = shortcut.x_in[rows.to(shortcut.x_in.device)]

    def replace(_m, args):
        i = next(k for k, a in enumerate(args) if isinstance(a, torch.Tensor))
        return (*args[:i], x.to(args[i].device, args[i].dtype), *args[i + 1 :])

    own = [m.__dict__.get("forward") for m in shortcut.before]
    for m, (shape, dtype) in zip(shortcut.before, shortcut.outputs, strict=True):
        m.forward = lambda *a, _s=shape, _d=dtype, **k: _placeholder(_s, _d, *a, **k)
    handle = unit.register_forward_pre_hook(replace)
    try:
        yield
    finally:
        handle.remove()
        for m, f in zip(shortcut.before, own, strict=True):
            del m.forward
            if f is not None:
                m.forward = f


class FisherEstimator:
    """Grows the rank-k statistics ``G``, ``Delta``, ``M`` of one unit at a time.

    The driver owns it; the reconstruction module asks it to :meth:`refresh` when a callback says so.
    A refresh runs the whole model (the current unit as it trains: soft rounding, current scales,
    QDrop; every other unit as the caller left it) on the reconstruction images with
    ``KL(P || softmax(logits / T))`` (batchmean), and records the mean absolute gradient and the mean
    absolute output error at the unit. When the driver hands over the unit's cached input
    (:meth:`start`), the earlier units are not run again: the refresh starts at the unit.

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
        self.shortcut: Shortcut | None = None
        self.seconds = 0.0

    def start(
        self,
        unit: Unit,
        y_fp: torch.Tensor,
        masks: BatchMasks | None = None,
        x_in: torch.Tensor | None = None,
        before: Sequence[nn.Module] = (),
    ) -> None:
        """Begin a new unit (its FP output cache aligns with the images); forget the old statistics.

        ``masks``: the QDrop masks of the unit while it trains (refreshes draw them per global batch).
        ``x_in``: the unit's input over the images as the refreshes will see it (the earlier units
        ``before`` in the state they are left in), so that refreshes start at the unit; checked once
        against the whole model, which is used instead if they disagree.
        """
        self.unit, self.y_fp, self.masks = unit, y_fp, masks
        self.G, self.Delta, self.stats = [], [], None
        self.shortcut = self._shortcut(x_in, list(before)) if x_in is not None and before else None
        self.cols = slice(None)
        if self.cfg.lowrank_tokens == "cls":
            if unit.has_cls_token and y_fp.ndim == 3:
                self.cols = slice(0, y_fp.shape[-1])  # the first token's channels of the flattened output
            else:
                log.info("%s has no class token: its low-rank Fisher uses all tokens", unit.name)

    def _forward(self, rows: torch.Tensor, shortcut: Shortcut | None) -> torch.Tensor:
        """The model's logits on the images ``rows`` (from the unit's cached input with ``shortcut``)."""
        assert self.unit is not None
        device = next(self.net.parameters()).device
        skip = _skipping(shortcut, self.unit.module, rows) if shortcut is not None else nullcontext()
        with skip:
            return self.net(self.images[rows].to(device))

    @torch.no_grad()
    def _shortcut(self, x_in: torch.Tensor, before: list[nn.Module]) -> Shortcut | None:
        """A :class:`Shortcut`, once the float model gives the same logits on two images with it."""
        assert self.unit is not None
        device = next(self.net.parameters()).device
        rows = torch.arange(min(2, self.images.shape[0]))
        outputs: dict[nn.Module, tuple[torch.Size, torch.dtype]] = {}

        def record(m, _args, out):
            if isinstance(out, torch.Tensor):
                outputs[m] = (out.shape[1:], out.dtype)

        def stop(_m, _args):
            raise StopForward

        handles = [m.register_forward_hook(record) for m in before]
        handles.append(self.unit.module.register_forward_pre_hook(stop))
        try:
            with quant_mode(self.net, enabled=False), autocast(self.precision, device):
                try:
                    self.net(self.images[rows].to(device))
                except StopForward:
                    pass
        finally:
            for h in handles:
                h.remove()
        name = self.unit.name
        if len(outputs) < len(before):
            log.info("%s: an earlier unit returns no single tensor; refreshes run the whole model", name)
            return None
        shortcut = Shortcut(x_in, before, [outputs[m] for m in before])
        with quant_mode(self.net, enabled=False), autocast(self.precision, device):
            whole = self._forward(rows, None).float()
            short = self._forward(rows, shortcut).float()
        # the cached input was computed on other batches (and may be stored in lower precision)
        tol = max(1e-3, 4 * torch.finfo(x_in.dtype).eps) * float(whole.abs().max()) + 1e-6
        if short.shape != whole.shape or not float((short - whole).abs().max()) <= tol:
            log.info("%s: its cached input does not reproduce the model; refreshes run the whole model", name)
            return None
        return shortcut

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

        def enter(_m, _args):
            torch.set_grad_enabled(False)  # the unit runs without autograd: no gradient is taken in it

        def hook(_m, _args, out):
            torch.set_grad_enabled(True)
            leaf = out.detach().requires_grad_(True)  # gradient stops here: nothing before it is needed
            seen["y"] = leaf
            return leaf

        with (
            torch.enable_grad(),  # (restores the caller's mode on the way out, whatever happened)
            unit_hook(self.unit.module, hook),
            unit_hook(self.unit.module, enter, pre=True),
            masks,
            autocast(self.precision, device),
        ):
            logits = self._forward(idx, self.shortcut).float()
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
