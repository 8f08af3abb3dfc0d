"""Per-layer calibration searches (ALGORITHM sections 2.1-2.4), on captured FP tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.config import CalibConfig
from fimaq.layers import QuantConv2d, QuantLinear, QuantMatMul
from fimaq.quant import grids, search
from fimaq.quant.fake_quant import fake_quant


def _pick(grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """grid (P, rows, 1), idx (rows,) -> (rows, 1)."""
    return grid.gather(0, idx.view(1, -1, 1)).squeeze(0)


def search_linear(
    w: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    w_bits: int | None,
    a_bits: int | None,
    cfg: CalibConfig,
    rows_per_chunk: int,
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, tuple[torch.Tensor, torch.Tensor] | None]:
    """Section 2.1: per-row weight and per-tensor input qparams of ``y = x W^T + b``.

    Returns ((w_scale (rows,1), w_zp), (a_scale (), a_zp ())), None where that side stays FP.
    """
    chunk = cfg.candidate_chunk
    wq = aq = None
    if w_bits is not None:
        ws, wz = grids.weight_grid(w, w_bits, cfg.eq_n)
        wi = search.weight_self_search(w, ws, wz, w_bits)
        wq = (_pick(ws, wi), _pick(wz, wi))
    if a_bits is not None:
        a_s, a_z = grids.activation_grid(x, a_bits, cfg.eq_n)
        ai = int(search.act_self_search(x, a_s, a_z, a_bits)[0])
        aq = (a_s[ai], a_z[ai])
    for _ in range(cfg.search_rounds):
        if w_bits is not None:
            x_hat = fake_quant(x, aq[0], aq[1], a_bits) if aq is not None else x
            wi = search.weight_output_search(w, bias, x_hat, y, ws, wz, w_bits, chunk)
            wq = (_pick(ws, wi), _pick(wz, wi))
        if a_bits is not None:
            w_hat = fake_quant(w, wq[0], wq[1], w_bits) if wq is not None else w
            ai = search.act_output_search(x, w_hat, bias, y, a_s, a_z, a_bits, chunk, rows_per_chunk)
            aq = (a_s[ai], a_z[ai])
        if w_bits is None or a_bits is None:
            break  # nothing left to alternate with
    return wq, aq


def fold_layernorm(
    norm: nn.LayerNorm, layer: QuantLinear, x: torch.Tensor, bits: int, cfg: CalibConfig
) -> torch.Tensor:
    """Section 2.2: per-input-channel qparams by input MSE, folded into the LayerNorm and the linear.

    The float function is unchanged; returns the captured input transformed like the LayerNorm output.
    """
    scales, zps = grids.activation_grid(x, bits, cfg.eq_n, channel_wise=True)
    idx = search.act_self_search(x, scales, zps, bits, channel_wise=True)
    s_c = scales.gather(1, idx.view(-1, 1)).squeeze(1)
    zp_c = zps.gather(1, idx.view(-1, 1)).squeeze(1)
    s_t = s_c.mean().view(1)
    zp_t = zp_c.mean().round().view(1)
    r = s_c / s_t
    beta = (-zp_c * s_c) / r - (-zp_t * s_t)
    with torch.no_grad():
        norm.weight.div_(r)
        norm.bias.copy_(norm.bias / r - beta)
        layer.weight.mul_(r.view(1, -1))
        layer.bias.add_(torch.mm(layer.weight, beta.view(-1, 1)).view(-1))
    return x / r - beta


def calibrate_linear(
    layer: QuantLinear,
    norm: nn.LayerNorm | None,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: CalibConfig,
    tokens_per_image: int,
) -> None:
    """Calibrate one QuantLinear from its captured FP input ``x`` (M, in) and output ``y`` (M, out)."""
    w_bits, a_bits = layer.w_quantizer.bits, layer.a_quantizer.bits
    if norm is not None and a_bits is not None and cfg.fold_layernorm:
        x = fold_layernorm(norm, layer, x, a_bits, cfg)
    rows = max(1, cfg.images_per_chunk) * tokens_per_image
    wq, aq = search_linear(layer.weight.detach(), layer.bias.detach(), x, y, w_bits, a_bits, cfg, rows)
    if wq is not None:
        layer.w_quantizer.set_qparams(*wq)
    if aq is not None:
        layer.a_quantizer.set_qparams(*aq)


def _conv_output_error(
    layer: QuantConv2d,
    x: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    rows: torch.Tensor,
    batch_size: int,
    chunk: int,
) -> torch.Tensor:
    """Output squared error of candidates for the output channels ``rows``, ``(P, len(rows))``,
    accumulated in float32 in the reference's order (per image mean over positions, summed per batch,
    then over batches), so that near-ties resolve as they do there."""
    w = layer.weight.detach()[rows]
    w2d = w.reshape(w.shape[0], -1)
    scales, zps, bias = scales[:, rows], zps[:, rows], layer.bias.detach()[rows]
    totals = []
    for b0 in range(0, x.shape[0], batch_size):
        xb, yb = x[b0 : b0 + batch_size], y[b0 : b0 + batch_size, rows].unsqueeze(1)
        per_batch = []
        for c0 in range(0, scales.shape[0], chunk):
            sc, zp = scales[c0 : c0 + chunk], zps[c0 : c0 + chunk]
            w_hat = search.fake_quant_nograd(w2d.unsqueeze(0), sc, zp, bits).reshape(-1, *w.shape[1:])
            out = F.conv2d(xb, w_hat, bias.repeat(sc.shape[0]), layer.stride, layer.padding, layer.dilation)
            out = out.view(out.shape[0], sc.shape[0], w.shape[0], *out.shape[2:])
            per_batch.append((yb - out).pow_(2).mean(dim=(3, 4)).sum(dim=0, keepdim=True))
        totals.append(torch.cat(per_batch, dim=1))
    return torch.cat(totals, dim=0).sum(dim=0)


def calibrate_conv(layer: QuantConv2d, x: torch.Tensor, y: torch.Tensor, cfg: CalibConfig) -> None:
    """Section 2.4: per-output-channel bounds by output MSE, then coordinate descent on each bound.

    The convolution is a linear map on unfolded patches, so candidates are scored with the row-wise
    Gram search of the linear layers; near-ties are settled in the reference's float32 order.
    """
    bits = layer.w_quantizer.bits
    if bits is None:
        return
    w2d = layer.weight.detach().reshape(layer.out_channels, -1)
    upper, lower = grids.conv_weight_bounds(w2d, cfg.eq_n)
    upper, lower = upper[: cfg.eq_n], lower[: cfg.eq_n]  # the reference never evaluates the last (1.0) bound

    patches = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    patches = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    out = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    bias = layer.bias.detach()

    def best(up: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        s, z = grids.bounds_to_qparams(up, lo, bits)
        sse = search.weight_output_sse(w2d, bias, patches, out, s, z, bits, cfg.candidate_chunk)
        return search.resolve_near_ties(
            sse, lambda c, g: _conv_output_error(layer, x, y, s[c], z[c], bits, g, cfg.batch_size, cfg.candidate_chunk)
        )

    idx = best(upper, lower)
    iu = il = idx
    # with an FP input there is no activation step to alternate with: the reference stops after one round
    rounds = cfg.search_rounds if layer.a_quantizer.bits is not None else min(1, cfg.search_rounds)
    for _ in range(rounds):
        il = best(_pick(upper, iu).unsqueeze(0), lower)
        iu = best(upper, _pick(lower, il).unsqueeze(0))
    scale, zp = grids.bounds_to_qparams(_pick(upper, iu), _pick(lower, il), bits)
    layer.w_quantizer.set_qparams(scale, zp)


def calibrate_matmul(
    layer: QuantMatMul, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: CalibConfig
) -> None:
    """Section 2.3: per-head operand bounds, joint sweeps for A then B, then coordinate descent."""
    ab, bb = layer.A_quantizer.bits, layer.B_quantizer.bits
    if ab is None and bb is None:
        return
    chunk, ipc = cfg.candidate_chunk, max(1, cfg.images_per_chunk)
    bounds = {}
    for op, x in (("A", a), ("B", b)):
        up, lo = grids.matmul_operand_bounds(x, cfg.eq_n)
        bounds[op] = (up[: cfg.eq_n], lo[: cfg.eq_n])  # candidate eq_n is never evaluated
    bits = {"A": ab, "B": bb}
    heads = a.shape[1]
    start = torch.full((heads,), cfg.eq_n - 1, dtype=torch.long)
    sel = {"A": [start.clone(), start.clone()], "B": [start.clone(), start.clone()]}  # (upper idx, lower idx)

    def qparams(op: str) -> tuple[torch.Tensor, torch.Tensor]:
        up, lo = bounds[op]
        iu, il = sel[op]
        u = up.gather(0, iu.view(1, -1))[0]
        lw = lo.gather(0, il.view(1, -1))[0]
        return grids.bounds_to_qparams(u, lw, bits[op])

    def quantized(op: str, t: torch.Tensor) -> torch.Tensor:
        if bits[op] is None:
            return t
        s, z = qparams(op)
        return fake_quant(t, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), bits[op])

    def sweep(op: str, mode: str) -> None:
        if bits[op] is None:
            return
        up, lo = bounds[op]
        iu, il = sel[op]
        if mode == "upper":
            lo = lo.gather(0, il.view(1, -1)).expand_as(up)
        elif mode == "lower":
            up = up.gather(0, iu.view(1, -1)).expand_as(lo)
        s, z = grids.bounds_to_qparams(up, lo, bits[op])
        other_a = a if op == "A" else quantized("A", a)
        other_b = quantized("B", b) if op == "A" else b
        idx = search.matmul_operand_search(other_a, other_b, out, s, z, bits[op], op, chunk, ipc)
        if mode in ("joint", "upper"):
            sel[op][0] = idx
        if mode in ("joint", "lower"):
            sel[op][1] = idx

    sweep("A", "joint")
    sweep("B", "joint")
    for _ in range(cfg.search_rounds):
        for op in ("A", "B"):
            sweep(op, "lower")
            sweep(op, "upper")
    for op, quantizer in (("A", layer.A_quantizer), ("B", layer.B_quantizer)):
        if bits[op] is not None:
            s, z = qparams(op)
            quantizer.set_qparams(s.view(1, -1, 1, 1), z.view(1, -1, 1, 1))
