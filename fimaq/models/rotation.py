"""Hadamard rotation of a ViT/DeiT (docs/algorithm.md, section 1.1): the float function is unchanged,
the activations that are quantized lose their outlier channels.

1. Every writer to the residual stream (patch embedding, class/distillation/register tokens, position
   embedding, ``attn.proj``, ``mlp.fc2``; layer scales folded into the last two) is centred, so the
   stream has zero mean per token and each LayerNorm's mean subtraction does nothing.
2. Every LayerNorm's affine is folded into the linears it feeds (``qkv``, ``fc1``, the heads), and the
   LayerNorms become :class:`RMSLayerNorm` (no centring, affine 1 and 0, which the calibration's
   LayerNorm fold may fill again).
3. The stream is rotated by an orthogonal ``Q`` (random signs times a block-diagonal normalised
   Hadamard matrix, seeded): writers ``W <- Q^T W``, tokens ``t <- t Q``, readers ``W <- W Q``;
   ``RMSLayerNorm(x Q) = RMSLayerNorm(x) Q``.
4. The MLP hidden is rotated online: ``mlp.norm`` (an identity in timm's ``Mlp``) becomes
   :class:`OnlineRotation` by ``Q2`` and ``fc2``'s weight ``W2 <- W2 Q2``; ``fc2``'s input quantizer
   then sees the rotated hidden.

Swin and ViT variants with other norms (a pre-norm, query/key norms, an MLP norm) are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fimaq.errors import FimaqError

ROTATION_SEED = 0


class RMSLayerNorm(nn.LayerNorm):
    """``x / sqrt(mean(x^2) + eps) * weight + bias``: a LayerNorm without the mean subtraction, equal to
    the LayerNorm on the zero-mean residual stream of a rotated model (float32 arithmetic)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float() + self.bias.float()).to(x.dtype)


class OnlineRotation(nn.Module):
    """``x @ matrix`` over the last dimension (a fixed orthogonal matrix, kept in the state dict).

    A block-diagonal matrix (:func:`block_hadamard` of a size that is not a power of two, e.g. 768 =
    3 x 256) is applied block by block: ``n / block`` products of ``block`` columns instead of one of
    ``n`` (a third of the arithmetic at 768), the same values up to float rounding.
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.float().contiguous())
        n = matrix.shape[0]
        k = n & -n  # the largest power of two dividing n: block_hadamard's block size
        m = n // k
        mask = torch.block_diag(*([torch.ones(k, k, dtype=torch.bool)] * m))
        self.block = k if m > 1 and not matrix[~mask].any() else n

    def _blocks(self, dtype: torch.dtype) -> torch.Tensor:
        """The diagonal blocks, ``(n / block, block, block)``."""
        n, k = self.matrix.shape[0], self.block
        m = n // k
        return self.matrix.reshape(m, k, m, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.matrix.shape[0], self.block
        if k == n:
            return F.linear(x, self.matrix.T.to(x.dtype))
        parts = x.reshape(-1, n // k, k).transpose(0, 1)  # (blocks, rows, block)
        return torch.bmm(parts, self._blocks(x.dtype)).transpose(0, 1).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"size={self.matrix.shape[0]}"


def block_hadamard(n: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """An orthogonal ``n x n`` float64 matrix: random signs (seeded) times the block-diagonal of
    normalised Sylvester-Hadamard blocks of the largest power of two dividing ``n``."""
    k = n & -n  # largest power of two dividing n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < k:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    blocks = torch.block_diag(*([h / k**0.5] * (n // k)))
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
    return signs[:, None] * blocks


def _refuse(net: nn.Module, why: str) -> None:
    raise FimaqError(f"quant.rotation hadamard: {why} ({type(net).__name__}); use quant.rotation none")


def _check(net: nn.Module) -> VisionTransformer:
    if not isinstance(net, VisionTransformer):
        _refuse(net, "supports ViT/DeiT (timm VisionTransformer) only")
    if not isinstance(net.norm_pre, nn.Identity):
        _refuse(net, "a norm before the blocks is not supported")
    if getattr(net, "attn_pool", None) is not None:
        _refuse(net, "attention pooling is not supported")
    norms = [m for m in (net.norm, net.fc_norm) if not isinstance(m, nn.Identity)]
    if len(norms) != 1 or not isinstance(norms[0], nn.LayerNorm):
        _refuse(net, "needs exactly one final LayerNorm")
    for block in net.blocks:
        parts = (block.attn.q_norm, block.attn.k_norm, block.mlp.norm, getattr(block.attn, "norm", None))
        if any(p is not None and not isinstance(p, nn.Identity) for p in parts):
            _refuse(net, "query/key or MLP norms are not supported")
        if not isinstance(block.norm1, nn.LayerNorm) or not isinstance(block.norm2, nn.LayerNorm):
            _refuse(net, "blocks need LayerNorms")
    return net


def _center_rows(w: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over dim 0 (the output channels of a writer)."""
    return w - w.mean(0, keepdim=True)


def _fold_norm(norm: nn.LayerNorm, readers: list[nn.Linear]) -> None:
    """``(n * g + b) W^T + c = n (W diag(g))^T + (c + W b)``: the affine into every reader."""
    g, b = norm.weight.double(), norm.bias.double()
    for lin in readers:
        w = lin.weight.double()
        bias = lin.bias.double() if lin.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if lin.bias is None:
            lin.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=lin.weight.dtype, device=w.device))
        lin.bias.copy_(bias + w @ b)
        lin.weight.copy_(w * g)


def _rms_norm(norm: nn.LayerNorm) -> RMSLayerNorm:
    return RMSLayerNorm(norm.normalized_shape, eps=norm.eps).to(norm.weight)


def _write(lin: nn.Module, q: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """A residual writer: fold a layer scale, centre, rotate the output side (``Q^T W``)."""
    shape = lin.weight.shape
    w = lin.weight.double().reshape(shape[0], -1)
    b = lin.bias.double() if lin.bias is not None else torch.zeros(shape[0], dtype=torch.float64)
    if scale is not None:
        w, b = w * scale[:, None], b * scale
    w, b = q.T @ _center_rows(w), q.T @ (b - b.mean())
    lin.weight.copy_(w.reshape(shape))
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(shape[0], dtype=lin.weight.dtype, device=lin.weight.device))
    lin.bias.copy_(b)


def _layer_scale(ls: nn.Module, net: nn.Module) -> torch.Tensor | None:
    if isinstance(ls, nn.Identity):
        return None
    if isinstance(ls, LayerScale):
        gamma = ls.gamma.detach().double().clone()
        ls.gamma.data.fill_(1.0)  # folded into the writer
        return gamma
    _refuse(net, f"layer scale {type(ls).__name__} is not supported")
    return None


@torch.no_grad()
def rotate_model(net: nn.Module, seed: int = ROTATION_SEED) -> nn.Module:
    """Rotate a float ViT/DeiT in place (see the module docstring); returns it. The logits are
    unchanged up to float rounding."""
    vit = _check(net)
    dim = vit.cls_token.shape[-1] if vit.cls_token is not None else vit.pos_embed.shape[-1]
    q = block_hadamard(dim, seed).to(vit.patch_embed.proj.weight.device)
    # 1. writers: centred and rotated on the output side; tokens likewise (t <- (t - mean) Q)
    _write(vit.patch_embed.proj, q)
    for name in ("cls_token", "reg_token", "dist_token", "pos_embed"):
        t = getattr(vit, name, None)
        if isinstance(t, torch.Tensor):
            t.copy_((t.double() - t.double().mean(-1, keepdim=True)) @ q)
    heads = [h for h in (vit.head, getattr(vit, "head_dist", None)) if isinstance(h, nn.Linear)]
    for block in vit.blocks:
        _write(block.attn.proj, q, _layer_scale(block.ls1, net))
        _write(block.mlp.fc2, q, _layer_scale(block.ls2, net))
        # 2. LayerNorm affine into the readers, 3. readers rotated on the input side
        for norm_name, reader in (("norm1", block.attn.qkv), ("norm2", block.mlp.fc1)):
            norm = getattr(block, norm_name)
            _fold_norm(norm, [reader])
            reader.weight.copy_(reader.weight.double() @ q)
            setattr(block, norm_name, _rms_norm(norm))
        # 4. the MLP hidden, rotated online before fc2's input quantizer
        q2 = block_hadamard(block.mlp.fc1.out_features, seed + 1).to(q.device)
        block.mlp.norm = OnlineRotation(q2)
        block.mlp.fc2.weight.copy_(block.mlp.fc2.weight.double() @ q2)
    final = "norm" if not isinstance(vit.norm, nn.Identity) else "fc_norm"
    _fold_norm(getattr(vit, final), heads)
    for h in heads:
        h.weight.copy_(h.weight.double() @ q)
    setattr(vit, final, _rms_norm(getattr(vit, final)))
    return net


__all__ = ["OnlineRotation", "RMSLayerNorm", "block_hadamard", "rotate_model"]
