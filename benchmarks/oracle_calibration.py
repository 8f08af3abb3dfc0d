"""fimaq's calibration against the reference implementation's, on the oracle folder's model and tensors.

Prints the CPU capability and thread count, then per bit-width: top-1 of both on the 450 test
tensors, argmax agreement, max logit difference, how many scale groups (rows / heads / tensors) match
within 1e-5 with identical zero points, and the calibration wall time next to the reference's. Every
scale group that differs is listed with the reason: where fimaq's tie rule settled that group between
near-equal candidates and the reference's choice was one of them, both candidates' float64 errors.
Run: python benchmarks/oracle_calibration.py [--bits 8 4 3] [--threads 2] [--oracle DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _machine import machine_line
from safetensors.torch import load_file

import fimaq  # noqa: F401
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.oracle import ORACLE_ARCH, ORACLE_KWARGS, compare_qparams, oracle_dir, scale_mismatches

REFERENCE_SECONDS = {
    8: 435,
    4: 436,
    3: 401,
}  # the reference's calibration time (2 threads, this kind of machine)


def explain(key: str, ours: float, theirs: float, ties: list[dict]) -> str:
    """Why a scale of quantizer ``key`` differs: the last tie-rule decision that chose it."""
    label = key.rsplit(".", 1)[0]  # e.g. blocks.0.attn.qkv.w_quantizer
    for entry in reversed(ties):
        scales, errors = entry["scales"], entry["errors"]
        if entry["label"] != label or abs(scales[entry["chosen"]] - ours) > 1e-7 * abs(ours):
            continue
        mine = errors[entry["chosen"]]
        near = [i for i, s in enumerate(scales) if abs(s - theirs) <= 1e-5 * abs(theirs)]
        if near:
            gap = (errors[near[0]] - mine) / mine
            return (
                f"near-tie: fimaq's candidate (scale {ours:.7g}) has float64 error {mine:.10g}, the "
                f"reference's (scale {theirs:.7g}) {errors[near[0]]:.10g} ({gap:+.2e} relative)"
            )
    return f"no near-tie recorded (fimaq {ours:.7g}, reference {theirs:.7g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3])
    parser.add_argument("--oracle", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.oracle or oracle_dir()
    if folder is None:
        raise SystemExit("no oracle folder: pass --oracle DIR or set FIMAQ_ORACLE_DIR")
    inputs = load_file(str(folder / "inputs.safetensors"))
    labels = inputs["test_labels"]
    print(
        f"{machine_line()}; oracle: {folder}",
        flush=True,
    )
    rows, notes = [], []
    for bits in args.bits:
        ref = load_file(str(folder / f"official_calib_w{bits}a{bits}.safetensors"))
        model = create_fp_model(ORACLE_ARCH, str(folder / "model.safetensors"), model_kwargs=ORACLE_KWARGS)
        quantize_model(model, QuantSpec(w_bits=bits, a_bits=bits))
        ties: list[dict] = []
        report = calibrate_model(model, inputs["calib"], CalibConfig(), progress=False, tie_log=ties)
        with torch.no_grad():
            logits = model(inputs["test"])
        state = model.state_dict()
        diff = compare_qparams(state, ref)
        ref_logits = ref["logits"]
        rows.append(
            {
                "bits": bits,
                "top1": 100 * (logits.argmax(1) == labels).float().mean().item(),
                "ref_top1": 100 * (ref_logits.argmax(1) == labels).float().mean().item(),
                "agree": 100 * (logits.argmax(1) == ref_logits.argmax(1)).float().mean().item(),
                "logit_diff": (logits - ref_logits).abs().max().item(),
                "matched": f"{diff.matched}/{diff.groups}",
                "zp_off": sum(diff.zero_point_mismatch.values()),
                "seconds": report.total_seconds,
                "speedup": REFERENCE_SECONDS.get(bits, float("nan")) / report.total_seconds,
            }
        )
        for key, group, ours, theirs in scale_mismatches(state, ref):
            notes.append(f"W{bits}/A{bits} {key}[{group}]: {explain(key, ours, theirs, ties)}")
        print(f"W{bits}/A{bits} done in {report.total_seconds:.1f} s", flush=True)
    print(
        "| bits | top-1 fimaq | top-1 reference | argmax agree | max logit diff | scale groups equal | "
        "zero points off | seconds | reference seconds | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| W{r['bits']}/A{r['bits']} | {r['top1']:.3f} | {r['ref_top1']:.3f} | {r['agree']:.2f} | "
            f"{r['logit_diff']:.2e} | {r['matched']} | {r['zp_off']} | {r['seconds']:.1f} | "
            f"{REFERENCE_SECONDS.get(r['bits'], float('nan'))} | {r['speedup']:.1f}x |"
        )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
