"""The timm Swin Transformer V2 family: cosine window attention, post-norm blocks, v2 patch merging.

Its ``WindowAttention`` and ``PatchMerging`` are classes of their own (not v1's, whose entries are in
:mod:`fimaq.models.timm_families`). The blocks are post-norm (``x + norm1(attn(x))``): no LayerNorm
feeds a linear directly, so they list no norms. Patch merging applies its reduction first and its
LayerNorm after: no fold either.
"""

from __future__ import annotations

from torch import nn

from fimaq.layers.swinv2 import QuantWindowAttentionV2
from fimaq.models.registry import Quantizable, SwapContext


def quantize_window_attention_v2(attn: nn.Module, ctx: SwapContext) -> QuantWindowAttentionV2:
    """timm v2 ``WindowAttention`` -> :class:`QuantWindowAttentionV2` (tokens = window area)."""
    from fimaq.models.timm_families import attention_bits

    return QuantWindowAttentionV2.from_float(attn, attention_bits(ctx))


def entries() -> tuple[Quantizable, ...]:
    """The family's registry entries."""
    from timm.models.swin_transformer_v2 import (
        PatchMerging,
        SwinTransformerV2,
        SwinTransformerV2Block,
        WindowAttention,
    )

    from fimaq.models.timm_families import ATTENTION_ROLES

    return (
        Quantizable(
            WindowAttention,
            quantize_window_attention_v2,
            QuantWindowAttentionV2,
            roles=ATTENTION_ROLES,
            input="qkv",
        ),
        Quantizable(SwinTransformerV2Block, unit="block"),
        Quantizable(PatchMerging, unit="merge", roles={"reduction": "reduction"}),
        Quantizable(SwinTransformerV2, heads=("head.fc",)),
    )
