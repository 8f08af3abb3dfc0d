"""Held-out families on the digits: FP vs W3/A3 calibration only vs W3/A3 ``fit`` (calibration + FIMA-Q
reconstruction, loss ``fisher_dplr``), several seeds, for the small EVA-02 and SwinV2 models that
``scripts/train_family.py`` trains (checkpoints ``embedded:digits_eva02``, ``embedded:digits_swinv2``).

The settings mirror the embedded default's config (``configs/digits/w3a3.yaml``): its calibration and
reconstruction sizes, its Fisher images and its steps per unit (``--iters`` overrides them). Top-1 is
on the 450 validation digits. Calibration is deterministic, so it runs once per family and bit-width;
every reconstruction starts from a copy of it. The share of the calibration loss recovered is
``(fit - calibration) / (FP - calibration)``. Where calibration alone loses less than
``--min-loss`` points at W3/A3 (too easy to show anything), the family also gets a W2/A3 row.

Results are appended to a JSON file as they come (a long run can be stopped and resumed).
Run: python benchmarks/families.py [--families eva02 swinv2] [--seeds 0 1 2] [--iters N] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _digits import load_results, save_results, top1
from _machine import machine_line

from fimaq.artifacts import resolve_checkpoint
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.data import DigitsDataModule
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "digits" / "w3a3.yaml"
A_BITS = 3


def read_config(path: Path) -> dict[str, Any]:
    """What the benchmark mirrors of the embedded default's config: steps, Fisher and data sizes."""
    cfg = yaml.safe_load(path.read_text())
    model, data = cfg["model"], cfg["data"].get("init_args", {})
    return {
        "w_bits": model["quant"]["w_bits"],
        "a_bits": model["quant"]["a_bits"],
        "iters": model.get("recon", {}).get("iters", ReconConfig().iters),
        "fisher_samples": model.get("fisher", {}).get("num_samples", FisherConfig().num_samples),
        "calib_size": data.get("calib_size", 128),
        "recon_size": data.get("recon_size", 1024),
    }


def family_fp(family: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The float model of ``embedded:digits_<family>``, built from the arch and kwargs of its card."""
    path = resolve_checkpoint(f"embedded:digits_{family}")
    assert path is not None
    card = json.loads(Path(path).with_suffix(".json").read_text())
    return create_fp_model(card["arch"], path, model_kwargs=card["model_kwargs"]), card


def summary(rows: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Mean and standard deviation of top-1, mean seconds."""
    accs = [r["top1"] for r in rows]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.mean(accs), std, statistics.mean(r["seconds"] for r in rows)


def print_table(results: dict[str, Any], families: list[str], iters: int) -> None:
    """The markdown table: one row per family and bit-width that has results."""
    print(
        "| family | bits | FP top-1 (%) | calibration only (%) | fit (%) mean ± std | seeds | "
        "share of the calibration loss recovered | seconds: calibration / fit per seed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family in families:
        fp = results.get(f"{family}/fp")
        if not fp:
            continue
        fp_top1 = fp[0]["top1"]
        for w_bits in (3, 2):
            bits = f"W{w_bits}A{A_BITS}"
            calib = results.get(f"{family}/{bits}/calibration")
            if not calib:
                continue
            calib_top1, calib_secs = calib[0]["top1"], calib[0]["seconds"]
            fits = results.get(f"{family}/{bits}/fit@{iters}", [])
            if fits:
                mean, std, secs = summary(fits)
                lost = fp_top1 - calib_top1
                share = f"{(mean - calib_top1) / lost:.2f}" if lost > 0 else "n/a (no loss)"
                fit_cell, seeds, secs_cell = f"{mean:.2f} ± {std:.2f}", str(len(fits)), f"{secs:.0f}"
            else:
                fit_cell, seeds, share, secs_cell = "-", "0", "-", "-"
            print(
                f"| {family} | W{w_bits}/A{A_BITS} | {fp_top1:.2f} | {calib_top1:.2f} | {fit_cell} | "
                f"{seeds} | {share} | {calib_secs:.0f} / {secs_cell} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=["eva02", "swinv2"], default=["eva02", "swinv2"])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config whose settings to mirror")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None, help="steps per unit (default: the config's)")
    parser.add_argument("--min-loss", type=float, default=2.0, help="below this W3/A3 loss, add W2/A3")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="lightning_logs/bench_families.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = read_config(args.config)
    if (cfg["w_bits"], cfg["a_bits"]) != (3, A_BITS):
        parser.error(f"--config must be a W3/A{A_BITS} config, got W{cfg['w_bits']}/A{cfg['a_bits']}")
    iters = args.iters if args.iters is not None else cfg["iters"]
    results = load_results(args.out)
    dm = DigitsDataModule(calib_size=cfg["calib_size"], recon_size=cfg["recon_size"])
    dm.setup()
    calib, _ = dm.calibration_tensors()
    recon_images, _ = dm.reconstruction_tensors()
    xv, yv = dm.val_tensors()
    for family in args.families:
        fp, _ = family_fp(family)
        if f"{family}/fp" not in results:
            results[f"{family}/fp"] = [{"top1": top1(fp, xv, yv), "seconds": 0.0}]
            save_results(args.out, results)
        fp_top1 = results[f"{family}/fp"][0]["top1"]
        print(f"{family} FP: top-1 {fp_top1:.2f}%", flush=True)
        for w_bits in (3, 2):
            bits = f"W{w_bits}A{A_BITS}"
            if w_bits == 2:
                w3_loss = fp_top1 - results[f"{family}/W3A{A_BITS}/calibration"][0]["top1"]
                if w3_loss >= args.min_loss:
                    break
                print(f"{family}: W3/A{A_BITS} calibration loses only {w3_loss:.2f} points; adding W2/A3")
            calibrated = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=w_bits, a_bits=A_BITS))
            t0 = time.perf_counter()
            calibrate_model(calibrated, calib, CalibConfig(), progress=False)
            row = {"top1": top1(calibrated, xv, yv), "seconds": time.perf_counter() - t0}
            results[f"{family}/{bits}/calibration"] = [row]
            save_results(args.out, results)
            print(
                f"{family}/{bits} calibration: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s", flush=True
            )
            key = f"{family}/{bits}/fit@{iters}"
            done = {r["seed"] for r in results.get(key, [])}
            for seed in (s for s in args.seeds if s not in done):
                model = copy.deepcopy(calibrated)
                recon_cfg = ReconConfig(iters=iters, seed=seed)
                fisher_cfg = FisherConfig(num_samples=cfg["fisher_samples"])
                report = reconstruct_model(model, recon_images, recon_cfg, fisher_cfg, progress=False)
                row = {"seed": seed, "top1": top1(model, xv, yv), "seconds": report.total_seconds}
                results.setdefault(key, []).append(row)
                save_results(args.out, results)
                print(f"{key} seed {seed}: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s", flush=True)
    print(
        f"\n{machine_line()}; A{A_BITS}, {iters} steps per unit (loss {ReconConfig().loss}), "
        f"{cfg['fisher_samples']} Fisher images, {cfg['calib_size']} calibration / {cfg['recon_size']} "
        f"reconstruction images, {len(xv)} validation images (one = {100 / len(xv):.2f} points)"
    )
    print_table(results, args.families, iters)


if __name__ == "__main__":
    main()
