"""Candidate scoring for the calibration searches: one evaluator per metric, and one tie rule.

Metrics, each with one evaluator here or in :mod:`fimaq.quant.matmul_sweep`:

* a tensor's own quantization error (:func:`self_sse`; weight rows, the input per tensor or per
  channel),
* a linear layer's output error over its weight candidates (:class:`WeightOutputError`, through the
  Gram matrix of the input),
* a linear layer's output error over its input candidates (:func:`act_output_sse`),
* the output error of an attention product over one operand's candidates
  (:func:`fimaq.quant.matmul_sweep.matmul_sweep`).

Every quantized value is the float32 fake-quant of the model (:mod:`fimaq.quant.fake_quant`): the
same codes on every machine. Each evaluator scores all candidates in a fast pass (float32 products,
float64 sums), with a stated bound on its relative deviation from the float64 error.

**The tie rule** (:func:`choose`): a candidate repeating an earlier candidate's (scale, zero point)
in its group is not scored (it could only tie it). Candidates whose fast-pass error is within
``rtol`` of their group's best are scored again by the same evaluator in float64, and the lowest
float64 error wins; an exact tie goes to the lower candidate index. ``rtol`` is larger than the fast
pass's deviation, so every candidate that can win is re-scored, and the choice does not depend on
the CPU, the BLAS kernel or the thread count. Output-error searches prune exactly: a candidate whose
partial sum already exceeds a complete candidate's total by more than ``rtol`` can neither win nor
tie, and is dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch

from fimaq.quant.fake_quant import broadcast_buffer, fake_quant
from fimaq.quant.sorted_sse import SortedValues, sort_rows

ChunkEval = Callable[[torch.Tensor, int], torch.Tensor]  # (candidate indices, chunk) -> (n, groups) SSE
Rescore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (candidates, groups) -> float64 (n, g)

GRAM_RTOL = 2e-3  # weight output errors through float32 Gram products deviate up to ~5e-5: 40x margin


def tie_rtol(bits: int) -> float:
    """Relative window of the tie rule for direct float32 evaluations at ``bits`` bits.

    A float32 error ``e = y - y_hat`` carries rounding of order eps32 * |y|, so the relative deviation
    of a squared error grows with ``|y| / |e|``, about 2^b: 2e-4 * 2^(b - 8) keeps a margin of
    several times the deviations measured at 2 to 8 bits.
    """
    return 2e-4 * 2.0 ** (bits - 8)


def fq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``fake_quant`` without autograd into a fresh buffer of the broadcast shape (contiguous)."""
    return fake_quant(x, scale, zero_point, bits, out=broadcast_buffer(x, scale, zero_point))


def first_occurrences(scales: torch.Tensor, zps: torch.Tensor) -> torch.Tensor:
    """(P, G) bool: whether candidate p's (scale, zero point) differs from every earlier one's in group g."""
    same = (scales.unsqueeze(1) == scales.unsqueeze(0)) & (zps.unsqueeze(1) == zps.unsqueeze(0))
    earlier = torch.ones(scales.shape[0], scales.shape[0], dtype=torch.bool, device=scales.device).tril(-1)
    return ~(same & earlier.view(*earlier.shape, *([1] * (scales.ndim - 1)))).any(dim=1)


_TIE_LOG: contextvars.ContextVar[tuple[list, str] | None] = contextvars.ContextVar(
    "fimaq_tie_log", default=None
)


@contextlib.contextmanager
def tie_log(entries: list, label: str = "") -> Iterator[None]:
    """Within the block, :func:`choose` appends one dict per group settled by a float64 re-score:
    ``label``, ``group``, the near candidates' ``scales``, ``zero_points`` and float64 ``errors``, and
    the ``chosen`` position among them. Nested calls replace the label."""
    token = _TIE_LOG.set((entries, label))
    try:
        yield
    finally:
        _TIE_LOG.reset(token)


def choose(
    values: torch.Tensor,
    rescore: Rescore,
    rtol: float,
    scales: torch.Tensor,
    zps: torch.Tensor,
    what: str = "",
) -> torch.Tensor:
    """Per-group winner under the tie rule (module docstring).

    Args:
        values: fast-pass errors (P, G); ``inf`` for pruned candidates.
        rescore: float64 errors of the given (candidates, groups), (n, g).
        rtol: the evaluator's tie window.
        scales: the candidates' scales (P, G); ``zps`` their zero points: repeated candidates are
            never chosen over their first occurrence.
        what: names the quantizer in the tie log.
    """
    values = values.masked_fill(~first_occurrences(scales, zps), torch.inf)
    idx = values.argmin(dim=0)
    best = values.min(dim=0).values
    near = values <= best + rtol * best.abs()
    groups = (near.sum(dim=0) > 1).nonzero().flatten()
    if groups.numel() == 0:
        return idx
    cands = near[:, groups].any(dim=1).nonzero().flatten()
    exact = rescore(cands, groups).to(torch.float64)
    scores = torch.where(near[cands][:, groups], exact, torch.inf)
    pick = scores.argmin(dim=0)  # the first minimum: the lower candidate index
    idx[groups] = cands[pick]
    log = _TIE_LOG.get()
    if log is not None:
        entries, label = log
        for j, g in enumerate(groups.tolist()):
            mine = near[cands, g]
            entries.append(
                {
                    "label": f"{label}.{what}" if what else label,
                    "group": g,
                    "scales": scales[cands[mine], g].tolist(),
                    "zero_points": zps[cands[mine], g].tolist(),
                    "errors": exact[mine, j].tolist(),
                    "chosen": int(mine[: pick[j]].sum()),
                }
            )
    return idx


def pruned_totals(evaluate: ChunkEval, num_cand: int, num_chunks: int, keep_rtol: float) -> torch.Tensor:
    """Totals ``sum_k evaluate(c, k)`` per (candidate, group) with exact branch-and-bound pruning.

    Candidates whose partial sum exceeds ``(1 + keep_rtol)`` times a complete candidate's total can
    neither win nor tie within ``keep_rtol``; they are dropped and reported as ``inf``. Every other
    candidate is summed over all chunks. The seeds (each group's best on chunk 0) are summed first;
    the others then take the chunks in decreasing order of the seeds' errors.

    Args:
        evaluate: returns the (non-negative) error of the given candidates on chunk k, shape (n, groups).
        num_cand: number of candidates.
        num_chunks: number of chunks the error is summed over.
        keep_rtol: candidates within this relative distance of the best are kept (the tie window).
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


def candidate_chunks(num: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, end) of consecutive slices of ``chunk`` candidates."""
    for start in range(0, num, chunk):
        yield start, min(num, start + chunk)


def sorted_input(x: torch.Tensor, channel_wise: bool = False) -> torch.Tensor:
    """An input ``(M, C)`` sorted for :func:`self_sse` and ``grids.activation_grid``: the whole tensor as
    one row ``(1, M*C)``, or each channel ``(C, M)``."""
    return sort_rows(x.T if channel_wise else x.reshape(1, -1))


def direct_self_sse(
    x: torch.Tensor, scales: torch.Tensor, zps: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Own squared error ``sum (fake_quant(x) - x)^2`` of each group (row of ``x``, (G, n)) under each
    candidate (grids (G, P)), (P, G) float64; differences and squares in ``dtype``."""
    out = []
    step = max(1, 2**24 // max(1, x.numel()))  # candidates per pass: bounds the temporaries
    for s, e in candidate_chunks(scales.shape[1], step):
        x_hat = fq(x.unsqueeze(1), scales[:, s:e, None], zps[:, s:e, None], bits)  # (G, p, n)
        err = x_hat.to(dtype).sub_(x.unsqueeze(1))
        out.append(err.pow_(2).sum(dim=-1, dtype=torch.float64).T)
    return torch.cat(out, 0)


def self_sse(
    x: torch.Tensor,
    scales: torch.Tensor,
    zps: torch.Tensor,
    bits: int,
    what: str = "",
    sorted_x: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index (G,) of the candidate (grids (G, P)) minimising each group's own squared error; ``x`` is
    (G, n), one group per row.

    Fast pass: a direct float32 pass for short rows (weights), else one sort (``sorted_x``: the rows
    already sorted) and float64 prefix sums (:class:`fimaq.quant.sorted_sse.SortedValues`, within
    1e-9 of the float64 direct error). Near-ties are re-scored directly in float64.
    """
    if x.shape[1] <= 16 * 2**bits:
        values = direct_self_sse(x, scales, zps, bits, torch.float32)
    else:
        values = SortedValues(x) if sorted_x is None else SortedValues(sorted_x, presorted=True)
        values = values.sse(scales, zps, bits).T

    def rescore(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return direct_self_sse(x[g], scales[g][:, c], zps[g][:, c], bits, torch.float64)

    return choose(values, rescore, tie_rtol(bits), scales.T, zps.T, what)


class WeightOutputError:
    """Layer-output squared error ``||x W_hat^T + b - y||^2`` of weight candidates, per output row.

    Each output row depends only on its weight row, so with ``d = w_hat - w`` and ``r = x w + b - y``
    the error is ``d^T G d + 2 d^T x^T r + ||r||^2`` with ``G = x^T x``: one Gram matrix instead of
    one matmul per candidate. ``x^T r = G w^T + x^T 1 b^T - x^T y`` and ``||r||^2`` follow from ``G``
    and ``x^T y``, all float64. The fast pass takes float32 products (within ``GRAM_RTOL`` / 40 of the
    float64 errors).

    Args:
        w: weight (rows, in); ``bias`` (rows,).
        x: the layer input as the search sees it (already quantized where it is), (M, in).
        y: the FP output (M, rows).
    """

    def __init__(self, w: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        xd, wd, bd, yd = x.double(), w.double(), bias.double(), y.double()
        self.w = w
        self.gram = xd.T @ xd
        xty = xd.T @ yd  # (in, rows)
        colsum = xd.sum(dim=0)
        gw = self.gram @ wd.T  # (in, rows)
        self.cross = (gw + colsum.view(-1, 1) * bd.view(1, -1) - xty).T  # x^T r, (rows, in)
        self.const = (  # ||r||^2 per row
            (wd.T * gw).sum(0)
            + 2 * bd * (wd @ colsum)
            - 2 * (wd.T * xty).sum(0)
            + x.shape[0] * bd * bd
            - 2 * bd * yd.sum(0)
            + yd.pow(2).sum(0)
        )
        self.gram32, self.cross32 = self.gram.float(), self.cross.float()

    def fast(self, scales: torch.Tensor, zps: torch.Tensor, bits: int, chunk: int) -> torch.Tensor:
        """Float32-product errors of every candidate, (P, rows) float64; grids (P, rows, 1)."""
        out = []
        for s, e in candidate_chunks(scales.shape[0], chunk):
            d = fq(self.w.unsqueeze(0), scales[s:e], zps[s:e], bits).sub_(self.w)
            quad = (d @ self.gram32).mul_(d).sum(-1, dtype=torch.float64)
            out.append(quad + 2 * (d * self.cross32).sum(-1, dtype=torch.float64) + self.const)
        return torch.cat(out, 0)

    def exact(
        self, scales: torch.Tensor, zps: torch.Tensor, bits: int, cands: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """Float64 errors of candidates ``cands`` on rows ``rows``, (len(cands), len(rows))."""
        w = self.w[rows]
        d = fq(w.unsqueeze(0), scales[cands][:, rows], zps[cands][:, rows], bits).double() - w.double()
        return ((d @ self.gram) * d).sum(-1) + 2 * (d * self.cross[rows]).sum(-1) + self.const[rows]

    def best(
        self, scales: torch.Tensor, zps: torch.Tensor, bits: int, chunk: int, what: str = ""
    ) -> torch.Tensor:
        """Index (rows,) of each row's best candidate under the tie rule."""
        values = self.fast(scales, zps, bits, chunk)
        rescore = lambda c, g: self.exact(scales, zps, bits, c, g)  # noqa: E731
        return choose(values, rescore, GRAM_RTOL, scales[..., 0], zps[..., 0], what)


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
    what: str = "",
) -> int:
    """Index of the per-tensor input candidate (grids (P,)) minimising ``||x_hat W_hat^T + b - y||^2``.

    The rows of ``x`` (M, in) are taken in chunks with exact pruning (:func:`pruned_totals`). Where the
    layer has fewer inputs than outputs the error is ``<D G, D> + 2 <D, R W> + ||R||^2`` with ``D =
    x_hat - x``, ``R = x W_hat^T + b - y`` and ``G = W_hat^T W_hat`` (float32 per token, float64 over
    tokens); else the product itself. Near-ties are re-scored in float64 over all rows.
    """
    num_chunks = -(-x.shape[0] // rows_per_chunk)
    target = y - bias
    gram = (w_hat.T @ w_hat) if w_hat.shape[1] < w_hat.shape[0] else None
    residuals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per chunk: (R W, ||R||^2)

    def evaluate(cands: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = slice(k * rows_per_chunk, (k + 1) * rows_per_chunk)
        xs, ts = x[rows], target[rows]
        out = []
        if dtype == torch.float64:  # the product in float64 (near-ties only)
            wd, td = w_hat.double(), ts.double()
            for c in cands.tolist():
                x_hat = fq(xs, scales[c], zps[c], bits).double()
                out.append((x_hat @ wd.T).sub_(td).pow_(2).sum().view(1, 1))
            return torch.cat(out, 0)
        if gram is not None and k not in residuals:
            resid = xs @ w_hat.T - ts
            residuals[k] = (resid @ w_hat, resid.pow(2).sum(dtype=torch.float64))
        for s, e in candidate_chunks(cands.numel(), chunk):
            c = cands[s:e]
            x_hat = fq(xs.unsqueeze(0), scales[c].view(-1, 1, 1), zps[c].view(-1, 1, 1), bits)
            if gram is not None:  # <D, D G + 2 R W>
                proj, const = residuals[k]
                d = x_hat.sub_(xs)
                terms = (d.view(-1, d.shape[-1]) @ gram).view_as(d).add_(proj, alpha=2).mul_(d)
                out.append((terms.sum(dim=-1).sum(dim=-1, dtype=torch.float64) + const).unsqueeze(-1))
            else:
                err = (x_hat.view(-1, x_hat.shape[-1]) @ w_hat.T).view(e - s, -1, w_hat.shape[0]).sub_(ts)
                out.append(err.pow_(2).sum(dim=(1, 2), dtype=torch.float64).unsqueeze(-1))
        return torch.cat(out, 0)

    def rescore(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return sum(evaluate(c, k, torch.float64) for k in range(num_chunks))

    rtol = tie_rtol(bits)
    totals = pruned_totals(evaluate, scales.shape[0], num_chunks, keep_rtol=rtol)
    return int(choose(totals, rescore, rtol, scales.view(-1, 1), zps.view(-1, 1), what)[0])
