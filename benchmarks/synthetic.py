"""Calibration without data on the embedded default: calibration and ``fisher_dplr`` reconstruction from
images synthesised by the float model (``--data.synthetic true``), against the same from real digits.

Prints the CPU capability and thread count, the synthesis seconds, and per setting top-1 on the 450
validation digits (calibration once, reconstruction per seed). The digits config's sizes: 128
calibration images (optimised from noise) and 1024 reconstruction images (the 128 and seeded shifted
copies, as the data modules make them).
Run: python benchmarks/synthetic.py [--bits 3] [--seeds 0 1 2] [--threads 1] [--sources synthetic real]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from _digits import digits_sets, embedded_fp, top1
from _machine import machine_line

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.data.synthetic import shifted_views, synthesize_images
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model

DIGITS_SEED = 3407  # the digits config's data seed (the synthetic images' seed in a run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--sources", nargs="+", default=["synthetic", "real"], choices=["synthetic", "real"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    data = digits_sets()
    xv, yv = data["val"]
    fp = embedded_fp()
    print(machine_line(), flush=True)
    rows = []
    for source in args.sources:
        if source == "real":
            calib, recon = data["calib"][0], data["recon"][0]
            made = 0.0
        else:
            t0 = time.perf_counter()
            images, labels = synthesize_images(copy.deepcopy(fp), calib_n := data["calib"][0].shape[0],
                                               seed=DIGITS_SEED, progress=False)  # fmt: skip
            made = time.perf_counter() - t0
            calib = images
            recon = shifted_views(images, labels, data["recon"][0].shape[0], DIGITS_SEED)[0]
            print(f"synthesised {calib_n} images in {made:.1f} s", flush=True)
        model = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=args.bits, a_bits=args.bits))
        t0 = time.perf_counter()
        calibrate_model(model, calib, CalibConfig(), progress=False)
        cal_seconds = time.perf_counter() - t0
        cal_top1 = top1(model, xv, yv)
        print(f"{source}: calibrated {cal_top1:.2f}% ({cal_seconds:.0f} s)", flush=True)
        fits = []
        for seed in args.seeds:
            m = copy.deepcopy(model)
            cfg = ReconConfig(iters=args.iters, loss="fisher_dplr", seed=seed)
            report = reconstruct_model(m, recon, cfg, FisherConfig(num_samples=256), progress=False)
            fits.append((top1(m, xv, yv), report.total_seconds))
            print(f"{source} seed {seed}: reconstructed {fits[-1][0]:.2f}% ({fits[-1][1]:.0f} s)", flush=True)
        rows.append((source, made, cal_top1, cal_seconds, fits))
    print(f"\n{machine_line()}, W{args.bits}/A{args.bits}, {args.iters} steps per unit, fisher_dplr")
    print("| images | synthesis s | calibrated | calibration s | fit top-1 mean ± std | fit s per run |")
    print("|---|---|---|---|---|---|")
    for source, made, cal, cal_s, fits in rows:
        accs = [a for a, _ in fits]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(s for _, s in fits) if fits else float("nan")
        print(
            f"| {source} | {made:.0f} | {cal:.2f} | {cal_s:.0f} | {statistics.mean(accs):.2f} ± {std:.2f} "
            f"| {secs:.0f} |"
        )


if __name__ == "__main__":
    main()
