"""Reconstruction units in model order: patch embedding, every block (Swin: and patch merging), head(s)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fimaq.layers import QuantConv2d, QuantLinear
from fimaq.models.swap import _classifier_ids, _timm_types
from fimaq.quant.quantizer import UniformQuantizer


@dataclass
class Unit:
    """One reconstruction unit: its qualified name, module and kind (patch_embed | block | merge | head)."""

    name: str
    module: nn.Module
    kind: str
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
    """The units of a quantized timm ViT/DeiT/Swin in forward order."""
    from timm.layers import PatchEmbed

    types = _timm_types()
    heads = _classifier_ids(net)
    cls = getattr(net, "cls_token", None) is not None
    units: list[Unit] = []
    for name, mod in net.named_modules():
        if isinstance(mod, PatchEmbed):
            units.append(Unit(name, mod, "patch_embed"))
        elif isinstance(mod, types["Block"]):
            units.append(Unit(name, mod, "block", has_cls_token=cls))
        elif isinstance(mod, types["SwinBlock"]):
            units.append(Unit(name, mod, "block"))
        elif isinstance(mod, types["PatchMerging"]):
            units.append(Unit(name, mod, "merge"))
        elif id(mod) in heads:
            units.append(Unit(name, mod, "head"))
    return units


class StopForward(Exception):
    """Raised by a capture hook once the unit of interest has run (the rest of the model is skipped)."""


@contextmanager
def unit_hook(module: nn.Module, hook) -> Iterator[None]:
    """Attach a forward hook for the duration of the block."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def first_tensor(args: tuple) -> torch.Tensor:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    raise TypeError("unit called without a tensor input")
