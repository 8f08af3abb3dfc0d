"""Quantized drop-in layers, each built from its float counterpart with ``from_float``."""

from fimaq.layers.attention import QuantAttention, QuantWindowAttention
from fimaq.layers.conv import QuantConv2d
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

__all__ = ["QuantAttention", "QuantConv2d", "QuantLinear", "QuantMatMul", "QuantWindowAttention"]
