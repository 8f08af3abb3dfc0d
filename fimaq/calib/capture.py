"""Context-managed capture of layer inputs and outputs during FP forward passes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Captured:
    """Inputs (one tensor per positional argument) and output of one layer, batches concatenated."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    output: torch.Tensor | None = None


def _keep(t: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """A captured tensor, on ``device`` and in float32 when autocast made it bf16/fp16."""
    dtype = torch.float32 if t.dtype in (torch.bfloat16, torch.float16) else t.dtype
    return t.detach().to(device=device or t.device, dtype=dtype)


@contextmanager
def capture_io(
    modules: dict[str, nn.Module], device: torch.device | None = None
) -> Iterator[dict[str, Captured]]:
    """Record every forward call's inputs and output of ``modules`` while the block runs.

    Args:
        modules: name -> module to watch.
        device: where to keep the captured tensors (default: where they were produced).
    """
    parts: dict[str, tuple[list[list[torch.Tensor]], list[torch.Tensor]]] = {
        name: ([], []) for name in modules
    }
    hooks = []
    for name, mod in modules.items():

        def hook(_m, args, out, name=name):
            ins, outs = parts[name]
            ins.append([_keep(a, device) for a in args if isinstance(a, torch.Tensor)])
            outs.append(_keep(out, device))

        hooks.append(mod.register_forward_hook(hook))
    result: dict[str, Captured] = {name: Captured() for name in modules}
    try:
        yield result
    finally:
        for h in hooks:
            h.remove()
        for name, (ins, outs) in parts.items():
            if outs:
                result[name].inputs = [torch.cat(list(group), 0) for group in zip(*ins, strict=True)]
                result[name].output = torch.cat(outs, 0)


def run_batches(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Forward ``images`` through ``model`` in batches under ``no_grad`` (outputs discarded)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            model(images[start : start + batch_size].to(device))
