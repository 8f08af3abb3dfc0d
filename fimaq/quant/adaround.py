"""AdaRound: learned up/down rounding of a weight on its fixed quantization grid.

``h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)`` replaces the rounding offset;
the soft weight is ``(clamp(floor(W/s) + h(alpha) + zp, 0, 2^b-1) - zp) * s``, and the final (hard)
weight uses ``[alpha >= 0]`` instead of ``h``. ``alpha`` starts where ``h(alpha) = W/s - floor(W/s)``,
so the soft weight equals the (clamped) float weight at the start.
"""

from __future__ import annotations

import torch
from torch import nn

from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding, attach_rounding, finalize_rounding

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    """``h(alpha)``: the stretched, clipped sigmoid of AdaRound."""
    return torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)


def init_alpha(rest: torch.Tensor) -> torch.Tensor:
    """The ``alpha`` with ``h(alpha) = rest`` for a fractional part ``rest`` in ``[0, 1)``."""
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)


class _SoftWeights(torch.autograd.Function):
    """``(W_soft, penalty)`` of a :class:`SoftRounding` group from its flat ``alpha``: every weight's
    ``(clamp(floor + h + zp, 0, qmax) - zp) * s`` and ``weight * sum(1 - |2h - 1|^beta)`` (None without
    ``beta``), with the gradient to ``alpha`` in three passes (autograd's composition takes about
    twenty). The derivatives are saved by the forward: ``D = [0 < y < 1] sig (1 - sig)`` (the
    rectified sigmoid), ``oS = [code inside the grid] s (zeta - gamma)`` and the penalty's
    ``sign(u) |u|^(beta - 1)``.
    """

    @staticmethod
    def forward(ctx, alpha, group: SoftRounding, beta: float | None):
        sig = torch.sigmoid(alpha)
        y = torch.add(group.gamma, sig, alpha=ZETA - GAMMA)
        h = torch.clamp(y, 0, 1)
        inner = torch.eq(h, y, out=y)  # 1.0 where the clamp passes gradients
        d = torch.ops.aten.sigmoid_backward(inner, sig)
        c = torch.add(group.floor_zp, h)
        q = torch.clamp(c, group.zero, group.qmax)
        o_s = torch.eq(q, c, out=c).mul_(group.step_c1)
        w = torch.addcmul(group.zp_step, q, group.step)  # (q - zp) * s
        if beta is None:
            ctx.save_for_backward(d, o_s)
            return w, None
        u = torch.add(group.minus_one, h, alpha=2.0)
        a = torch.abs(u)
        if beta >= 1:  # |u|^beta = |u|^(beta - 1) |u|; its derivative's direction sign(u) |u|^(beta - 1)
            p = torch.pow(a, beta - 1)
            total = torch.dot(p, a)
            direction = torch.copysign(p, u, out=u)
        else:  # (|u|^(beta - 1) is infinite at u = 0: there the derivative is taken as 0)
            p = torch.pow(a, beta)
            total = p.sum()
            direction = torch.div(p, u).nan_to_num_(0.0)
        penalty = torch.sub(group.numel_weight, total, alpha=group.weight)
        ctx.save_for_backward(d, o_s, direction)
        ctx.k = -2.0 * beta * group.weight * (ZETA - GAMMA)
        return w, penalty

    @staticmethod
    def backward(ctx, g_w, g_penalty):
        d, o_s, *direction = ctx.saved_tensors
        t = torch.mul(g_w, o_s) if g_w is not None else torch.zeros_like(o_s)
        if direction and g_penalty is not None:
            t.addcmul_(direction[0], g_penalty, value=ctx.k)
        return t.mul_(d), None, None


class SoftRounding:
    """The soft weights of several AdaRound quantizers (a unit's) from one flat ``alpha``, computed
    together once per step, and their rounding penalty.

    Each quantizer's ``alpha`` becomes a view of :attr:`alpha` (the parameter the optimiser updates;
    the quantizers' own stop requiring gradients until :meth:`release`). Call :meth:`begin_step`
    before each forward pass: the first quantizer that asks computes every weight (and with ``beta``
    the penalty) in one pass of a few operations over all of them.

    Args:
        quantizers: the AdaRound quantizers (soft, not grouped yet).
        weight: the penalty's weight (``recon.round_weight``).
    """

    def __init__(self, quantizers: list[AdaRoundQuantizer], weight: float) -> None:
        self.quantizers, self.weight = quantizers, float(weight)
        self.sizes = [q.alpha.numel() for q in quantizers]
        with torch.no_grad():
            self.alpha = nn.Parameter(torch.cat([q.alpha.detach().reshape(-1) for q in quantizers]))
            parts = self.alpha.detach().split(self.sizes)
            for i, (q, part) in enumerate(zip(quantizers, parts, strict=True)):
                q.alpha.data = part.view(q.alpha.shape)  # shares the flat parameter's memory
                q.alpha.requires_grad_(False)
                q.group, q.group_index = self, i

            def flat(per_row) -> torch.Tensor:  # a per-row (or per-weight) value, one per weight
                return torch.cat([per_row(q).expand(q.floor.shape).reshape(-1) for q in quantizers])

            zp = flat(lambda q: q.base.zero_point.detach().float())
            step = flat(lambda q: q.base.scale.detach().float())
            self.floor_zp = flat(lambda q: q.floor) + zp
            self.qmax = flat(lambda q: torch.tensor(2.0**q.bits - 1, device=q.floor.device))
            self.step, self.zp_step = step, -zp * step
            self.step_c1 = step * (ZETA - GAMMA)
            like = self.alpha.detach()
            self.gamma, self.zero, self.minus_one = (like.new_tensor(v) for v in (GAMMA, 0.0, -1.0))
            self.numel_weight = like.new_tensor(self.alpha.numel() * self.weight)
        self._weights: list[torch.Tensor] | None = None
        self._taken: set[int] = set()
        self._penalty: torch.Tensor | None = None
        self.beta: float | None = None

    def begin_step(self, beta: float | None) -> None:
        """A new step: weights are computed afresh, with the penalty at ``beta`` (None: no penalty)."""
        self._weights, self._penalty, self._taken, self.beta = None, None, set(), beta

    def _compute(self) -> None:
        w, self._penalty = _SoftWeights.apply(self.alpha, self, self.beta)
        parts = w.split(self.sizes)
        self._weights = [part.view(q.floor.shape) for part, q in zip(parts, self.quantizers, strict=True)]
        self._taken = set()

    def weight_of(self, index: int) -> torch.Tensor:
        """The soft weight of quantizer ``index`` (flattened like its ``floor``) for this step."""
        if torch.compiler.is_compiling():
            return self._written_out(index)
        if self._weights is None or index in self._taken:  # (a quantizer used twice: a new pass)
            self._compute()
        self._taken.add(index)
        return self._weights[index]

    def _written_out(self, index: int) -> torch.Tensor:
        """The soft weight of quantizer ``index`` from the paper's formula, for autograd (the graph
        ``torch.compile`` traces, where the compiler derives and fuses the backward)."""
        lo = sum(self.sizes[:index])
        part = slice(lo, lo + self.sizes[index])
        h = rectified_sigmoid(self.alpha[part])
        q = torch.clamp(self.floor_zp[part] + h, self.zero, self.qmax[part])
        return torch.addcmul(self.zp_step[part], q, self.step[part]).view(self.quantizers[index].floor.shape)

    def written_out_penalty(self, beta: torch.Tensor) -> torch.Tensor:
        """:meth:`penalty` from the formula, ``beta`` a tensor (what ``torch.compile`` traces: one
        graph for every step of the schedule)."""
        u = rectified_sigmoid(self.alpha) * 2 - 1
        return self.weight * (1 - u.abs().pow(beta)).sum()

    def penalty(self) -> torch.Tensor:
        """``weight * sum(1 - |2h - 1|^beta)`` over every offset, at this step's ``beta``."""
        if self._penalty is None:
            self._compute()
        return self._penalty

    def release(self) -> None:
        """The quantizers learn through their own ``alpha`` again (their values are the group's)."""
        for q in self.quantizers:
            q.group = None
            q.alpha.requires_grad_(q.soft)
        self._weights, self._penalty = None, None


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
        self.group: SoftRounding | None = None  # the unit's group while it trains (SoftRounding)
        self.group_index = 0

    @property
    def learned(self) -> list[nn.Parameter]:
        return [self.alpha]

    @property
    def shape(self) -> torch.Size:
        return self.floor.shape

    def rounding(self) -> torch.Tensor:
        """The rounding offsets: ``h(alpha)`` while soft, ``[alpha >= 0]`` once hard."""
        if self.soft:
            return rectified_sigmoid(self.alpha)
        return (self.alpha >= 0).to(self.floor.dtype)

    def codes(self) -> torch.Tensor:
        """``floor(W/s) + h(alpha)`` while soft, ``floor(W/s) + [alpha >= 0]`` once hard."""
        return self.floor + self.rounding()

    def hard_codes(self) -> torch.Tensor:
        """``floor(W/s) + [alpha >= 0]``."""
        return self.floor + (self.alpha >= 0).to(self.floor.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        group = self.group
        learning = group is not None and self.soft and self.base.active and torch.is_grad_enabled()
        if not learning or weight.shape != self.shape:  # (a wrong shape: the base class's error)
            return super().forward(weight)  # (alone: autograd through the written-out formula)
        return group.weight_of(self.group_index).to(weight.dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(alpha) - 1|^beta)``: pushes every offset to 0 or 1 (a unit's reconstruction
        takes the penalty of all its quantizers at once from :meth:`SoftRounding.penalty`)."""
        return (1 - (rectified_sigmoid(self.alpha) * 2 - 1).abs().pow(beta)).sum()


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
    "SoftRounding",
    "attach_adaround",
    "beta_schedule",
    "finalize_adaround",
    "init_alpha",
    "rectified_sigmoid",
    "round_regulariser_on",
]
