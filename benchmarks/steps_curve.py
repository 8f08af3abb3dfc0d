"""Accuracy against reconstruction steps per unit on the embedded default (digits DeiT, W3/A3 by
default, fisher_dplr): top-1 on the 450 validation digits for several step counts and seeds.

Calibration is deterministic, so it runs once; every reconstruction starts from it. Results are
appended to a JSON file as they come (a long run can be stopped and resumed).
Run: python benchmarks/steps_curve.py [--steps 25 50 100 200 400] [--seeds 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from _digits import digits_sets, embedded_fp, load_results, save_results, top1
from _machine import machine_line

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--loss", default="fisher_dplr")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lightning_logs/bench_steps_curve.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results = load_results(args.out)
    data = digits_sets()
    xv, yv = data["val"]
    calibrated = quantize_model(embedded_fp(), QuantSpec(w_bits=args.bits, a_bits=args.bits))
    calibrate_model(calibrated, data["calib"][0], CalibConfig(), progress=False)
    start_top1 = top1(calibrated, xv, yv)
    for steps in args.steps:
        key = f"W{args.bits}/{args.loss}/{steps}"
        done = {r["seed"] for r in results.get(key, [])}
        for seed in (s for s in args.seeds if s not in done):
            model = copy.deepcopy(calibrated)
            cfg = ReconConfig(iters=steps, loss=args.loss, seed=seed)
            t0 = time.perf_counter()
            report = reconstruct_model(
                model, data["recon"][0], cfg, FisherConfig(num_samples=args.fisher_samples), progress=False
            )
            row = {
                "seed": seed,
                "top1": top1(model, xv, yv),
                "seconds": time.perf_counter() - t0,
                "fisher_seconds": report.fisher_seconds,
            }
            results.setdefault(key, []).append(row)
            save_results(args.out, results)
            print(f"{key} seed {seed}: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s", flush=True)
    print(f"\n{machine_line()}; W{args.bits}/A{args.bits} {args.loss}, calibrated top-1 {start_top1:.2f}%")
    print("| steps per unit | top-1 (%) mean ± std | seeds | reconstruction s | Fisher refresh s |")
    print("|---|---|---|---|---|")
    for steps in sorted(int(k.split("/")[-1]) for k in results if k.startswith(f"W{args.bits}/{args.loss}/")):
        rows = results[f"W{args.bits}/{args.loss}/{steps}"]
        accs = [r["top1"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["seconds"] for r in rows)
        fisher = statistics.mean(r["fisher_seconds"] for r in rows)
        mean = statistics.mean(accs)
        print(f"| {steps} | {mean:.2f} ± {std:.2f} | {len(rows)} | {secs:.0f} | {fisher:.0f} |")


if __name__ == "__main__":
    main()
