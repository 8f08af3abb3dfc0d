"""Quantization math: fake-quant primitives, quantizer modules and the calibration searches."""

from fimaq.quant.fake_quant import centered_codes, dequantize, fake_quant, quantize, round_ste
from fimaq.quant.quantizer import UniformQuantizer, check_bits

__all__ = [
    "UniformQuantizer",
    "centered_codes",
    "check_bits",
    "dequantize",
    "fake_quant",
    "quantize",
    "round_ste",
]
