"""The timm ViT-RelPos family (``timm.models.vision_transformer_relpos``): its attention
(:class:`QuantRelPosAttention`), the pre-norm ``RelPosBlock`` (LayerNorm folds into ``qkv`` and
``fc1``), the post-norm ``ResPostRelPosBlock`` (no fold: its norms follow the attention and the MLP),
and the model's head.

The relative position modules stay float: a block's ``rel_pos`` is kept inside the quantized
attention, and the model's shared one (``shared_rel_pos``) reaches each attention by keyword (kept
from the example forward pass for a block called alone). ``RelPosMlp`` is registered ``keep_float``,
so the linears of its MLP are never quantized."""

from __future__ import annotations

from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.relpos import QuantRelPosAttention
from fimaq.models.registry import Quantizable, SwapContext
from fimaq.models.timm_families import ATTENTION_ROLES, BLOCK_NORMS, attention_bits


def quantize_relpos_attention(attn: nn.Module, ctx: SwapContext) -> QuantRelPosAttention:
    """timm ``RelPosAttention`` -> :class:`QuantRelPosAttention` (tokens from the recorded input)."""
    if not ctx.token_shape:
        raise FimaqError(f"attention {ctx.name} did not run on the example input: its token count is unknown")
    shared = ctx.example_kwargs.get("shared_rel_pos")
    return QuantRelPosAttention.from_float(attn, ctx.token_shape[0], attention_bits(ctx), shared)


def entries() -> tuple[Quantizable, ...]:
    """The family's registry entries."""
    from timm.layers import RelPosMlp
    from timm.models.vision_transformer_relpos import (
        RelPosAttention,
        RelPosBlock,
        ResPostRelPosBlock,
        VisionTransformerRelPos,
    )

    return (
        Quantizable(
            RelPosAttention,
            quantize_relpos_attention,
            QuantRelPosAttention,
            roles=ATTENTION_ROLES,
            input="qkv",
        ),
        Quantizable(RelPosBlock, unit="block", norms=BLOCK_NORMS, cls_token=True),
        Quantizable(ResPostRelPosBlock, unit="block", cls_token=True),
        Quantizable(RelPosMlp, keep_float=True),
        Quantizable(VisionTransformerRelPos, heads=("head",)),
    )
