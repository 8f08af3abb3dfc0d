"""Training-time fake quantization: one autograd function for quantize-dequantize with the
straight-through estimator and QDrop, and cheap seeded Bernoulli masks (QDrop).

Forward: ``x_hat = clamp(round(x/s), -zp, qmax - zp) * s`` (equal to ``(clamp(round(x/s) + zp, 0,
qmax) - zp) * s``), then ``x_hat`` where ``keep`` is 1 and ``x`` where it is 0.
Backward (LSQ without gradient scaling):
``dx = g`` where the code is inside the range or the element was dropped, else 0;
``ds = g * (round(x/s) - x/s)`` inside the range, ``g * (bound - zp)`` outside, 0 where dropped.
These are exactly the gradients autograd gives for the composed ops with ``round_ste``; the fused
form needs far fewer passes over memory.
"""

from __future__ import annotations

import torch

from fimaq.quant.fake_quant import clamp_centered


class FakeQuantSTE(torch.autograd.Function):
    """``fake_quant_ste(x, scale, zero_point, bits, keep)``; ``keep`` = float 0/1 QDrop mask or None.

    Masks are float tensors and selections are ``lerp``/multiplications: on CPU, boolean masks and
    ``torch.where`` cost several times more memory passes than float arithmetic.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits: int, keep):
        zp = zero_point.detach()
        v = x / scale
        r = torch.round(v)
        rc = clamp_centered(r, zp, bits)
        out = rc * scale
        inside = torch.eq(r, rc, out=r)  # 1.0 where the code is not clamped (one pass, into r's memory)
        ds = torch.addcmul(rc, v, inside, value=-1, out=v)  # r - v inside, the bound (minus zp) outside
        if keep is not None:
            out = torch.lerp(x, out, keep, out=out)  # exact: weight 1 gives out, weight 0 gives x
            ds.mul_(keep)
            dx = inside.sub_(1).mul_(keep).add_(1)  # 1 where inside or dropped
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
    """Quantize-dequantize with straight-through gradients to ``x`` and ``scale``; ``keep`` is a float
    0/1 mask (1 = quantized value, 0 = float value, QDrop) or None."""
    return FakeQuantSTE.apply(x, scale, zero_point, bits, keep)


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A 0/1 float mask that is 1 with probability ``p`` (in steps of 1/256), from random bytes.

    One 64-bit draw gives eight bytes, so this costs an eighth of the generator calls of ``rand``.
    """
    n = 1
    for s in shape:
        n *= int(s)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, generator=generator, device=device
    )
    byte = words.view(torch.uint8)[:n].reshape(shape)
    threshold = round(p * 256)
    out = torch.empty(shape, dtype=dtype, device=device)
    if threshold > 255:  # every byte is below 256 (and 256 is not a uint8 to compare with)
        return out.fill_(1)
    return torch.lt(byte, threshold, out=out)  # 1.0 where byte < 256 p, in one pass
