"""Reconstruction units in model order: patch embedding, every block (Swin: and patch merging), head(s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fimaq.layers import QuantConv2d, QuantLinear
from fimaq.models.registry import UnitKind, find_units
from fimaq.quant.quantizer import UniformQuantizer


@dataclass
class Unit:
    """One reconstruction unit: its qualified name, module and kind (patch_embed | block | merge | head).

    ``has_cls_token``: the unit's output carries the class token first (ViT/DeiT blocks).
    """

    name: str
    module: nn.Module
    kind: UnitKind
    has_cls_token: bool = False

    @property
    def is_head(self) -> bool:
        return self.kind == "head"

    def weight_layers(self) -> list[nn.Module]:
        """The unit's quantized linear/conv layers (AdaRound targets)."""
        return [m for m in self.module.modules() if isinstance(m, (QuantLinear, QuantConv2d))]

    def quantizers(self) -> list[UniformQuantizer]:
        """Every uniform quantizer inside the unit."""
        return [m for m in self.module.modules() if isinstance(m, UniformQuantizer)]


def recon_units(net: nn.Module) -> list[Unit]:
    """The units of a quantized model of a registered family (:mod:`fimaq.models.registry`), in
    forward order."""
    return [Unit(u.name, u.module, u.kind, u.has_cls_token) for u in find_units(net)]


class StopForward(Exception):
    """Raised by a capture hook once the unit of interest has run (the rest of the model is skipped)."""


@contextmanager
def unit_hook(module: nn.Module, hook, pre: bool = False) -> Iterator[None]:
    """Attach a forward hook (``pre``: a forward pre-hook) for the duration of the block."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def first_tensor(args: tuple) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError("unit called without a tensor input")
