"""Attention-matmul operand searches: per-image errors of every candidate of one operand of a
quantized product, and the per-head pruned sweep over them (ALGORITHM section 2.3)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fimaq.quant.int_sweep import int_matmul_available, product_sse
from fimaq.quant.search import _candidate_chunks, fake_quant_nograd


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
    are the same, and ties go to the lower index. Below 8 bits on CPU, with both operands quantized,
    the candidates are scored by exact int8 products (:func:`fimaq.quant.int_sweep.product_sse`), and
    the float32 per-image errors are computed for the near-ties only.
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
