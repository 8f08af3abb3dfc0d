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


def matmul_image_errors(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    operand: str,
    chunk: int,
    images_per_chunk: int,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Mean squared error of the product against the FP ``out``, per (candidate, image, head), for each
    candidate of one operand of ``a @ b`` (the other already quantized as given): (P, n, H) float32.

    Grids are (P, H). Each image's error is computed exactly as the reference does (float32 product,
    ``(out - prod)^2`` averaged over the head's output), so these numbers serve both the exact ranking
    (summed in float64) and the reference's float32 order on near-ties
    (:func:`fimaq.calib.reference_order.matmul_error_from_images`). Candidates are stacked along the
    rows (A) or columns (B) of one larger product per head: the product's values do not depend on it.
    ``workspace``: a dict whose buffers are reused across calls.
    """
    n, heads, rows, inner = a.shape
    cols = b.shape[-1]
    errors = torch.empty(scales.shape[0], n, heads, dtype=torch.float32, device=a.device)
    ipc, step = min(n, images_per_chunk), min(chunk, scales.shape[0])
    op_shape = (ipc, heads, step, rows, inner) if operand == "A" else (ipc, heads, inner, step, cols)
    work = {} if workspace is None else workspace
    op_buf = _buffer(work, "op", torch.Size(op_shape).numel(), a)
    prod_buf = _buffer(work, "prod", ipc * heads * step * rows * cols, a)
    err_buf = _buffer(work, "err", ipc * heads * step * rows * cols, a)
    for s, e in _candidate_chunks(scales.shape[0], chunk):
        p = e - s
        if operand == "A":
            sc, zp = scales[s:e].T.reshape(1, heads, p, 1, 1), zps[s:e].T.reshape(1, heads, p, 1, 1)
        else:
            sc, zp = scales[s:e].T.reshape(1, heads, 1, p, 1), zps[s:e].T.reshape(1, heads, 1, p, 1)
        for i0 in range(0, n, images_per_chunk):
            sl = slice(i0, i0 + images_per_chunk)
            ak, bk, ok = a[sl], b[sl], out[sl]
            n_k = ak.shape[0]
            size = n_k * heads * p * rows * cols
            err = err_buf[:size].view(n_k, heads, p, rows, cols)
            if operand == "A":
                a_hat = op_buf[: n_k * heads * p * rows * inner].view(n_k, heads, p, rows, inner)
                a_hat = fake_quant_nograd(ak.unsqueeze(2), sc, zp, bits, out=a_hat)
                prod = prod_buf[:size].view(n_k, heads, p * rows, cols)
                torch.matmul(a_hat.view(n_k, heads, p * rows, inner), bk, out=prod)
                torch.sub(ok.unsqueeze(2), prod.view(n_k, heads, p, rows, cols), out=err)
            else:
                b_hat = op_buf[: n_k * heads * inner * p * cols].view(n_k, heads, inner, p, cols)
                b_hat = fake_quant_nograd(bk.unsqueeze(3), sc, zp, bits, out=b_hat)
                prod = prod_buf[:size].view(n_k, heads, rows, p * cols)
                torch.matmul(ak, b_hat.view(n_k, heads, inner, p * cols), out=prod)
                torch.sub(ok.unsqueeze(2), prod.view(n_k, heads, rows, p, cols).transpose(2, 3), out=err)
            errors[s:e, sl] = err.pow_(2).mean(dim=(3, 4)).permute(2, 0, 1)
    return errors


def _buffer(workspace: dict, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements from ``workspace``, grown when too small."""
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf


def _first_occurrences(scales: torch.Tensor, zps: torch.Tensor) -> torch.Tensor:
    """(P, G) bool: whether candidate p's (scale, zero point) in group g differs from every earlier one's."""
    num = scales.shape[0]
    first = torch.zeros(scales.shape, dtype=torch.bool, device=scales.device)
    for g in range(scales.shape[1]):
        pairs = torch.stack([scales[:, g], zps[:, g]], dim=1)
        _, inverse = torch.unique(pairs, dim=0, return_inverse=True)
        lowest = torch.full((int(inverse.max()) + 1,), num, device=scales.device)
        lowest = lowest.scatter_reduce(0, inverse, torch.arange(num, device=scales.device), "amin")
        first[lowest, g] = True
    return first


def matmul_sweep(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    operand: str,
    chunk: int,
    images_per_chunk: int,
    keep_rtol: float,
    other_qparams: tuple[torch.Tensor, torch.Tensor, int] | None = None,
) -> tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Total error per (candidate, head) of every candidate of one operand of ``a @ b``, with exact
    per-head pruning.

    The other operand is given unquantized, with ``other_qparams`` = (scale (H,), zero point (H,),
    bits), or None where it stays FP. Returns the totals (P, H) float64, ``inf`` for candidates
    pruned as more than ``keep_rtol`` worse than a head's best, and a function giving the per-image
    errors of :func:`matmul_image_errors` (float32, the reference's values) for chosen
    (candidates, heads), (c, n, h), for settling near-ties.

    All candidates are scored on the first slice of images; each head's best there is scored on every
    image, and its total bounds that head. A candidate is dropped once its partial sum exceeds the
    bound (plus ``keep_rtol``): the errors are non-negative, so it can neither win nor tie. A candidate
    repeating an earlier one's (scale, zero point) in a head is not scored there (``inf``): its errors
    are the same, and ties go to the lower index. Below 8
    bits on CPU, with both operands quantized, the candidates are scored by exact int8 products
    (:func:`fimaq.quant.int_sweep.product_sse`), and the float32 per-image errors are computed for the
    near-ties only.
    """
    num, heads = scales.shape
    n = a.shape[0]
    ipc = max(1, min(n, images_per_chunk))
    a_used, b_used = a, b
    if other_qparams is not None:
        o_s, o_z, o_bits = other_qparams
        if operand == "A":
            b_used = fake_quant_nograd(b, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), o_bits)
        else:
            a_used = fake_quant_nograd(a, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), o_bits)
    work: dict = {}
    use_int = other_qparams is not None and bits < 8 and int_matmul_available(a.device)
    errors = None
    if use_int:
        if operand == "A":
            x, y, target = a, b, out
        else:  # (A B_hat)^T = B_hat^T A^T: B's candidates become the rows
            x, y, target = (t.transpose(-1, -2).contiguous() for t in (b, a, out))
        per_image = out.shape[-2] * out.shape[-1]
    else:
        errors = torch.full((num, n, heads), torch.nan, dtype=torch.float32, device=a.device)

    def run(cands: torch.Tensor, h: int | None, images: slice | torch.Tensor, per_call: int) -> torch.Tensor:
        """Errors of ``cands`` on ``images`` for head ``h`` (None: all heads), (p, images, heads)."""
        hs = slice(None) if h is None else slice(h, h + 1)
        if use_int:
            sse = product_sse(
                x[images, hs], y[images, hs], target[images, hs], (o_s[hs], o_z[hs], o_bits),
                scales[cands][:, hs], zps[cands][:, hs], bits,
            )  # fmt: skip
            return sse / per_image
        e = matmul_image_errors(
            a_used[images, hs], b_used[images, hs], out[images, hs], scales[cands][:, hs], zps[cands][:, hs],
            bits, operand, chunk, per_call, work,
        )  # fmt: skip
        if h is None:
            errors[cands, images] = e
        else:
            img = images if isinstance(images, torch.Tensor) else torch.arange(n, device=a.device)[images]
            head_errors = errors[:, :, h]  # a view: written through
            head_errors[cands.view(-1, 1), img] = e[..., 0]
        return e

    partial = run(torch.arange(num, device=a.device), None, slice(0, ipc), ipc).sum(
        dim=1, dtype=torch.float64
    )
    first = _first_occurrences(scales, zps)  # a repeated (scale, zero point) can only tie its first
    head_idx = torch.arange(heads, device=a.device)
    seeds = partial.masked_fill(~first, torch.inf).argmin(dim=0)
    seed_total = partial[seeds, head_idx].clone()
    alive = first.clone()
    alive[seeds, head_idx] = False
    bound = seed_total * (1 + keep_rtol)
    for h in range(heads):
        if ipc == n:
            alive[:, h] &= partial[:, h] <= bound[h]
            continue
        # the head's best so far on every other image (one candidate: more images per call); the others
        # then take the images in decreasing order of its errors, which passes the bound soonest
        seed_errors = run(seeds[h : h + 1], h, slice(ipc, n), ipc * min(chunk, num))[0, :, 0]
        seed_total[h] += seed_errors.sum(dtype=torch.float64)
        bound[h] = seed_total[h] * (1 + keep_rtol)
        alive[:, h] &= partial[:, h] <= bound[h]
        order = ipc + seed_errors.argsort(descending=True, stable=True)
        for i0 in range(0, n - ipc, ipc):
            cands = alive[:, h].nonzero().flatten()
            if cands.numel() == 0:
                break
            images = order[i0 : i0 + ipc].sort().values
            partial[cands, h] += run(cands, h, images, ipc)[:, :, 0].sum(dim=1, dtype=torch.float64)
            alive[cands, h] &= partial[cands, h] <= bound[h]
    totals = torch.full_like(partial, torch.inf)
    totals[alive] = partial[alive]
    totals[seeds, head_idx] = seed_total

    def image_errors(cands: torch.Tensor, hs: torch.Tensor) -> torch.Tensor:
        if errors is not None:
            return errors[cands][:, :, hs]
        return matmul_image_errors(
            a_used[:, hs], b_used[:, hs], out[:, hs], scales[cands][:, hs], zps[cands][:, hs],
            bits, operand, chunk, ipc, work,
        )  # fmt: skip

    return totals, image_errors
