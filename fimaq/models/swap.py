"""The explicit float -> quantized module swap, and the list of quantized layers in model order."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.config import QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers import QuantAttention, QuantConv2d, QuantLinear, QuantMatMul, QuantWindowAttention


def _timm_types() -> dict[str, type]:
    from timm.layers import Attention, Mlp
    from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock, WindowAttention
    from timm.models.vision_transformer import Block

    return {
        "Attention": Attention,
        "WindowAttention": WindowAttention,
        "Mlp": Mlp,
        "Block": Block,
        "SwinBlock": SwinTransformerBlock,
        "PatchMerging": PatchMerging,
    }


@dataclass
class QLayer:
    """A quantized layer: its qualified name, module, role and (for folds) the LayerNorm feeding it."""

    name: str
    module: nn.Module
    role: str  # patch_embed | qkv | proj | fc1 | fc2 | reduction | head | matmul1 | matmul2
    unit: str  # the reconstruction unit holding it: a block, a patch merging, patch_embed or the head
    norm: nn.LayerNorm | None = None


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero image of the size the model was built for."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "img_size"):
        raise FimaqError(f"{type(model).__name__} has no patch_embed.img_size: not a timm ViT/DeiT/Swin")
    h, w = pe.img_size
    in_chans = pe.proj.in_channels
    p = next(model.parameters())
    return torch.zeros(batch, in_chans, h, w, device=p.device, dtype=p.dtype)


def _record_token_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Input shapes (without batch and channel dims) of every Linear and ViT attention."""
    types = _timm_types()
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, types["Attention"])):

            def hook(m, args, _out, name=name):
                shapes[name] = tuple(args[0].shape[1:-1])

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input(model))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _classifier_ids(model: nn.Module) -> set[int]:
    heads = set()
    for attr in ("head", "head_dist"):
        mod = getattr(model, attr, None)
        if isinstance(mod, nn.Linear):
            heads.add(id(mod))
        elif mod is not None and isinstance(getattr(mod, "fc", None), nn.Linear):
            heads.add(id(mod.fc))
    return heads


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Swap every quantizable layer of a timm ViT/DeiT/Swin for its quantized version, in place.

    Quantizers start disabled (the model computes exactly as before); calibration fills and enables
    them. Returns the same model object.
    """
    spec.validate()
    types = _timm_types()
    if not any(isinstance(m, (types["Attention"], types["WindowAttention"])) for m in model.modules()):
        raise FimaqError(f"{type(model).__name__} has no timm ViT or Swin attention: unsupported model")
    shapes = _record_token_counts(model)
    heads = _classifier_ids(model)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, types["Attention"]):
            bits = _attention_bits(spec, name)
            model.set_submodule(name, QuantAttention.from_float(mod, shapes[name][0], bits))
        elif isinstance(mod, types["WindowAttention"]):
            model.set_submodule(name, QuantWindowAttention.from_float(mod, _attention_bits(spec, name)))
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            role = "head" if id(mod) in heads else "linear"
            w, a = spec.bits_for(name, role)
            token_shape = shapes.get(name) or None
            model.set_submodule(name, QuantLinear.from_float(mod, w, a, token_shape))
    conv = model.patch_embed.proj
    if isinstance(conv, nn.Conv2d) and not isinstance(conv, QuantConv2d):
        w, a = spec.bits_for("patch_embed.proj", "patch_embed")
        model.patch_embed.proj = QuantConv2d.from_float(conv, w, a)
    return model


def _attention_bits(spec: QuantSpec, name: str) -> dict[str, tuple[int | None, int | None]]:
    bits = {}
    for part in ("qkv", "proj"):
        bits[part] = spec.bits_for(f"{name}.{part}", "linear")
    for part in ("matmul1", "matmul2"):
        _, a = spec.bits_for(f"{name}.{part}", "matmul")
        bits[part] = (a, a)
    return bits


def iter_qlayers(model: nn.Module) -> Iterator[QLayer]:
    """Quantized layers in model (``named_modules``) order, with their roles and fold partners."""
    types = _timm_types()
    norms: dict[int, nn.Module] = {}
    roles: dict[int, str] = {}
    heads = _classifier_ids(model)
    for mod in model.modules():
        if isinstance(mod, (types["Block"], types["SwinBlock"])):
            norms[id(mod.attn.qkv)] = mod.norm1
            if isinstance(mod.mlp, types["Mlp"]):
                norms[id(mod.mlp.fc1)] = mod.norm2
        elif isinstance(mod, types["PatchMerging"]):
            norms[id(mod.reduction)] = mod.norm
            roles[id(mod.reduction)] = "reduction"
        elif isinstance(mod, (QuantAttention, QuantWindowAttention)):
            roles.update(
                {
                    id(mod.qkv): "qkv",
                    id(mod.proj): "proj",
                    id(mod.matmul1): "matmul1",
                    id(mod.matmul2): "matmul2",
                }
            )
        elif isinstance(mod, types["Mlp"]):
            roles.update({id(mod.fc1): "fc1", id(mod.fc2): "fc2"})
    unit_types = (types["Block"], types["SwinBlock"], types["PatchMerging"])
    unit = None
    for name, mod in model.named_modules():
        if isinstance(mod, unit_types):
            unit = name
        in_unit = unit is not None and name.startswith(unit + ".")
        if isinstance(mod, QuantConv2d):
            yield QLayer(name, mod, "patch_embed", unit if in_unit else name)
        elif isinstance(mod, QuantMatMul):
            yield QLayer(name, mod, roles[id(mod)], unit if in_unit else name)
        elif isinstance(mod, QuantLinear):
            role = "head" if id(mod) in heads else roles.get(id(mod), "linear")
            norm = norms.get(id(mod))
            norm = norm if isinstance(norm, nn.LayerNorm) else None
            yield QLayer(name, mod, role, unit if in_unit else name, norm)
