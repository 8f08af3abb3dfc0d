"""Comparison with the reference implementation's calibration of a small model (the oracle folder).

The folder holds ``model.safetensors`` (a 4-block ViT on digits), ``inputs.safetensors`` (128
calibration and 450 test tensors) and ``official_calib_w{b}a{b}.safetensors`` (the reference's
calibrated state dict and test logits). Names map one to one; only the weight-scale shapes differ
(the reference stores qkv rows as (3, rows/3, 1)).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.calib.capture import capture_io, run_batches
from fimaq.errors import FimaqError
from fimaq.layers import QuantConv2d, QuantMatMul
from fimaq.layers.mode import quant_mode
from fimaq.quant.search import fq

ORACLE_ARCH = "deit_tiny_patch16_224"
ORACLE_KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}
QPARAM_SUFFIXES = ("_quantizer.scale", "_quantizer.zero_point")


def oracle_dir() -> Path | None:
    """``$FIMAQ_ORACLE_DIR``, else ``../shared/oracle`` beside the repository, if it exists."""
    env = os.environ.get("FIMAQ_ORACLE_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "oracle")
    for path in candidates:
        if (path / "model.safetensors").is_file():
            return path
    return None


@dataclass
class QParamDiff:
    """How one calibrated state dict compares with the reference's, one search decision at a time.

    A group is what one search decides: a weight row, an attention head of a matmul operand, a
    per-tensor activation quantizer (the reference stores per-head and per-tensor scales repeated over
    tokens; a group counts once). Its zero point's shape gives the grouping. A group differs when its
    scale differs by more than the relative tolerance or its zero point differs.
    """

    groups: int = 0  # search decisions compared (rows, heads, tensors)
    differing: dict[str, int] = field(default_factory=dict)  # scale key -> groups that differ
    zero_point_only: dict[str, int] = field(default_factory=dict)  # of those, groups with equal scales

    @property
    def matched(self) -> int:
        return self.groups - sum(self.differing.values())


def _grouped(
    scale: torch.Tensor, zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(largest scale, smallest scale, zero point) per group, each flat (G,); ``scale`` and
    ``zero_point`` in the reference's shapes."""
    if zero_point.numel() == 1:
        return scale.amax().view(1), scale.amin().view(1), zero_point.reshape(1)
    dims = [i for i in range(scale.dim()) if zero_point.shape[i] == 1 and scale.shape[i] > 1]
    if not dims:
        return scale.reshape(-1), scale.reshape(-1), zero_point.reshape(-1)
    return (
        scale.amax(dim=dims, keepdim=True).reshape(-1),
        scale.amin(dim=dims, keepdim=True).reshape(-1),
        zero_point.reshape(-1),
    )


@dataclass
class _Groups:
    """One quantizer's groups: which differ (and of those, which by the zero point alone), with both
    sides' per-group scales and zero points."""

    key: str  # the scale's key
    differs: torch.Tensor
    zero_point_only: torch.Tensor
    ours: tuple[torch.Tensor, torch.Tensor]
    theirs: tuple[torch.Tensor, torch.Tensor]


def _group_pairs(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float
) -> Iterator[_Groups]:
    for key, want in ref.items():
        if not key.endswith("_quantizer.scale") or key.startswith("patch_embed.proj.a_quantizer"):
            continue  # the patch-embed input stays FP (the reference keeps an unused scale there)
        zp_key = key[: -len("scale")] + "zero_point"
        if key not in ours or zp_key not in ours:
            raise FimaqError(f"missing quantizer parameter {key}")
        want_zp = ref[zp_key]
        hi, lo, zp = _grouped(ours[key].reshape(want.shape), ours[zp_key].reshape(want_zp.shape))
        ref_s, _, ref_zp = _grouped(want, want_zp)
        denom = ref_s.abs().clamp_min(1e-12)
        scale_off = ((hi - ref_s).abs() / denom > rtol) | ((lo - ref_s).abs() / denom > rtol)
        zp_off = zp != ref_zp
        yield _Groups(key, scale_off | zp_off, zp_off & ~scale_off, (hi, zp), (ref_s, ref_zp))


def compare_qparams(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-5
) -> QParamDiff:
    """Group-by-group comparison of every active quantizer's scale and zero point."""
    diff = QParamDiff()
    for g in _group_pairs(ours, ref, rtol):
        diff.groups += g.differs.numel()
        if g.differs.any():
            diff.differing[g.key] = int(g.differs.sum())
        if g.zero_point_only.any():
            diff.zero_point_only[g.key] = int(g.zero_point_only.sum())
    return diff


def differing_groups(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-5
) -> list[tuple[str, int, tuple[float, float], tuple[float, float]]]:
    """(scale key, group index, our (scale, zero point), the reference's) of every differing group."""
    return [
        (g.key, i, (float(g.ours[0][i]), float(g.ours[1][i])), (float(g.theirs[0][i]), float(g.theirs[1][i])))
        for g in _group_pairs(ours, ref, rtol)
        for i in g.differs.nonzero().flatten().tolist()
    ]


def _group_mask(index: int, ref_scale: torch.Tensor, ref_zero_point: torch.Tensor, shape) -> torch.Tensor:
    """Bool mask, in a quantizer's scale ``shape``, of group ``index`` (as :func:`_group_pairs` counts)."""
    if ref_zero_point.numel() == 1:
        return torch.ones(shape, dtype=torch.bool)
    mask = torch.zeros(ref_zero_point.shape, dtype=torch.bool)
    mask.view(-1)[index] = True
    return mask.expand(ref_scale.shape).reshape(shape)


def _objective(module: nn.Module, which: str, captured, qparams: dict, group: torch.Tensor) -> float:
    """Float64 squared output error of ``module`` with its quantizers at ``qparams`` (name -> (scale,
    zero point, bits)), over the outputs that the group decides: the search criterion of that group."""

    def quant(x, name):
        if name not in qparams:
            return x
        s, z, bits = qparams[name]
        return fq(x, s, z, bits)

    if isinstance(module, QuantMatMul):
        a, b = captured.inputs
        heads = group.reshape(group.shape[1], -1).any(dim=1)  # (H,) the heads the group covers
        prod = quant(a, "A_quantizer").double() @ quant(b, "B_quantizer").double()
        return float((captured.output.double() - prod)[:, heads].pow(2).sum())
    w = module.weight.detach()
    if isinstance(module, QuantConv2d):
        x = F.unfold(captured.inputs[0], module.kernel_size, module.dilation, module.padding, module.stride)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
        y = captured.output.flatten(2).transpose(1, 2).reshape(-1, w.shape[0])
        w = w.reshape(w.shape[0], -1)
        w_hat = quant(w, "w_quantizer")
    else:
        x = quant(captured.inputs[0], "a_quantizer").reshape(-1, w.shape[1])
        y = captured.output.reshape(-1, w.shape[0])
        w_hat = quant(w, "w_quantizer")
    rows = group.reshape(-1) if which == "w_quantizer" else torch.ones(w.shape[0], dtype=torch.bool)
    out = x.double() @ w_hat[rows].double().T + module.bias.detach()[rows].double()
    return float((y[:, rows].double() - out).pow(2).sum())


@torch.no_grad()
def objective_gaps(
    model: nn.Module,
    images: torch.Tensor,
    ref: dict[str, torch.Tensor],
    rtol: float = 1e-5,
    batch_size: int = 32,
) -> list[tuple[str, int, float]]:
    """How much a differing decision matters: for every group that differs from the reference's
    (:func:`differing_groups`), (key, group index, gap). The gap is the relative increase of that
    group's search criterion (the product's or the layer output's squared error, in float64) when the
    reference's scale and zero point replace ours, every other quantizer kept at our final values (an
    alternating search decided a group against the other side's values of its last round). The
    criterion is evaluated on the FP tensors the search saw, captured again from the calibrated
    ``model`` with its quantizers off. A gap near 0 is a near-tie that float rounding decides; a
    negative one means the reference's candidate is better on the same tensors.
    """
    state = model.state_dict()
    differing = differing_groups(state, ref, rtol)
    if not differing:
        return []
    names = sorted({key.rsplit(".", 2)[0] for key, *_ in differing})
    modules = {name: model.get_submodule(name) for name in names}
    with quant_mode(model, enabled=False, explicit_matmuls=True), capture_io(modules) as store:
        run_batches(model, images, batch_size)
    gaps = []
    for key, index, _, _ in differing:
        name, which = key.rsplit(".", 2)[:2]
        module = modules[name]
        qparams = {
            q: (getattr(module, q).scale.detach(), getattr(module, q).zero_point, getattr(module, q).bits)
            for q in ("w_quantizer", "a_quantizer", "A_quantizer", "B_quantizer")
            if hasattr(module, q) and getattr(module, q).bits is not None
        }
        scale, zero_point, bits = qparams[which]
        zp_key = key[: -len("scale")] + "zero_point"
        group = _group_mask(index, ref[key], ref[zp_key], scale.shape)
        zp_group = _group_mask(index, ref[zp_key], ref[zp_key], zero_point.shape)
        theirs = (
            torch.where(group, ref[key].reshape(scale.shape), scale),
            torch.where(zp_group, ref[zp_key].reshape(zero_point.shape), zero_point),
            bits,
        )
        mine = _objective(module, which, store[name], qparams, group)
        other = _objective(module, which, store[name], {**qparams, which: theirs}, group)
        gaps.append((key, index, (other - mine) / max(mine, 1e-300)))
    return gaps
