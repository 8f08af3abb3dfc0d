"""Quantized window attention of timm Swin Transformer V2 (cosine attention, continuous position bias).

timm's v2 ``WindowAttention`` (:mod:`timm.models.swin_transformer_v2`) differs from v1's: the logits
are the cosine similarities of the L2-normalised q and k, times ``exp(clamp(logit_scale))``; the
relative position bias comes out of a small MLP (``cpb_mlp``) on a log-spaced coordinate table,
squashed by ``16 * sigmoid``; q and v carry their own biases (``q_bias``, ``v_bias``; k's is zero).
timm has no fused (SDPA) path for it, so the float forward is always the explicit one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.attention import _QuantAttentionBase
from fimaq.layers.linear import QuantLinear
from fimaq.layers.matmul import QuantMatMul

#: timm's upper clamp of the logit scale (``log(1 / 0.01)``)
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


class QuantWindowAttentionV2(_QuantAttentionBase):
    """Quantized ``timm.models.swin_transformer_v2.WindowAttention``.

    Quantized: ``qkv`` and ``proj`` (weights and inputs), ``matmul1`` on the normalised q and k (per
    head) and ``matmul2`` on the attention probabilities and v. Float: the L2 normalisation of q and
    k, the logit scale (``logit_scale``, kept by reference), the continuous position bias (``cpb_mlp``
    kept by reference, its two linears are not quantized, and the ``16 * sigmoid``), the shift mask
    (the block's buffer, passed in as ``mask``) and the softmax. timm's ``q_bias``/``k_bias``/
    ``v_bias`` become the bias of the quantized ``qkv`` (``cat(q_bias, 0, v_bias)``, as timm adds them).
    """

    @classmethod
    def from_float(
        cls, attn: nn.Module, bits: dict[str, tuple[int | None, int | None]]
    ) -> QuantWindowAttentionV2:
        """Build from a timm v2 ``WindowAttention`` (tokens = window area).

        Args:
            attn: the float attention module.
            bits: ``{"qkv": (w, a), "proj": (w, a), "matmul1": (a, b), "matmul2": (a, b)}``.

        Raises:
            FimaqError: the attention adds its qkv bias separately (``qkv_bias_separate=True``).
        """
        if getattr(attn, "qkv_bias_separate", False):
            raise FimaqError("SwinV2 WindowAttention with qkv_bias_separate=True is not supported")
        new = cls()
        win_h, win_w = attn.window_size
        n = win_h * win_w
        new.num_heads = attn.num_heads
        new.head_dim = attn.dim // attn.num_heads
        new.window_size = (win_h, win_w)
        new.window_area = n
        new.explicit_matmuls = False
        new.logit_scale = attn.logit_scale
        new.cpb_mlp = attn.cpb_mlp
        new.register_buffer("relative_coords_table", attn.relative_coords_table.clone(), persistent=False)
        new.register_buffer("relative_position_index", attn.relative_position_index.clone(), persistent=False)
        new.qkv = QuantLinear.from_float(attn.qkv, *bits["qkv"], token_shape=(n,))
        if attn.q_bias is not None:
            with torch.no_grad():
                new.qkv.bias.copy_(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        new.attn_drop = attn.attn_drop
        new.proj = QuantLinear.from_float(attn.proj, *bits["proj"], token_shape=(n,))
        new.proj_drop = attn.proj_drop
        new.softmax = nn.Softmax(dim=-1)
        new.matmul1 = QuantMatMul(attn.num_heads, n, n, *bits["matmul1"])
        new.matmul2 = QuantMatMul(attn.num_heads, n, new.head_dim, *bits["matmul2"])
        return new

    def _position_bias(self) -> torch.Tensor:
        """``16 * sigmoid`` of the continuous position bias, ``(num_heads, N, N)``."""
        n = self.window_area
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        return 16 * torch.sigmoid(bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        use = self._use_matmuls()
        attn = self.matmul1(q, k.transpose(-2, -1)) if use else q @ k.transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()
        attn = attn + self._position_bias().unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        x = self.matmul2(attn, v) if use else attn @ v
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))
