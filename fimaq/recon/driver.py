"""The reconstruction driver: a plain loop over the units, one fresh Trainer per unit.

It owns the caches and the Fisher estimator; callbacks only decide when to refresh. Finished units
keep their float weights and hard rounding side by side (quantization off gives the float model for
the FP caches and the Fisher passes); the rounding is folded into the weights at the end. After
every unit the whole model state is written atomically, so a killed run continues at the first
unfinished unit and, every random draw being seeded per unit, ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from fimaq.amp import autocast, check_precision
from fimaq.callbacks import FisherRefresh, StepClock, UnitProgressBar
from fimaq.config import FisherConfig, ReconConfig
from fimaq.errors import FimaqError, Interrupted, defer_interrupts
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.parallel import Ranks
from fimaq.quant.rounding import LearnedRounding, attach_rounding, finalize_rounding
from fimaq.recon.batches import BatchMasks
from fimaq.recon.cache import DTYPES, UnitCache, capture_unit, soft_targets
from fimaq.recon.fisher import FisherEstimator
from fimaq.recon.global_local import penultimate_targets, suffix
from fimaq.recon.module import BlockReconModule, step_loader
from fimaq.recon.report import ReconReport, mean_objective, unit_error, unit_line
from fimaq.recon.state import ROUNDING_QUANTIZERS, STATE_FILE, load_state, recon_fingerprint, write_state
from fimaq.recon.units import Unit, recon_units

log = logging.getLogger(__name__)


def _one_device(device: torch.device) -> dict[str, Any]:
    """Trainer settings for one process on ``device`` (the default of the per-unit Trainers)."""
    if device.type == "cuda":
        return {"accelerator": "cuda", "devices": [device.index or 0]}
    return {"accelerator": device.type, "devices": 1}


class _Rounding:
    """Attaches learned rounding (``cfg.rounding``) to a unit's weight layers (and learnable activation
    scales); on error drops the unfinished rounding state, and always freezes the scales again."""

    def __init__(self, unit: Unit, cfg: ReconConfig) -> None:
        self.unit, self.cfg = unit, cfg
        self.layers = unit.weight_layers()

    def __enter__(self) -> _Rounding:
        for layer in self.layers:
            attach_rounding(layer, ROUNDING_QUANTIZERS[self.cfg.rounding])
        learned = [m for m in self.unit.module.modules() if isinstance(m, LearnedRounding)]
        bases = {id(m.base) for m in learned}
        scales = [q.scale for q in self.unit.quantizers() if q.bits is not None and id(q) not in bases]
        for scale in scales:  # (the quantizers are switched on later)
            scale.requires_grad_(self.cfg.learn_act_scales)
        # what the unit starts from: its calibrated rounding (AdaRound's initial offsets harden to it)
        self.start = [(p, p.detach().clone()) for p in [*(p for m in learned for p in m.learned), *scales]]
        return self

    @torch.no_grad()
    def restore_start(self) -> None:
        """Put back the rounding parameters and activation scales the unit started with."""
        for param, start in self.start:
            param.copy_(start)

    def finalize(self) -> None:
        """Switch to hard rounding (folded into the weights once every unit is done)."""
        for layer in self.layers:
            if isinstance(layer.w_quantizer, LearnedRounding):
                layer.w_quantizer.harden()

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            learned = layer.w_quantizer
            if isinstance(learned, LearnedRounding) and learned.soft:
                layer.w_quantizer = learned.base
        for q in self.unit.quantizers():
            q.scale.requires_grad_(False)
        self.unit.module.eval()


def reconstruct_model(
    net: nn.Module,
    images: torch.Tensor,
    cfg: ReconConfig | None = None,
    fisher_cfg: FisherConfig | None = None,
    *,
    state_dir: str | Path | None = None,
    meta: dict[str, Any] | None = None,
    logger: Any = None,
    precision: Any = "32-true",
    progress: bool = True,
    units: Sequence[str] | None = None,
    ranks: Ranks | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
) -> ReconReport:
    """Reconstruct every unit of a calibrated model, in order (docs/algorithm.md, sections 3 and 4).

    Args:
        net: a calibrated quantized model (``quantize_model`` + ``calibrate_model``).
        images: the reconstruction images ``(n, C, H, W)``, already transformed. Data parallel: this
            rank's contiguous shard (ranks in order); every sum is reduced over ``ranks``.
        cfg: reconstruction settings.
        fisher_cfg: Fisher settings.
        state_dir: where ``recon_state.safetensors`` is written after each unit (and resumed from).
        meta: what the state records about the model (arch, bits); a state with other values is refused.
        logger: a Lightning logger shared by the per-unit trainers (``None``: no logging).
        precision: Lightning precision of the per-unit trainers.
        progress: show the per-unit progress bar.
        units: reconstruct only these units (names as in ``recon_units``); the others keep their
            calibrated rounding. All by default.
        ranks: the processes of a data-parallel run (default: one process).
        trainer_kwargs: accelerator, strategy, devices and num_nodes of the per-unit Trainers: the
            parent Trainer's (data parallel: its DDP strategy averages the gradients). Default: one
            process on the model's device.
    """
    cfg = (cfg or ReconConfig()).validate()
    fisher_cfg = (fisher_cfg or FisherConfig()).validate()
    precision = check_precision(precision)
    if images.ndim != 4 or not torch.isfinite(images).all():
        raise FimaqError("reconstruction images must be a finite (n, C, H, W) tensor")
    start_time = time.perf_counter()
    report = ReconReport()
    only = units
    units = recon_units(net)
    unknown = set(only or ()) - {u.name for u in units}
    if unknown:
        raise FimaqError(f"unknown units {sorted(unknown)}; the model has {[u.name for u in units]}")
    device = next(net.parameters()).device
    ranks = ranks or Ranks()
    n_total, lo, hi = ranks.shard_offsets(images.shape[0], device)
    cache_device = torch.device(cfg.cache_device) if cfg.cache_device else device
    dtype = DTYPES[cfg.cache_dtype]
    meta = dict(meta or {})
    fingerprint = recon_fingerprint(cfg, fisher_cfg, n_total)
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    done: list[str] = []
    if state_path is not None and state_path.is_file():
        done = load_state(state_path, net, units, meta, fingerprint, report)
        ranks.info(log, "resuming reconstruction after %d finished units (%s)", len(done), state_path)
    ranks.barrier()  # every rank has read the state before rank 0 writes it again
    before, fisher_before = report.total_seconds, report.fisher_seconds  # earlier sessions' (resumed)
    fisher = None

    def count_seconds() -> None:
        report.total_seconds = before + time.perf_counter() - start_time
        report.fisher_seconds = fisher_before + (fisher.seconds if fisher is not None else 0.0)

    def save_state() -> None:
        count_seconds()
        if state_path is not None and ranks.is_main:
            write_state(state_path, net, meta, fingerprint, done, report)

    if state_path is not None and not state_path.is_file():
        save_state()  # the calibrated starting point: a kill during the first unit keeps calibration
    grads = {p: p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(False)
    was_training = net.training
    net.eval()
    todo = [u for u in units if u.name not in done and (only is None or u.name in only)]
    needs_fisher = cfg.loss not in ("mse", "global_local") and any(not u.is_head for u in todo)
    mode = set_quant_mode(net, enabled=False)  # restored at the end
    if needs_fisher:
        with autocast(precision, device):
            targets = soft_targets(net, images, fisher_cfg.temperature, fisher_cfg.batch_size)
        fisher = FisherEstimator(
            net,
            images,
            targets,
            fisher_cfg,
            seed=cfg.seed,
            shard=(n_total, lo, hi),
            precision=precision,
            ranks=ranks,
        )
    ctx = _Context(
        net,
        units,
        images,
        cfg,
        fisher_cfg,
        fisher,
        report,
        cache_device,
        dtype,
        logger,
        precision,
        progress,
        (n_total, lo, hi),
        ranks,
        {**_one_device(device), **(trainer_kwargs or {})},
    )
    if cfg.loss == "global_local" and any(not u.is_head for u in todo):
        with autocast(precision, device):  # the float model's penultimate features, once per run
            ctx.features = penultimate_targets(net, images, fisher_cfg.batch_size, cache_device)
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
            quiet.setLevel(logging.WARNING)  # the per-unit trainers' banners, once per unit, are noise
            for i, unit in enumerate(units):
                if unit.name in done or (only is not None and unit.name not in only):
                    continue
                t0 = time.perf_counter()
                try:
                    _reconstruct_unit(ctx, i, unit, set(done), f"{unit.name} [{i + 1}/{len(units)}]")
                    with defer_interrupts():  # the unit counts as finished once its state is written
                        done.append(unit.name)
                        report.unit_seconds[unit.name] = time.perf_counter() - t0
                        save_state()
                    ranks.info(log, "%s", unit_line(report, unit.name, "kl" if unit.is_head else cfg.loss))
                except Interrupted as exc:
                    exc.where = exc.where or f"in unit {unit.name} after {len(done)} finished units"
                    raise
    finally:
        quiet.setLevel(level)
        for unit in units:  # fold the hard rounding of every finished unit into its weights
            for layer in unit.weight_layers():
                finalize_rounding(layer)
        mode.restore()
        for p, g in grads.items():
            p.requires_grad_(g)
        net.train(was_training)
    count_seconds()
    return report


@dataclass
class _Context:
    """What every unit of one reconstruction run shares."""

    net: nn.Module
    units: list[Unit]
    images: torch.Tensor
    cfg: ReconConfig
    fisher_cfg: FisherConfig
    fisher: FisherEstimator | None
    report: ReconReport
    cache_device: torch.device
    dtype: torch.dtype
    logger: Any
    precision: Any
    progress: bool
    shard: tuple[int, int, int]  # (n_total, lo, hi) of this rank's images
    ranks: Ranks
    trainer_kwargs: dict[str, Any]  # the per-unit Trainers' accelerator, strategy, devices
    features: torch.Tensor | None = None  # global_local: the float penultimate features per image


def _reconstruct_unit(ctx: _Context, i: int, unit: Unit, done: set[str], description: str) -> None:
    """Cache, train, finalise and measure unit ``i`` (``done``: the units already reconstructed)."""
    net, cfg, fisher, report = ctx.net, ctx.cfg, ctx.fisher, ctx.report
    logger = ctx.logger if ctx.ranks.is_main else None  # only rank 0 logs
    (n, lo, hi), batch = ctx.shard, ctx.fisher_cfg.batch_size
    device = next(net.parameters()).device
    finished = [u.module for u in ctx.units if u.name in done]
    with quant_mode(net, enabled=False), autocast(ctx.precision, device):
        x_fp, y_fp = capture_unit(net, unit, ctx.images, batch, True, ctx.cache_device, ctx.dtype)
    x_q = x_fp
    if done and cfg.input_mode != "rinp":
        with quant_mode(net, only=finished), autocast(ctx.precision, device):
            x_q, _ = capture_unit(net, unit, ctx.images, batch, False, ctx.cache_device, ctx.dtype)
    cache = UnitCache(x_fp, y_fp, x_q)
    m = max(0, min(hi, cfg.error_images or n) - lo)  # this rank's rows among the first error_images
    before: list[torch.Tensor] = []  # the calibrated unit's outputs, for its objective once trained
    with quant_mode(net, only=[unit.module]):
        report.error_before[unit.name] = unit_error(unit, x_q[:m], y_fp[:m], batch, ctx.ranks, before)
    brecq = None
    if cfg.loss == "fisher_brecq" and not unit.is_head:
        with quant_mode(net, only=finished):  # earlier units quantized, this one FP
            fisher.start(unit, y_fp)
            brecq = fisher.per_sample_grads().to(ctx.cache_device)
    masks = BatchMasks(torch.Generator(device=device).manual_seed(cfg.seed * 10_007 + i))
    qdrop = cfg.drop_prob if cfg.input_mode == "qdrop" else None
    training = quant_mode(net, only=[unit.module], train=True, qdrop=qdrop, masks=masks)
    with _Rounding(unit, cfg) as rounding, training:
        use_fisher = fisher is not None and cfg.loss in ("fisher_diag", "fisher_lr", "fisher_dplr")
        use_fisher = use_fisher and not unit.is_head
        if use_fisher:
            # earlier units are float during refreshes: their output is the cached float input
            fisher.start(unit, y_fp, masks, x_in=x_fp, before=[u.module for u in ctx.units[:i]])
        rest = None
        if ctx.features is not None and not unit.is_head:
            rest = (suffix(net, unit), ctx.features)
        module = BlockReconModule(
            unit, cache, cfg, ctx.fisher_cfg, fisher if use_fisher else None, brecq, masks, (lo, hi), rest
        )
        trained = bool(module.roundings or module.act_scales)
        if not trained:
            ctx.ranks.info(log, "%s has no quantized weights or inputs: skipped", unit.name)
        else:
            _train(ctx, module, unit, i, description, use_fisher, logger)
        rounding.finalize()
    bad = [
        k
        for k, v in unit.module.state_dict().items()
        if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise FimaqError(
            f"unit {unit.name}: reconstruction produced NaN/Inf in {bad[0]}; finished units are kept"
        )
    after: list[torch.Tensor] = []
    with quant_mode(net, only=[unit.module]):
        report.error_after[unit.name] = unit_error(unit, x_q[:m], y_fp[:m], batch, ctx.ranks, after)
    if trained:  # the objective it minimised, on the same images, at the end of its training
        report.objective_before[unit.name] = mean_objective(module, before, ctx.ranks)
        report.objective_after[unit.name] = mean_objective(module, after, ctx.ranks)
        if cfg.keep_better and report.objective_after[unit.name] > report.objective_before[unit.name]:
            report.rejected[unit.name] = report.objective_after[unit.name]
            rounding.restore_start()  # the calibrated unit did better: it stays as calibrated
            after = []
            with quant_mode(net, only=[unit.module]):
                report.error_after[unit.name] = unit_error(unit, x_q[:m], y_fp[:m], batch, ctx.ranks, after)
            report.objective_after[unit.name] = mean_objective(module, after, ctx.ranks)
    if logger is not None:
        values = {
            "recon/output_mse_before": report.error_before[unit.name],
            "recon/output_mse_after": report.error_after[unit.name],
        }
        if trained:
            values["recon/objective_before"] = report.objective_before[unit.name]
            values["recon/objective_after"] = report.objective_after[unit.name]
        logger.log_metrics(values, step=i)
    if not torch.isfinite(torch.tensor(report.error_after[unit.name])):
        raise FimaqError(
            f"unit {unit.name}: its output is NaN/Inf after reconstruction; finished units are kept"
        )


def _train(
    ctx: _Context, module: BlockReconModule, unit: Unit, i: int, description: str, fisher: bool, logger
) -> None:
    """Optimise one unit with a fresh Trainer on the parent's accelerator, strategy and devices."""
    cfg, iters = ctx.cfg, ctx.cfg.unit_iters
    callbacks = [UnitProgressBar(description)] if ctx.progress else []
    if fisher:
        callbacks.append(FisherRefresh(ctx.fisher_cfg.refresh_steps(iters)))
    clock = StepClock()
    callbacks.append(clock)  # after FisherRefresh: refreshes are not counted
    trainer = L.Trainer(
        max_steps=iters,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=ctx.progress,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=max(1, min(50, iters // 20)),
        precision=ctx.precision,
        use_distributed_sampler=False,  # every rank steps through the same global batches
        **ctx.trainer_kwargs,
    )
    seconds = ctx.fisher.seconds if ctx.fisher is not None else 0.0
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=step_loader(ctx.shard[0], cfg, cfg.seed * 10_007 + i))
    ctx.report.train_seconds[unit.name] = time.perf_counter() - t0
    ctx.report.step_seconds[unit.name] = clock.mean_seconds
    now = ctx.fisher.seconds if ctx.fisher is not None else 0.0
    ctx.report.refresh_seconds[unit.name] = now - seconds
