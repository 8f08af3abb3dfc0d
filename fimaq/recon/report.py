"""What a reconstruction reports: per unit the wall time, the output error and the unit's own
objective before and after, measured on the same images."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fimaq.parallel import Ranks
from fimaq.recon.units import Unit

if TYPE_CHECKING:
    from fimaq.recon.module import BlockReconModule


@dataclass
class ReconReport:
    """Per-unit wall time and output error (MSE on the quantized input) before/after, in unit order."""

    unit_seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)  # the Trainer's fit, refreshes included
    refresh_seconds: dict[str, float] = field(default_factory=dict)
    step_seconds: dict[str, float] = field(default_factory=dict)  # mean optimisation step, no refresh
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)
    # the unit's own reconstruction objective (the loss it minimised, no rounding penalty) before/after
    objective_before: dict[str, float] = field(default_factory=dict)
    objective_after: dict[str, float] = field(default_factory=dict)
    # units whose reconstruction ended with a higher objective than calibration (``recon.keep_better``):
    # that objective; the unit kept its calibration
    rejected: dict[str, float] = field(default_factory=dict)
    resumed_units: list[str] = field(default_factory=list)
    fisher_seconds: float = 0.0  # (a resumed run's seconds include the earlier sessions' saved work)
    total_seconds: float = 0.0


@torch.no_grad()
def unit_error(
    unit: Unit,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    ranks: Ranks | None = None,
    outputs: list[torch.Tensor] | None = None,
) -> float:
    """Mean squared error of ``unit(x)`` against ``y`` (float64 accumulation; summed over ``ranks``);
    the outputs, batch by batch, go to ``outputs`` when given (on ``y``'s device)."""
    device = next(unit.module.parameters()).device
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, x.shape[0], batch_size):
        out = unit.module(x[start : start + batch_size].to(device, torch.float32))
        ref = y[start : start + batch_size].to(device).double()
        sums[0] += (out.double() - ref).pow(2).sum()
        sums[1] += ref.numel()
        if outputs is not None:
            outputs.append(out.to(y.device))
    total, count = (ranks or Ranks()).sum(sums).tolist()
    return total / max(1.0, count)


@torch.no_grad()
def mean_objective(module: BlockReconModule, outputs: list[torch.Tensor], ranks: Ranks) -> float:
    """The unit's objective (:meth:`BlockReconModule.objective_sum`) of the outputs of its first cached
    rows, in order, averaged over them (and over ``ranks``)."""
    sums = torch.zeros(2, dtype=torch.float64, device=module.device)
    start = 0
    for out in outputs:
        rows = torch.arange(start, start + out.shape[0])
        sums[0] += module.objective_sum(out.to(module.device, torch.float32), rows).double()
        sums[1] += out.shape[0]
        start += out.shape[0]
    total, count = ranks.sum(sums).tolist()
    return total / max(1.0, count)


def unit_line(report: ReconReport, name: str, loss: str) -> str:
    """``blocks.0: output MSE 0.05 -> 0.04, objective (fisher_dplr) 2.1 -> 1.2 (3.1 s)``."""
    line = f"{name}: output MSE {report.error_before[name]:.4g} -> {report.error_after[name]:.4g}"
    if name in report.objective_after:
        before, after = report.objective_before[name], report.objective_after[name]
        line += f", objective ({loss}) {before:.4g} -> {after:.4g}"
    if name in report.rejected:
        line += f"; kept calibrated (the reconstruction ended at objective {report.rejected[name]:.4g})"
    return f"{line} ({report.unit_seconds[name]:.1f} s)"
