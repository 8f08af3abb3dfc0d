"""Deployable export: integer weight codes and quantizer parameters in one self-contained safetensors file.

The file (``export.safetensors``) holds, for a model whose quantizers are calibrated and on:

* ``<layer>.weight_codes``: the weight codes ``clamp(round(W / s) + z, 0, 2^b - 1)`` of every quantized
  Linear/Conv2d as ``uint8`` (b <= 8), in the weight's shape;
* ``<quantizer>.scale`` (float32) and ``<quantizer>.zero_point`` (int32) of every quantizer that has a
  bit-width (weights per output row, activations per tensor / token / head);
* every other tensor of the state dict (norms, biases, position embedding, class token, ...) unchanged;
* JSON metadata under ``fimaq_export``: ``format``, ``export_schema_version``, ``arch``, ``model_kwargs``,
  the ``quant`` spec, the ``stage`` and ``bits`` (quantizer name -> bit-width).

:func:`load_quantized` rebuilds the timm model from the metadata alone (no float checkpoint), sets every
quantized weight to ``(codes - z) * s`` and turns the quantizers on. Fake-quantizing such a weight again
gives back the same codes (``(q - z) * s / s`` rounds to ``q - z``), so the loaded model's outputs equal
the exported model's bit for bit. Files are read without unpickling; every problem is one FimaqError.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fimaq
from fimaq.errors import FimaqError
from fimaq.files import atomic_write_bytes
from fimaq.layers import QuantConv2d, QuantLinear
from fimaq.layers.mode import set_quant_mode
from fimaq.quant.fake_quant import dequantize, quantize
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding

EXPORT_FORMAT = "fimaq-export"
EXPORT_SCHEMA_VERSION = 1
META_KEY = "fimaq_export"
CODES_SUFFIX = ".weight_codes"
CODES_DTYPE = torch.uint8
ZERO_POINT_DTYPE = torch.int32
MODEL_KEYS = ("arch", "model_kwargs", "quant")


def quantizers(net: nn.Module) -> dict[str, UniformQuantizer]:
    """Every quantizer of ``net`` that has a bit-width (FP pass-through quantizers left out), by name."""
    found: dict[str, UniformQuantizer] = {}
    for name, mod in net.named_modules():
        if isinstance(mod, LearnedRounding):
            raise FimaqError(
                f"{name} still has learned rounding ({type(mod).__name__}): finish the reconstruction first"
            )
        if isinstance(mod, UniformQuantizer) and mod.bits is not None:
            found[name] = mod
    return found


def require_quantized(net: nn.Module) -> dict[str, UniformQuantizer]:
    """The quantizers of ``net`` (see :func:`quantizers`), all of which must be on."""
    qs = quantizers(net)
    off = [n for n, q in qs.items() if not q.enabled]
    if off:
        raise FimaqError(
            f"export: quantization is off in {off[0]} ({len(off)} quantizers): export a calibrated model"
        )
    return qs


def weight_layers(net: nn.Module) -> dict[str, QuantLinear | QuantConv2d]:
    """The Linear/Conv2d layers whose weights are quantized, by name."""
    return {
        name: mod
        for name, mod in net.named_modules()
        if isinstance(mod, (QuantLinear, QuantConv2d))
        and isinstance(mod.w_quantizer, UniformQuantizer)
        and mod.w_quantizer.bits is not None
    }


def _check_qparams(name: str, scale: torch.Tensor, zero_point: torch.Tensor, where: str) -> None:
    if not torch.isfinite(scale).all() or not (scale > 0).all():
        raise FimaqError(f"{where}: {name}.scale holds non-positive, NaN or Inf values")
    if not torch.isfinite(zero_point).all() or not torch.equal(zero_point, zero_point.round()):
        raise FimaqError(f"{where}: {name}.zero_point holds non-integer, NaN or Inf values")
    if zero_point.abs().max() >= 2**24:
        raise FimaqError(f"{where}: {name}.zero_point is too large to be exact in float32")


@torch.no_grad()
def weight_codes(layer: QuantLinear | QuantConv2d, name: str = "layer") -> torch.Tensor:
    """The ``uint8`` codes of a layer's quantized weight (rows, fan-in), checked to reproduce it exactly.

    Raises:
        FimaqError: when ``(codes - z) * s`` differs from the weight the forward pass uses.
    """
    q = layer.w_quantizer
    _check_qparams(f"{name}.w_quantizer", q.scale, q.zero_point, "export")
    flat = layer.weight.detach().reshape(q.scale.shape[0], -1)
    codes = quantize(flat, q.scale, q.zero_point, q.bits)
    used = layer.quantized_weight().detach().reshape_as(flat)
    if not torch.equal(dequantize(codes, q.scale, q.zero_point), used):
        raise FimaqError(f"export: the integer codes of {name} do not reproduce its quantized weight")
    return codes.to(CODES_DTYPE)


def layout(net: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], set[str]]:
    """Key -> (shape, dtype) of an export of ``net``, and the state-dict keys it leaves out.

    Left out: the float weights of quantized layers (stored as codes) and the scale/zero point of
    quantizers without a bit-width (FP pass-through; they keep their defaults).
    """
    state = net.state_dict()
    qs = quantizers(net)
    omitted = {f"{n}.weight" for n in weight_layers(net)}
    for name, mod in net.named_modules():
        if isinstance(mod, UniformQuantizer) and mod.bits is None:
            omitted |= {f"{name}.scale", f"{name}.zero_point"}
    keys = {k: (tuple(v.shape), v.dtype) for k, v in state.items() if k not in omitted}
    for name, layer in weight_layers(net).items():
        keys[name + CODES_SUFFIX] = (tuple(layer.weight.shape), CODES_DTYPE)
    for name in qs:
        keys[f"{name}.scale"] = (tuple(state[f"{name}.scale"].shape), torch.float32)
        keys[f"{name}.zero_point"] = (tuple(state[f"{name}.zero_point"].shape), ZERO_POINT_DTYPE)
    return keys, omitted


def export_quantized(
    net: nn.Module, meta: dict[str, Any], path: str | Path, check_input: torch.Tensor | None = None
) -> dict[str, Any]:
    """Write a self-contained integer export of a quantized model (atomically).

    Args:
        net: the quantized timm model (quantizers calibrated and on, learned rounding finished).
        meta: ``QuantModel.artifact_meta()``: ``arch``, ``model_kwargs``, ``quant`` and ``stage``.
        path: the ``.safetensors`` file to write.
        check_input: images; when given, the written file is loaded back with :func:`load_quantized`
            before it replaces ``path``, and its outputs must equal ``net``'s exactly.

    Returns:
        ``{"path", "bytes", "weight_layers", "quantizers"}``.

    Raises:
        FimaqError: a quantizer is off or invalid, the codes do not reproduce a weight, or the reload
            check fails (nothing is written then).
    """
    from safetensors.torch import save_file

    missing = [k for k in MODEL_KEYS if k not in meta]
    if missing:
        raise FimaqError(f"export: the metadata lacks {missing}")
    qs = require_quantized(net)
    keys, omitted = layout(net)
    state = net.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in omitted}
    for name, q in qs.items():
        _check_qparams(name, q.scale.detach(), q.zero_point, "export")
        tensors[f"{name}.scale"] = q.scale.detach().cpu().float().contiguous()
        tensors[f"{name}.zero_point"] = q.zero_point.cpu().to(ZERO_POINT_DTYPE).contiguous()
    for name, layer in weight_layers(net).items():
        codes = weight_codes(layer, name)
        tensors[name + CODES_SUFFIX] = codes.reshape(layer.weight.shape).cpu().contiguous()
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == keys
    header = {
        "format": EXPORT_FORMAT,
        "export_schema_version": EXPORT_SCHEMA_VERSION,
        "fimaq_version": fimaq.__version__,
        **{k: meta[k] for k in (*MODEL_KEYS, "stage") if k in meta},
        "bits": {n: q.bits for n, q in qs.items()},
    }

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(header, sort_keys=True)})
        if check_input is not None:
            device = next(net.parameters()).device
            loaded = load_quantized(tmp, device=device)
            x = check_input.to(device)
            with torch.no_grad():
                want, got = net(x), loaded(x)
            if not torch.equal(want, got):
                diff = (want - got).abs().max().item()
                raise FimaqError(f"export: the reloaded model's outputs differ (max |diff| {diff:.3g})")

    atomic_write_bytes(Path(path), write)
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "weight_layers": len(weight_layers(net)),
        "quantizers": len(qs),
    }


def read_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of an export, with the file-level checks (no model built)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FimaqError(f"export not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # truncated, corrupt or not safetensors at all
        raise FimaqError(
            f"cannot read {path}: truncated or not a safetensors file ({type(exc).__name__}: {exc})"
        ) from None
    raw = header.get(META_KEY)
    if raw is None:
        if "fimaq" in header:
            raise FimaqError(
                f"{path} is a fimaq training artifact (float weights), not an export: "
                f"run `python main.py export -c CONFIG --model.init_from {path}`"
            )
        raise FimaqError(f"{path} is not a fimaq export (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FimaqError(f"{path}: corrupt fimaq export metadata ({exc})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != EXPORT_FORMAT:
        raise FimaqError(f"{path} is not a fimaq export (format {fmt!r})")
    version = meta.get("export_schema_version")
    if version != EXPORT_SCHEMA_VERSION:
        raise FimaqError(
            f"{path} has export schema version {version!r}, this fimaq reads version {EXPORT_SCHEMA_VERSION}"
        )
    lacking = [k for k in (*MODEL_KEYS, "bits") if k not in meta]
    if lacking:
        raise FimaqError(f"{path}: the export metadata lacks {lacking}")
    return tensors, meta


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the level of the named loggers while the block runs (restored afterwards)."""
    loggers = [logging.getLogger(n) for n in names]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


def _build(meta: dict[str, Any], where: str) -> nn.Module:
    from fimaq.config import QuantSpec
    from fimaq.models import create_fp_model
    from fimaq.models.swap import quantize_model

    quant = meta["quant"]
    try:
        spec = QuantSpec(**quant).validate()
        with quiet_loggers("fimaq.models.factory"):  # its random-init warning: weights come from the file
            fp = create_fp_model(
                meta["arch"], None, pretrained=False, model_kwargs=meta["model_kwargs"], weights_follow=True
            )
        return quantize_model(fp, spec)
    except FimaqError as exc:
        raise FimaqError(f"{where}: {exc}") from None
    except Exception as exc:  # a tampered spec or model_kwargs that timm cannot build
        raise FimaqError(
            f"{where}: cannot build {meta['arch']} with model_kwargs {meta['model_kwargs']!r} and quant "
            f"{quant!r}: {type(exc).__name__}: {exc}"
        ) from None


def _check_tensors(
    tensors: dict[str, torch.Tensor], net: nn.Module, meta: dict[str, Any], where: str
) -> None:
    keys, _ = layout(net)
    missing = sorted(set(keys) - set(tensors))
    extra = sorted(set(tensors) - set(keys))
    if missing or extra:
        first = f"missing '{missing[0]}'" if missing else f"unexpected '{extra[0]}'"
        raise FimaqError(
            f"{where} does not fit {meta['arch']} {meta['quant']}: {len(missing)} tensor(s) missing, "
            f"{len(extra)} unexpected; first {first}"
        )
    for k, (shape, dtype) in keys.items():
        t = tensors[k]
        if tuple(t.shape) != shape:
            raise FimaqError(f"{where}: tensor '{k}' has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype != dtype:
            raise FimaqError(f"{where}: tensor '{k}' has dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise FimaqError(f"{where}: tensor '{k}' holds NaN or Inf values")
    qs = quantizers(net)
    bits = {n: q.bits for n, q in qs.items()}
    if meta["bits"] != bits:
        bad = sorted(n for n in set(bits) | set(meta["bits"]) if meta["bits"].get(n) != bits.get(n))
        raise FimaqError(
            f"{where}: recorded bits {meta['bits'].get(bad[0])} for '{bad[0]}' disagree with its "
            f"quant spec ({bits.get(bad[0])})"
        )
    for name in qs:
        _check_qparams(name, tensors[f"{name}.scale"], tensors[f"{name}.zero_point"].float(), where)
    for name in weight_layers(net):
        qmax = 2 ** qs[f"{name}.w_quantizer"].bits - 1
        top = int(tensors[name + CODES_SUFFIX].max())
        if top > qmax:
            raise FimaqError(f"{where}: codes of '{name}' reach {top}, above {qmax} for its bits")


def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a quantized model from an export written by :func:`export_quantized`.

    No float checkpoint is needed: the timm model is built from the recorded arch and keyword
    arguments, quantized with the recorded spec, and filled from the file.

    Args:
        path: the ``export.safetensors`` file.
        device: where the model goes.

    Returns:
        The quantized timm model in eval mode with its quantizers on; its outputs equal the exported
        model's exactly.

    Raises:
        FimaqError: missing, truncated or corrupt file; not a fimaq export; another export schema
            version; unknown arch; a tensor missing, unexpected, of the wrong shape or dtype, NaN/Inf;
            codes out of range for their bits; non-positive scales or non-integer zero points.
    """
    where = str(path)
    tensors, meta = read_export(path)
    net = _build(meta, where)
    _check_tensors(tensors, net, meta, where)
    state = {k: v for k, v in tensors.items() if not k.endswith(CODES_SUFFIX)}
    qs = quantizers(net)
    for name in qs:
        state[f"{name}.zero_point"] = tensors[f"{name}.zero_point"].to(torch.float32)
    for name, layer in weight_layers(net).items():
        scale = state[f"{name}.w_quantizer.scale"]
        zp = state[f"{name}.w_quantizer.zero_point"]
        codes = tensors[name + CODES_SUFFIX].reshape(scale.shape[0], -1)
        state[f"{name}.weight"] = (
            dequantize(codes, scale, zp).reshape(layer.weight.shape).to(layer.weight.dtype)
        )
    _, omitted = layout(net)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) - omitted or unexpected:
        raise FimaqError(
            f"{where} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    set_quant_mode(net, enabled=True)
    return net.to(device).eval()


def export_copy(net: nn.Module) -> nn.Module:
    """A CPU float32 eval copy of ``net`` (for exporting without touching the caller's model)."""
    return copy.deepcopy(net).cpu().float().eval()


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_SCHEMA_VERSION",
    "export_copy",
    "export_quantized",
    "layout",
    "load_quantized",
    "quantizers",
    "quiet_loggers",
    "read_export",
    "require_quantized",
    "weight_codes",
    "weight_layers",
]
