"""Training-time fake quantization: one autograd function for quantize-dequantize with the
straight-through estimator and QDrop, and cheap seeded Bernoulli masks (QDrop).

Forward: ``x_hat = clamp(round(x/s), -zp, qmax - zp) * s`` (equal to ``(clamp(round(x/s) + zp, 0,
qmax) - zp) * s``), then ``x_hat`` where ``keep`` is 1 and ``x`` where it is 0.
Backward (LSQ without gradient scaling):
``dx = g`` where the code is inside the range or the element was dropped, else 0;
``ds = g * (round(x/s) - x/s)`` inside the range, ``g * (bound - zp)`` outside, 0 where dropped.
These are exactly the gradients autograd gives for the composed ops with ``round_ste``; the fused
form needs far fewer passes over memory.

Two kernels compute the forward's three tensors (``x_hat`` and the two local derivatives): on the
CPU the C++ one of :mod:`fimaq.quant.native` (one pass over memory, reading the QDrop draws as raw
bytes), else the eager one (a few in-place passes; the same values bit for bit). Inside a step that
``torch.compile`` traces (``recon.compile``) the written-out composition runs instead
(:func:`fake_quant_ste_composed`): the compiler derives the same gradients and fuses the passes.
"""

from __future__ import annotations

import torch

from fimaq.quant import native
from fimaq.quant.fake_quant import (
    broadcast_buffer,
    broadcasts_to,
    dense_order,
    empty_in_order,
    fake_quant,
)

Derivatives = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def code_bounds(zp: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(-zp, qmax - zp, 1.0)``: the bounds of the centred codes as tensors (one clamp against them,
    whatever the zero points' shape) and a one for the QDrop selection; a quantizer computes them once
    per training mode (its zero point does not change while it trains)."""
    zp = zp.detach()
    return torch.neg(zp), torch.rsub(zp, qmax), zp.new_ones(())


def _eager_kernel(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int, keep, bounds=None
) -> Derivatives:
    """``(x_hat, dx, ds)`` in three contiguous buffers and a few in-place passes (the codes clamped to
    the :func:`code_bounds` of the zero point)."""
    lo, hi, one = bounds if bounds is not None else code_bounds(zp, qmax)
    # contiguous in x's logical order whatever its memory order: an attention operand (a permuted
    # view of the qkv output) then reaches its product without a copy
    v = torch.div(x, scale, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    r = torch.round(v)
    rc = torch.clamp(r, lo, hi)
    inside = torch.eq(r, rc, out=r)  # 1.0 where the code is not clamped (into r's memory)
    ds = torch.addcmul(rc, v, inside, value=-1, out=v)  # r - v inside, the bound (minus zp) outside
    out = rc.mul_(scale)
    if keep is None:
        return out, inside, ds
    out = torch.lerp(x, out, keep, out=out)  # exact: weight 1 gives x_hat, weight 0 gives x
    ds.mul_(keep)
    dx = torch.lerp(one, inside, keep, out=inside)  # 1 where dropped
    return out, dx, ds


def _functional_kernel(
    x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, qmax: int, keep
) -> Derivatives:
    """The same values as :func:`_eager_kernel` without in-place operations, for a scale or zero point
    that broadcasts ``x`` to a larger shape; ``keep`` may be a 0/1 ``uint8`` mask, and ``dx`` is
    returned as ``uint8`` (a quarter of the memory traffic)."""
    v = x / scale
    r = torch.round(v)
    rc = torch.clamp(r + zp, 0, qmax) - zp
    inside = r == rc
    ds = rc - v * inside
    out = rc * scale
    if keep is None:
        return out, inside.to(torch.uint8), ds
    kept = keep.to(x.dtype)
    dx = (inside | (keep == 0)).to(torch.uint8)
    return torch.lerp(x, out, kept), dx, ds * kept


def _functional_backward(
    g: torch.Tensor, dx: torch.Tensor, ds: torch.Tensor, scale_shape, want_x: bool, want_s: bool
):
    """The gradients of ``x`` and the scale from the upstream gradient ``g`` (``None`` where not wanted)."""
    gx = g * dx.to(g.dtype) if want_x else None
    gs = (g * ds).sum_to_size(scale_shape) if want_s else None
    return gx, gs


def mask_dtype(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.dtype | None:
    """The dtype the QDrop masks for quantizing ``x`` should have: None (the raw random bytes, see
    :func:`mask_from_bytes`) where the native kernel applies (never inside a compiled step), else
    ``x``'s dtype."""
    return None if native.applies(x, scale, zero_point) else x.dtype


def _native_kernel(x: torch.Tensor, scale, zp, qmax: int, keep, p, derivatives: bool = True):
    """``(x_hat, dx, ds)`` (or ``x_hat`` alone) from the native kernel; ``keep``: raw bytes (``p``) or
    None. The buffers are contiguous, in ``x``'s logical order whatever its memory order: an
    attention operand (a permuted view of the ``qkv`` output) then reaches its product without a
    copy, and the product's backward hands over its gradient in the layout of the saved derivatives."""
    bufs = [torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(3 if derivatives else 1)]
    threshold = drop_threshold(p) if keep is not None else 0
    native.fake_quant(x, scale, zp, qmax, keep, threshold, *bufs)
    return tuple(bufs) if derivatives else bufs[0]


def drop_threshold(p: float) -> int:
    """The byte threshold of a QDrop probability ``p``: a raw byte keeps its element where it is below."""
    return round(p * 256)


def fake_quant_drop(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, keep, p: float | None
) -> torch.Tensor:
    """The forward values of :func:`fake_quant_ste` without autograd or derivatives (a Fisher
    refresh's pass): the same values bit for bit from the same QDrop draws, in the same layout."""
    zp = zero_point.detach()
    if _is_raw(keep, p) or keep is None:
        if native.applies(x, scale, zp):
            return _native_kernel(x, scale.detach(), zp, 2**bits - 1, keep, p, derivatives=False)
        if keep is not None:
            keep = mask_from_bytes(keep, p, x.dtype, dense_order(x))
    out = fake_quant(x, scale, zp, bits, out=broadcast_buffer(x, scale, zp))  # laid out like x
    if keep is not None:
        out = torch.lerp(x, out, keep.to(x.dtype), out=out)
    return out


def _is_raw(keep, p) -> bool:
    return keep is not None and p is not None and keep.dtype == torch.uint8


class FakeQuantSTE(torch.autograd.Function):
    """``fake_quant_ste(x, scale, zero_point, bits, keep, p)``; ``keep`` = float 0/1 QDrop mask, raw
    bytes with ``p`` (:func:`mask_from_bytes`), or None.

    Masks are float tensors and selections are ``lerp``/multiplications: on CPU, boolean masks and
    ``torch.where`` cost several times more memory passes than float arithmetic.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits: int, keep, p, bounds=None):
        zp = zero_point.detach()
        layer_use = broadcasts_to(scale.shape, x.shape) and broadcasts_to(zp.shape, x.shape)
        if (_is_raw(keep, p) or keep is None) and native.applies(x, scale, zp):
            out, dx, ds = _native_kernel(x, scale.detach(), zp, 2**bits - 1, keep, p)
            ctx.save_for_backward(dx, ds)
            ctx.x_shape, ctx.scale_shape, ctx.in_place, ctx.native = x.shape, scale.shape, True, True
            return out
        ctx.native = False
        if _is_raw(keep, p):
            keep = mask_from_bytes(keep, p, x.dtype, dense_order(x))
        args = (x, scale.detach(), zp, 2**bits - 1, keep)
        if not layer_use or (keep is not None and keep.dtype != x.dtype):
            out, dx, ds = _functional_kernel(*args)
        else:
            out, dx, ds = _eager_kernel(*args, bounds)
        ctx.save_for_backward(dx, ds)
        ctx.x_shape, ctx.scale_shape = x.shape, scale.shape
        # the eager kernel's derivatives are float buffers of x's shape that only this backward reads
        ctx.in_place = dx.dtype == x.dtype and dx.shape == x.shape
        return out

    @staticmethod
    def backward(ctx, g):
        dx, ds = ctx.saved_tensors
        want_x, want_s = ctx.needs_input_grad[:2]
        if ctx.native and native.backward_applies(g, ds):
            # one pass into the saved buffers; the scale's gradient summed by torch from the same
            # product in the same layout as the eager passes
            gx, gs = native.backward(g, dx, ds, want_x, want_s)
            gs = gs.sum_to_size(ctx.scale_shape) if gs is not None else None
        elif ctx.in_place and g.shape == dx.shape and g.stride() == ds.stride():
            # into the saved buffers (no fresh allocations), where the product's layout and so the
            # order of the scale gradient's sum are the same as out of place
            gs = ds.mul_(g).sum_to_size(ctx.scale_shape) if want_s else None
            gx = dx.mul_(g) if want_x else None
        else:
            gx, gs = _functional_backward(g, dx, ds, ctx.scale_shape, want_x, want_s)
            gx = gx.sum_to_size(ctx.x_shape) if gx is not None else None
        return gx, gs, None, None, None, None, None


def fake_quant_ste(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    keep: torch.Tensor | None = None,
    p: float | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with straight-through gradients to ``x`` and ``scale``; ``keep`` is a 0/1
    mask (1 = quantized value, 0 = float value, QDrop; float or ``uint8``), the raw random bytes of
    one (``uint8`` with ``p``: 1 where ``byte < 256 p``), or None;
    ``bounds``: the zero point's :func:`code_bounds` where the caller keeps them."""
    if torch.compiler.is_compiling():
        if _is_raw(keep, p):
            keep = mask_from_bytes(keep, p, x.dtype)
        return fake_quant_ste_composed(x, scale, zero_point, bits, keep, bounds)
    return FakeQuantSTE.apply(x, scale, zero_point, bits, keep, p, bounds)


def fake_quant_ste_composed(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    keep: torch.Tensor | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`fake_quant_ste` written out for autograd (``keep``: a float 0/1 mask or None): the values
    and gradients of :class:`FakeQuantSTE` from plain operations, what ``torch.compile`` traces."""
    lo, hi, _ = bounds if bounds is not None else code_bounds(zero_point, 2**bits - 1)
    v = x / scale
    rounded = v + (torch.round(v) - v).detach()  # round with the straight-through gradient
    out = torch.clamp(rounded, lo, hi) * scale
    return out if keep is None else torch.lerp(x, out, keep.to(x.dtype))


def random_bytes(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Uniform random bytes of ``shape`` (contiguous ``uint8``); one 64-bit draw gives eight bytes, an
    eighth of the generator calls of ``rand``."""
    n = 1
    for s in shape:
        n *= int(s)
    count = (n + 7) // 8
    words = torch.randint(
        -(2**63), 2**63 - 1, (count,), dtype=torch.int64, generator=generator, device=device
    )
    return words.view(torch.uint8)[:n].reshape(shape)


def mask_from_bytes(
    byte: torch.Tensor,
    p: float,
    dtype: torch.dtype | None = torch.float32,
    order: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """The 0/1 mask ``byte < 256 p`` (1 with probability ``p`` in steps of 1/256) as ``dtype``, laid out
    in memory in ``order`` (:func:`dense_order` of the tensor it will be combined with); with
    ``dtype`` None the bytes themselves (what the native kernel reads)."""
    if dtype is None:
        return byte
    shape, device = byte.shape, byte.device
    threshold = drop_threshold(p)
    if dtype == torch.uint8:  # 0/1 bytes
        if threshold > 255:
            return empty_in_order(shape, order, dtype, device).fill_(1)
        below = torch.lt(byte, threshold)
        if order is not None:
            below = empty_in_order(shape, order, torch.bool, device).copy_(below)
        return below.view(torch.uint8)
    out = empty_in_order(shape, order, dtype, device)
    if threshold > 255:  # every byte is below 256 (and 256 is not a uint8 to compare with)
        return out.fill_(1)
    # 1.0 where byte < 256 p: clamp(256 p - byte, 0, 1) on the bytes as floats (exact small integers);
    # three fast vectorised passes, where a comparison into a float tensor goes through a bool copy
    out.copy_(byte)
    return torch.add(out.new_tensor(float(threshold)), out, alpha=-1, out=out).clamp_(0, 1)


def bernoulli_mask(
    shape: torch.Size | tuple[int, ...],
    p: float,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype | None = torch.float32,
    order: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """A 0/1 mask that is 1 with probability ``p`` (in steps of 1/256), from random bytes
    (:func:`random_bytes`, :func:`mask_from_bytes`; ``dtype`` None: the bytes). ``order`` changes
    only where the values lie in memory, never which element gets which value."""
    return mask_from_bytes(random_bytes(shape, generator, device), p, dtype, order)
