"""The timm EVA / EVA-02 family (``timm.models.eva``): rotary attention with fused or separate q/k/v
projections, the GLU MLPs (packed ``GluMlp``, split ``SwiGLU``), pre-norm and post-norm blocks."""

from __future__ import annotations

from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.eva import QuantEvaAttention
from fimaq.models.registry import Quantizable, Role, SwapContext

EVA_ATTENTION_ROLES: dict[str, Role] = {
    "qkv": "qkv",
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "proj": "proj",
    "matmul1": "matmul1",
    "matmul2": "matmul2",
}
_PARTS = tuple(EVA_ATTENTION_ROLES)


def quantize_eva_attention(attn: nn.Module, ctx: SwapContext) -> QuantEvaAttention:
    """timm ``EvaAttention`` -> :class:`QuantEvaAttention` (tokens and ``rope`` from the example pass)."""
    if not ctx.token_shape:
        raise FimaqError(f"attention {ctx.name} did not run on the example input: its token count is unknown")
    bits = {part: ctx.child(part).bits() for part in _PARTS}
    return QuantEvaAttention.from_float(attn, ctx.token_shape[0], bits, ctx.example_kwargs.get("rope"))


def entries() -> tuple[Quantizable, ...]:
    """The family's registry entries.

    The attention's sub-LayerNorm (``scale_attn_inner``) folds into ``proj`` and a GLU MLP's
    LayerNorm (``scale_mlp``) into ``fc2`` (an ``nn.Identity`` there folds nothing). ``SwiGLU`` feeds
    its input to two linears (``fc1_g``, ``fc1_x``) and separate projections read the attention's
    input three times: the block's LayerNorm folds into all of them. The post-norm block lists no
    norms: its LayerNorms follow the attention and the MLP.
    """
    from timm.layers import GluMlp, SwiGLU
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

    return (
        Quantizable(
            EvaAttention,
            quantize_eva_attention,
            QuantEvaAttention,
            roles=EVA_ATTENTION_ROLES,
            input=("qkv", "q_proj", "k_proj", "v_proj"),  # fused, or the separate projections
            norms={"norm": "proj"},
        ),
        Quantizable(GluMlp, roles={"fc1": "fc1", "fc2": "fc2"}, input="fc1", norms={"norm": "fc2"}),
        Quantizable(
            SwiGLU,
            roles={"fc1_g": "fc1", "fc1_x": "fc1", "fc2": "fc2"},
            input=("fc1_g", "fc1_x"),
            norms={"norm": "fc2"},
        ),
        Quantizable(EvaBlock, unit="block", norms={"norm1": "attn", "norm2": "mlp"}, cls_token=True),
        Quantizable(EvaBlockPostNorm, unit="block", cls_token=True),
        Quantizable(Eva, heads=("head",)),
    )
