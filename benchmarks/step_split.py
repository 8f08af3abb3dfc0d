"""Where a reconstruction step's extra time goes: one block of the embedded default, forward+backward
with a squared-output loss (no reconstruction loss, regulariser, optimizer or Lightning loop), as a
plain float block with fused attention, with the explicit attention matmuls that quantized attention
needs, and quantized in training mode (STE scales, AdaRound weights) without and with QDrop.

Best of three runs of ``--repeats`` steps each, batch 32, W4/A4 min-max qparams (speed does not
depend on them).
Run: python benchmarks/step_split.py [--threads 1] [--unit blocks.0]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from _machine import machine_line

import fimaq  # noqa: F401
from fimaq.artifacts import resolve_checkpoint
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import QuantSpec
from fimaq.layers.mode import set_quant_mode
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.quant.adaround import attach_adaround
from fimaq.recon import recon_units
from fimaq.recon.batches import BatchMasks
from fimaq.recon.cache import capture_unit

KWARGS = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}


def best_ms(step, repeats: int) -> float:
    """The fastest of three timed runs of ``repeats`` steps, per step, after three warm-up steps."""
    for _ in range(3):
        step()
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            step()
        runs.append((time.perf_counter() - t0) / repeats * 1e3)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unit", default="blocks.0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    ckpt = resolve_checkpoint("embedded:digits_deit_tiny")
    net = quantize_model(
        create_fp_model("deit_tiny_patch16_224", ckpt, model_kwargs=KWARGS), QuantSpec(w_bits=4, a_bits=4)
    )
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    minmax_calibrate(net, images)
    unit = next(u for u in recon_units(net) if u.name == args.unit)
    set_quant_mode(net, enabled=False)
    x, _ = capture_unit(net, unit, images[:32], 32, False, torch.device("cpu"), torch.float32)
    learned: list[torch.nn.Parameter] = []

    def step() -> None:
        unit.module(x).pow(2).mean().backward()
        for p in learned:
            p.grad = None

    learned = list(unit.module.parameters())
    for p in learned:
        p.requires_grad_(True)
    fused = best_ms(step, args.repeats)
    set_quant_mode(net, enabled=False, explicit_matmuls=True)
    explicit = best_ms(step, args.repeats)
    for p in learned:
        p.requires_grad_(False)
    for layer in unit.weight_layers():
        attach_adaround(layer)
    learned = [p for p in unit.module.parameters() if p.requires_grad]  # alphas and activation scales
    masks = BatchMasks(torch.Generator().manual_seed(0))
    set_quant_mode(net, only=[unit.module], train=True, qdrop=None, masks=masks)
    no_qdrop = best_ms(step, args.repeats)
    set_quant_mode(net, only=[unit.module], train=True, qdrop=0.5, masks=masks)
    qdrop = best_ms(step, args.repeats)
    print(machine_line())
    print(f"embedded digits DeiT, {args.unit}, batch 32, forward+backward of a squared-output loss")
    print("| block | ms |\n|---|---|")
    print(f"| plain, fused attention | {fused:.1f} |")
    print(f"| plain, explicit attention matmuls | {explicit:.1f} |")
    print(f"| quantized training mode, no QDrop | {no_qdrop:.1f} |")
    print(f"| quantized training mode, QDrop 0.5 | {qdrop:.1f} |")


if __name__ == "__main__":
    main()
