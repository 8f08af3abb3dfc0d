"""QuantLinear: per-row weight quantizer and a per-tensor input quantizer with per-token scales."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.quant.quantizer import UniformQuantizer


class QuantLinear(nn.Linear):
    """A linear layer with fake-quantized weight (per output row) and input (per tensor / per token).

    The input quantizer's scale has shape ``(1, *token_shape, 1)`` (one scale per token position, all
    equal after calibration) and one shared zero point; with ``token_shape=None`` it is a single scale.
    The layer always carries a bias (zeros when the float layer had none) so that a LayerNorm fold can
    move an offset into it.

    Args:
        in_features: input width.
        out_features: output width.
        w_bits: weight bit-width, ``None`` for FP.
        a_bits: input bit-width, ``None`` for FP.
        token_shape: the input's shape between batch and channel dims, e.g. ``(197,)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        w_bits: int | None,
        a_bits: int | None,
        token_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=True)
        self.w_quantizer = UniformQuantizer(w_bits, (out_features, 1), (out_features, 1))
        a_shape = (1, *token_shape, 1) if token_shape else (1,)
        self.a_quantizer = UniformQuantizer(a_bits, a_shape, (1,))

    @classmethod
    def from_float(
        cls, linear: nn.Linear, w_bits: int | None, a_bits: int | None, token_shape: Sequence[int] | None
    ) -> QuantLinear:
        """Build from an ``nn.Linear``, copying its weight and bias."""
        new = cls(linear.in_features, linear.out_features, w_bits, a_bits, token_shape)
        new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            new.bias.copy_(linear.bias if linear.bias is not None else torch.zeros_like(new.bias))
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it."""
        return self.w_quantizer(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.a_quantizer(x), self.quantized_weight(), self.bias)
