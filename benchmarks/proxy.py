"""The harder proxy (digits composited on photos, 6-block DeiT): FP vs calibration only vs mse vs
fisher_dplr reconstruction, and the options beyond FIMA-Q (``--methods fisher_dplr+rotation
global_local fisher_dplr+ste fisher_dplr+bf16 ...``), several seeds each, top-1 on the proxy's
validation images and wall time.

``--calib-domain in`` calibrates and reconstructs on the proxy's own training images (the config's
calibration and reconstruction sets). ``--calib-domain out`` uses images of another distribution
than the validation set: the plain scikit-learn digits of :class:`fimaq.data.DigitsDataModule` (grey
ink on black, upsampled to 32x32 and repeated to RGB; the same training digits and permutation, so
only the rendering differs: no photo, no colour, no placement). ``--calib-domain synthetic`` uses no
data: images optimised from noise by the float model (:func:`fimaq.data.synthetic.synthesize_images`,
the config's seed; the reconstruction set is their seeded shifted copies, as ``--data.synthetic true``
makes them), with the synthesis seconds recorded. Validation is the proxy's either way.

A method is a reconstruction loss or ``calibration`` (calibration only), each optionally with
``+rotation``, ``+ste``, ``+bf16`` and ``+log2`` / ``+adalog`` (``quant.attn_probs``), e.g.
``calibration+adalog fisher_dplr+adalog``.

Calibration is deterministic, so it runs once per domain and grid; every reconstruction starts from
it. Runs go seed by seed (every method's seed 0 first).
Results are appended to a JSON file as they come (a long run can be stopped and resumed). The two
domains can run at once, one thread each, into two files; ``--report FILE ...`` prints their table.
Run: python benchmarks/proxy.py [--calib-domain in|out|synthetic] [--seeds 0 1 2] [--iters N] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _digits import load_results, save_results
from _machine import machine_line

from fimaq.artifacts import resolve_checkpoint
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.data import DigitsDataModule, ProxyDataModule
from fimaq.data.synthetic import shifted_views, synthesize_images
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "proxy" / "w2a3.yaml"


def read_config(path: Path) -> dict[str, Any]:
    """What the benchmark takes from a proxy config: model, bits, steps, Fisher and data sizes."""
    cfg = yaml.safe_load(path.read_text())
    model, data = cfg["model"], cfg["data"].get("init_args", {})
    return {
        "arch": model["arch"],
        "checkpoint": model["checkpoint_path"],
        "model_kwargs": model["model_kwargs"],
        "w_bits": model["quant"]["w_bits"],
        "a_bits": model["quant"]["a_bits"],
        "iters": model.get("recon", {}).get("iters", ReconConfig().iters),
        "fisher_samples": model.get("fisher", {}).get("num_samples", FisherConfig().num_samples),
        "calib_size": data.get("calib_size", 128),
        "recon_size": data.get("recon_size", 1024),
        "seed": cfg.get("seed_everything", 0),
    }


def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 300) -> float:
    """Top-1 accuracy in percent, in chunks."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            logits = model(x[start : start + batch_size])
            correct += int((logits.argmax(-1) == y[start : start + batch_size]).sum())
    return 100.0 * correct / len(x)


def calib_sets(domain: str, calib_size: int, recon_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration and reconstruction images of a domain (``in``: the proxy's, ``out``: plain digits)."""
    module = ProxyDataModule if domain == "in" else DigitsDataModule
    dm = module(calib_size=calib_size, recon_size=recon_size)
    dm.setup()
    return dm.calibration_tensors()[0], dm.reconstruction_tensors()[0]


def summary(rows: list[dict[str, Any]]) -> tuple[float, float, float]:
    """Mean and standard deviation of top-1, mean seconds."""
    accs = [r["top1"] for r in rows]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.mean(accs), std, statistics.mean(r["seconds"] for r in rows)


def _key(domain: str, bits: str, method: str, iters: int) -> str:
    """Where ``results`` keeps the runs of one setting (reconstruction runs per steps per unit)."""
    return f"{domain}/{bits}/{method}" + ("" if method.startswith("calibration") else f"@{iters}")


def print_table(results: dict[str, Any], bits: str, iters: int) -> None:
    """The markdown table of every domain and method in ``results`` at ``bits`` and ``iters`` steps per
    unit, with the out-of-domain drop."""
    print("| calibration data | method | top-1 (%) mean ± std | runs | seconds per run |")
    print("|---|---|---|---|---|")
    if "fp" in results:
        print(f"| - | FP | {results['fp'][0]['top1']:.2f} | 1 | - |")
    methods = ["calibration", "calibration+rotation", "mse", "fisher_dplr"]
    for key in results:  # the options' rows after the baselines, in the order they were run
        method = key.split("/")[-1].split("@")[0]
        if "/" in key and method not in methods:
            methods.append(method)
    for domain in ("in", "out", "synthetic"):
        for method in methods:
            rows = results.get(_key(domain, bits, method, iters))
            if rows:
                mean, std, secs = summary(rows)
                name = {"calibration": "calibration only", "fisher_dplr": "`fisher_dplr` (default)"}
                label = name.get(method, f"`{method}`")
                print(f"| {domain} | {label} | {mean:.2f} ± {std:.2f} | {len(rows)} | {secs:.0f} |")
    if "synthesis" in results:
        print(f"\nsynthesis of the calibration images: {results['synthesis'][0]['seconds']:.0f} s")
    for other in ("out", "synthetic"):
        drops = []
        for method in methods:
            rows_in = results.get(_key("in", bits, method, iters))
            rows_other = results.get(_key(other, bits, method, iters))
            if rows_in and rows_other:
                drops.append(f"{method} {summary(rows_other)[0] - summary(rows_in)[0]:+.2f}")
        if drops:
            print(f"\n{other} minus in (points of top-1): {', '.join(drops)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="proxy config (bits, steps)")
    parser.add_argument("--calib-domain", choices=["in", "out", "synthetic"], default="in")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["mse", "fisher_dplr"],
        help="recon losses or 'calibration', each optionally with +rotation (quant.rotation hadamard), "
        "+ste (recon.rounding ste), +bf16 (recon.cache_dtype bfloat16) and +log2 / +adalog "
        "(quant.attn_probs), e.g. fisher_dplr+rotation global_local+rotation+ste calibration+adalog",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=None, help="steps per unit (default: the config's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lightning_logs/bench_proxy.json")
    parser.add_argument("--report", nargs="+", help="only print the table of these result files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    cfg = read_config(args.config)
    iters = args.iters if args.iters is not None else cfg["iters"]
    bits = f"W{cfg['w_bits']}A{cfg['a_bits']}"
    if args.report:
        merged: dict[str, Any] = {}
        for path in args.report:
            merged.update(load_results(path))
        print_table(merged, bits, iters)
        return
    results = load_results(args.out)
    val = ProxyDataModule()
    xv, yv = val.val_tensors()
    fp = create_fp_model(cfg["arch"], resolve_checkpoint(cfg["checkpoint"]), model_kwargs=cfg["model_kwargs"])
    if args.calib_domain == "synthetic":
        t0 = time.perf_counter()
        calib, labels = synthesize_images(
            copy.deepcopy(fp), cfg["calib_size"], seed=cfg["seed"], progress=False
        )
        results.setdefault("synthesis", [{"seconds": time.perf_counter() - t0}])
        recon_images = shifted_views(calib, labels, cfg["recon_size"], cfg["seed"])[0]
    else:
        calib, recon_images = calib_sets(args.calib_domain, cfg["calib_size"], cfg["recon_size"])
    if "fp" not in results:
        results["fp"] = [{"top1": top1(fp, xv, yv), "seconds": 0.0}]
        save_results(args.out, results)
    calibrated: dict[tuple[str, str], torch.nn.Module] = {}

    def calibrated_model(rotation: str, attn_probs: str) -> torch.nn.Module:
        """Calibrated once per rotation and attention-probability grid (calibration is deterministic)."""
        if (rotation, attn_probs) not in calibrated:
            spec = QuantSpec(
                w_bits=cfg["w_bits"], a_bits=cfg["a_bits"], rotation=rotation, attn_probs=attn_probs
            )
            net = quantize_model(copy.deepcopy(fp), spec)
            t0 = time.perf_counter()
            calibrate_model(net, calib, CalibConfig(), progress=False)
            row = {"top1": top1(net, xv, yv), "seconds": time.perf_counter() - t0}
            name = "calibration" + ("+rotation" if rotation != "none" else "")
            name += f"+{attn_probs}" if attn_probs != "uniform" else ""
            results[f"{args.calib_domain}/{bits}/{name}"] = [row]
            save_results(args.out, results)
            print(f"{args.calib_domain}/{bits} {name}: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s")
            calibrated[(rotation, attn_probs)] = net
        return calibrated[(rotation, attn_probs)]

    def grids(options: list[str]) -> tuple[str, str]:
        rotation = "hadamard" if "rotation" in options else "none"
        return rotation, next((o for o in options if o in ("log2", "adalog")), "uniform")

    for seed in args.seeds:  # every method's first seed before any second one
        for method in args.methods:
            loss, *options = method.split("+")
            if loss == "calibration":
                if seed == args.seeds[0] and f"{args.calib_domain}/{bits}/{method}" not in results:
                    calibrated_model(*grids(options))
                continue
            key = _key(args.calib_domain, bits, method, iters)
            if seed in {r["seed"] for r in results.get(key, [])}:
                continue
            model = copy.deepcopy(calibrated_model(*grids(options)))
            rounding = "ste" if "ste" in options else "adaround"
            cache_dtype = "bfloat16" if "bf16" in options else "float32"
            recon_cfg = ReconConfig(
                iters=iters, loss=loss, seed=seed, rounding=rounding, cache_dtype=cache_dtype
            )
            fisher_cfg = FisherConfig(num_samples=cfg["fisher_samples"])
            report = reconstruct_model(model, recon_images, recon_cfg, fisher_cfg, progress=False)
            row = {"seed": seed, "top1": top1(model, xv, yv), "seconds": report.total_seconds}
            results.setdefault(key, []).append(row)
            save_results(args.out, results)
            print(f"{key} seed {seed}: top-1 {row['top1']:.2f}%  {row['seconds']:.0f} s", flush=True)
    print(
        f"\n{machine_line()}; {bits}, {iters} steps per unit, {cfg['fisher_samples']} Fisher images, "
        f"{len(xv)} validation images (one = {100 / len(xv):.2f} points)"
    )
    print_table(results, bits, iters)


if __name__ == "__main__":
    main()
