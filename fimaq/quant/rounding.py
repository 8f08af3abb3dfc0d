"""Learned rounding of a weight on its fixed quantization grid: what AdaRound and STE rounding share.

A learned-rounding quantizer wraps (and keeps) the calibrated per-row :class:`UniformQuantizer` of a
layer, whose scale and zero point stay fixed, and learns which integer each weight rounds to. The
float weight stays in ``layer.weight`` while the unit trains (switching quantization off gives the
float layer); :meth:`LearnedRounding.harden` freezes the rounding and :func:`finalize_rounding` folds
the hard weight into ``layer.weight`` and restores the uniform quantizer.
"""

from __future__ import annotations

import torch
from torch import nn

from fimaq.errors import FimaqError
from fimaq.quant.fake_quant import dequantize
from fimaq.quant.quantizer import UniformQuantizer


class LearnedRounding(nn.Module):
    """Base of the weight quantizers with learned rounding.

    A subclass builds its state from ``base`` and the flattened float weight and defines
    :meth:`codes` (the rounded values ``W/s`` as they train, before the zero point) and
    :meth:`hard_codes` (the same, frozen); :attr:`learned` lists its trained parameters.

    Args:
        base: the calibrated per-row weight quantizer (its scale and zero point stay fixed).
        what: the method's name in error messages.
    """

    def __init__(self, base: UniformQuantizer, what: str) -> None:
        super().__init__()
        if base.bits is None:
            raise FimaqError(f"{what} needs a quantized weight (w_bits 2..8), got a float layer")
        self.base = base
        self.soft = True  # learning; False once hardened

    @property
    def bits(self) -> int:
        return self.base.bits

    @property
    def learned(self) -> list[nn.Parameter]:
        """The parameters the reconstruction trains."""
        raise NotImplementedError

    @property
    def shape(self) -> torch.Size:
        """The shape of the flattened weight the quantizer was built for."""
        raise NotImplementedError

    def codes(self) -> torch.Tensor:
        """The rounded values (integers once hard) with the gradients of the method."""
        raise NotImplementedError

    def hard_codes(self) -> torch.Tensor:
        """The frozen rounded values."""
        raise NotImplementedError

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.base.active:
            return weight  # quantization switched off: the float weight, as with the plain quantizer
        if weight.shape != self.shape:
            raise FimaqError(
                f"{type(self).__name__} built for a weight of shape {tuple(self.shape)}, "
                f"got {tuple(weight.shape)}"
            )
        zp = self.base.zero_point
        q = torch.clamp(self.codes() + zp, 0, 2**self.bits - 1)
        return dequantize(q, self.base.scale.detach(), zp).to(weight.dtype)

    def harden(self) -> None:
        """Freeze the rounding for good (its parameters stop learning)."""
        self.soft = False
        for p in self.learned:
            p.requires_grad_(False)

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """The weight with the frozen rounding, dequantized."""
        zp = self.base.zero_point
        q = torch.clamp(self.hard_codes() + zp, 0, 2**self.bits - 1)
        return dequantize(q, self.base.scale.detach(), zp)


def attach_rounding(layer: nn.Module, kind: type[LearnedRounding]) -> LearnedRounding | None:
    """Swap a quantized layer's weight quantizer for a ``kind`` quantizer (None if FP weights).

    A layer that already has a learned-rounding quantizer keeps it.
    """
    base = layer.w_quantizer
    if isinstance(base, LearnedRounding):
        return base
    if base.bits is None:
        return None
    weight = layer.weight.detach().reshape(base.scale.shape[0], -1)
    layer.w_quantizer = kind(base, weight)
    return layer.w_quantizer


@torch.no_grad()
def finalize_rounding(layer: nn.Module) -> None:
    """Fold the hard-rounded weight into ``layer.weight`` and restore the uniform quantizer."""
    learned = layer.w_quantizer
    if not isinstance(learned, LearnedRounding):
        return
    layer.weight.copy_(learned.hard_weight().reshape_as(layer.weight))
    layer.w_quantizer = learned.base


__all__ = ["LearnedRounding", "attach_rounding", "finalize_rounding"]
