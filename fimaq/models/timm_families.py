"""The built-in model families: timm ViT/DeiT and Swin, plain ``nn.Linear`` and the patch-embedding
``nn.Conv2d``, described with the same :class:`~fimaq.models.registry.Quantizable` entries any other
family uses (:func:`fimaq.models.registry.register`)."""

from __future__ import annotations

from torch import nn

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.errors import FimaqError
from fimaq.layers import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention
from fimaq.models.registry import Quantizable, Role, SwapContext

ATTENTION_ROLES: dict[str, Role] = {"qkv": "qkv", "proj": "proj", "matmul1": "matmul1", "matmul2": "matmul2"}
MLP_ROLES: dict[str, Role] = {"fc1": "fc1", "fc2": "fc2"}
BLOCK_NORMS = {"norm1": "attn", "norm2": "mlp"}


def attention_bits(ctx: SwapContext) -> dict[str, tuple[int | None, int | None]]:
    """The bits of an attention's qkv, proj and both matmuls (``from_float``'s ``bits`` argument)."""
    return {part: ctx.child(part).bits() for part in ("qkv", "proj", "matmul1", "matmul2")}


def quantize_linear(linear: nn.Module, ctx: SwapContext) -> QuantLinear:
    """``nn.Linear`` -> :class:`QuantLinear` with the input's recorded token shape."""
    w, a = ctx.bits()
    return QuantLinear.from_float(linear, w, a, ctx.token_shape or None)


def quantize_conv(conv: nn.Module, ctx: SwapContext) -> QuantConv2d:
    """``nn.Conv2d`` (a patch embedding's projection) -> :class:`QuantConv2d`."""
    w, a = ctx.bits()
    return QuantConv2d.from_float(conv, w, a)


def quantize_attention(attn: nn.Module, ctx: SwapContext) -> QuantAttention:
    """timm ViT/DeiT ``Attention`` -> :class:`QuantAttention` (tokens from the recorded input)."""
    if not ctx.token_shape:
        raise FimaqError(f"attention {ctx.name} did not run on the example input: its token count is unknown")
    return QuantAttention.from_float(attn, ctx.token_shape[0], attention_bits(ctx))


def quantize_window_attention(attn: nn.Module, ctx: SwapContext) -> QuantWindowAttention:
    """timm Swin ``WindowAttention`` -> :class:`QuantWindowAttention` (tokens = window area)."""
    return QuantWindowAttention.from_float(attn, attention_bits(ctx))


def timm_families() -> tuple[Quantizable, ...]:
    """The entries of the built-in families (timm is imported here, not at fimaq's import): ViT/DeiT
    and Swin here, the others from :mod:`fimaq.models.families`."""
    from timm.layers import Attention, Mlp, PatchEmbed
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.swin_transformer import (
        PatchMerging,
        SwinTransformer,
        SwinTransformerBlock,
        WindowAttention,
    )
    from timm.models.vision_transformer import Block, VisionTransformer

    from fimaq.models.families import entries as family_entries

    return (
        Quantizable(nn.Linear, quantize_linear, QuantLinear, role="linear"),
        Quantizable(nn.Conv2d, quantize_conv, QuantConv2d, needs_role=True),
        Quantizable(PatchEmbed, unit="patch_embed", roles={"proj": "patch_embed"}),
        Quantizable(Mlp, roles=MLP_ROLES, input="fc1", norms={"norm": "fc2"}),  # norm: scale_mlp
        # ViT / DeiT
        Quantizable(Attention, quantize_attention, QuantAttention, roles=ATTENTION_ROLES, input="qkv"),
        Quantizable(Block, unit="block", norms=BLOCK_NORMS, cls_token=True),
        Quantizable(VisionTransformer, heads=("head",)),
        Quantizable(VisionTransformerDistilled, heads=("head", "head_dist")),
        # Swin
        Quantizable(
            WindowAttention,
            quantize_window_attention,
            QuantWindowAttention,
            roles=ATTENTION_ROLES,
            input="qkv",
        ),
        Quantizable(SwinTransformerBlock, unit="block", norms=BLOCK_NORMS),
        Quantizable(
            PatchMerging, unit="merge", roles={"reduction": "reduction"}, norms={"norm": "reduction"}
        ),
        Quantizable(SwinTransformer, heads=("head.fc",)),
        *family_entries(),
    )
