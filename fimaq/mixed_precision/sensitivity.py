"""Layer sensitivity: the Fisher trace ``tr(F_i) = E ||grad_{W_i} loss||^2`` and its type-aware
normalisation ``Omega_i = alpha_t tr(F_i)`` (docs/algorithm.md, section 5)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode


def kl_to_targets(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(targets || softmax(logits / T))`` summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits.float() / temperature, -1), targets, reduction="batchmean")


def fisher_traces(
    net: nn.Module,
    layers: dict[str, nn.Module],
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    micro_batch: int = 1,
    temperature: float = 1.0,
) -> dict[str, float]:
    """``E ||dL/dW_i||^2`` over micro-batches of ``images`` for every layer's ``weight``.

    The loss is the KL to the soft ``targets`` (FP predictions), or cross-entropy to ``labels``.
    Quantizers run with straight-through rounding (so gradients reach quantized weights) and are
    restored afterwards; the model's parameters get no ``.grad``.

    Args:
        net: the model (FP or quantized).
        layers: name -> layer with a ``weight``.
        images: inputs ``(n, C, H, W)``.
        targets: ``softmax(logits_FP / T)`` per image.
        labels: class indices per image (used when ``targets`` is None).
        micro_batch: images per gradient (1 = per-sample Fisher).
        temperature: T of the KL.
    """
    if (targets is None) == (labels is None):
        raise FimaqError("fisher_traces needs exactly one of targets (soft predictions) or labels")
    device = next(net.parameters()).device
    weights = [m.weight for m in layers.values()]
    grads_on = [p.requires_grad for p in weights]
    was_training = net.training
    net.eval()
    totals = torch.zeros(len(weights), dtype=torch.float64)
    mode = set_quant_mode(net, train=True)  # straight-through gradients reach the weights
    try:
        for p in weights:
            p.requires_grad_(True)
        n = images.shape[0]
        count = 0
        for start in range(0, n, micro_batch):
            x = images[start : start + micro_batch].to(device)
            with torch.enable_grad():
                logits = net(x)
                if targets is not None:
                    loss = kl_to_targets(logits, targets[start : start + micro_batch].to(device), temperature)
                else:
                    loss = F.cross_entropy(logits.float(), labels[start : start + micro_batch].to(device))
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for j, g in enumerate(grads):
                if g is not None:
                    totals[j] += g.double().pow(2).sum().item()
            count += 1
    finally:
        mode.restore()
        for p, g in zip(weights, grads_on, strict=True):
            p.requires_grad_(g)
        net.train(was_training)
    traces = {name: float(t) / count for name, t in zip(layers, totals, strict=True)}
    bad = [k for k, v in traces.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise FimaqError(f"the Fisher trace of {bad[0]} is NaN/Inf")
    return traces


def type_normalise(traces: dict[str, float], types: dict[str, str], mode: str = "type") -> dict[str, float]:
    """``Omega_i = alpha_t tr(F_i)`` with ``alpha_t = 1 / mean_{j in t} tr(F_j)`` (mode ``type``: every
    type then has mean 1), or ``alpha_t = 1`` (mode ``none``)."""
    if mode == "none":
        return dict(traces)
    if mode != "type":
        raise FimaqError(f"normalisation must be 'type' or 'none', got {mode!r}")
    groups: dict[str, list[float]] = {}
    for name, tr in traces.items():
        groups.setdefault(types[name], []).append(tr)
    means = {t: sum(v) / len(v) for t, v in groups.items()}
    return {name: tr / means[types[name]] if means[types[name]] > 0 else 0.0 for name, tr in traces.items()}


def quantization_errors(weight: torch.Tensor, bits: Sequence[int], eq_n: int = 128) -> list[float]:
    """``||Q_b(W) - W||^2`` per candidate bit-width, with the per-row MSE-optimal grid of calibration."""
    from fimaq.quant import grids, search

    w = weight.detach().reshape(weight.shape[0], -1).float()
    found = {}
    for b in sorted(set(bits)):
        scales, zps = grids.weight_grid(w, b, eq_n)
        s_g, z_g = scales[..., 0].T, zps[..., 0].T  # (rows, P)
        idx = search.self_sse(w, s_g, z_g, b).view(-1, 1)
        err = float(search.direct_self_sse(w, s_g.gather(1, idx), z_g.gather(1, idx), b, torch.float64).sum())
        # a (b+1)-bit grid holds every b-bit grid of the same scale: never report a larger error
        found[b] = min([err, *found.values()])
    return [found[b] for b in bits]
