"""AdaRound: learned up/down rounding of a weight on its fixed quantization grid.

``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` replaces the rounding offset;
the soft weight is ``(clamp(floor(W/s) + h(alpha) + zp, 0, 2^b-1) - zp) * s``, and the final (hard)
weight uses ``[alpha >= 0]`` instead of ``h``. ``alpha`` starts where ``h(alpha) = W/s - floor(W/s)``,
so the soft weight equals the (clamped) float weight at the start.
"""

from __future__ import annotations

import torch
from torch import nn

from fimaq.quant import native
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding, attach_rounding, finalize_rounding

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(alpha)``: the stretched, clipped sigmoid of AdaRound."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_alpha(rest: torch.Tensor) -> torch.Tensor:
    """The ``alpha`` with ``h(alpha) = rest`` for a fractional part ``rest`` in ``[0, 1)``."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


class SoftWeight(torch.autograd.Function):
    """``(W_soft, h)`` from ``alpha``: the soft weight ``(clamp(floor + h + zp, 0, qmax) - zp) * s`` and
    the offsets ``h = h(alpha)`` (for the rounding regulariser), in a few in-place passes.

    The backward takes both upstream gradients and repeats autograd's arithmetic for the composed
    ops operation for operation (``g * s``, the two clamps' masks, the sum at ``h``, ``* (zeta -
    gamma)``, the sigmoid's derivative), so the gradient is the same bit for bit; it only skips
    autograd's boolean masks and selections (a clamp's backward is four passes, here one).
    """

    @staticmethod
    def forward(ctx, alpha, floor, zp, scale, qmax: int):
        sig = torch.sigmoid(alpha)
        rows = (floor.shape[0], 1)  # one zero point and scale per row
        ctx.native = (
            floor.dim() == 2 and zp.shape == scale.shape == rows and native.takes(sig, floor, zp, scale)
        )
        if ctx.native:  # the passes below fused into one (the same values)
            w, h, inner, outer = native.soft_weight(sig, floor, zp, scale, ZETA - GAMMA, GAMMA, qmax)
            ctx.save_for_backward(sig, inner, outer, scale)
            return w, h
        y = torch.mul(sig, ZETA - GAMMA).add_(GAMMA)
        h = torch.clamp(y, 0, 1)
        inner = torch.eq(h, y, out=y)  # 1.0 where 0 <= y <= 1: where the clamp passes gradients
        c = torch.add(floor, h).add_(zp)
        q = torch.clamp(c, 0, qmax)
        outer = torch.eq(q, c, out=c)
        ctx.save_for_backward(sig, inner, outer, scale)
        return q.sub_(zp).mul_(scale), h

    @staticmethod
    def backward(ctx, g_weight, g_h):
        sig, inner, outer, scale = ctx.saved_tensors
        if ctx.native and native.takes(g_weight, *([g_h] if g_h is not None else [])):
            return (
                native.soft_weight_backward(g_weight, g_h, scale, outer, inner, sig, ZETA - GAMMA),
                None,
                None,
                None,
                None,
            )
        t = torch.mul(g_weight, scale).mul_(outer)
        if g_h is not None:
            t.add_(g_h)
        t.mul_(inner).mul_(ZETA - GAMMA)
        return torch.ops.aten.sigmoid_backward.grad_input(t, sig, grad_input=t), None, None, None, None


class RoundingPenalty(torch.autograd.Function):
    """``sum(1 - |2h - 1|^beta)`` with its gradient ``-2 beta |u|^beta / u`` (``u = 2h - 1``; 0 at
    ``u = 0``): one power instead of autograd's two and a few passes fewer over the offsets."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, beta: float) -> torch.Tensor:
        if native.takes(h):  # u and |u| in one pass (the same values)
            u, p = native.penalty_prepare(h)
            p = p.pow_(beta)
        else:
            u = h * 2 - 1
            p = u.abs().pow_(beta)
        ctx.save_for_backward(u, p)
        ctx.beta = beta
        return (1 - p).sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        u, p = ctx.saved_tensors
        c = g * (-2 * ctx.beta)
        if native.takes(p, u, c):
            return native.penalty_grad(p, u, c), None
        grad = torch.div(p, u).nan_to_num_(0.0)  # |u|^beta / u = sign(u) |u|^(beta - 1); 0/0 at u = 0
        return grad.mul_(c), None


def beta_schedule(step: int, iters: int, warmup: float, start: float, end: float) -> float:
    """Rounding temperature at 0-based ``step``: ``start`` during the warm-up, then linear to ``end``.

    Counted from 1 like the reference (``t = step + 1``), so the last step has exactly ``end``.
    """
    t = step + 1
    begin = warmup * iters
    if t < begin or iters <= begin:
        return float(start)
    rel = (t - begin) / (iters - begin)
    return float(end + (start - end) * max(0.0, 1.0 - rel))


def round_regulariser_on(step: int, iters: int, warmup: float) -> bool:
    """Whether the rounding regulariser is active at 0-based ``step`` (off for the warm-up)."""
    return step + 1 >= warmup * iters


class AdaRoundQuantizer(LearnedRounding):
    """Weight quantizer with AdaRound's learned rounding; wraps (and keeps) the calibrated quantizer.

    Args:
        base: the calibrated per-row weight quantizer (its scale and zero point stay fixed).
        weight: the float weight, flattened to ``(rows, -1)`` like ``base`` sees it.
    """

    def __init__(self, base: UniformQuantizer, weight: torch.Tensor) -> None:
        super().__init__(base, "AdaRound")
        with torch.no_grad():
            scaled = weight.detach().float() / base.scale.detach().float()
            floor = torch.floor(scaled)
            self.register_buffer("floor", floor)
            self.alpha = nn.Parameter(init_alpha(scaled - floor))
        self._h: torch.Tensor | None = None  # h(alpha) of the last forward with gradients (regulariser)

    @property
    def learned(self) -> list[nn.Parameter]:
        return [self.alpha]

    @property
    def shape(self) -> torch.Size:
        return self.floor.shape

    def rounding(self) -> torch.Tensor:
        """The rounding offsets: ``h(alpha)`` while soft, ``[alpha >= 0]`` once hard."""
        if self.soft:
            h = rectified_sigmoid(self.alpha)
            self._h = h if torch.is_grad_enabled() and h.requires_grad else None
            return h
        return (self.alpha >= 0).to(self.floor.dtype)

    def codes(self) -> torch.Tensor:
        """``floor(W/s) + h(alpha)`` while soft, ``floor(W/s) + [alpha >= 0]`` once hard."""
        return self.floor + self.rounding()

    def hard_codes(self) -> torch.Tensor:
        """``floor(W/s) + [alpha >= 0]``."""
        return self.floor + (self.alpha >= 0).to(self.floor.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        learning = self.soft and self.base.active and torch.is_grad_enabled() and self.alpha.requires_grad
        if not learning or weight.shape != self.shape:  # (a wrong shape: the base class's error)
            return super().forward(weight)
        base = self.base
        w, self._h = SoftWeight.apply(
            self.alpha, self.floor, base.zero_point.detach(), base.scale.detach(), 2**self.bits - 1
        )
        return w.to(weight.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(alpha) - 1|^beta)``: pushes every offset to 0 or 1 (from ``h(alpha)`` of this
        step's forward pass where there was one, else computed here)."""
        h, self._h = (self._h if self._h is not None else rectified_sigmoid(self.alpha)), None
        return RoundingPenalty.apply(h, beta)


def attach_adaround(layer: nn.Module) -> LearnedRounding | None:
    """Swap a quantized layer's weight quantizer for an AdaRound quantizer (None if FP weights).

    The float weight stays in ``layer.weight`` (switching quantization off gives the float layer)
    until :func:`finalize_adaround` folds the hard-rounded weight into it.
    """
    return attach_rounding(layer, AdaRoundQuantizer)


finalize_adaround = finalize_rounding
"""Fold the hard-rounded weight into ``layer.weight`` and restore the uniform quantizer."""


__all__ = [
    "AdaRoundQuantizer",
    "attach_adaround",
    "beta_schedule",
    "finalize_adaround",
    "init_alpha",
    "rectified_sigmoid",
    "round_regulariser_on",
]
