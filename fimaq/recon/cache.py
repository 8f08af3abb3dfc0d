"""Per-unit caches: FP input and output (all units FP) and quantized input (earlier units quantized)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from fimaq.errors import FimaqError
from fimaq.recon.units import StopForward, Unit, first_tensor, unit_hook

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class UnitCache:
    """Tensors of one unit over the reconstruction images, in image order."""

    x_fp: torch.Tensor
    y_fp: torch.Tensor
    x_q: torch.Tensor


def _model_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def soft_targets(net: nn.Module, images: torch.Tensor, temperature: float, batch_size: int) -> torch.Tensor:
    """``softmax(logits / T)`` of the model as it is now (the caller switches it to FP), per image."""
    device = _model_device(net)
    out = []
    for start in range(0, images.shape[0], batch_size):
        logits = net(images[start : start + batch_size].to(device)).float()
        out.append(F.softmax(logits / temperature, dim=-1))
    return torch.cat(out)


@torch.no_grad()
def capture_unit(
    net: nn.Module,
    unit: Unit,
    images: torch.Tensor,
    batch_size: int,
    want_output: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``net`` on ``images`` up to ``unit``; return its input (and output), stored on device/dtype.

    The forward pass stops right after the unit (later units never run). The cache size is logged
    when the first batch has shown the shapes, before the rest is filled.
    """
    model_device = _model_device(net)
    probe: dict[str, torch.Tensor] = {}

    def hook(_m, args, out):
        probe["x"], probe["y"] = first_tensor(args), out
        raise StopForward

    n = images.shape[0]
    x_all = y_all = None
    with unit_hook(unit.module, hook):
        for start in range(0, n, batch_size):
            batch = images[start : start + batch_size].to(model_device)
            try:
                net(batch)
            except StopForward:
                pass
            if "x" not in probe:
                raise FimaqError(f"unit {unit.name} did not run in the model's forward pass")
            x, y = probe.pop("x"), probe.pop("y")
            if x_all is None:
                shapes = [(n, *x.shape[1:])] + ([(n, *y.shape[1:])] if want_output else [])
                if rank_zero_only.rank == 0:
                    log.info(describe_cache(unit, shapes, dtype, device))
                # in host memory for a GPU model: page-locked, so that a step's rows copy without waiting
                pin = torch.device(device).type == "cpu" and model_device.type == "cuda"
                store = {"device": device, "dtype": dtype, "pin_memory": pin}
                x_all = torch.empty(shapes[0], **store)
                y_all = torch.empty(shapes[1], **store) if want_output else None
            x_all[start : start + x.shape[0]] = x.to(device=device, dtype=dtype)
            if want_output:
                y_all[start : start + y.shape[0]] = y.to(device=device, dtype=dtype)
    return x_all, y_all


def describe_cache(
    unit: Unit, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> str:
    size = sum(math.prod(s) for s in shapes) * torch.empty((), dtype=dtype).element_size()
    kind = str(dtype).removeprefix("torch.")
    listed = ", ".join(str(tuple(sh)) for sh in shapes)
    return f"cache for {unit.name}: {listed} {kind} on {device}, {size / 2**20:.1f} MiB"
