"""The timm CaiT family: talking-heads self-attention blocks over the patch tokens, then
class-attention blocks that update the class token alone.

``LayerScaleBlock`` (pre-norm, talking heads) is a reconstruction unit; the class token is added
after those blocks, so their tokens do not start with it (``cls_token=False``). A
``LayerScaleBlockClassAttn`` is called as ``blk(x, x_cls)``, with two inputs that depend on the
image, which a reconstruction unit (one cached input) cannot take: it is registered without a unit,
its layers are quantized and calibrated (each layer its own calibration group) but not
reconstructed. Its ``norm1`` feeds three linears (q, k, v): no fold; its ``norm2`` folds into the
MLP's ``fc1``.
"""

from __future__ import annotations

from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.cait import QuantClassAttn, QuantTalkingHeadAttn
from fimaq.models.registry import Quantizable, Role, SwapContext

CLASS_ATTN_ROLES: dict[str, Role] = {
    "q": "qkv",
    "k": "qkv",
    "v": "qkv",
    "proj": "proj",
    "matmul1": "matmul1",
    "matmul2": "matmul2",
}


def _num_tokens(ctx: SwapContext) -> int:
    if not ctx.token_shape:
        raise FimaqError(f"attention {ctx.name} did not run on the example input: its token count is unknown")
    return ctx.token_shape[0]


def quantize_talking_head_attn(attn: nn.Module, ctx: SwapContext) -> QuantTalkingHeadAttn:
    """timm CaiT ``TalkingHeadAttn`` -> :class:`QuantTalkingHeadAttn` (tokens from the recorded input)."""
    from fimaq.models.timm_families import attention_bits

    return QuantTalkingHeadAttn.from_float(attn, _num_tokens(ctx), attention_bits(ctx))


def quantize_class_attn(attn: nn.Module, ctx: SwapContext) -> QuantClassAttn:
    """timm CaiT ``ClassAttn`` -> :class:`QuantClassAttn` (tokens from the recorded input)."""
    bits = {part: ctx.child(part).bits() for part in CLASS_ATTN_ROLES}
    return QuantClassAttn.from_float(attn, _num_tokens(ctx), bits)


def entries() -> tuple[Quantizable, ...]:
    """The family's registry entries."""
    from timm.models.cait import (
        Cait,
        ClassAttn,
        LayerScaleBlock,
        LayerScaleBlockClassAttn,
        TalkingHeadAttn,
    )

    from fimaq.models.timm_families import ATTENTION_ROLES, BLOCK_NORMS

    return (
        Quantizable(
            TalkingHeadAttn,
            quantize_talking_head_attn,
            QuantTalkingHeadAttn,
            roles=ATTENTION_ROLES,
            input="qkv",
        ),
        Quantizable(ClassAttn, quantize_class_attn, QuantClassAttn, roles=CLASS_ATTN_ROLES, input=None),
        Quantizable(LayerScaleBlock, unit="block", norms=BLOCK_NORMS, cls_token=False),
        Quantizable(LayerScaleBlockClassAttn, norms={"norm2": "mlp"}),
        Quantizable(Cait, heads=("head",)),
    )
