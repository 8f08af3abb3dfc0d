"""Typed configuration objects shared by the stages (LightningCLI builds them from YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fimaq.errors import FimaqError, require_int
from fimaq.quant.quantizer import check_bits


@dataclass
class QuantSpec:
    """What gets quantized and at which bit-width.

    Attributes:
        w_bits: weight bits of every quantized layer (2..8).
        a_bits: activation bits (linear inputs and both matmul operands), 2..8.
        head_a_bits: input bits of the classifier head; ``None`` = ``a_bits`` (as every official config).
        overrides: per-layer exceptions, ``{layer name: {"w_bits": b, "a_bits": b}}``; 32 or null = FP.
    """

    w_bits: int = 4
    a_bits: int = 4
    head_a_bits: int | None = None
    overrides: dict[str, dict[str, int | None]] = field(default_factory=dict)

    def validate(self) -> QuantSpec:
        """Check every bit-width (2..8, or 32/null for FP); returns self."""
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.head_a_bits, "head_a_bits")
        for name, bits in self.overrides.items():
            unknown = set(bits) - {"w_bits", "a_bits"}
            if unknown:
                raise FimaqError(
                    f"override for '{name}' has unknown keys {sorted(unknown)} (use w_bits, a_bits)"
                )
            for key, value in bits.items():
                check_bits(value, f"overrides[{name!r}].{key}")
        return self

    def bits_for(self, name: str, role: str) -> tuple[int | None, int | None]:
        """(weight bits, input bits) for a layer; ``role`` is linear, head, patch_embed or matmul."""
        w, a = self.w_bits, self.a_bits
        if role == "head" and self.head_a_bits is not None:
            a = self.head_a_bits
        if role == "patch_embed":
            a = None  # the image stays FP
        if name in self.overrides:
            o = self.overrides[name]
            w = o.get("w_bits", w)
            a = o.get("a_bits", a)
        return check_bits(w), check_bits(a)


@dataclass
class CalibConfig:
    """Scale search of the calibration stage (ALGORITHM section 2).

    Attributes:
        num_images: calibration images (taken from the data module's calibration set).
        eq_n: candidates per grid.
        search_rounds: alternating weight/activation rounds after the initial search.
        batch_size: images per forward pass while capturing.
        candidate_chunk: candidates evaluated at once (bounds memory; no effect on the result).
        images_per_chunk: images per slice of the pruned output-error searches (speed only).
        fold_layernorm: fold per-channel input scales of qkv/fc1/reduction into the preceding LayerNorm.
        recapture_after_fold: capture a unit's remaining layers again after a fold (bit-faithful to the
            reference's float rounding; off saves one forward pass per fold).
    """

    num_images: int = 128
    eq_n: int = 128
    search_rounds: int = 3
    batch_size: int = 32
    candidate_chunk: int = 16
    images_per_chunk: int = 4
    fold_layernorm: bool = True
    recapture_after_fold: bool = True

    def validate(self) -> CalibConfig:
        """Check the settings; returns self."""
        for key in ("num_images", "eq_n", "batch_size", "candidate_chunk", "images_per_chunk"):
            require_int(f"calibration {key}", getattr(self, key), 1)
        require_int("calibration search_rounds", self.search_rounds, 0)
        return self
