"""Quantization math: fake-quant primitives, quantizer modules and the calibration searches."""

from fimaq.quant.fake_quant import fake_quant, quantize_codes, round_ste
from fimaq.quant.quantizer import UniformQuantizer, check_bits

__all__ = ["UniformQuantizer", "check_bits", "fake_quant", "quantize_codes", "round_ste"]
