"""A whole ``fit`` of the embedded default at W3/A3, timed stage by stage: calibration,
reconstruction and total seconds, the mean reconstruction step of the blocks against a plain float
forward+backward of a block (the step/plain ratio), the share of the reconstruction spent in Fisher
refreshes, the step of the patch-embedding and head units against their own plain forward+backward
(what remains is framework overhead), and the resulting top-1, with the CPU capability and thread
count. ``--compile``: with ``recon.compile``.

The defaults are the digits config's (200 steps per unit, 256 Fisher images); ``--iters`` and
``--fisher-samples`` give other schedules.
Run: python benchmarks/fit_speed.py [--iters 200] [--threads 2] [--bits 3] [--loss fisher_dplr]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from _digits import digits_sets, embedded_fp, top1
from _machine import machine_line
from recon_speed import plain_step_seconds

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.models.swap import quantize_model
from fimaq.recon import recon_units, reconstruct_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--loss", default="fisher_dplr")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="recon.compile: the whole step compiled")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sets = digits_sets()
    (xc, _), (xr, _), (xv, yv) = sets["calib"], sets["recon"], sets["val"]
    net = quantize_model(embedded_fp(), QuantSpec(w_bits=args.bits, a_bits=args.bits))
    t0 = time.perf_counter()
    calibrate_model(net, xc, CalibConfig(), progress=False)
    calibration = time.perf_counter() - t0
    calibrated = top1(net, xv, yv)
    units = recon_units(net)
    block = next(u for u in units if u.name == "blocks.0")
    plain = plain_step_seconds(net, block, xr, 32)
    ends = [units[0], units[-1]]  # the patch embedding and the head: tiny compute, so the overhead shows
    plain_ends = {u.name: plain_step_seconds(net, u, xr, 32) for u in ends}
    cfg = ReconConfig(iters=args.iters, loss=args.loss, compile=args.compile)
    t0 = time.perf_counter()
    report = reconstruct_model(net, xr, cfg, FisherConfig(num_samples=args.fisher_samples), progress=False)
    reconstruction = time.perf_counter() - t0
    blocks = [n for n in report.train_seconds if n.startswith("blocks.")]
    step = sum(report.step_seconds[n] for n in blocks) / len(blocks)
    refresh = report.fisher_seconds
    print(machine_line())
    print(
        f"embedded digits DeiT, W{args.bits}/A{args.bits}, {args.iters} steps per unit, loss {args.loss}, "
        f"compile {args.compile}"
    )
    print("| measure | value |\n|---|---|")
    print(f"| calibration | {calibration:.1f} s |")
    print(f"| reconstruction | {reconstruction:.1f} s |")
    print(f"| total | {calibration + reconstruction:.1f} s |")
    print(f"| plain FP forward+backward of a block, batch 32 | {plain * 1e3:.1f} ms |")
    print(f"| mean reconstruction step of a block (no refresh) | {step * 1e3:.1f} ms |")
    print(f"| step / plain | {step / plain:.2f} |")
    for u in ends:
        step_ms, plain_ms = report.step_seconds[u.name] * 1e3, plain_ends[u.name] * 1e3
        print(
            f"| {u.name} step / plain forward+backward / difference | {step_ms:.1f} / {plain_ms:.1f} / "
            f"{step_ms - plain_ms:.1f} ms |"
        )
    print(f"| Fisher refreshes | {refresh:.1f} s ({100 * refresh / reconstruction:.0f}% of reconstruction) |")
    print(f"| top-1 calibrated / reconstructed | {calibrated:.2f} / {top1(net, xv, yv):.2f} |")


if __name__ == "__main__":
    main()
