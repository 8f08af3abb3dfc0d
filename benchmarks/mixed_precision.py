"""LampQ on the embedded default (digits DeiT): uniform W3/A3 vs mixed-precision weights at the same
average weight bits (activations at 3 bits everywhere), calibration only and with FIMA-Q
reconstruction, plus two ablations: no type-aware normalisation, and one allocation round instead
of three. Top-1 on the 450 validation digits.

Run: python benchmarks/mixed_precision.py [--budget 3.0] [--iters 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from _digits import ARCH, KWARGS, digits_sets, embedded_fp, top1
from _machine import machine_line

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, MixedPrecisionConfig, QuantSpec, ReconConfig
from fimaq.files import atomic_write_bytes
from fimaq.mixed_precision import search_bit_plan
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--a-bits", type=int, default=3)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lightning_logs/bench_mixed_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    data = digits_sets()
    calib, _ = data["calib"]
    recon_images, _ = data["recon"]
    xv, yv = data["val"]
    make_fp = embedded_fp

    base_bits = int(args.budget)
    spec = QuantSpec(w_bits=base_bits, a_bits=args.a_bits)
    calib_cfg = CalibConfig()
    variants = {
        f"uniform W{base_bits}": None,
        "LampQ (type-aware, 3 rounds)": MixedPrecisionConfig(budget=args.budget, rounds=3),
        "LampQ, no type normalisation": MixedPrecisionConfig(budget=args.budget, rounds=3, normalise="none"),
        "LampQ, 1 round": MixedPrecisionConfig(budget=args.budget, rounds=1),
    }
    rows = []
    for name, mp in variants.items():
        t0 = time.perf_counter()
        overrides, avg = {}, float(base_bits)
        if mp is not None:
            plan = search_bit_plan(make_fp, spec, calib, mp, calib_cfg, ARCH, KWARGS, progress=False)
            overrides, avg = plan.overrides(), plan.average_w_bits
        search_s = time.perf_counter() - t0
        net = quantize_model(make_fp(), QuantSpec(spec.w_bits, spec.a_bits, overrides=overrides))
        calibrate_model(net, calib, calib_cfg, progress=False)
        calibrated = top1(net, xv, yv)
        recon = copy.deepcopy(net)
        reconstruct_model(
            recon, recon_images, ReconConfig(iters=args.iters), FisherConfig(num_samples=256), progress=False
        )
        row = {
            "variant": name,
            "average_w_bits": avg,
            "calibrated_top1": calibrated,
            "reconstructed_top1": top1(recon, xv, yv),
            "search_seconds": search_s,
            "w_bits": {k: v["w_bits"] for k, v in overrides.items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(rows, indent=1)
        atomic_write_bytes(Path(args.out), lambda tmp, text=text: Path(tmp).write_text(text))
    print(f"\n{machine_line()}; A{args.a_bits}; reconstruction {args.iters} steps per unit")
    print("| weights | average weight bits | calibrated top-1 | reconstructed top-1 | allocation seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['average_w_bits']:.3f} | {r['calibrated_top1']:.2f} | "
            f"{r['reconstructed_top1']:.2f} | {r['search_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
