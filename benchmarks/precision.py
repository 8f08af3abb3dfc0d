"""float32 vs bf16 autocast on the embedded default (digits DeiT): top-1 after calibration and after
reconstruction, and wall time of each stage (CPU here; pass --device cuda on a GPU, where 16-mixed
also works).

Run: python benchmarks/precision.py [--bits 3] [--iters 200] [--precisions 32-true bf16-mixed]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from _digits import digits_sets, embedded_fp
from _machine import machine_line

from fimaq.amp import autocast
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model


def top1(model, x, y, precision: str, device) -> float:
    with torch.no_grad(), autocast(precision, device):
        return 100.0 * (model(x.to(device)).argmax(-1).cpu() == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    sets = digits_sets()
    (xc, _), (xr, _), (xv, yv) = sets["calib"], sets["recon"], sets["val"]
    rows = []
    for precision in args.precisions:
        net = quantize_model(embedded_fp(), QuantSpec(w_bits=args.bits, a_bits=args.bits)).to(device)
        t0 = time.perf_counter()
        calibrate_model(net, xc.to(device), CalibConfig(), progress=False, precision=precision)
        t_cal = time.perf_counter() - t0
        cal = top1(net, xv, yv, precision, device)
        t0 = time.perf_counter()
        reconstruct_model(
            net,
            xr.to(device),
            ReconConfig(iters=args.iters),
            FisherConfig(num_samples=256),
            precision=precision,
            progress=False,
        )
        t_rec = time.perf_counter() - t0
        rec = top1(net, xv, yv, precision, device)
        rows.append((precision, cal, rec, t_cal, t_rec))
        print(f"{precision}: calibrated {cal:.2f}  reconstructed {rec:.2f}  ({t_cal:.1f} s + {t_rec:.1f} s)")
    bits = f"W{args.bits}/A{args.bits}"
    print(f"\n{machine_line()}")
    print(f"\n| precision | {bits} calibrated | reconstructed | calibration s | reconstruction s |")
    print("|---|---|---|---|---|")
    for p, cal, rec, tc, tr in rows:
        print(f"| {p} | {cal:.2f} | {rec:.2f} | {tc:.1f} | {tr:.1f} |")


if __name__ == "__main__":
    main()
