"""QuantMatMul: ``A @ B`` with both operands fake-quantized per head, with per-row / per-column scales."""

from __future__ import annotations

import torch
from torch import nn

from fimaq.quant.log_quantizer import LogQuantizer
from fimaq.quant.quantizer import UniformQuantizer


class QuantMatMul(nn.Module):
    """Batched ``A @ B`` on ``(batch, heads, rows, inner) @ (batch, heads, inner, cols)``.

    ``A`` gets one scale per (head, row) and ``B`` one per (head, column); each operand has one zero
    point per head. After calibration the scales along rows/columns are equal; reconstruction may
    then move them apart.

    Args:
        num_heads: number of attention heads.
        rows: rows of ``A`` (tokens).
        cols: columns of ``B`` (tokens for ``q @ k^T``, head dim for ``attn @ v``).
        a_bits: bit-width of ``A``, ``None`` for FP.
        b_bits: bit-width of ``B``, ``None`` for FP.
    """

    def __init__(self, num_heads: int, rows: int, cols: int, a_bits: int | None, b_bits: int | None) -> None:
        super().__init__()
        self.A_quantizer = UniformQuantizer(a_bits, (1, num_heads, rows, 1), (1, num_heads, 1, 1))
        self.B_quantizer = UniformQuantizer(b_bits, (1, num_heads, 1, cols), (1, num_heads, 1, 1))

    def use_log_grid(self, kind: str) -> None:
        """Quantize ``A`` (attention probabilities) on a log grid (:mod:`fimaq.quant.log_quantizer`)."""
        old = self.A_quantizer
        self.A_quantizer = LogQuantizer(old.bits, tuple(old.scale.shape), tuple(old.zero_point.shape), kind)
        self.A_quantizer.to(old.scale.device)

    @property
    def active(self) -> bool:
        return self.A_quantizer.active or self.B_quantizer.active

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.A_quantizer(a) @ self.B_quantizer(b)
