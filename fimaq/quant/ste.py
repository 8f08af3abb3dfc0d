"""Training-time fake quantization: one autograd function for quantize-dequantize with the
straight-through estimator and QDrop, and cheap seeded Bernoulli masks.

Forward: ``x_hat = clamp(round(x/s), -zp, qmax - zp) * s`` (equal to ``(clamp(round(x/s) + zp, 0,
qmax) - zp) * s``), then ``where(keep, x_hat, x)``. Backward (LSQ without gradient scaling):
``dx = g`` where the code is inside the range or the element was dropped, else 0;
``ds = g * (round(x/s) - x/s)`` inside the range, ``g * (bound - zp)`` outside, 0 where dropped.
These are exactly the gradients autograd gives for the composed ops with ``round_ste``; the fused
form needs a third of the memory passes.
"""

from __future__ import annotations

import torch


class FakeQuantSTE(torch.autograd.Function):
    """``fake_quant_ste(x, scale, zero_point, bits, keep)``; ``keep`` = QDrop mask or None."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmax: int, keep):
        zp = zero_point.detach()
        v = x / scale
        r = torch.round(v)
        rc = torch.maximum(torch.minimum(r, qmax - zp), -zp)
        out = rc * scale
        inside = r == rc
        ds = rc - v * inside  # r - v inside the range, the clamp bound (minus zp) outside
        if keep is not None:
            out = torch.where(keep, out, x)
            ds = ds * keep
            dx = inside | ~keep
        else:
            dx = inside
        ctx.save_for_backward(dx, ds)
        ctx.scale_shape = scale.shape
        return out

    @staticmethod
    def backward(ctx, g):
        dx, ds = ctx.saved_tensors
        gx = g * dx if ctx.needs_input_grad[0] else None
        gs = (g * ds).sum_to_size(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None


def fake_quant_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients to ``x`` and ``scale`` (and QDrop ``keep``)."""
    return FakeQuantSTE.apply(x, scale, zero_point, 2**bits - 1, keep)


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """A boolean mask that is True with probability ``p`` (in steps of 1/256), from random bytes.

    One 64-bit draw gives eight bytes, so this costs an eighth of the generator calls of ``rand``.
    """
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=generator, device=device
    )
    threshold = round(p * 256)
    return (words.view(torch.uint8)[:n] < threshold).reshape(shape)
