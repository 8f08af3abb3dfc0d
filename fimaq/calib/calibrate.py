"""calibrate_model: the calibration stage, one FP capture pass per unit, then each layer's search."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fimaq.calib.capture import capture_io, explicit_matmuls, layer_subset, run_batches
from fimaq.calib.layers import calibrate_conv, calibrate_linear, calibrate_matmul
from fimaq.config import CalibConfig
from fimaq.errors import FimaqError
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.models.swap import iter_qlayers, set_quant_enabled

log = logging.getLogger(__name__)


@dataclass
class CalibReport:
    """Wall time of the stage: capture passes and per-layer searches, in seconds."""

    layer_seconds: dict[str, float] = field(default_factory=dict)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def seconds_per_layer(self) -> float:
        return self.total_seconds / max(1, len(self.layer_seconds))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def calibrate_layer(layer, captured, cfg: CalibConfig, num_images: int) -> None:
    """Dispatch one layer's search on its captured FP input(s) and output."""
    mod = layer.module
    if isinstance(mod, QuantConv2d):
        calibrate_conv(mod, captured.inputs[0], captured.output, cfg)
    elif isinstance(mod, QuantLinear):
        x, y = _flat(captured.inputs[0]), _flat(captured.output)
        calibrate_linear(mod, layer.norm, x, y, cfg, tokens_per_image=max(1, x.shape[0] // num_images))
    elif isinstance(mod, QuantMatMul):
        a, b = captured.inputs
        calibrate_matmul(mod, a, b, captured.output, cfg)


def calibrate_model(
    model: nn.Module, images: torch.Tensor, cfg: CalibConfig | None = None, progress: bool = True
) -> CalibReport:
    """Search the qparams of every quantized layer of ``model`` (built by ``quantize_model``).

    Each unit (patch embedding, block, patch merging, head) is captured once with the whole model in
    FP; each of its layers is then searched on those tensors in model order. LayerNorm folds change
    the float weights but not the float function. Quantizers are enabled at the end.

    Args:
        model: a quantized model (``fimaq.models.swap.quantize_model``).
        images: calibration images ``(n, C, H, W)``, used as given (already transformed).
        cfg: search settings.
        progress: show a progress bar.
    """
    cfg = (cfg or CalibConfig()).validate()
    if images.ndim != 4 or images.shape[0] < 1:
        raise FimaqError(f"calibration images must be a (n, C, H, W) tensor, got shape {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise FimaqError("calibration images contain NaN or Inf")
    images = images[: cfg.num_images]
    layers = list(iter_qlayers(model))
    if not layers:
        raise FimaqError("model has no quantized layers: call quantize_model first")
    units = list(dict.fromkeys(q.unit for q in layers))
    report = CalibReport()
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    set_quant_enabled(model, False)
    bar = tqdm(total=len(layers), desc="calibrate", disable=not progress, leave=False)
    with explicit_matmuls(model):
        for unit in units:
            t0 = time.perf_counter()
            with capture_io(layer_subset(layers, unit)) as store:
                run_batches(model, images, cfg.batch_size)
            report.capture_seconds += time.perf_counter() - t0
            for layer in (q for q in layers if q.unit == unit):
                bar.set_postfix_str(layer.name)
                t1 = time.perf_counter()
                calibrate_layer(layer, store[layer.name], cfg, images.shape[0])
                report.layer_seconds[layer.name] = time.perf_counter() - t1
                bar.update()
            del store
    bar.close()
    set_quant_enabled(model, True)
    model.train(was_training)
    report.total_seconds = time.perf_counter() - start
    return report
