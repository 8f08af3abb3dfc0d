"""Calibration time of a random-weight timm model at full size, on the CPU or a GPU.

Default: DeiT-S at 224 px, W3/A3, 128 random images (no checkpoint, no data needed: the time of the
searches does not depend on what the weights learned). Prints the machine, the seconds per unit kind
and in all, and the peak GPU memory. The searches run with TF32 off (full float32 products).
Run: python benchmarks/calibration_speed.py [--arch deit_small_patch16_224] [--bits 3]
     [--device cuda] [--images 128] [--threads 2] [--depth N (fewer blocks, for a quick look)]
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import machine_line

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="deit_small_patch16_224")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--depth", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kwargs = {} if args.depth is None else {"depth": args.depth}
    torch.manual_seed(0)
    model = quantize_model(create_fp_model(args.arch, model_kwargs=kwargs), QuantSpec(args.bits, args.bits))
    model.to(device)
    size = model.patch_embed.img_size
    images = torch.randn(args.images, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = calibrate_model(model, images, CalibConfig(num_images=args.images), progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    kinds: dict[str, float] = {}
    for name, seconds in report.layer_seconds.items():
        kind = name.rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0.0) + seconds
    print(f"{machine_line()}; device {device}")
    print(f"{args.arch} {kwargs or ''} W{args.bits}/A{args.bits}, {args.images} images of {tuple(size)}")
    print("| part | seconds |\n|---|---|")
    print(f"| captures | {report.capture_seconds:.1f} |")
    for kind, seconds in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {seconds:.1f} |")
    print(f"| total | {total:.1f} |")
    if device.type == "cuda":
        print(f"| peak GPU memory | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
