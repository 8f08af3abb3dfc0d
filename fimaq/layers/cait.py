"""Quantized attention of timm CaiT: talking-heads self-attention and class attention.

``TalkingHeadAttn`` (the ``LayerScaleBlock`` s over the patch tokens) mixes the heads of the
``N x N`` logits with a linear over the head dimension before the softmax (``proj_l``) and of the
probabilities after it (``proj_w``). ``ClassAttn`` (the ``LayerScaleBlockClassAttn`` s after the
class token is added) lets only the class token query every token, with separate q, k and v
linears. Both follow timm's order of operations: q is scaled before ``q @ k^T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.layers.attention import _QuantAttentionBase
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

Bits = dict[str, tuple[int | None, int | None]]


class QuantTalkingHeadAttn(_QuantAttentionBase):
    """Quantized ``timm.models.cait.TalkingHeadAttn``.

    Quantized: ``qkv`` and ``proj`` (weights and inputs), ``matmul1`` (``(q * scale) @ k^T``) and
    ``matmul2`` (the head-mixed probabilities ``@ v``). Float: the scaling of q, the softmax and the
    two talking-heads projections ``proj_l`` and ``proj_w`` (plain ``nn.Linear`` kept by reference:
    they mix the heads of the ``N x N`` logits and probabilities, a ``num_heads x num_heads`` map).
    timm has no fused (SDPA) path for it.
    """

    @classmethod
    def from_float(cls, attn: nn.Module, num_tokens: int, bits: Bits) -> QuantTalkingHeadAttn:
        """Build from a timm ``TalkingHeadAttn``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N.
            bits: ``{"qkv": (w, a), "proj": (w, a), "matmul1": (a, b), "matmul2": (a, b)}``.
        """
        new = cls()
        new.num_heads = attn.num_heads
        new.head_dim = attn.qkv.in_features // attn.num_heads
        new.scale = attn.scale
        new.explicit_matmuls = False
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(num_tokens,))
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(num_tokens,))
        new.proj_l, new.proj_w = attn.proj_l, attn.proj_w
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, num_tokens, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, num_tokens, new.head_dim, *bits["matmul2"])
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        use = self._use_matmuls()
        attn = self.matmul1(q, k.transpose(-2, -1)) if use else q @ k.transpose(-2, -1)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v) if use else attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class QuantClassAttn(_QuantAttentionBase):
    """Quantized ``timm.models.cait.ClassAttn``: the class token queries all N tokens.

    Quantized: ``q`` (on the class token alone), ``k``, ``v`` and ``proj`` (weights and inputs),
    ``matmul1`` (``(q * scale) @ k^T``, one query row per head) and ``matmul2`` (probabilities ``@ v``,
    one row). Float: the scaling of q and the softmax (the fused SDPA call when timm's ``fused_attn``
    is set and nothing is quantized).
    """

    @classmethod
    def from_float(cls, attn: nn.Module, num_tokens: int, bits: Bits) -> QuantClassAttn:
        """Build from a timm ``ClassAttn``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N (the class token and the patch tokens).
            bits: ``{"q" | "k" | "v" | "proj": (w, a), "matmul1" | "matmul2": (a, b)}``.
        """
        new = cls()
        new.num_heads = attn.num_heads
        new.head_dim = attn.q.in_features // attn.num_heads
        new.scale = attn.scale
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        new.q = QuantLinear.from_float(attn.q, *bits["q"], token_shape=None)  # input: the class token (B, C)
        new.k = QuantLinear.from_float(attn.k, *bits["k"], token_shape=(num_tokens,))
        new.v = QuantLinear.from_float(attn.v, *bits["v"], token_shape=(num_tokens,))
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(1,))
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, 1, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, 1, new.head_dim, *bits["matmul2"])
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        h, d = self.num_heads, C // self.num_heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, h, d).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, h, d).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, h, d).permute(0, 2, 1, 3)
        if self._use_matmuls():
            attn = self.matmul1(q * self.scale, k.transpose(-2, -1))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x_cls = self.matmul2(attn, v)
        elif self.fused_attn:
            x_cls = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x_cls = attn @ v
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x_cls))
