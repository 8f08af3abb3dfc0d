"""Bit allocation as an integer linear program (``scipy.optimize.milp``, HiGHS).

Binary ``x[i, k]`` = layer i takes candidate bit-width ``bits[k]``; one bit-width per layer;
``sum x[i, k] * bits[k] * size[i] <= budget * sum size``; minimise ``sum x[i, k] * cost[i, k]``.
Disallowed (layer, bit-width) pairs (per-layer min/max bits) are fixed to 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fimaq.errors import FimaqError


def smallest_budget(sizes: Sequence[int], bits: Sequence[int], allowed: np.ndarray) -> float:
    """The lowest average bit-width any allocation reaches (every layer at its smallest allowed bits)."""
    sizes_a = np.asarray(sizes, dtype=float)
    low = np.array([min(b for b, ok in zip(bits, row, strict=True) if ok) for row in allowed], dtype=float)
    return float((low * sizes_a).sum() / sizes_a.sum())


def check_budget(budget: float, sizes: Sequence[int], bits: Sequence[int], allowed: np.ndarray) -> None:
    """Refuse a budget below :func:`smallest_budget`, naming the smallest feasible one."""
    floor = smallest_budget(sizes, bits, allowed)
    if budget < floor - 1e-9:
        raise FimaqError(
            f"budget {budget:g} average weight bits cannot be met: "
            f"the smallest feasible budget is {floor:.4g}"
        )


def solve_allocation(
    cost: np.ndarray,
    sizes: Sequence[int],
    bits: Sequence[int],
    budget: float,
    allowed: np.ndarray | None = None,
) -> list[int]:
    """The bit-width per layer minimising the total cost under the average-bits budget.

    Args:
        cost: ``(layers, len(bits))`` cost of each layer at each candidate bit-width.
        sizes: number of weights per layer.
        bits: candidate bit-widths.
        budget: the largest allowed size-weighted average bit-width.
        allowed: ``(layers, len(bits))`` boolean mask of permitted choices (default: all).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    cost = np.asarray(cost, dtype=float)
    n, k = cost.shape
    if k != len(bits) or len(sizes) != n:
        raise FimaqError(f"cost table {cost.shape} does not match {n} layers x {len(bits)} bit-widths")
    allowed = np.ones((n, k), dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    if not allowed.any(axis=1).all():
        bad = int(np.flatnonzero(~allowed.any(axis=1))[0])
        raise FimaqError(f"layer {bad} has no allowed bit-width")
    if not np.isfinite(cost[allowed]).all():
        raise FimaqError("the bit-allocation costs contain NaN or Inf")
    check_budget(budget, sizes, bits, allowed)
    sizes_a = np.asarray(sizes, dtype=float)
    c = np.where(allowed, cost, 0.0).reshape(-1)
    c = c / max(float(np.abs(c).max()), 1e-300)  # O(1) coefficients: HiGHS gaps are absolute too
    one_each = np.kron(np.eye(n), np.ones((1, k)))
    weight_bits = (sizes_a[:, None] * np.asarray(bits, dtype=float)[None, :]).reshape(1, -1)
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(weight_bits, -np.inf, budget * sizes_a.sum() * (1 + 1e-12)),
    ]
    upper = allowed.reshape(-1).astype(float)
    res = milp(c, constraints=constraints, integrality=np.ones(n * k), bounds=Bounds(0, upper))
    if res.status != 0 or res.x is None:
        raise FimaqError(f"the bit-allocation ILP failed: {res.message}")
    choice = np.round(res.x).reshape(n, k).argmax(axis=1)
    return [int(bits[j]) for j in choice]
