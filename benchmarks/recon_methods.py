"""Reconstruction losses on the embedded default (digits DeiT): calibration only vs mse vs fisher_diag
vs fisher_dplr, several seeds each, top-1 on the 450 validation digits and wall time.

Calibration is deterministic, so it runs once per bit-width; every reconstruction starts from it.
Results are appended to a JSON file as they come (a long run can be stopped and resumed).
``--attn-probs log2 adalog`` measures the grids of the attention probabilities (``quant.attn_probs``).
Run: python benchmarks/recon_methods.py [--bits 3 4] [--iters 200] [--seeds 0 1 2] [--threads 2]
[--attn-probs uniform log2 adalog]
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
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    parser.add_argument("--methods", nargs="+", default=["mse", "fisher_diag", "fisher_dplr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--attn-probs", nargs="+", default=["uniform"], choices=["uniform", "log2", "adalog"])
    parser.add_argument("--out", default="lightning_logs/bench_recon_methods.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    results = load_results(args.out)
    data = digits_sets()
    calib, _ = data["calib"]
    recon_images, _ = data["recon"]
    xv, yv = data["val"]
    fp = embedded_fp()
    for bits, probs in ((b, p) for b in args.bits for p in args.attn_probs):
        tag = f"W{bits}" if probs == "uniform" else f"W{bits}+{probs}"
        spec = QuantSpec(w_bits=bits, a_bits=bits, attn_probs=probs)
        calibrated = quantize_model(copy.deepcopy(fp), spec)
        t0 = time.perf_counter()
        calibrate_model(calibrated, calib, CalibConfig(), progress=False)
        results[f"{tag}/calibration"] = [
            {"top1": top1(calibrated, xv, yv), "seconds": time.perf_counter() - t0}
        ]
        print(f"{tag}/calibration: top-1 {results[f'{tag}/calibration'][0]['top1']:.2f}%", flush=True)
        for method in args.methods:
            key = f"{tag}/{method}"
            done = {r["seed"] for r in results.get(key, [])}
            for seed in args.seeds:
                if seed in done:
                    continue
                model = copy.deepcopy(calibrated)
                cfg = ReconConfig(iters=args.iters, loss=method, seed=seed)
                report = reconstruct_model(
                    model, recon_images, cfg, FisherConfig(num_samples=args.fisher_samples), progress=False
                )
                row = {"seed": seed, "top1": top1(model, xv, yv), "seconds": report.total_seconds}
                results.setdefault(key, []).append(row)
                save_results(args.out, results)
                print(f"{key} seed {seed}: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s", flush=True)
    print(f"\n{machine_line()}, iters: {args.iters}, Fisher samples: {args.fisher_samples}")
    print("| bits | method | top-1 (%) mean ± std | runs | seconds per run |\n|---|---|---|---|---|")
    for key, rows in results.items():
        tag, method = key.split("/")
        bits, _, probs = tag.partition("+")
        method = f"{method} ({probs} attention probabilities)" if probs else method
        accs = [r["top1"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["seconds"] for r in rows)
        mean = statistics.mean(accs)
        print(f"| {bits}/A{bits[1:]} | {method} | {mean:.2f} ± {std:.2f} | {len(rows)} | {secs:.0f} |")


if __name__ == "__main__":
    main()
