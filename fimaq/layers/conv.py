"""QuantConv2d for the patch embedding: per-output-channel weights; input FP unless asked otherwise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.quant.quantizer import UniformQuantizer


class QuantConv2d(nn.Conv2d):
    """Conv2d with a per-output-channel weight quantizer and an optional per-tensor input quantizer.

    Args:
        conv: the float convolution whose hyper-parameters, weight and bias are copied.
        w_bits: weight bit-width, ``None`` for FP.
        a_bits: input bit-width, ``None`` (the default for the patch embedding) keeps the image FP.
    """

    @classmethod
    def from_float(cls, conv: nn.Conv2d, w_bits: int | None, a_bits: int | None = None) -> QuantConv2d:
        """Build from an ``nn.Conv2d``."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=True,
            padding_mode=conv.padding_mode,
        )
        new.to(device=conv.weight.device, dtype=conv.weight.dtype)
        new.w_quantizer = UniformQuantizer(w_bits, (conv.out_channels, 1), (conv.out_channels, 1))
        new.a_quantizer = UniformQuantizer(a_bits, (1,), (1,))
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            new.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(new.bias))
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it (quantized per output channel)."""
        flat = self.weight.reshape(self.out_channels, -1)
        return self.w_quantizer(flat).reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.a_quantizer(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
