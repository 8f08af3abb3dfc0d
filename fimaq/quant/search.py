"""Batched candidate scoring for the calibration searches: each ``*_sse`` function returns the squared
error of every candidate per group (row, head or tensor), ``(P, groups)``, accumulated in float64; the
caller takes the argmin (ties to the lowest index), settling float-noise ties with
:func:`resolve_near_ties`.

Output-error searches over activations prune: every candidate's error is a sum of non-negative
per-chunk terms, so a candidate whose partial sum already exceeds a complete candidate's total (plus
the tie tolerance) can neither win nor tie and is dropped (exact, not a heuristic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fimaq.quant.int_sweep import code_gram, int_matmul_available, product_sse
from fimaq.quant.sorted_sse import SortedValues, sort_rows

ChunkEval = Callable[[torch.Tensor, int], torch.Tensor]  # (candidate indices, chunk) -> (n, groups) SSE


def tie_rtol(bits: int) -> float:
    """Relative gap below which two candidates count as tied in float32 at ``bits`` bits.

    The reference's float32 errors are perturbed relative to the exact ones by about float32 epsilon
    over the relative quantization error (larger at 8 bits than at 3); 2e-4 * 2^(b - 8) keeps a
    margin of several times that.
    """
    return 2e-4 * 2.0 ** (bits - 8)


def pruned_totals(
    evaluate: ChunkEval, num_cand: int, num_chunks: int, keep_rtol: float = 1e-4
) -> torch.Tensor:
    """Totals ``sum_k evaluate(c, k)`` per (candidate, group) with exact branch-and-bound pruning.

    Candidates whose partial sum exceeds ``(1 + keep_rtol)`` times a complete candidate's total can
    neither win nor tie within ``keep_rtol``; they are dropped and reported as ``inf``. Every other
    candidate is summed over all chunks. The seeds (each group's best on chunk 0) are summed first;
    the others then take the chunks in decreasing order of the seeds' errors.

    Args:
        evaluate: returns the (non-negative) error of the given candidates on chunk k, shape (n, groups).
        num_cand: number of candidates.
        num_chunks: number of chunks the error is summed over.
        keep_rtol: candidates within this relative distance of the best are kept (near-tie resolution).
    """
    everyone = torch.arange(num_cand)
    partial = evaluate(everyone, 0)
    seeds = torch.unique(partial.argmin(dim=0))
    seed_total = partial[seeds].clone()
    seed_chunk = torch.zeros(num_chunks, dtype=torch.float64)
    for k in range(1, num_chunks):
        part = evaluate(seeds, k)
        seed_total += part
        seed_chunk[k] = part.sum()
    bound = seed_total.min(dim=0).values * (1 + keep_rtol)
    alive = partial <= bound
    alive[seeds] = False
    # the remaining chunks in decreasing order of the seeds' errors: partial sums pass the bound soonest
    for k in (1 + seed_chunk[1:].argsort(descending=True, stable=True)).tolist():
        idx = alive.any(dim=1).nonzero().flatten()
        if idx.numel() == 0:
            break
        partial[idx] += evaluate(idx, k)
        alive[idx] &= partial[idx] <= bound
    totals = torch.full_like(partial, float("inf"))
    totals[alive] = partial[alive]
    totals[seeds] = seed_total
    return totals


def fake_quant_nograd(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``fake_quant`` without autograd, in place: ``s * (clamp(round(x / s) + zp, 0, qmax) - zp)``.

    Bit-identical to ``fake_quant`` (the rounded values and zero points are small integers, so adding
    and removing the zero point is exact); clamping to scalar bounds is much faster than to per-group
    tensors. The result is contiguous in the broadcast shape, written to ``out`` when given (a reused
    buffer spares the page faults of a fresh large allocation).
    """
    if out is None:
        if x.ndim == scale.ndim == zero_point.ndim:
            shape = torch.Size(
                max(u, v, w) for u, v, w in zip(x.shape, scale.shape, zero_point.shape, strict=True)
            )
        else:
            shape = torch.broadcast_shapes(x.shape, scale.shape, zero_point.shape)
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    t = torch.div(x, scale, out=out)
    t.round_().add_(zero_point).clamp_(0, 2**bits - 1).sub_(zero_point)
    return t.mul_(scale)


def _candidate_chunks(num: int, chunk: int):
    for start in range(0, num, chunk):
        yield start, min(num, start + chunk)


def sorted_input(x: torch.Tensor, channel_wise: bool = False) -> torch.Tensor:
    """An input ``(M, C)`` sorted for :func:`act_self_sse` and ``grids.activation_grid``: the whole
    tensor as one row ``(1, M*C)``, or each channel ``(C, M)``."""
    return sort_rows(x.T if channel_wise else x.reshape(1, -1))


def _self_sse(
    x: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, bits: int, sorted_x: torch.Tensor | None = None
) -> torch.Tensor:
    """Own squared error of each group (row of ``x``, (G, n)) under each candidate (grids (G, P)), (P, G):
    one sort (or ``sorted_x``, the rows already sorted) when the groups are long, a direct pass over
    the values when they are short."""
    if x.shape[1] <= 16 * 2**bits:  # short rows (weights): the direct pass is cheaper than sorting
        err = fake_quant_nograd(x.unsqueeze(1), scales.unsqueeze(-1), zps.unsqueeze(-1), bits).sub_(
            x.unsqueeze(1)
        )
        return err.pow_(2).sum(dim=-1, dtype=torch.float64).T
    values = SortedValues(x) if sorted_x is None else SortedValues(sorted_x, presorted=True)
    return values.sse(scales, zps, bits).T


def weight_self_sse(w: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, bits: int) -> torch.Tensor:
    """The weight's own squared error per (candidate, row), (P, rows); grids (P, rows, 1)."""
    return _self_sse(w, scales[..., 0].T, zps[..., 0].T, bits)


PREFILTER_RTOL = 2e-3  # float32 Gram products are within ~5e-5 of the exact errors; 40x margin


def weight_output_sse(
    w: torch.Tensor,
    bias: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    chunk: int,
    x_qparams: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Layer-output squared error ``||x W_hat^T + b - y||^2`` of every candidate per row, (P, rows);
    ``inf`` for candidates more than ``PREFILTER_RTOL`` worse than a row's best.

    Each output row depends only on its weight row, so with ``d = w_hat - w`` and ``r = x w + b - y``
    the error is ``d^T G d + 2 d^T x^T r + ||r||^2`` with ``G = x^T x``: one Gram matrix instead of
    one matmul per candidate. ``x`` (M, in) is the (already quantized) input, ``y`` (M, out) the FP
    output. ``x^T r = G w^T + x^T 1 b^T - x^T y`` and ``||r||^2`` follow from ``G`` and ``x^T y``
    (float64). Where ``x_qparams`` (per-tensor scale, zero point, bits) says how ``x`` was quantized,
    ``G`` comes from its integer codes (:func:`fimaq.quant.int_sweep.code_gram`) on CPU.

    Every candidate is first scored with float32 Gram products; those within ``PREFILTER_RTOL`` of
    their row's best (all near-ties among them) are then scored in float64.
    """
    xd, wd, bd, yd = x.double(), w.double(), bias.double(), y.double()
    if x_qparams is not None and int_matmul_available(x.device):
        gram = code_gram(x, *x_qparams)
    else:
        gram = xd.T @ xd
    xty = xd.T @ yd  # (in, out)
    colsum = xd.sum(dim=0)
    gw = gram @ wd.T  # (in, out)
    cross = (gw + colsum.view(-1, 1) * bd.view(1, -1) - xty).T  # x^T r, (out, in)
    const = (  # ||r||^2 per output
        (wd.T * gw).sum(0)
        + 2 * bd * (wd @ colsum)
        - 2 * (wd.T * xty).sum(0)
        + x.shape[0] * bd * bd
        - 2 * bd * yd.sum(0)
        + yd.pow(2).sum(0)
    )
    gram32, cross32 = gram.float(), cross.float()
    approx = []
    for s, e in _candidate_chunks(scales.shape[0], chunk):
        d = fake_quant_nograd(w.unsqueeze(0), scales[s:e], zps[s:e], bits).sub_(w)
        quad = (d @ gram32).mul_(d).sum(-1, dtype=torch.float64)
        approx.append(quad + 2 * (d * cross32).sum(-1, dtype=torch.float64) + const)
    approx = torch.cat(approx, 0)
    best = approx.min(dim=0).values
    cand, row = (approx <= best + PREFILTER_RTOL * best.abs()).nonzero(as_tuple=True)
    vals = torch.full_like(approx, torch.inf)
    for s, e in _candidate_chunks(cand.numel(), chunk * 64):
        c, r = cand[s:e], row[s:e]
        d = (fake_quant_nograd(w[r], scales[c, r], zps[c, r], bits) - w[r]).double()
        vals[c, r] = ((d @ gram) * d).sum(-1) + 2 * (d * cross[r]).sum(-1) + const[r]
    return vals


def resolve_near_ties(
    values: torch.Tensor,
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rtol: float,
) -> torch.Tensor:
    """Per-group argmin of exact errors ``values`` (P, G), with float-noise ties settled like the reference.

    Where other candidates come within ``rtol`` of a group's best, ``reference(candidates, groups)``
    re-scores just those (an (n, g) tensor in the reference implementation's float32 arithmetic and
    summation order) and its first minimum is taken.
    """
    idx = values.argmin(dim=0)
    best = values.min(dim=0).values
    near = values <= best * (1 + rtol)
    groups = (near.sum(dim=0) > 1).nonzero().flatten()
    if groups.numel() == 0:
        return idx
    cands = near[:, groups].any(dim=1).nonzero().flatten()
    scores = torch.where(near[cands][:, groups], reference(cands, groups).to(values.dtype), torch.inf)
    idx[groups] = cands[scores.argmin(dim=0)]
    return idx


def act_self_sse(
    x: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    channel_wise: bool = False,
    sorted_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input's own squared error per candidate: per tensor (grids (P,), returns (P, 1)) or per
    channel (grids (C, P), returns (P, C)); ``x`` is (M, C), ``sorted_x`` optionally
    :func:`sorted_input` of it."""
    if channel_wise:
        return _self_sse(x.T.contiguous(), scales, zps, bits, sorted_x)
    return _self_sse(x.reshape(1, -1), scales.view(1, -1), zps.view(1, -1), bits, sorted_x)


def act_output_sse(
    x: torch.Tensor,
    w_hat: torch.Tensor,
    bias: torch.Tensor,
    y: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    chunk: int,
    rows_per_chunk: int,
    w_qparams: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
) -> torch.Tensor:
    """Output squared error ``||x_hat W_hat^T + b - y||^2`` of each per-tensor input candidate, (P, 1);
    ``inf`` for candidates pruned as more than 1e-4 worse than the best.

    ``w_qparams``: (float weight, row scales, row zero points, bits) of ``w_hat`` where the weight is
    quantized: layers with at least as many inputs as outputs then take exact int8 products
    (:func:`fimaq.quant.int_sweep.product_sse`) on CPU.
    """
    num_chunks = -(-x.shape[0] // rows_per_chunk)

    target = y - bias
    gram = (w_hat.T @ w_hat) if w_hat.shape[1] < w_hat.shape[0] else None
    use_int = gram is None and w_qparams is not None and int_matmul_available(x.device)

    residuals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per chunk: (R W, ||R||^2)

    def evaluate(cands: torch.Tensor, k: int) -> torch.Tensor:
        rows = slice(k * rows_per_chunk, (k + 1) * rows_per_chunk)
        xs, ts = x[rows], target[rows]
        if use_int:
            w, ws, wz, w_bits = w_qparams
            y_q = (ws.reshape(1, -1), wz.reshape(1, -1), w_bits)
            sse = product_sse(
                xs.view(1, 1, *xs.shape),
                w.T.view(1, 1, *w.T.shape),
                ts.view(1, 1, *ts.shape),
                y_q,
                scales[cands].view(-1, 1),
                zps[cands].view(-1, 1),
                bits,
            )
            return sse.view(-1, 1)
        if gram is not None:  # ||D W^T + R||^2 = <D G, D> + 2 <D, R W> + ||R||^2, cheaper when in < out
            if k not in residuals:
                resid = xs @ w_hat.T - ts
                residuals[k] = (resid @ w_hat, resid.pow(2).sum(dtype=torch.float64))
            proj, const = residuals[k]
        out = []
        for s, e in _candidate_chunks(cands.numel(), chunk):
            c = cands[s:e]
            x_hat = fake_quant_nograd(xs.unsqueeze(0), scales[c].view(-1, 1, 1), zps[c].view(-1, 1, 1), bits)
            if gram is not None:  # <D, D G + 2 R W>: float32 per token, float64 over tokens
                d = x_hat.sub_(xs)
                terms = (d.view(-1, d.shape[-1]) @ gram).view_as(d).add_(proj, alpha=2).mul_(d)
                out.append((terms.sum(dim=-1).sum(dim=-1, dtype=torch.float64) + const).unsqueeze(-1))
            else:
                err = (x_hat.view(-1, x_hat.shape[-1]) @ w_hat.T).view(e - s, -1, w_hat.shape[0]).sub_(ts)
                out.append(err.pow_(2).sum(dim=(1, 2), dtype=torch.float64).unsqueeze(-1))
        return torch.cat(out, 0)

    return pruned_totals(evaluate, scales.shape[0], num_chunks, keep_rtol=tie_rtol(bits))
