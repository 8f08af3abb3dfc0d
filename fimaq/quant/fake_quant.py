"""Uniform asymmetric quantize-dequantize, the primitive every fimaq quantizer is built on.

``q = clamp(round(x / s) + zp, 0, 2^b - 1)`` and ``x_hat = (q - zp) * s`` with an integer zero point.
``round`` is half-to-even (``torch.round``), as in the reference implementation.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity in the backward pass)."""
    return (torch.round(x) - x).detach() + x


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / s) + zp, 0, 2^b - 1)`` (as a float tensor)."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 2**bits - 1)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, ste: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``x``; with ``ste`` gradients flow to ``x`` and ``scale`` (LSQ-style, unscaled).

    Args:
        x: input tensor.
        scale: positive step size, broadcastable to ``x``.
        zero_point: integer-valued offset, broadcastable to ``x``; never receives a gradient.
        bits: bit-width b, codes lie in ``[0, 2^b - 1]``.
        ste: use the straight-through estimator for rounding.
    """
    zero_point = zero_point.detach()
    rounded = round_ste(x / scale) if ste else torch.round(x / scale)
    q = torch.clamp(rounded + zero_point, 0, 2**bits - 1)
    return (q - zero_point) * scale
