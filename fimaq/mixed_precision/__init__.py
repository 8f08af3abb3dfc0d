"""LampQ mixed precision: Fisher-trace sensitivity, ILP bit allocation, iterative updates, bit plans."""

from fimaq.mixed_precision.ilp import smallest_budget, solve_allocation
from fimaq.mixed_precision.plan import BitPlan, plot_plan
from fimaq.mixed_precision.search import search_bit_plan
from fimaq.mixed_precision.sensitivity import fisher_traces, quantization_errors, type_normalise

__all__ = [
    "BitPlan",
    "fisher_traces",
    "plot_plan",
    "quantization_errors",
    "search_bit_plan",
    "smallest_budget",
    "solve_allocation",
    "type_normalise",
]
