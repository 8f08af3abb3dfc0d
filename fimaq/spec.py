"""What gets quantized: :class:`QuantSpec` (bit-widths, the patch-embedding and head exceptions,
per-layer overrides by name, glob or ``re:`` pattern) and the checks on the model's ``model_kwargs``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, get_args

from fimaq.errors import FimaqError, require_choice
from fimaq.quant.quantizer import check_bits

Rotation = Literal["none", "hadamard"]
AttnProbs = Literal["uniform", "log2", "adalog"]


@dataclass
class QuantSpec:
    """What gets quantized and at which bit-width.

    Keys of ``overrides`` are layer names (``blocks.0.attn.qkv``), glob patterns matched against the
    whole name (``blocks.*.mlp.fc2``; ``*`` also crosses dots) or regular expressions after a ``re:``
    prefix, matched against the whole name (``re:blocks\\.1[01]\\..*``). Every entry that matches a
    layer applies, from the lowest precedence to the highest, each setting only the keys it names:
    patterns in the order written (a later pattern wins over an earlier one), then the exact name,
    which wins over every pattern. A pattern that matches no quantized layer is an error
    (:meth:`check_overrides`).

    Attributes:
        w_bits: weight bits of every quantized layer (2..8).
        a_bits: activation bits (linear inputs and both matmul operands), 2..8.
        head_a_bits: input bits of the classifier head; ``None`` = ``a_bits`` (as every official config).
        overrides: per-layer exceptions, ``{layer name or pattern: {"w_bits": b, "a_bits": b}}``;
            32 or null = FP.
        rotation: ``none`` or ``hadamard``: rotate the residual stream and the MLP hidden of a ViT/DeiT
            by Hadamard matrices before quantizing, LayerNorm affine folded, the float function
            unchanged (docs/algorithm.md, section 1.1; Swin is refused).
        attn_probs: the grid of the attention probabilities (the left operand of ``attn @ v``):
            ``uniform`` (FIMA-Q's), ``log2`` (levels ``s * 2^-q``) or ``adalog`` (levels ``s * 2^(-q c)``
            with the base exponent ``c`` searched per head); docs/algorithm.md, section 2.5.
    """

    w_bits: int = 4
    a_bits: int = 4
    head_a_bits: int | None = None
    overrides: dict[str, dict[str, int | None]] = field(default_factory=dict)
    rotation: Rotation = "none"
    attn_probs: AttnProbs = "uniform"

    @staticmethod
    @lru_cache(maxsize=256)
    def override_matcher(key: str) -> Callable[[str], bool] | None:
        """How an override key matches layer names: ``None`` for an exact name, else a predicate."""
        if key.startswith("re:"):
            try:
                regex = re.compile(key[3:])
            except re.error as exc:
                raise FimaqError(
                    f"override pattern '{key}' is not a valid regular expression ({exc})"
                ) from None
            return lambda name: regex.fullmatch(name) is not None
        if any(c in key for c in "*?["):
            return lambda name: fnmatch.fnmatchcase(name, key)
        return None

    def validate(self) -> QuantSpec:
        """Check every bit-width (2..8, or 32/null for FP) and every override pattern; returns self."""
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.head_a_bits, "head_a_bits")
        require_choice("quant rotation", self.rotation, get_args(Rotation))
        require_choice("quant attn_probs", self.attn_probs, get_args(AttnProbs))
        for name, bits in self.overrides.items():
            self.override_matcher(name)
            unknown = set(bits) - {"w_bits", "a_bits"}
            if unknown:
                raise FimaqError(
                    f"override for '{name}' has unknown keys {sorted(unknown)} (use w_bits, a_bits)"
                )
            for key, value in bits.items():
                check_bits(value, f"overrides[{name!r}].{key}")
        return self

    def matching_overrides(self, name: str) -> list[dict[str, int | None]]:
        """The override entries that apply to layer ``name``, from the lowest precedence to the highest."""
        matchers = {key: self.override_matcher(key) for key in self.overrides}
        found = [bits for key, bits in self.overrides.items() if matchers[key] and matchers[key](name)]
        return found + ([self.overrides[name]] if name in self.overrides else [])

    def check_overrides(self, names: Iterable[str]) -> None:
        """Refuse override patterns that match none of ``names`` (the model's quantized layers).

        Exact names are not checked here (a bit plan's names are checked by ``BitPlan.check_layers``).

        Raises:
            FimaqError: naming the first pattern that matches no layer.
        """
        names = list(names)
        for key in self.overrides:
            match = self.override_matcher(key)
            if match is not None and not any(match(n) for n in names):
                raise FimaqError(
                    f"override pattern '{key}' matches no quantized layer of the model "
                    f"(e.g. {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                )

    def bits_for(self, name: str, role: str) -> tuple[int | None, int | None]:
        """(weight bits, input bits) for a layer; ``role`` is linear, head, patch_embed or matmul."""
        w, a = self.w_bits, self.a_bits
        if role == "head" and self.head_a_bits is not None:
            a = self.head_a_bits
        if role == "patch_embed":
            a = None  # the image stays FP
        for o in self.matching_overrides(name):
            w = o.get("w_bits", w)
            a = o.get("a_bits", a)
        return check_bits(w), check_bits(a)


def check_model_kwargs(kwargs: Any) -> dict[str, Any]:
    """``model_kwargs`` as a dict; a key like ``"depth:2"`` with no value (YAML's reading of ``{depth:2}``,
    which timm would silently drop) is refused with the spelling that works."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise FimaqError(f"model_kwargs must be a mapping, got {type(kwargs).__name__}")
    glued = [k for k, v in kwargs.items() if v is None and isinstance(k, str) and ":" in k]
    if glued:
        fixed = ", ".join(f"{k.split(':', 1)[0]}: {k.split(':', 1)[1]}" for k in glued)
        raise FimaqError(
            f"model_kwargs has the key(s) {', '.join(repr(k) for k in glued)} without a value: "
            f"YAML needs a space after each colon ({fixed})"
        )
    return dict(kwargs)
