"""Exact quantization error of many (scale, zero point) candidates from one sort.

A uniform quantizer maps every value in ``[t_{j-1}, t_j)`` to the same level, with thresholds
``t_j = (j - zp + 0.5) * s``. After sorting the values once and taking prefix sums of ``x`` and
``x^2`` (float64), the squared error of a candidate is a sum over its ``2^b`` segments of
``S2 - 2 v S1 + n v^2``: ``O(2^b log n)`` per candidate instead of a pass over all values.
"""

from __future__ import annotations

import numpy as np
import torch


def sort_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` (groups, n) sorted ascending (NumPy's vectorised sort for CPU float32, several
    times faster than ``torch.sort`` there; the sorted values are the same)."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.sort(x.detach().contiguous().numpy(), axis=-1))
    return torch.sort(x, dim=-1).values


class SortedValues:
    """Rows of values sorted once, with float64 prefix sums.

    Args:
        x: ``(groups, n)``: each row is quantized on its own (a weight row, a channel, or the whole
            tensor as a single row).
        presorted: ``x`` is already sorted along its rows (e.g. by :func:`sort_rows`).
    """

    def __init__(self, x: torch.Tensor, presorted: bool = False) -> None:
        vals = (x if presorted else sort_rows(x)).double()
        zero = torch.zeros(vals.shape[0], 1, dtype=torch.float64, device=vals.device)
        self.sorted = vals.contiguous()
        self.s1 = torch.cat([zero, vals.cumsum(-1)], dim=-1)
        self.s2 = torch.cat([zero, (vals * vals).cumsum(-1)], dim=-1)
        self.n = vals.shape[-1]

    def sse(self, scales: torch.Tensor, zps: torch.Tensor, bits: int) -> torch.Tensor:
        """Squared error per (group, candidate) for grids of shape ``(groups, P)``.

        With level values ``v_k = (k - z) s`` and ``pos_i`` the number of values below threshold
        ``t_i`` (i < 2^b - 1), summing by parts over the segments gives
        ``sum (x - v_max)^2 + 2 s sum_i S1[pos_i] - s^2 sum_i pos_i (2 i + 1 - 2 z)``: one prefix-sum
        lookup per threshold. Groups are taken a few at a time so the temporaries stay in cache.
        """
        qmax = 2**bits - 1
        g, p = scales.shape
        out = torch.empty(g, p, dtype=torch.float64, device=scales.device)
        i = torch.arange(qmax, dtype=torch.float64, device=scales.device)
        step = max(1, _LOOKUPS_PER_STEP // (p * qmax))
        for g0 in range(0, g, step):
            rows = slice(g0, min(g, g0 + step))
            s = scales[rows].double().unsqueeze(-1)  # (g, P, 1)
            z = zps[rows].double().unsqueeze(-1)
            m = s.shape[0]
            pos = torch.searchsorted(self.sorted[rows], ((i - z + 0.5) * s).reshape(m, -1), side="left")
            lookup = self.s1[rows].gather(-1, pos).view(m, p, qmax).sum(-1)
            pos = pos.view(m, p, qmax).double()
            weighted = (pos * i).sum(-1)
            count = pos.sum(-1)
            s, z = s[..., 0], z[..., 0]
            v_max = (qmax - z) * s
            top = self.s2[rows, -1:] - 2 * v_max * self.s1[rows, -1:] + self.n * v_max * v_max
            out[rows] = top + 2 * s * lookup - s * s * (2 * weighted + (1 - 2 * z) * count)
        return out


_LOOKUPS_PER_STEP = 2**18
