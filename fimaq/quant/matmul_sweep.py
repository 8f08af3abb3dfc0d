"""Attention-matmul operand searches: per-image errors of every candidate of one operand of a
quantized product, and the per-head pruned sweep over them (docs/algorithm.md, section 2.3: per-head
bounds, coordinate descent); the tie rule is :func:`fimaq.quant.search.choose`."""

from __future__ import annotations

import torch

from fimaq.quant.fake_quant import centered_codes
from fimaq.quant.log_quantizer import log_fake_quant
from fimaq.quant.search import candidate_chunks, choose, first_occurrences, fq, tie_rtol


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

    Grids are (P, H). The fast pass of the sweep: float32 product, ``(out - prod)^2`` averaged over the
    head's output in float32 (within ``tie_rtol(bits)`` / 4 of the float64 errors). Candidates are
    stacked along the rows (A) or columns (B) of one larger product per head. ``workspace``: a dict
    whose buffers are reused across calls.
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
    for s, e in candidate_chunks(scales.shape[0], chunk):
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
            if operand == "A":  # centred codes times B, scaled per candidate while taking the error
                codes = op_buf[: n_k * heads * p * rows * inner].view(n_k, heads, p, rows, inner)
                codes = centered_codes(ak.unsqueeze(2), sc, zp, bits, out=codes)
                prod = prod_buf[:size].view(n_k, heads, p * rows, cols)
                torch.matmul(codes.view(n_k, heads, p * rows, inner), bk, out=prod)
                prod, sc_err = prod.view(n_k, heads, p, rows, cols), sc
            else:
                codes = op_buf[: n_k * heads * inner * p * cols].view(n_k, heads, inner, p, cols)
                codes = centered_codes(bk.unsqueeze(3), sc, zp, bits, out=codes)
                prod = prod_buf[:size].view(n_k, heads, rows, p * cols)
                torch.matmul(ak, codes.view(n_k, heads, inner, p * cols), out=prod)
                prod, sc_err = prod.view(n_k, heads, rows, p, cols).transpose(2, 3), sc.transpose(2, 3)
            torch.addcmul(ok.unsqueeze(2), prod, sc_err, value=-1, out=err)  # out - s (codes @ other)
            norms = torch.linalg.vector_norm(err.view(n_k, heads, p, rows * cols), dim=-1)
            errors[s:e, sl] = norms.square_().div_(rows * cols).permute(2, 0, 1)
    return errors


def _buffer(workspace: dict, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements from ``workspace``, grown when too small."""
    buf = workspace.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = workspace[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf


def exact_image_errors(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    operand: str,
) -> torch.Tensor:
    """Float64 total error per (candidate, head) of candidates (grids (p, H)) of one operand, the other
    operand already quantized as given: the quantized operand is the float32 fake-quant, the product
    and the errors float64 (``matmul_image_errors`` summed over images, without float32 rounding)."""
    x, other = (a, b.double()) if operand == "A" else (b, a.double())
    totals = torch.empty(scales.shape, dtype=torch.float64, device=a.device)
    od = out.double()
    per_image = out.shape[-2] * out.shape[-1]
    for c in range(scales.shape[0]):
        x_hat = fq(x, scales[c].view(1, -1, 1, 1), zps[c].view(1, -1, 1, 1), bits).double()
        prod = x_hat @ other if operand == "A" else other @ x_hat
        totals[c] = (od - prod).pow_(2).sum(dim=(0, 2, 3)) / per_image
    return totals


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
    other_qparams: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    what: str = "",
) -> torch.Tensor:
    """Index (H,) of each head's best candidate (grids (P, H)) for one operand of ``a @ b``: the mean
    squared error of the product against the FP ``out``, summed over images, with exact per-head
    pruning and the tie rule of :func:`fimaq.quant.search.choose`.

    The other operand is given unquantized, with ``other_qparams`` = (scale (H,), zero point (H,),
    bits), or None where it stays FP.

    All candidates are scored on the first slice of images; each head's best there is scored on every
    image, and its total bounds that head. A candidate is dropped once its partial sum exceeds the
    bound (plus the tie window): the errors are non-negative, so it can neither win nor tie. The
    remaining images are taken in decreasing order of the bounding candidate's errors, which passes the
    bound soonest. A candidate repeating an earlier one's (scale, zero point) in a head is not scored
    there. Near-ties are re-scored in float64 (:func:`exact_image_errors`).
    """
    num, heads = scales.shape
    n = a.shape[0]
    ipc = max(1, min(n, images_per_chunk))
    keep_rtol = tie_rtol(bits)
    a_used, b_used = a, b
    if other_qparams is not None:
        o_s, o_z, o_bits = other_qparams
        if operand == "A":
            b_used = fq(b, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), o_bits)
        else:
            a_used = fq(a, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), o_bits)
    work: dict = {}

    def run(cands: torch.Tensor, h: int | None, images: slice | torch.Tensor, per_call: int) -> torch.Tensor:
        """Float32 errors of ``cands`` on ``images`` for head ``h`` (None: all heads), (p, images, heads)."""
        hs = slice(None) if h is None else slice(h, h + 1)
        return matmul_image_errors(
            a_used[images, hs], b_used[images, hs], out[images, hs], scales[cands][:, hs], zps[cands][:, hs],
            bits, operand, chunk, per_call, work,
        )  # fmt: skip

    partial = run(torch.arange(num, device=a.device), None, slice(0, ipc), ipc).sum(
        dim=1, dtype=torch.float64
    )
    first = first_occurrences(scales, zps)  # a repeated (scale, zero point) can only tie its first
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

    def rescore(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return exact_image_errors(
            a_used[:, g], b_used[:, g], out[:, g], scales[c][:, g], zps[c][:, g], bits, operand
        )

    return choose(totals, rescore, keep_rtol, scales, zps, what)


def log_grid_errors(
    a: torch.Tensor,
    b_hat: torch.Tensor,
    out: torch.Tensor,
    scales: torch.Tensor,
    steps: torch.Tensor,
    bits: int,
    images_per_chunk: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Squared error of ``fq_log(a) @ b_hat`` against ``out`` per (candidate, head), summed over the
    images in float64: candidates of the log grid of ``a`` (:mod:`fimaq.quant.log_quantizer`) with
    grids ``scales`` / ``steps`` (P, H); the product in ``dtype`` (float64: the exact re-scoring)."""
    num, heads = scales.shape
    totals = torch.zeros(num, heads, dtype=torch.float64, device=a.device)
    other = b_hat.to(dtype)
    for i0 in range(0, a.shape[0], images_per_chunk):
        sl = slice(i0, i0 + images_per_chunk)
        ak, bk, ok = a[sl], other[sl], out[sl].to(dtype)
        for p in range(num):
            a_hat = log_fake_quant(ak, scales[p].view(1, -1, 1, 1), steps[p].view(1, -1, 1, 1), bits)
            err = ok - a_hat.to(dtype) @ bk
            totals[p] += err.square_().sum(dim=(0, 2, 3), dtype=torch.float64)
    return totals


def log_grid_search(
    a: torch.Tensor,
    b_hat: torch.Tensor,
    out: torch.Tensor,
    bits: int,
    step_choices: tuple[float, ...],
    num_scales: int,
    images_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head (scale, base exponent) of the log grid of ``a`` in ``a @ b_hat`` by the product's
    squared error (docs/algorithm.md, section 2.5), under the tie rule of :func:`choose`.

    A log grid repeats itself when its scale is multiplied by ``2^c``, so one period below each head's
    largest value holds every distinct candidate: scales ``max * 2^(-c t)``, ``t = linspace(0, 1,
    num_scales)``, for every exponent ``c`` of ``step_choices``.
    """
    heads = a.shape[1]
    top = a.transpose(0, 1).reshape(heads, -1).amax(dim=1).clamp_min(1e-8)  # (H,)
    rtol = tie_rtol(bits)

    def best(step_grid: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # step_grid (S, H): candidates are every (exponent, t) pair
        steps = step_grid.repeat_interleave(t.numel(), dim=0)  # (P, H)
        scales = top.view(1, -1) * torch.exp2(-steps * t.repeat(step_grid.shape[0]).view(-1, 1))
        values = log_grid_errors(a, b_hat, out, scales, steps, bits, images_per_chunk)

        def rescore(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return log_grid_errors(
                a[:, g], b_hat[:, g], out[:, g], scales[c][:, g], steps[c][:, g], bits, images_per_chunk,
                torch.float64,
            )  # fmt: skip

        idx = choose(values, rescore, rtol, scales, steps, "A_quantizer")
        cols = torch.arange(heads, device=a.device)
        return scales[idx, cols], steps[idx, cols]

    choices = torch.tensor(step_choices, dtype=a.dtype, device=a.device).view(-1, 1).expand(-1, heads)
    return best(choices, torch.linspace(0, 1, num_scales, device=a.device))
