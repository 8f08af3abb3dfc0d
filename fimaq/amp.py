"""Mixed precision: autocast for the forward passes, quantizer parameters and losses in float32.

``--trainer.precision bf16-mixed`` (CPU and GPU) or ``16-mixed`` (GPU) runs the forward passes of
calibration, caching, Fisher refreshes, reconstruction and validation under ``torch.autocast``.
Quantizers compute in float32 whatever their input's dtype, and the model's parameters stay
float32; ``*-true`` precisions, which would convert them, are refused.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from fimaq.errors import FimaqError

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
FULL = {"32-true", "32", "64-true", "64"}


def check_precision(precision: Any) -> str:
    """The precision as Lightning's string; FimaqError for one fimaq cannot run."""
    name = str(precision)
    if name in AUTOCAST or name in FULL:
        return name
    raise FimaqError(
        f"precision {name!r} is not supported: use 32-true, bf16-mixed (CPU/GPU) or 16-mixed (GPU); "
        "quantizer parameters stay float32"
    )


def autocast(precision: Any, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a ``*-mixed`` precision on ``device``; a no-op context otherwise."""
    name = check_precision(precision)
    device = torch.device(device)
    if name not in AUTOCAST:
        return contextlib.nullcontext()
    if name == "16-mixed" and device.type == "cpu":
        raise FimaqError("precision 16-mixed needs a GPU; on CPU use bf16-mixed")
    return torch.autocast(device.type, dtype=AUTOCAST[name])
