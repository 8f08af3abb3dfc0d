"""STE rounding: a learned offset ``v`` on the scaled weight, rounded straight-through.

The weight is ``(clamp(round(W/s + v) + zp, 0, 2^b-1) - zp) * s`` on the fixed grid of the
calibrated quantizer; ``round`` passes the gradient through unchanged (straight-through estimator),
the clamp stops it outside the grid's range, so ``d w_hat / d v = s`` inside the range and 0 outside.
``v`` starts at 0 (round to nearest) and is in units of the quantization step. Unlike AdaRound there
is no soft relaxation and no regulariser: the forward pass always uses the hard weight, so hardening
only freezes ``v``.
"""

from __future__ import annotations

import torch
from torch import nn

from fimaq.quant.fake_quant import round_ste
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding, attach_rounding


class SteRoundingQuantizer(LearnedRounding):
    """Weight quantizer with straight-through learned rounding; wraps the calibrated quantizer.

    Args:
        base: the calibrated per-row weight quantizer (its scale and zero point stay fixed).
        weight: the float weight, flattened to ``(rows, -1)`` like ``base`` sees it.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__(base, "STE rounding")
        with torch.no_grad():
            self.register_buffer("scaled", weight.detach().float() / base.scale.detach().float())
            self.v = nn.Parameter(torch.zeros_like(self.scaled))

    @property
    def learned(self) -> list[nn.Parameter]:
        return [self.v]

    @property
    def shape(self) -> torch.Size:
        return self.scaled.shape

    def codes(self) -> torch.Tensor:
        """``round(W/s + v)`` with the straight-through gradient (identity) to ``v``."""
        return round_ste(self.scaled + self.v)

    def hard_codes(self) -> torch.Tensor:
        """``round(W/s + v)``."""
        return torch.round(self.scaled + self.v)


def attach_ste_rounding(layer: nn.Module) -> LearnedRounding | None:
    """Swap a quantized layer's weight quantizer for an STE-rounding quantizer (None if FP weights)."""
    return attach_rounding(layer, SteRoundingQuantizer)


__all__ = ["SteRoundingQuantizer", "attach_ste_rounding"]
