"""The timm BEiT family (``timm.models.beit``): its attention (:class:`QuantBeitAttention`), the
pre-norm block with its LayerScale gammas (plain parameters, kept float), and the model's head.

The model's shared relative position bias module (``use_shared_rel_pos_bias``) is not registered: it
stays float, and its output reaches each quantized attention by keyword (kept from the example forward
pass for a block called alone)."""

from __future__ import annotations

from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.beit import QuantBeitAttention
from fimaq.models.registry import Quantizable, SwapContext
from fimaq.models.timm_families import ATTENTION_ROLES, BLOCK_NORMS, attention_bits


def quantize_beit_attention(attn: nn.Module, ctx: SwapContext) -> QuantBeitAttention:
    """timm BEiT ``Attention`` -> :class:`QuantBeitAttention` (tokens from the recorded input)."""
    if not ctx.token_shape:
        raise FimaqError(f"attention {ctx.name} did not run on the example input: its token count is unknown")
    shared = ctx.example_kwargs.get("shared_rel_pos_bias")
    return QuantBeitAttention.from_float(attn, ctx.token_shape[0], attention_bits(ctx), shared)


def entries() -> tuple[Quantizable, ...]:
    """The family's registry entries."""
    from timm.models.beit import Attention, Beit, Block

    return (
        Quantizable(
            Attention, quantize_beit_attention, QuantBeitAttention, roles=ATTENTION_ROLES, input="qkv"
        ),
        Quantizable(Block, unit="block", norms=BLOCK_NORMS, cls_token=True),
        Quantizable(Beit, heads=("head",)),
    )
