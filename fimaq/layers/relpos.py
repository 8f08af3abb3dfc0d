"""Quantized attention of timm ViT-RelPos (``timm.models.vision_transformer_relpos.RelPosAttention``).

Quantized: ``qkv``, ``proj`` and the two matrix products ``q @ k^T`` (``matmul1``) and ``attn @ v``
(``matmul2``). In float: the query/key norms, the per-block relative position module ``rel_pos``
(``RelPosMlp`` or ``RelPosBias``, kept by reference with its parameters), the model's shared relative
position bias (a keyword input kept from the example forward pass), the scaling of q, the softmax and
the dropouts.

With every quantizer off the forward pass is the installed timm code path (fused SDPA with the bias as
the attention mask, or the explicit one). Through the matmul modules it follows timm's explicit order:
``q * scale``, ``matmul1(q, k^T)``, ``rel_pos(attn)`` (or plus the shared bias), the softmax,
``matmul2(attn, v)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.layers.attention import _QuantAttentionBase
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

Bits = dict[str, tuple[int | None, int | None]]


class QuantRelPosAttention(_QuantAttentionBase):
    """Quantized ``RelPosAttention`` (per-block or shared relative position, pre- or post-norm blocks)."""

    rel_pos: nn.Module | None
    shared_rel_pos: torch.Tensor | None

    @classmethod
    def from_float(
        cls,
        attn: nn.Module,
        num_tokens: int,
        bits: Bits,
        shared_rel_pos: torch.Tensor | None = None,
    ) -> QuantRelPosAttention:
        """Build from a timm ``RelPosAttention``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N (class token included when the model has one).
            bits: ``{"qkv": (w, a), "proj": (w, a), "matmul1": (a, b), "matmul2": (a, b)}``.
            shared_rel_pos: the model's shared relative position bias as the example forward pass gave
                it, used when the forward pass is given none (a block called alone).
        """
        new = cls()
        new.num_heads = attn.num_heads
        new.head_dim = attn.head_dim
        new.scale = attn.scale
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(num_tokens,))
        new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
        new.rel_pos = attn.rel_pos
        if shared_rel_pos is not None:
            new.register_buffer("shared_rel_pos", shared_rel_pos.clone(), persistent=False)
        else:
            new.shared_rel_pos = None
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(num_tokens,))
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, num_tokens, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, num_tokens, attn.head_dim, *bits["matmul2"])
        return new

    def forward(self, x: torch.Tensor, shared_rel_pos: torch.Tensor | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if shared_rel_pos is None:
            shared_rel_pos = self.shared_rel_pos
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        use_matmuls = self._use_matmuls()
        if self.fused_attn and not use_matmuls:
            if self.rel_pos is not None:
                attn_bias = self.rel_pos.get_bias()
            else:
                attn_bias = shared_rel_pos
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = self.matmul1(q, k.transpose(-2, -1)) if use_matmuls else q @ k.transpose(-2, -1)
            if self.rel_pos is not None:
                attn = self.rel_pos(attn, shared_rel_pos=shared_rel_pos)
            elif shared_rel_pos is not None:
                attn = attn + shared_rel_pos
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self.matmul2(attn, v) if use_matmuls else attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
