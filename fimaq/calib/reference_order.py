"""Candidate errors computed in the reference implementation's float32 arithmetic and order.

fimaq ranks candidates exactly (float64 sums, algebraic shortcuts). Where two candidates come within
float32 noise of each other, the reference's choice is decided by how it happened to sum; these
functions recompute just those few candidates the way the reference does (batches of images, a mean
per image, sums per batch, then over batches) so that such ties fall the same way. Each returns an
``(n candidates, n groups)`` float32 tensor, smaller is better.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fimaq.quant.search import fake_quant_nograd


def linear_weight_error(
    w: torch.Tensor,
    bias: torch.Tensor,
    x_hat: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    cands: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Per-row weight candidates; ``x_hat`` (n, tokens, in), ``y`` (n, tokens, out), grids (P, out, 1)."""
    sc, zp = scales[cands][:, rows], zps[cands][:, rows]  # (p, g, 1)
    p, g = sc.shape[0], rows.numel()
    w_sim = fake_quant_nograd(w[rows].unsqueeze(0), sc, zp, bits).view(p * g, -1)
    b_sim = bias[rows].repeat(p)
    total = None
    for b0 in range(0, x_hat.shape[0], batch_size):
        out = F.linear(x_hat[b0 : b0 + batch_size], w_sim, b_sim)
        out = out.view(*out.shape[:-1], p, g)
        err = (y[b0 : b0 + batch_size, ..., rows].unsqueeze(-2) - out).pow_(2)
        part = err.mean(dim=tuple(range(1, err.ndim - 2))).sum(dim=0)
        total = part if total is None else total + part
    return total


def linear_act_error(
    x: torch.Tensor,
    w_hat: torch.Tensor,
    bias: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    cands: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Per-tensor input candidates; ``x`` (n, tokens, in), ``y`` (n, tokens, out), grids (P,)."""
    sc, zp = scales[cands], zps[cands]
    total = None
    for b0 in range(0, x.shape[0], batch_size):
        xb = x[b0 : b0 + batch_size].unsqueeze(-2)
        x_sim = fake_quant_nograd(xb, sc.view(-1, 1), zp.view(-1, 1), bits)  # (b, tokens, p, in), contiguous
        out = F.linear(x_sim, w_hat, bias)
        err = (y[b0 : b0 + batch_size].unsqueeze(-2) - out).pow_(2).mean(dim=-1)
        part = err.mean(dim=tuple(range(1, err.ndim - 1))).sum(dim=0)
        total = part if total is None else total + part
    return total.unsqueeze(-1)


def matmul_error_from_images(
    image_errors: torch.Tensor,
    cands: torch.Tensor,
    heads: torch.Tensor,
    batch_size: int,
    cand_chunk: int = 16,
) -> torch.Tensor:
    """Per-head candidates of one matmul operand, from the reference's own per-image mean errors
    (:func:`fimaq.quant.matmul_sweep.matmul_image_errors`, (P, n, H)): summed per batch of images, then over
    batches, in float32, as the reference does. Returns (len(cands), len(heads))."""
    per_head = image_errors[:, :, heads]
    results = []
    for c0 in range(0, cands.numel(), cand_chunk):
        errs = per_head[cands[c0 : c0 + cand_chunk]]
        total = None
        for b0 in range(0, errs.shape[1], batch_size):
            part = errs[:, b0 : b0 + batch_size].contiguous().sum(dim=1)
            total = part if total is None else total + part
        results.append(total)
    return torch.cat(results, 0)


def conv_weight_error(
    weight: torch.Tensor,
    bias: torch.Tensor,
    conv_args: tuple,
    x: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    cands: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Per-output-channel candidates of a convolution; grids (P, out, 1)."""
    w = weight[rows]
    sc, zp = scales[cands][:, rows], zps[cands][:, rows]
    p = sc.shape[0]
    w_hat = fake_quant_nograd(w.reshape(w.shape[0], -1).unsqueeze(0), sc, zp, bits).reshape(-1, *w.shape[1:])
    b_sim = bias[rows].repeat(p)
    total = None
    for b0 in range(0, x.shape[0], batch_size):
        out = F.conv2d(x[b0 : b0 + batch_size], w_hat, b_sim, *conv_args)
        out = out.view(out.shape[0], p, w.shape[0], *out.shape[2:])
        part = (y[b0 : b0 + batch_size, rows].unsqueeze(1) - out).pow_(2).mean(dim=(3, 4)).sum(dim=0)
        total = part if total is None else total + part
    return total


def weight_self_error(
    w: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    cands: torch.Tensor,
    rows: torch.Tensor,
) -> torch.Tensor:
    """Per-row weight candidates by the weight's own mean squared error; grids (P, out, 1)."""
    sc, zp = scales[cands][:, rows], zps[cands][:, rows]
    raw = w[rows].unsqueeze(0)
    return (raw - fake_quant_nograd(raw, sc, zp, bits)).pow_(2).mean(dim=-1)


def act_self_error(
    x: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    cands: torch.Tensor,
    channels: torch.Tensor | None,
    batch_size: int,
) -> torch.Tensor:
    """Input candidates by the input's own squared error: per tensor (grids (P,), returns (n, 1)) or
    per channel (grids (C, P), returns (n, len(channels))); ``x`` is (n, tokens, C)."""
    if channels is None:
        sc, zp = scales[cands], zps[cands]
        xs = x
    else:
        sc, zp = scales[channels][:, cands], zps[channels][:, cands]
        xs = x[..., channels]
    total = None
    for b0 in range(0, xs.shape[0], batch_size):
        raw = xs[b0 : b0 + batch_size].unsqueeze(-1)
        err = (raw - fake_quant_nograd(raw, sc, zp, bits)).pow_(2)
        err = err.mean(dim=tuple(range(1, err.ndim - 2)))  # (b, C, p)
        if channels is None:
            err = err.mean(dim=1, keepdim=True)
        part = err.sum(dim=0)
        total = part if total is None else total + part
    return total.T  # (p, 1) or (p, channels)
