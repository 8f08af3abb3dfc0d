"""Quantized drop-in layers, each built from its float counterpart with ``from_float``."""

from fimaq.layers.attention import QuantAttention, QuantWindowAttention
from fimaq.layers.conv import QuantConv2d
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

#: the layer types calibration and reconstruction work on; families compose them
QUANT_LAYER_TYPES = (QuantConv2d, QuantLinear, QuantMatMul)

__all__ = [
    "QUANT_LAYER_TYPES",
    "QuantAttention",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "QuantWindowAttention",
]
