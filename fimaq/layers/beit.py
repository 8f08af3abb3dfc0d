"""Quantized attention of timm BEiT (``timm.models.beit.Attention``).

Quantized: ``qkv`` (a :class:`QuantLinear` whose bias is ``cat(q_bias, k_bias, v_bias)``, the bias
timm gives ``F.linear``; ``k_bias`` is timm's zero buffer), ``proj``, and the two matrix products
``q @ k^T`` (``matmul1``) and ``attn @ v`` (``matmul2``). In float: the per-block relative position
bias (its table kept by reference, the index copied), the model's shared relative position bias (a
keyword input kept from the example forward pass), the scaling of q, the softmax and the dropouts.

With every quantizer off the forward pass is the installed timm code path (fused SDPA with the biases
as the attention mask, or the explicit one). Through the matmul modules it follows timm's explicit
order: ``q * scale``, ``matmul1(q, k^T)``, plus the relative position bias, plus the shared bias, the
softmax, ``matmul2(attn, v)``.
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


class QuantBeitAttention(_QuantAttentionBase):
    """Quantized ``timm.models.beit.Attention`` (BEiT v1/v2, with or without relative position bias)."""

    relative_position_bias_table: nn.Parameter | None
    relative_position_index: torch.Tensor | None
    shared_rel_pos_bias: torch.Tensor | None

    @classmethod
    def from_float(
        cls,
        attn: nn.Module,
        num_tokens: int,
        bits: Bits,
        shared_rel_pos_bias: torch.Tensor | None = None,
    ) -> QuantBeitAttention:
        """Build from a timm BEiT ``Attention``.

        Args:
            attn: the float attention module.
            num_tokens: sequence length N (class token included).
            bits: ``{"qkv": (w, a), "proj": (w, a), "matmul1": (a, b), "matmul2": (a, b)}``.
            shared_rel_pos_bias: the model's shared relative position bias as the example forward pass
                gave it, used when the forward pass is given none (a block called alone).

        Raises:
            FimaqError: the attention adds its qkv bias separately (``qkv_bias_separate=True``).
        """
        if getattr(attn, "qkv_bias_separate", False):
            raise FimaqError("BEiT attention with qkv_bias_separate=True is not supported")
        new = cls()
        head_dim = attn.qkv.out_features // 3 // attn.num_heads
        new.num_heads = attn.num_heads
        new.scale = attn.scale
        new.fused_attn = bool(attn.fused_attn)
        new.explicit_matmuls = False
        new.window_size = attn.window_size
        new.relative_position_bias_table = attn.relative_position_bias_table
        if attn.relative_position_index is not None:
            index = attn.relative_position_index.clone()
            new.register_buffer("relative_position_index", index, persistent=False)
        else:
            new.relative_position_index = None
        if shared_rel_pos_bias is not None:
            new.register_buffer("shared_rel_pos_bias", shared_rel_pos_bias.clone(), persistent=False)
        else:
            new.shared_rel_pos_bias = None
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(num_tokens,))
        if attn.q_bias is not None:
            with torch.no_grad():
                new.qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(num_tokens,))
        new.proj_drop = attn.proj_drop
        new.matmul1 = QuantMatMul(attn.num_heads, num_tokens, num_tokens, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, num_tokens, head_dim, *bits["matmul2"])
        return new

    def _get_rel_pos_bias(self) -> torch.Tensor:
        area = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        if shared_rel_pos_bias is None:
            shared_rel_pos_bias = self.shared_rel_pos_bias
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        use_matmuls = self._use_matmuls()
        if self.fused_attn and not use_matmuls:
            rel_pos_bias = None
            if self.relative_position_bias_table is not None:
                rel_pos_bias = self._get_rel_pos_bias()
                if shared_rel_pos_bias is not None:
                    rel_pos_bias = rel_pos_bias + shared_rel_pos_bias
            elif shared_rel_pos_bias is not None:
                rel_pos_bias = shared_rel_pos_bias
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=rel_pos_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            q = q * self.scale
            attn = self.matmul1(q, k.transpose(-2, -1)) if use_matmuls else q @ k.transpose(-2, -1)
            if self.relative_position_bias_table is not None:
                attn = attn + self._get_rel_pos_bias()
            if shared_rel_pos_bias is not None:
                attn = attn + shared_rel_pos_bias
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = self.matmul2(attn, v) if use_matmuls else attn @ v
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))
