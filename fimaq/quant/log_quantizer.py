"""Log-domain quantizer for the attention probabilities (the post-softmax operand of ``attn @ v``).

Values lie in [0, 1] and are heavily skewed: a uniform grid of 2^b levels spends almost all of them
on the few large probabilities. A log grid places its levels at ``s * 2^(-q * c)``:

- codes ``q = 0 .. 2^b - 2`` stand for ``s * 2^(-q c)``; the last code, ``2^b - 1``, stands for 0;
- a value is rounded in the log domain, ``q = round(-log2(x / s) / c)``, clamped below at 0 (values
  above ``s`` become ``s``); a value whose code reaches ``2^b - 1`` (or any ``x <= 0``) becomes 0;
- ``log2``: ``c = 1`` (base 2); ``adalog``: the base ``2^c`` is searched per head with the scale
  (AdaLog's adaptive base, docs/algorithm.md section 2.5).

While reconstructing, rounding is straight-through: the gradient reaches ``x`` and, where values are
clipped at the top level, the scale (inside the grid a change of ``s`` moves the codes with it and the
output not at all). Plain torch arithmetic, so a compiled step fuses it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fimaq.quant.fake_quant import dense_order
from fimaq.quant.quantizer import UniformQuantizer

ATTN_PROBS = ("uniform", "log2", "adalog")
# the bases 2^c an adalog search tries per head (c = 1 is log2)
ADALOG_STEPS = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75, 2.0)
TINY = 1e-30  # log2 of a zero probability: far beyond the last code


def log_fake_quant(
    x: torch.Tensor, scale: torch.Tensor, step: torch.Tensor, bits: int, ste: bool = False
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the log grid ``scale * 2^(-q * step)``, q = 0 .. 2^b - 2, and 0.

    ``scale`` and ``step`` broadcast against ``x``; ``ste``: straight-through rounding.
    """
    zero_code = 2**bits - 1
    t = -torch.log2(x.clamp_min(TINY) / scale) / step
    q = t.round() if not ste else t + (t.round() - t).detach()
    q = q.clamp_min(0)
    x_hat = scale * torch.exp2(-q * step)
    return torch.where(q.detach() >= zero_code, torch.zeros((), dtype=x_hat.dtype, device=x.device), x_hat)


class LogQuantizer(UniformQuantizer):
    """Log-domain fake-quantizer with a learnable scale and a fixed per-group base exponent ``step``.

    Shapes as :class:`UniformQuantizer` (the zero point is kept at 0 and unused: the grid starts at
    the scale and ends at 0). ``step`` has the zero point's shape.

    Args:
        bits: bit-width (2..8); ``None`` builds a pass-through quantizer.
        scale_shape: shape of ``scale``.
        group_shape: shape of ``step`` (and of the unused zero point): one base per head.
        kind: ``log2`` (step fixed at 1) or ``adalog`` (step searched per group).
    """

    def __init__(
        self, bits: int | None, scale_shape: Sequence[int], group_shape: Sequence[int], kind: str
    ) -> None:
        super().__init__(bits, scale_shape, group_shape)
        if kind not in ATTN_PROBS[1:]:
            raise ValueError(f"log quantizer kind {kind!r}: use one of {ATTN_PROBS[1:]}")
        self.kind = kind
        self.register_buffer("step", torch.ones(tuple(group_shape)))

    def extra_repr(self) -> str:
        return f"{self.kind}, {super().extra_repr()}"

    def set_log_qparams(self, scale: torch.Tensor, step: torch.Tensor | None = None) -> None:
        """Copy (broadcast) calibrated scales and, for ``adalog``, base exponents."""
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale).expand_as(self.scale))
            if step is not None:
                self.step.copy_(step.to(self.step).expand_as(self.step))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        xf, scale = self.float_operands(x)
        ste = self.ste and torch.is_grad_enabled()
        x_hat = log_fake_quant(xf, scale, self.step.to(xf.dtype), self.bits, ste=ste)
        if self.ste and self.qdrop is not None and self.qdrop < 1:
            keep = self.masks(xf.shape, self.qdrop, xf.device, xf.dtype, order=dense_order(xf))
            x_hat = torch.where(keep.bool(), x_hat, xf)
        return x_hat.to(x.dtype)
