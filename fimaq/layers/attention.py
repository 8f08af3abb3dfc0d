"""Quantized self-attention for timm ViT/DeiT (``Attention``) and Swin (``WindowAttention``).

Each owns its two matrix products as :class:`QuantMatMul` modules. When every quantizer of the
attention is off, the forward pass is the installed timm code path (fused SDPA or the explicit one,
as the float module was configured), so the output is identical to timm's. When the matmuls are
quantized (or ``explicit_matmuls`` is set, which calibration does to capture their operands):
ViT computes ``(q @ k^T) * scale`` with unscaled q and k; Swin scales q first and adds the relative
position bias and the shift mask in FP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul


class _QuantAttentionBase(nn.Module):
    explicit_matmuls: bool

    def _use_matmuls(self) -> bool:
        return self.explicit_matmuls or self.matmul1.active or self.matmul2.active


class QuantAttention(_QuantAttentionBase):
    """Quantized ``timm.layers.Attention`` (ViT, DeiT)."""

    @classmethod
    def from_float(
        cls,
        attn: nn.Module,
        num_tokens: int,
        bits: dict[str, tuple[int | None, int | None]],
    ) -> QuantAttention:
        """Build from a timm ``Attention``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N (class/distillation tokens included).
            bits: ``{"qkv": (w, a), "proj": (w, a), "matmul1": (a, b), "matmul2": (a, b)}``.
        """
        if getattr(attn, "gate", None) is not None:
            raise FimaqError("gated attention is not supported")
        new = cls()
        new.num_heads = attn.num_heads
        new.head_dim = attn.head_dim
        new.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        new.scale = attn.scale
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(num_tokens,))
        new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
        new.attn_drop = attn.attn_drop
        new.norm = getattr(attn, "norm", nn.Identity())
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(num_tokens,))
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, num_tokens, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, num_tokens, attn.head_dim, *bits["matmul2"])
        return new

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._use_matmuls():
            attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self.matmul2(attn, v)
        elif self.fused_attn:
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.attn_drop.p if self.training else 0.0,
                is_causal=is_causal,
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


class QuantWindowAttention(_QuantAttentionBase):
    """Quantized ``timm.models.swin_transformer.WindowAttention``."""

    @classmethod
    def from_float(
        cls, attn: nn.Module, bits: dict[str, tuple[int | None, int | None]]
    ) -> QuantWindowAttention:
        """Build from a timm Swin ``WindowAttention`` (tokens = window area)."""
        new = cls()
        n = attn.window_area
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        new.num_heads = attn.num_heads
        new.window_area = n
        new.scale = attn.scale
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        new.relative_position_bias_table = attn.relative_position_bias_table
        new.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(n,))
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(n,))
        new.proj_drop = attn.proj_drop
        new.softmax = nn.Softmax(dim=-1)
        new.matmul1 = QuantMatMul(attn.num_heads, n, n, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, n, head_dim, *bits["matmul2"])
        return new

    def _get_rel_pos_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn and not self._use_matmuls():
            attn_mask = self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, self.num_heads, -1, -1)
                attn_mask = attn_mask + mask.reshape(-1, self.num_heads, N, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = self.matmul1(q, k.transpose(-2, -1)) if self._use_matmuls() else q @ k.transpose(-2, -1)
            attn = attn + self._get_rel_pos_bias()
            if mask is not None:
                num_win = mask.shape[0]
                attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, self.num_heads, N, N)
            attn = self.attn_drop(self.softmax(attn))
            x = self.matmul2(attn, v) if self._use_matmuls() else attn @ v
        x = x.transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(x))
