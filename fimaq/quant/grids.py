"""Candidate (scale, zero point) grids of the calibration searches (docs/algorithm.md, section 2).

Every grid reproduces the reference implementation's float32 arithmetic operation by operation, so
that the candidates are bit-identical to it.
"""

from __future__ import annotations

import torch

from fimaq.quant.sorted_sse import sort_rows

QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs


def _levels(bits: int) -> tuple[int, int, int]:
    """(largest code 2^b - 1, number of zero-point candidates, mid-range code 2^(b-1)) for a bit-width."""
    return 2**bits - 1, min(16, 2**bits), 2 ** (bits - 1)


def chunked_quantile(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quantiles of a whole tensor; tensors too large for ``torch.quantile`` are split into 2^k equal
    chunks whose quantiles are averaged (the reference's approximation)."""
    flat = x.reshape(-1)
    chunks = 1
    while flat.numel() % chunks or flat.numel() // chunks > QUANTILE_MAX_NUMEL:
        chunks *= 2
        if chunks > flat.numel():
            raise ValueError("cannot split tensor for quantiles")
    return torch.quantile(flat.view(chunks, -1), q.to(flat.device), dim=-1).mean(dim=-1)


def sorted_quantile(sorted_rows: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile(x, q, dim=-1)`` (linear interpolation) from ``x`` already sorted along its last
    dimension, bit for bit: the same float32 ranks, order statistics and ``lerp``. Returns (len(q), ...)."""
    ranks = q.to(sorted_rows) * (sorted_rows.shape[-1] - 1)
    below = ranks.long()
    above = ranks.ceil().long()
    return torch.lerp(sorted_rows[..., below], sorted_rows[..., above], ranks - below).movedim(-1, 0)


def _zero_points(bits: int, num_scale: int, device: torch.device) -> torch.Tensor:
    _, num_zp, half = _levels(bits)
    zps = torch.arange(int(half - num_zp / 2), int(half + num_zp / 2), device=device)
    return zps.repeat_interleave(num_scale).to(torch.float32)


def weight_grid(w: torch.Tensor, bits: int, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row candidates for a 2-D weight ``(rows, in)``: returns scales and zero points ``(P, rows, 1)``.

    Scales interpolate between the (q0.9 - q0.1) and (max - min) ranges; zero points are the fixed
    integers around mid-range; candidate index = zero-point index * num_scale + scale index; the last
    candidate is repeated once more (P = eq_n + 1).
    """
    qmax, num_zp, _ = _levels(bits)
    num_scale = int(eq_n / num_zp)
    pct = torch.tensor([0.9, 1.0])
    both = torch.quantile(w, torch.cat([pct, 1 - pct]).to(w.device), dim=-1).unsqueeze(-1)  # one sort
    upper, lower = both[:2], both[2:]  # (2, rows, 1) each
    delta_min = upper[0:1] - lower[0:1]
    delta_max = upper[1:] - lower[1:]
    splits = torch.linspace(0, 1, steps=num_scale, device=w.device)[:, None, None] * (delta_max - delta_min)
    scales = (delta_min + splits).repeat(num_zp, 1, 1) / qmax
    scales = torch.cat([scales, scales[-1:]], dim=0)
    zps = _zero_points(bits, num_scale, w.device)[:, None, None].expand(-1, w.shape[0], 1)
    zps = torch.cat([zps, zps[-1:]], dim=0)
    return scales, zps


def activation_grid(
    x: torch.Tensor,
    bits: int,
    eq_n: int,
    channel_wise: bool = False,
    sorted_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for an input tensor ``(..., C)``: per tensor ``(P,)`` or per channel ``(C, P)``.

    Same construction as :func:`weight_grid` on the whole tensor (or per channel), scales clamped to
    at least 1e-4. ``sorted_values``: the tensor already sorted (one row ``(1, numel)`` per tensor, or
    ``(C, M)`` per channel), which spares the quantiles their own sort; same result.
    """
    qmax, num_zp, _ = _levels(bits)
    num_scale = int(eq_n / num_zp)
    pct = torch.tensor([0.9, 1.0])
    if sorted_values is not None and (channel_wise or x.numel() <= QUANTILE_MAX_NUMEL):
        both = sorted_quantile(sorted_values, torch.cat([pct, 1 - pct]).to(x.device))  # (4, groups)
        upper, lower = both[:2].T, both[2:].T  # (groups, 2) each
    elif channel_wise:
        flat = x.reshape(-1, x.shape[-1])
        cols = max(1, QUANTILE_MAX_NUMEL // flat.shape[0])
        ups, lows = [], []
        for c0 in range(0, flat.shape[1], cols):
            part = flat[:, c0 : c0 + cols]
            ups.append(torch.quantile(part, pct.to(x.device), dim=0).transpose(0, 1))
            lows.append(torch.quantile(part, (1 - pct).to(x.device), dim=0).transpose(0, 1))
        upper, lower = torch.cat(ups, 0), torch.cat(lows, 0)  # (C, 2)
    else:
        both = chunked_quantile(x, torch.cat([pct, 1 - pct]))
        upper, lower = both[:2].unsqueeze(0), both[2:].unsqueeze(0)  # (1, 2) each
    delta_min = upper[:, 0:1] - lower[:, 0:1]
    delta_max = upper[:, 1:] - lower[:, 1:]
    splits = torch.linspace(0, 1, steps=num_scale, device=x.device)[None, :] * (delta_max - delta_min)
    scales = ((delta_min + splits).repeat(1, num_zp) / qmax).clamp(min=1e-4)
    scales = torch.cat([scales, scales[..., -1:]], dim=-1)
    zps = _zero_points(bits, num_scale, x.device)[None, :].expand(scales.shape[0], -1)
    zps = torch.cat([zps, zps[..., -1:]], dim=-1)
    if not channel_wise:
        return scales[0], zps[0]
    return scales, zps


def conv_weight_bounds(w2d: torch.Tensor, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (upper, lower) bound candidates ``(eq_n + 1, rows, 1)`` for the patch-embed
    weight: quantile levels ``0.99 + 0.0099 (i / (eq_n - 1))^0.5`` and 1.0 (lower: one minus them)."""
    lo, hi, k = 0.99, 0.9999, 0.5
    pct = torch.tensor([lo + (hi - lo) * (i / (eq_n - 1)) ** k for i in range(eq_n)] + [1.0])
    both = torch.quantile(w2d, torch.cat([pct, 1 - pct]).to(w2d.device), dim=-1).unsqueeze(-1)
    return both[: pct.numel()], both[pct.numel() :]


def bounds_to_qparams(
    upper: torch.Tensor, lower: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``(u - l) / (2^b - 1)`` and zero point ``-round(l / s)`` of a range."""
    scale = (upper - lower) / (2**bits - 1)
    return scale, -(lower / scale).round()


def matmul_operand_bounds(x: torch.Tensor, eq_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (upper, lower) candidates ``(eq_n + 1, heads)`` for a matmul operand ``(n, H, r, c)``.

    With ``t = linspace(0, 1, eq_n + 1)``: upper bounds run from q0.99 to q0.99999 and lower bounds
    from q(1 - 0.99999) to q(1 - 0.99), quantile levels in float32 as in the reference. The searches
    evaluate the first ``eq_n`` candidates (the reference never evaluates the last one).
    """
    pct = torch.cat([torch.tensor([0.99, 0.99999]), 1 - torch.tensor([0.99, 0.99999])]).to(x.device)
    if x[:, 0].numel() <= QUANTILE_MAX_NUMEL:  # one sort per head
        both = sorted_quantile(sort_rows(x.transpose(0, 1).reshape(x.shape[1], -1)), pct)
    else:
        both = torch.stack([chunked_quantile(x[:, h], pct) for h in range(x.shape[1])], dim=-1)
    uppers, lowers = both[:2], both[2:]  # (2, H) each
    t = torch.linspace(0, 1, steps=eq_n + 1, device=x.device)[:, None]
    upper = uppers[0:1] + t * (uppers[1:2] - uppers[0:1])
    lower = lowers[1:2] + t * (lowers[0:1] - lowers[1:2])
    return upper, lower
