"""ONNX export of a fimaq-quantized model, and the onnxruntime parity check.

The exported graph computes what the PyTorch model computes, with fimaq's quantizer math
``q = clamp(round(x / s) + z, 0, 2^b - 1)``, ``x_hat = (q - z) * s`` (round half to even in both):

* **Weights** of quantized Linear/Conv2d layers are always ``uint8`` code initializers. They are fed
  to ``DequantizeLinear`` (per output row: ``axis=0``, float32 scale, ``uint8`` zero point) for the
  patch-embedding convolution and for every linear layer whose input is a QDQ (per-tensor) activation:
  onnxruntime fuses those into integer matmuls (``MatMulIntegerToFloat``/``QGemm``) with the same
  result up to float rounding. Otherwise (float or explicitly quantized input, or a zero point
  outside ``[0, 255]``) the codes are dequantized with ``Cast``, ``Sub``, ``Mul``: onnxruntime would turn
  ``DequantizeLinear -> MatMul`` with a float input into ``MatMulNBits``, which by default
  (``session.qdq_matmulnbits_accuracy_level`` 4) quantizes that input to int8 and changes the logits.
* **Per-tensor activation quantizers** (one scale and zero point; calibration gives every linear
  input one, the per-token scale slots all equal) with a zero point in ``[0, 255]`` become
  ``QuantizeLinear`` (``uint8``) -> ``Clip(0, 2^b - 1)`` (only for b < 8, as ``QuantizeLinear``
  saturates to ``[0, 255]``) -> ``DequantizeLinear``.
* **Log-grid quantizers** (``quant.attn_probs: log2 | adalog``) are explicit arithmetic too:
  ``Max``, ``Div``, ``Log``, ``Round``, ``Pow``, ``Where`` (:func:`fimaq.quant.log_quantizer.log_fake_quant`).
* Every other activation quantizer is explicit arithmetic ``Div``, ``Round``, ``Add``, ``Clip``, ``Sub``,
  ``Mul``: per-(head, row) matmul scales after reconstruction, which QDQ cannot express, and also
  per-axis ones (per token, per head: calibrated matmul operands) that QDQ could express but that
  onnxruntime (1.32, default optimisations) fuses ``DequantizeLinear -> MatMul`` into
  ``MatMulIntegerToFloat``, which then fails at run time ("input a zero point must be a scalar ...
  Per-Channel is not supported yet"); and zero points outside ``[0, 255]``.

Parity with PyTorch is checked by :mod:`fimaq.onnx_parity` before a file is written.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.errors import FimaqError
from fimaq.export import export_copy, export_quantized, quiet_loggers, require_quantized, weight_codes
from fimaq.files import atomic_write_bytes
from fimaq.layers import QuantConv2d, QuantLinear
from fimaq.onnx_parity import onnx_parity
from fimaq.quant.fake_quant import dequantize, fake_quant
from fimaq.quant.log_quantizer import LogQuantizer, log_fake_quant
from fimaq.quant.quantizer import UniformQuantizer

DEFAULT_OPSET = 18


@torch.library.custom_op("fimaq::quant_dequant", mutates_args=())
def _quant_dequant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    return fake_quant(x, scale, zero_point.to(x.dtype), (qmax + 1).bit_length() - 1)


@_quant_dequant.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fimaq::dequantize_rows", mutates_args=())
def _dequantize_rows(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return dequantize(codes, scale[:, None], zero_point[:, None])


@_dequantize_rows.register_fake
def _(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return codes.new_empty(codes.shape, dtype=scale.dtype)


def _translations() -> dict:
    import onnx
    from onnxscript import opset18 as op

    def quant_dequant(x, scale, zero_point, qmax: int):
        q = op.QuantizeLinear(x, scale, zero_point)
        if qmax < 255:
            lo = op.Cast(op.Constant(value_int=0), to=onnx.TensorProto.UINT8)
            hi = op.Cast(op.Constant(value_int=qmax), to=onnx.TensorProto.UINT8)
            q = op.Clip(q, lo, hi)
        return op.DequantizeLinear(q, scale, zero_point)

    def dequantize_rows(codes, scale, zero_point):
        return op.DequantizeLinear(codes, scale, zero_point, axis=0)

    return {
        torch.ops.fimaq.quant_dequant.default: quant_dequant,
        torch.ops.fimaq.dequantize_rows.default: dequantize_rows,
    }


def qdq_form(scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(0-d scale, 0-d uint8 zero point) when the quantizer is per tensor with a zero point in [0, 255]."""
    if not (torch.all(scale == scale.reshape(-1)[0]) and torch.all(zero_point == zero_point.reshape(-1)[0])):
        return None
    z = zero_point.reshape(-1)[0]
    if not (0 <= z <= 255 and z == z.round()):
        return None
    return scale.reshape(-1)[0].clone(), z.to(torch.uint8)


class _PassThrough(nn.Module):
    """Stand-in for a quantizer without a bit-width."""

    active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ExportQuantizer(nn.Module):
    """Stand-in for an active :class:`UniformQuantizer`: QDQ custom op, or explicit arithmetic."""

    active = True

    def __init__(self, q: UniformQuantizer) -> None:
        super().__init__()
        self.bits = q.bits
        self.qmax = 2**q.bits - 1
        scale, zp = q.scale.detach().float(), q.zero_point.detach().float()
        form = qdq_form(scale, zp)
        self.qdq = form is not None
        self.kind = "qdq" if self.qdq else "explicit"
        if form is not None:
            scale, zp = form
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zp.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qdq:
            return torch.ops.fimaq.quant_dequant(x, self.scale, self.zero_point, self.qmax)
        return fake_quant(x, self.scale, self.zero_point, self.bits)


class LogExportQuantizer(nn.Module):
    """Stand-in for an active :class:`LogQuantizer`: its arithmetic, written out in ONNX ops."""

    active = True
    kind = "log"

    def __init__(self, q: LogQuantizer) -> None:
        super().__init__()
        self.bits = q.bits
        self.register_buffer("scale", q.scale.detach().float().clone())
        self.register_buffer("step", q.step.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_fake_quant(x, self.scale, self.step, self.bits)


class ExportLayer(nn.Module):
    """Stand-in for a QuantLinear/QuantConv2d: dequantized integer weight codes, quantized input."""

    def __init__(self, layer: QuantLinear | QuantConv2d, name: str) -> None:
        super().__init__()
        aq = layer.a_quantizer
        self.a_quantizer = ExportQuantizer(aq) if aq.active else _PassThrough()
        self.shape = tuple(layer.weight.shape)
        self.conv = None
        if isinstance(layer, QuantConv2d):
            self.conv = dict(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
            )
        self.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        wq = layer.w_quantizer
        self.kind = "float"
        if wq.active:
            zp = wq.zero_point.detach().float().reshape(-1)
            # DequantizeLinear -> MatMul with a float input is rewritten by onnxruntime into MatMulNBits,
            # which by default quantizes that input to int8 (accuracy level 4): keep DQ for conv and for
            # inputs that are QDQ themselves (fused into an exact integer matmul); else Cast/Sub/Mul.
            dq_fuses = self.conv is not None or getattr(self.a_quantizer, "kind", "") == "qdq"
            self.kind = "qdq" if dq_fuses and bool(((zp >= 0) & (zp <= 255)).all()) else "explicit"
            self.register_buffer("codes", weight_codes(layer, name).reshape(zp.shape[0], -1))
            self.register_buffer("scale", wq.scale.detach().float().reshape(-1).clone())
            self.register_buffer("zero_point", zp.to(torch.uint8) if self.kind == "qdq" else zp.clone())
        else:
            self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        if self.kind == "float":
            return self.weight
        if self.kind == "qdq":
            w = torch.ops.fimaq.dequantize_rows(self.codes, self.scale, self.zero_point)
        else:
            w = dequantize(self.codes, self.scale[:, None], self.zero_point[:, None])
        return w.reshape(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a_quantizer(x)
        if self.conv is None:
            return F.linear(x, self.dequantized_weight(), self.bias)
        return F.conv2d(x, self.dequantized_weight(), self.bias, **self.conv)


def export_module(net: nn.Module) -> nn.Module:
    """A CPU copy of ``net`` with every quantized layer and quantizer swapped for its export stand-in.

    Its PyTorch outputs equal ``net``'s exactly (same operations on the same values).
    """
    require_quantized(net)
    model = export_copy(net)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (QuantLinear, QuantConv2d)):
            model.set_submodule(name, ExportLayer(mod, name))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LogQuantizer) and mod.active:
            model.set_submodule(name, LogExportQuantizer(mod))
        elif isinstance(mod, UniformQuantizer):
            model.set_submodule(name, ExportQuantizer(mod) if mod.active else _PassThrough())
    return model


def export_summary(model: nn.Module) -> dict[str, int]:
    """How many quantizers/weights of an :func:`export_module` copy took each ONNX form."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        if isinstance(mod, (ExportQuantizer, LogExportQuantizer)):
            key = f"act_{mod.kind}"
        elif isinstance(mod, ExportLayer):
            key = f"weight_{mod.kind}"
        else:
            continue
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def export_onnx(
    net: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int = DEFAULT_OPSET,
    check_input: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Write ``net`` as an ONNX model (input ``images``, dynamic batch; output ``logits``), atomically.

    Args:
        net: the quantized model (quantizers calibrated and on).
        path: the ``.onnx`` file (one file, weights inside).
        example_input: an image batch of the model's input size (used for tracing only).
        opset: ONNX opset (18 or later).
        check_input: images; when given, onnxruntime must match PyTorch on them (:func:`onnx_parity`)
            before the file replaces ``path``.

    Returns:
        ``{"path", "bytes", "forms": export_summary, "parity": onnx_parity or None}``.
    """
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise FimaqError(f"ONNX export needs {', '.join(missing)}: pip install 'fimaq[export]'")
    model = export_module(net)
    x = example_input.detach().cpu().float()[:2]
    if x.shape[0] < 2:  # a batch of 1 would be specialised as a constant dimension
        x = torch.cat([x, x])
    result: dict[str, Any] = {"path": str(path), "forms": export_summary(model), "parity": None}

    def write(tmp: str) -> None:
        with (
            warnings.catch_warnings(),
            quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", level=logging.WARNING),
        ):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (x,),
                tmp,
                dynamo=True,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                custom_translation_table=_translations(),
                external_data=False,
                verbose=False,
            )
        if check_input is not None:
            parity = onnx_parity(tmp, net, check_input)
            result["parity"] = parity
            if not parity["ok"]:
                raise FimaqError(
                    f"ONNX export: onnxruntime differs from PyTorch on the {parity['images']} check images, "
                    f"nothing written: {'; '.join(parity['failed'])}"
                )

    try:
        atomic_write_bytes(Path(path), write)
    except FimaqError:
        raise
    except Exception as exc:
        raise FimaqError(f"ONNX export of {type(net).__name__} failed: {type(exc).__name__}: {exc}") from exc
    result["bytes"] = Path(path).stat().st_size
    return result


__all__ = [
    "DEFAULT_OPSET",
    "ExportLayer",
    "ExportQuantizer",
    "export_module",
    "export_onnx",
    "export_summary",
    "qdq_form",
]


def write_exports(
    net: nn.Module, meta: dict[str, Any], root: Path, images: torch.Tensor, onnx: bool = True, opset: int = 18
) -> tuple[dict[str, Any], str]:
    """Write ``root/export.safetensors`` (and ``root/model.onnx``), each checked on ``images`` first.

    Returns the values for ``metrics.json`` and a one-line summary.
    """
    net = export_copy(net)
    info = export_quantized(net, meta, Path(root) / "export.safetensors", check_input=images)
    values: dict[str, Any] = {"export_bytes": info["bytes"], "export_reload_max_abs_diff": 0.0}
    line = f"export: wrote {info['path']} ({info['bytes'] / 1e6:.2f} MB, reload identical)"
    if onnx:
        res = export_onnx(net, Path(root) / "model.onnx", images[:2], opset=opset, check_input=images)
        par = res["parity"]
        values.update(
            onnx_bytes=res["bytes"],
            onnx_max_abs_diff=par["max_abs_diff"],
            onnx_mean_abs_diff=par["mean_abs_diff"],
            onnx_mean_limit=par["mean_limit"],
            onnx_max_limit=par["max_limit"],
            onnx_argmax_agreement=par["argmax_agreement"],
            onnx_forms=res["forms"],
        )
        line += (
            f" and {res['path']} ({res['bytes'] / 1e6:.2f} MB; onnxruntime vs PyTorch on {par['images']} "
            f"images: argmax equal on all, max |diff| {par['max_abs_diff']:.2e} <= {par['max_limit']:.2e}, "
            f"mean {par['mean_abs_diff']:.2e} <= {par['mean_limit']:.2e})"
        )
    return values, line
