"""BlockReconModule: the LightningModule that reconstructs one unit (learned rounding, AdaRound or
STE, + learned activation scales + QDrop) against its FP output."""

from __future__ import annotations

import math
from contextlib import nullcontext

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from fimaq.config import FisherConfig, ReconConfig
from fimaq.errors import FimaqError
from fimaq.quant import native
from fimaq.quant.adaround import AdaRoundQuantizer, SoftRounding, beta_schedule, round_regulariser_on
from fimaq.quant.rounding import LearnedRounding
from fimaq.quant.ste import drop_threshold
from fimaq.quant.ste_rounding import SteRoundingQuantizer
from fimaq.recon.batches import BatchMasks, LocalBatch, local_batch
from fimaq.recon.cache import UnitCache
from fimaq.recon.compiled import CompiledStep
from fimaq.recon.fisher import FisherEstimator
from fimaq.recon.global_local import Suffix
from fimaq.recon.losses import FisherStats, ReconObjective
from fimaq.recon.units import Unit


def rows_of(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for a 1-d index on dim 0: ``index_select`` copies whole rows, several times faster
    on the CPU than advanced indexing's element-by-element gather (same values)."""
    return t.index_select(0, idx.to(t.device))


def rows_to(
    t: torch.Tensor, idx: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """:func:`rows_of` on ``device`` (as ``dtype``). From a cache in host memory to a GPU the rows
    are gathered into page-locked memory and copied without waiting: the host goes on queueing the
    step while the copy runs (torch's pinned-memory cache reuses the buffer once the copy is done)."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        rows = torch.empty((idx.numel(), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        torch.index_select(t, 0, idx.to(t.device), out=rows)
        return rows.to(device, non_blocking=True).to(dtype or t.dtype)
    return rows_of(t, idx).to(device, dtype or t.dtype)


class StepIndices(Dataset):
    """Item ``step`` = the minibatch indices of that step: ``randperm(n)[:batch]`` from a generator
    seeded with ``(seed, step)``, so any step can be replayed on its own."""

    def __init__(self, num_images: int, batch_size: int, steps: int, seed: int) -> None:
        self.n, self.batch, self.steps, self.seed = num_images, min(batch_size, num_images), steps, seed

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(self.n, generator=gen)[: self.batch]


def step_loader(num_images: int, cfg: ReconConfig, seed: int) -> DataLoader:
    """One batch of indices per optimisation step of a unit (no collation, no workers)."""
    return DataLoader(
        StepIndices(num_images, cfg.batch_size, cfg.unit_iters, seed), batch_size=None, shuffle=False
    )


class BlockReconModule(L.LightningModule):
    """Reconstruct one unit: minimise its output loss (plus the AdaRound regulariser with AdaRound).

    The unit's weight quantizers must already be learned-rounding quantizers (``attach_rounding``,
    AdaRound or STE rounding; ``cfg.unit_iters`` steps) and its
    activation quantizers in training mode (``fimaq.layers.mode.quant_mode(train=True)``, QDrop
    masks from ``masks``); the driver does both and undoes them.

    Args:
        unit: the unit under reconstruction (a submodule of the full model).
        cache: its FP input/output and quantized input on the reconstruction images.
        cfg: reconstruction settings.
        fisher_cfg: Fisher settings (weights of ``fisher_dplr``).
        fisher: the driver's estimator (``None`` for ``mse`` and the head).
        brecq_grads: per-image output gradients for ``fisher_brecq``.
        masks: the QDrop masks of the input mixing and of the quantizers (one generator).
        shard: ``(lo, hi)``, the global rows of the reconstruction images this rank's cache holds
            (data parallel; default: all of them). The Trainer's strategy averages the gradients
            over ranks and each rank's loss is weighted by its share of the global batch, so any
            number of ranks optimises the same objective as one process.
        rest: ``global_local``: the frozen float rest of the model from this unit's output to the
            penultimate features, and the float model's features of this rank's images.
    """

    def __init__(
        self,
        unit: Unit,
        cache: UnitCache,
        cfg: ReconConfig,
        fisher_cfg: FisherConfig,
        fisher: FisherEstimator | None = None,
        brecq_grads: torch.Tensor | None = None,
        masks: BatchMasks | None = None,
        shard: tuple[int, int] | None = None,
        rest: tuple[Suffix, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.lo, self.hi = shard if shard is not None else (0, cache.x_fp.shape[0])
        self.unit_name = unit.name
        self.unit = unit.module
        self.cache, self.cfg, self.fisher = cache, cfg, fisher
        self.brecq_grads = brecq_grads
        self.masks = masks if masks is not None else BatchMasks(None)
        kind = "kl" if unit.is_head else cfg.loss
        self.objective = ReconObjective(kind, fisher_cfg.p1, fisher_cfg.p2, cfg.local_weight)
        self.rest = rest
        self.roundings = [m for m in self.unit.modules() if isinstance(m, LearnedRounding)]
        self.adarounds = [m for m in self.roundings if isinstance(m, AdaRoundQuantizer)]
        # every AdaRound weight of the unit in one pass per step (one flat alpha, released at the end)
        self.soft_rounding = SoftRounding(self.adarounds, cfg.round_weight) if self.adarounds else None
        if self.soft_rounding is not None:
            self.rounding_alpha = self.soft_rounding.alpha  # (registered: the optimiser's, and DDP's)
        self.act_scales = self._activation_scales() if cfg.learn_act_scales else []
        self.stats: FisherStats | None = None
        self.compiled = CompiledStep(self) if cfg.compile else None

    def _activation_scales(self) -> list[torch.nn.Parameter]:
        from fimaq.quant.quantizer import UniformQuantizer

        bases = {id(r.base) for r in self.roundings}
        return [
            m.scale
            for m in self.unit.modules()
            if isinstance(m, UniformQuantizer) and m.active and id(m) not in bases
        ]

    # ----------------------------------------------------------------- fisher
    def refresh_fisher(self) -> None:
        """Grow the Fisher statistics by one rank and re-record the loss normalisers."""
        if self.fisher is None or not self.objective.uses_fisher:
            return
        self.stats = self.fisher.refresh()
        self.objective.reset()
        self.log_dict(
            {
                f"recon/{self.unit_name}/fisher_rank": float(self.stats.rank),
                f"recon/{self.unit_name}/fisher_cond": float(self.stats.condition),
            }
        )

    # ----------------------------------------------------------------- step
    def _inputs(self, idx: torch.Tensor) -> torch.Tensor:
        dev = self.device
        mode = self.cfg.input_mode
        x_fp, x_q = self.cache.x_fp, self.cache.x_q
        if mode == "qdrop" and dev.type == "cpu" and native.takes(x_fp, x_q):
            # the rows, the mask and the mix in one pass, from the same draws (the same values)
            keep = self.masks((idx.numel(), *x_fp.shape[1:]), self.cfg.drop_prob, dev, dtype=None)
            return native.mix_rows(x_fp, x_q, idx, keep, drop_threshold(self.cfg.drop_prob))
        x_fp = rows_to(x_fp, idx, dev, torch.float32)
        if mode == "rinp":
            return x_fp
        x_q = rows_to(x_q, idx, dev, torch.float32)
        if mode == "qinp":
            return x_q
        keep = self.masks(x_q.shape, self.cfg.drop_prob, dev)
        return torch.lerp(x_fp, x_q, keep)

    def _features(self, pred: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``global_local``: the penultimate features of ``pred`` through the frozen float rest of the
        model, and the float model's features of the rows ``idx`` (None for the other losses)."""
        if self.rest is None:
            return None
        run, features_fp = self.rest
        return run(pred), rows_to(features_fp, idx, self.device)

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def training_step(self, idx: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.unit.training:  # (Lightning switches the module to training mode at each epoch start)
            self.unit.eval()  # dropout/drop-path stay off; the training behaviour is the quantizers' state
        step, iters = self.global_step, self.cfg.unit_iters
        world = self.trainer.world_size
        rows: LocalBatch | None = None
        share = None
        if world > 1:  # this rank's members of the global batch
            rows = local_batch(idx, self.lo, self.hi)
            idx, share = rows.rows, rows.real / rows.total
        idx = idx.to(self.cache.x_fp.device)
        beta = beta_schedule(step, iters, self.cfg.warmup, self.cfg.beta_start, self.cfg.beta_end)
        regularise = bool(self.adarounds) and round_regulariser_on(step, iters, self.cfg.warmup)
        target = rows_to(self.cache.y_fp, idx, self.device, torch.float32)
        grad = rows_to(self.brecq_grads, idx, self.device) if self.brecq_grads is not None else None
        if self.compiled is not None and step > 0 and not self.objective.recording:
            rec, rnd = self._compiled_step(step, idx, rows, target, grad)
        else:
            rec, rnd = self._eager_step(beta if regularise else None, idx, rows, share, target, grad)
        # data parallel: the ranks' mean gradient (the strategy's) is then the global batch's gradient
        loss = rec * (world * share) if share is not None else rec
        if rnd is not None:  # (no AdaRound quantizers with STE rounding)
            loss = loss + rnd
        if (step + 1) % self.trainer.log_every_n_steps == 0 or step + 1 == iters:
            # every log_every_n_steps only: a finiteness check and a logged value each wait for the device
            if not torch.isfinite(loss):
                raise FimaqError(f"unit {self.unit_name}: the reconstruction loss is NaN/Inf at step {step}")
            prefix = f"recon/{self.unit_name}"
            self.log(f"{prefix}/loss", rec.detach(), prog_bar=True)
            if self.cfg.rounding == "adaround":
                self.log(f"{prefix}/round_loss", rnd.detach() if rnd is not None else 0.0)
                self.log(f"{prefix}/beta", beta)
        return loss

    def _eager_step(self, beta: float | None, idx, rows: LocalBatch | None, share, target, grad):
        """``(reconstruction loss, rounding penalty at beta or None)`` of this step, eagerly (and the
        normalisers recorded where a refresh asks for them)."""
        if self.soft_rounding is not None:
            self.soft_rounding.begin_step(beta)
        record = self.cfg.norm_rounding == "hard" and self.objective.recording and bool(self.adarounds)
        with self.masks.of(rows), self.masks.recording() if record else nullcontext([]) as served:
            inputs = self._inputs(idx)
            pred = self.unit(inputs)
        if record:  # the same batch and QDrop draws, the rounding hardened
            with self.masks.replaying(served[1:] if self.cfg.input_mode == "qdrop" else served):
                self._record_norms_hard(inputs, target, grad, idx, share)
        features = self._features(pred, idx)
        rec = self.objective(
            pred, target, self.stats, grad, share=share, reduce_sum=self._sum_over_ranks, features=features
        )
        return rec, (self.soft_rounding.penalty() if beta is not None else None)

    def _compiled_step(self, step: int, idx, rows: LocalBatch | None, target, grad):
        """The same as :meth:`_eager_step`, compiled whole (:class:`fimaq.recon.compiled.CompiledStep`;
        during the warm-up the penalty is computed and counted zero times)."""
        dev, cache = self.device, self.cache
        x_fp = rows_to(cache.x_fp, idx, dev, torch.float32)
        x_q = x_fp if cache.x_q is cache.x_fp else rows_to(cache.x_q, idx, dev, torch.float32)
        features_fp = rows_to(self.rest[1], idx, dev) if self.rest is not None else None
        with self.masks.of(rows):
            # the step's QDrop bytes at once: the draws the eager step takes one by one
            draws = self.masks.stream.raw(self.masks.stream.chunk, dev) if self.masks.stream.chunk else None
            try:
                return self.compiled(step, x_fp, x_q, target, grad, features_fp, draws)
            finally:
                self.masks.traced_bytes(None)

    @torch.no_grad()
    def objective_sum(self, pred: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The reconstruction objective of outputs ``pred`` of the cached rows ``rows`` (this rank's
        indices) times their number: summed over batches and ranks and divided by the number of rows,
        the objective's mean over them. With the normalisers and Fisher statistics as they are (at the
        end of training: the objective the last steps minimised), without the rounding penalty."""
        target = rows_to(self.cache.y_fp, rows, self.device, torch.float32)
        grad = rows_to(self.brecq_grads, rows, self.device) if self.brecq_grads is not None else None
        features = self._features(pred, rows)
        return self.objective(pred.float(), target, self.stats, grad, features=features) * rows.numel()

    @torch.no_grad()
    def _record_norms_hard(self, inputs, target, grad, idx: torch.Tensor, share: float | None) -> None:
        """Record the loss normalisers (after a Fisher refresh) on this batch's output with the rounding
        hardened as it stands (``recon.norm_rounding: hard``), instead of on the soft-rounded output."""
        for a in self.adarounds:
            a.soft = False
        try:
            pred = self.unit(inputs)
            features = self._features(pred, idx)
            total = self._sum_over_ranks
            self.objective(pred, target, self.stats, grad, share=share, reduce_sum=total, features=features)
        finally:
            for a in self.adarounds:
                a.soft = True

    def on_train_end(self) -> None:
        if self.soft_rounding is not None:
            self.soft_rounding.release()

    def configure_optimizers(self):
        groups = []
        lambdas = []
        alphas = [self.soft_rounding.alpha] if self.soft_rounding is not None else []
        if alphas:
            groups.append({"params": alphas, "lr": self.cfg.lr_alpha})
            lambdas.append(lambda s: 1.0)
        offsets = [r.v for r in self.roundings if isinstance(r, SteRoundingQuantizer)]
        if offsets:
            groups.append({"params": offsets, "lr": self.cfg.lr_ste})
            lambdas.append(lambda s: 1.0)
        if self.act_scales:
            groups.append({"params": self.act_scales, "lr": self.cfg.lr_scale})
            iters = self.cfg.unit_iters
            lambdas.append(lambda s: 0.5 * (1 + math.cos(math.pi * min(s, iters) / iters)))
        if not groups:
            raise FimaqError(
                f"unit {self.unit_name} has nothing to reconstruct (no quantized weights or inputs)"
            )
        # the fused kernel (one pass per parameter group; same update up to float rounding)
        fused = all(
            p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]
        )
        opt = torch.optim.Adam(groups, fused=fused or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambdas)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
