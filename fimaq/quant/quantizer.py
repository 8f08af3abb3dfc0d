"""The quantizer module: qparams with their final shapes from construction on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fimaq.errors import FimaqError
from fimaq.quant.fake_quant import broadcast_buffer, dense_order, fake_quant
from fimaq.quant.ste import code_bounds, fake_quant_drop, fake_quant_ste, mask_dtype

MIN_BITS, MAX_BITS = 2, 8
FP_BITS = (None, 32)


def check_bits(bits: int | None, what: str = "bits") -> int | None:
    """Validate a bit-width: 2..8 quantizes, ``None`` or 32 means full precision (returned as None)."""
    if bits in FP_BITS:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise FimaqError(
            f"{what}={bits!r} is outside the supported range {MIN_BITS}..{MAX_BITS} (or 32/null for FP)"
        )
    return bits


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake-quantizer with a learnable scale and a fixed integer zero point.

    Args:
        bits: bit-width (2..8); ``None`` builds a pass-through quantizer.
        scale_shape: shape of ``scale`` (broadcast against the input).
        zero_point_shape: shape of ``zero_point``.
    """

    def __init__(self, bits: int | None, scale_shape: Sequence[int], zero_point_shape: Sequence[int]) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.scale = nn.Parameter(torch.ones(tuple(scale_shape)))
        self.register_buffer("zero_point", torch.zeros(tuple(zero_point_shape)))
        # What the quantizer does; set only through fimaq.layers.mode (quant_mode / set_quant_mode).
        self.enabled = False  # switched on after calibration; calibration itself runs in FP
        self.ste = False  # straight-through rounding (gradients reach the input and the scale)
        # QDrop while reconstructing: each element keeps its quantized value with this probability,
        # else its float value; ``masks(shape, p, device, dtype)`` draws the 0/1 keep masks.
        self.qdrop: float | None = None
        self.masks = None
        self.bounds: tuple[torch.Tensor, ...] | None = None  # code_bounds while training (mode sets None)

    @property
    def active(self) -> bool:
        return self.enabled and self.bits is not None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={tuple(self.scale.shape)}, zero_point={tuple(self.zero_point.shape)}"

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Copy (broadcast) calibrated qparams into the fixed-shape parameters."""
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale).expand_as(self.scale))
            self.zero_point.copy_(zero_point.to(self.zero_point).expand_as(self.zero_point))

    def float_operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` and the scale for float32 arithmetic whatever the input (autocast hands bf16/fp16
        activations over)."""
        xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        return xf, self.scale.to(xf.dtype) if xf.dtype != self.scale.dtype else self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        xf, scale = self.float_operands(x)
        grad = torch.is_grad_enabled()
        if not self.ste:
            buffer = None if grad else broadcast_buffer(xf, scale, self.zero_point)  # in-place passes
            return fake_quant(xf, scale, self.zero_point, self.bits, out=buffer).to(x.dtype)
        keep = p = None
        if self.qdrop is not None and self.qdrop < 1:
            # raw bytes for the native kernel; else a mask laid out like x (an attention operand is a
            # permuted view): elementwise passes over operands in different memory orders cost more
            dtype = mask_dtype(xf, scale, self.zero_point)
            keep = self.masks(xf.shape, self.qdrop, xf.device, dtype, order=dense_order(xf))
            p = self.qdrop if dtype is None else None  # the bytes' threshold
        if not grad:  # the same values without the derivatives (a Fisher refresh)
            return fake_quant_drop(xf, scale, self.zero_point, self.bits, keep, p).to(x.dtype)
        if self.bounds is None or self.bounds[0].device != xf.device:
            self.bounds = code_bounds(self.zero_point, 2**self.bits - 1)
        return fake_quant_ste(xf, scale, self.zero_point, self.bits, keep, p, self.bounds).to(x.dtype)
