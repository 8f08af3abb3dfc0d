"""Calibration on the embedded default (digits DeiT): FP vs naive min-max vs fimaq's search.

Prints a table: bits, method, top-1 on the 450 validation digits, total seconds, seconds per layer.
Run: python benchmarks/calibration.py [--bits 8 4 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from _digits import digits_sets, embedded_fp, top1
from _machine import machine_line

from fimaq.calib import calibrate_model
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import CalibConfig, QuantSpec
from fimaq.models.swap import iter_qlayers, quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = digits_sets()
    calib, _ = data["calib"]
    xv, yv = data["val"]
    fp = embedded_fp()
    rows = [("FP", "-", top1(fp, xv, yv), 0.0, 0.0)]
    for bits in args.bits:
        naive = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=bits, a_bits=bits))
        t0 = time.perf_counter()
        minmax_calibrate(naive, calib)
        dt = time.perf_counter() - t0
        n = len(list(iter_qlayers(naive)))
        rows.append((f"W{bits}/A{bits}", "min-max", top1(naive, xv, yv), dt, dt / n))
        model = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=bits, a_bits=bits))
        report = calibrate_model(model, calib, CalibConfig(), progress=False)
        rows.append(
            (f"W{bits}/A{bits}", "fimaq", top1(model, xv, yv), report.total_seconds, report.seconds_per_layer)
        )
    print(machine_line())
    print("| bits | calibration | top-1 (%) | seconds | s/layer |\n|---|---|---|---|---|")
    for bits, method, acc, secs, per in rows:
        print(f"| {bits} | {method} | {acc:.2f} | {secs:.1f} | {per:.2f} |")


if __name__ == "__main__":
    main()
