"""Naive per-tensor min-max calibration: the baseline the searched calibration is measured against."""

from __future__ import annotations

import torch
from torch import nn

from fimaq.calib.capture import capture_io, run_batches
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.layers.mode import quant_mode, set_quant_mode
from fimaq.models.swap import iter_qlayers
from fimaq.quant.log_quantizer import LogQuantizer
from fimaq.quant.quantizer import UniformQuantizer


def _minmax(q: UniformQuantizer, t: torch.Tensor) -> None:
    if q.bits is None:
        return
    if isinstance(q, LogQuantizer):  # the grid starts at each head's largest value, base 2
        heads = t.shape[1]
        q.set_log_qparams(t.transpose(0, 1).reshape(heads, -1).amax(1).clamp(min=1e-8).view(1, -1, 1, 1))
        return
    lo, hi = t.min().clamp(max=0), t.max().clamp(min=0)
    scale = ((hi - lo) / (2**q.bits - 1)).clamp(min=1e-8)
    q.set_qparams(scale, (-lo / scale).round())


@torch.no_grad()
def minmax_calibrate(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> None:
    """Set every quantizer from the min and max of its whole tensor (weights and activations)."""
    layers = list(iter_qlayers(model))
    watched = {q.name: q.module for q in layers}
    with quant_mode(model, enabled=False, explicit_matmuls=True), capture_io(watched) as store:
        run_batches(model, images, batch_size)
    for layer in layers:
        mod, cap = layer.module, store[layer.name]
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            _minmax(mod.w_quantizer, mod.weight)
            _minmax(mod.a_quantizer, cap.inputs[0])
        elif isinstance(mod, QuantMatMul):
            _minmax(mod.A_quantizer, cap.inputs[0])
            _minmax(mod.B_quantizer, cap.inputs[1])
    set_quant_mode(model, enabled=True)
