"""Quantized EVA / EVA-02 self-attention (``timm.models.eva.EvaAttention``).

Quantized: the input projection(s) (the fused ``qkv``, or the separate ``q_proj``, ``k_proj``,
``v_proj``), the output projection ``proj``, and both matrix products ``q @ k^T`` (``matmul1``) and
``attn @ v`` (``matmul2``). In float: the per-head ``q_norm`` / ``k_norm``, the rotary position
embedding (applied to q and k, class/register tokens excepted, before ``matmul1``'s operand
quantizers), the scale, the softmax and the sub-LayerNorm ``norm`` before ``proj``.

timm's fused projection has no bias of its own: it passes ``cat(q_bias, k_bias, v_bias)`` to
``F.linear``; the quantized ``qkv`` carries exactly that concatenation as its bias (zeros when
``qkv_bias`` is off), so a LayerNorm fold can move an offset into it.

The rotary embedding arrives by keyword from ``Eva.forward_features``; the one of the example forward
pass is kept (a non-persistent buffer ``rope``) and used when the argument is ``None``, so that a
reconstruction unit called as ``block(x)`` computes what the model computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.attention import _QuantAttentionBase
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

Bits = dict[str, tuple[int | None, int | None]]


class QuantEvaAttention(_QuantAttentionBase):
    """Quantized ``timm.models.eva.EvaAttention`` (fused or separate q/k/v projections, RoPE)."""

    rope: torch.Tensor | None

    @classmethod
    def from_float(
        cls, attn: nn.Module, num_tokens: int, bits: Bits, rope: torch.Tensor | None = None
    ) -> QuantEvaAttention:
        """Build from a timm ``EvaAttention``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N (prefix tokens included).
            bits: ``{"qkv" | "q_proj" | "k_proj" | "v_proj" | "proj": (w, a), "matmul1" | "matmul2": (a, b)}``
                (the keys of the projections the module has).
            rope: the rotary embedding given on the example forward pass (``None``: the model has none).

        Raises:
            FimaqError: the attention is gated or adds its qkv bias separately.
        """
        if getattr(attn, "gate", None) is not None:
            raise FimaqError("EVA gated attention (gated_attn=True) is not supported")
        if attn.qkv is not None and attn.q_bias is not None and attn.qkv_bias_separate:
            raise FimaqError("EVA attention with qkv_bias_separate=True is not supported")
        new = cls()
        new.num_heads = attn.num_heads
        new.head_dim = attn.head_dim
        new.attn_dim = attn.num_heads * attn.head_dim
        new.scale = attn.scale
        new.num_prefix_tokens = attn.num_prefix_tokens
        new.rotate_half = bool(getattr(attn, "rotate_half", False))
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        tokens = (num_tokens,)
        if attn.qkv is not None:
            new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=tokens)
            if attn.q_bias is not None:
                with torch.no_grad():
                    new.qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        else:
            new.qkv = None
            for part in ("q_proj", "k_proj", "v_proj"):
                setattr(
                    new, part, QuantLinear.from_float(getattr(attn, part), *bits[part], token_shape=tokens)
                )
        new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
        new.attn_drop = attn.attn_drop
        new.norm = attn.norm
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=tokens)
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, num_tokens, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, num_tokens, attn.head_dim, *bits["matmul2"])
        new.register_buffer("rope", rope.clone() if rope is not None else None, persistent=False)
        return new

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        if self.qkv is not None:
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            return q, k, v
        q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        return q, k, v

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """timm's rotation of the non-prefix tokens (cast to ``like``'s dtype, as timm does)."""
        from timm.layers import apply_rot_embed_cat

        npt = self.num_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)
        return torch.cat([t[:, :, :npt, :], rotated], dim=2).type_as(like)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        from timm.layers import maybe_add_mask, resolve_self_attn_mask

        B, N, _ = x.shape
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        rope = self.rope if rope is None else rope
        if rope is not None:
            q, k = self._rotate(q, rope, v), self._rotate(k, rope, v)
        if self._use_matmuls():
            attn = self.matmul1(q, k.transpose(-2, -1)) * self.scale
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
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
            attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))
