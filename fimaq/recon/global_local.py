"""The frozen FP remainder of the network for the ``global_local`` loss (docs/algorithm.md, section 4).

A unit's (quantized) output is carried through the rest of the model in float to the penultimate
features, the input of the classifier (timm's ``forward_head(..., pre_logits=True)``), and compared
with the float model's features of the same images, which are computed once per run and cached.
Supported: timm ``VisionTransformer`` and its distilled variant (ViT, DeiT); other architectures are
refused with one line.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fimaq.errors import FimaqError
from fimaq.recon.units import Unit

Suffix = Callable[[torch.Tensor], torch.Tensor]


def _check(net: nn.Module) -> VisionTransformer:
    if not isinstance(net, VisionTransformer):
        raise FimaqError(
            f"recon.loss global_local supports ViT/DeiT (timm VisionTransformer), not {type(net).__name__}; "
            "use another recon.loss"
        )
    return net


def penultimate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The penultimate features of images ``x`` (as the model computes now: the caller sets float)."""
    vit = _check(net)
    return vit.forward_head(vit.forward_features(x), pre_logits=True)


def suffix(net: nn.Module, unit: Unit) -> Suffix:
    """``y -> features``: the unit's output through every later part of the model up to the penultimate
    features (what ``forward_features`` and ``forward_head`` do after the unit)."""
    vit = _check(net)
    names = [f"blocks.{i}" for i in range(len(vit.blocks))]
    if unit.name == "patch_embed":
        start = 0

        def enter(y: torch.Tensor) -> torch.Tensor:
            return vit.norm_pre(vit.patch_drop(vit._pos_embed(y)))

    elif unit.name in names:
        start = names.index(unit.name) + 1

        def enter(y: torch.Tensor) -> torch.Tensor:
            return y

    else:
        raise FimaqError(f"recon.loss global_local: no float remainder for unit {unit.name}")

    def run(y: torch.Tensor) -> torch.Tensor:
        x = enter(y)
        for block in vit.blocks[start:]:
            x = block(x)
        return vit.forward_head(vit.norm(x), pre_logits=True)

    return run


@torch.no_grad()
def penultimate_targets(
    net: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> torch.Tensor:
    """The float model's penultimate features of every image (the caller switches quantization off)."""
    model_device = next(net.parameters()).device
    out = [
        penultimate(net, images[s : s + batch_size].to(model_device)).float().to(device)
        for s in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out)
