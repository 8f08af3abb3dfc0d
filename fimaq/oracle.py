"""Comparison with the reference implementation's calibration of a small model (the oracle folder).

The folder holds ``model.safetensors`` (a 4-block ViT on digits), ``inputs.safetensors`` (128
calibration and 450 test tensors) and ``official_calib_w{b}a{b}.safetensors`` (the reference's
calibrated state dict and test logits). Names map one to one; only the weight-scale shapes differ
(the reference stores qkv rows as (3, rows/3, 1)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fimaq.errors import FimaqError

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
    """How one calibrated state dict compares with the reference's, group by group."""

    groups: int = 0  # scale groups compared (rows, heads, tensors)
    scale_mismatch: dict[str, int] = field(default_factory=dict)  # key -> groups off by more than rtol
    zero_point_mismatch: dict[str, int] = field(default_factory=dict)

    @property
    def matched(self) -> int:
        return self.groups - sum(self.scale_mismatch.values())


def compare_qparams(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-5
) -> QParamDiff:
    """Per-group comparison of every active quantizer's scale and zero point."""
    diff = QParamDiff()
    for key, want in ref.items():
        if not key.endswith(QPARAM_SUFFIXES) or key.startswith("patch_embed.proj.a_quantizer"):
            continue  # the patch-embed input stays FP (the reference keeps an unused scale there)
        if key not in ours:
            raise FimaqError(f"missing quantizer parameter {key}")
        got = ours[key].reshape(want.shape)
        if key.endswith("zero_point"):
            bad = int((got != want).sum())
            if bad:
                diff.zero_point_mismatch[key] = bad
            continue
        rel = ((got - want).abs() / want.abs().clamp_min(1e-12)).flatten()
        diff.groups += rel.numel()
        bad = int((rel > rtol).sum())
        if bad:
            diff.scale_mismatch[key] = bad
    return diff


def scale_mismatches(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float = 1e-5
) -> list[tuple[str, int, float, float]]:
    """(key, first flat group index, our scale, the reference's scale) of every distinct pair of scales
    that differ by more than ``rtol`` (a per-tensor scale repeated over tokens is listed once)."""
    found: dict[tuple[str, float, float], int] = {}
    for key, want in ref.items():
        if not key.endswith("_quantizer.scale") or key.startswith("patch_embed.proj.a_quantizer"):
            continue
        got = ours[key].reshape(want.shape).flatten()
        want = want.flatten()
        bad = (((got - want).abs() / want.abs().clamp_min(1e-12)) > rtol).nonzero().flatten()
        for i in bad.tolist():
            found.setdefault((key, float(got[i]), float(want[i])), i)
    return [(key, i, g, w) for (key, g, w), i in found.items()]
