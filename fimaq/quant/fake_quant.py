"""Uniform asymmetric affine quantization: the one place its formula is written.

``q = clamp(round(x / s) + zp, 0, 2^b - 1)`` and ``x_hat = (q - zp) * s`` with an integer zero point;
``round`` is half-to-even (``torch.round``). Every quantizer, the straight-through form, the
calibration searches, the exporter and the ONNX builder call these functions.

:func:`centered_codes` returns ``q - zp`` = ``clamp(round(x / s), -zp, 2^b - 1 - zp)`` directly: the
rounded values and zero points are small integers, so both forms are exact and ``fake_quant`` is
``centered_codes * s`` bit for bit.
"""

from __future__ import annotations

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient (identity in the backward pass)."""
    return (torch.round(x) - x).detach() + x


def clamp_centered(rounded: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(rounded, -zp, 2^b - 1 - zp)``: rounded values ``round(x / s)`` to centred codes ``q - zp``."""
    return torch.clamp(rounded, -zero_point, 2**bits - 1 - zero_point)


def clamp_codes(
    rounded: torch.Tensor, zero_point: torch.Tensor, qmax: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`clamp_centered` of rounded values (integers in float) into ``out`` (a new tensor laid out
    like ``rounded`` when None; may be ``rounded`` itself), in as few passes as the zero points allow.

    On the CPU a single zero point, or one per index of a single dimension (an attention operand's
    per-head ones), is clamped against plain numbers: one pass, several times faster than clamping
    against tensors. Otherwise the zero point is added, the codes clamped to ``[0, qmax]`` and the
    zero point subtracted (three passes; exact, small integers in float).
    """
    zero_point = zero_point.detach()
    groups = [d for d in range(zero_point.dim()) if zero_point.shape[d] > 1]
    cpu = zero_point.device.type == "cpu"
    if cpu and zero_point.numel() == 1:
        z = float(zero_point.reshape(()))
        return torch.clamp(rounded, -z, qmax - z, out=out)
    if cpu and len(groups) == 1 and zero_point.dim() == rounded.dim() and zero_point.numel() <= 64:
        d = groups[0]
        out = torch.empty_like(rounded) if out is None else out
        for i, z in enumerate(zero_point.reshape(-1).tolist()):
            torch.clamp(rounded.select(d, i), -z, qmax - z, out=out.select(d, i))
        return out
    if out is None:
        return torch.add(rounded, zero_point).clamp_(0, qmax).sub_(zero_point)
    return torch.add(rounded, zero_point, out=out).clamp_(0, qmax).sub_(zero_point)


def broadcasts_to(small: torch.Size, shape: torch.Size) -> bool:
    """Whether ``small`` broadcasts to ``shape`` without changing it (``torch.broadcast_shapes`` costs
    a hundred microseconds of Python per call)."""
    lead = len(shape) - len(small)
    return lead >= 0 and all(s == 1 or s == t for s, t in zip(small, shape[lead:], strict=True))


def dense_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The order of ``x``'s dimensions in memory, outermost first (by stride; size-1 dimensions keep
    their place), or None when ``x`` is contiguous. A permuted view such as ``k.transpose(-2, -1)``
    has an order other than ``0, 1, ..., n-1``; elementwise work is fastest when every operand is
    laid out in the same order."""
    if x.is_contiguous():
        return None
    big = iter(sorted((d for d in range(x.dim()) if x.shape[d] > 1), key=lambda d: -x.stride(d)))
    order = [d if x.shape[d] == 1 else next(big) for d in range(x.dim())]
    return None if order == list(range(x.dim())) else tuple(order)


def empty_in_order(
    shape: torch.Size | tuple[int, ...], order: tuple[int, ...] | None, dtype: torch.dtype, device
) -> torch.Tensor:
    """An empty tensor of ``shape`` whose memory runs through the dimensions in ``order``
    (:func:`dense_order`; None: contiguous)."""
    if order is None:
        return torch.empty(shape, dtype=dtype, device=device)
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return torch.empty([shape[d] for d in order], dtype=dtype, device=device).permute(inverse)


def broadcast_buffer(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``x``'s dtype in the broadcast shape of ``x`` and ``params``, for ``out=``;
    laid out in memory like ``x`` when that shape is ``x``'s (:func:`dense_order`)."""
    if all(broadcasts_to(p.shape, x.shape) for p in params):
        return empty_in_order(x.shape, dense_order(x), x.dtype, x.device)
    shape = torch.broadcast_shapes(x.shape, *(p.shape for p in params))
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def centered_codes(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q - zp``, small integers as floats (in ``[-zp, 2^b - 1 - zp]``), in the broadcast shape.

    ``out`` (no autograd): a buffer of the broadcast shape (:func:`broadcast_buffer`) that receives
    the result, computed in place by adding and removing the zero point around a clamp to scalar
    bounds: much faster than clamping to per-group tensors, and exact. Reused buffers also spare the
    page faults of fresh large allocations.
    """
    zero_point = zero_point.detach()
    if out is None:
        return clamp_centered(torch.round(x / scale), zero_point, bits)
    t = torch.div(x, scale, out=out).round_()
    return clamp_codes(t, zero_point, 2**bits - 1, out=t)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``q = clamp(round(x / s) + zp, 0, 2^b - 1)`` (as a float tensor)."""
    return centered_codes(x, scale, zero_point, bits) + zero_point.detach()


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Values ``(q - zp) * s`` of integer codes ``q`` (any integer or float dtype) in ``scale``'s dtype."""
    return (q.to(scale.dtype) - zero_point.detach().to(scale.dtype)) * scale


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    ste: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x``; with ``ste`` gradients flow to ``x`` and ``scale`` (LSQ-style, unscaled).

    Args:
        x: input tensor.
        scale: positive step size, broadcastable to ``x``.
        zero_point: integer-valued offset, broadcastable to ``x``; never receives a gradient.
        bits: bit-width b, codes lie in ``[0, 2^b - 1]``.
        ste: use the straight-through estimator for rounding.
        out: buffer for the result (no autograd), see :func:`centered_codes`.
    """
    if ste:
        zero_point = zero_point.detach()
        return clamp_centered(round_ste(x / scale), zero_point, bits) * scale
    if out is not None:
        return centered_codes(x, scale, zero_point, bits, out=out).mul_(scale)
    return centered_codes(x, scale, zero_point, bits) * scale
