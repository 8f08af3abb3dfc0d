"""fimaq's calibration against the reference implementation's, on the oracle folder's model and tensors.

Prints, per bit-width: top-1 of both on the 450 test tensors, argmax agreement, max logit difference,
how many scale groups (rows / heads / tensors) match within 1e-5 with identical zero points, and the
calibration wall time. Run: python benchmarks/oracle_calibration.py [--bits 8 4 3] [--oracle DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

import fimaq  # noqa: F401
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.oracle import ORACLE_ARCH, ORACLE_KWARGS, compare_qparams, oracle_dir

REFERENCE_SECONDS = {8: 435, 4: 436, 3: 401}  # the reference's calibration time on this machine kind


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
    rows = []
    for bits in args.bits:
        ref = load_file(str(folder / f"official_calib_w{bits}a{bits}.safetensors"))
        model = create_fp_model(ORACLE_ARCH, str(folder / "model.safetensors"), model_kwargs=ORACLE_KWARGS)
        quantize_model(model, QuantSpec(w_bits=bits, a_bits=bits))
        report = calibrate_model(model, inputs["calib"], CalibConfig(), progress=False)
        with torch.no_grad():
            logits = model(inputs["test"])
        diff = compare_qparams(model.state_dict(), ref)
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
                "per_layer": report.seconds_per_layer,
                "speedup": REFERENCE_SECONDS.get(bits, float("nan")) / report.total_seconds,
                "off": {**diff.scale_mismatch},
            }
        )
    print(f"torch threads: {args.threads}; oracle: {folder}")
    print(
        "| bits | top-1 fimaq | top-1 reference | argmax agree | max logit diff | scale groups equal | "
        "zero points off | seconds | s/layer | vs reference time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| W{r['bits']}/A{r['bits']} | {r['top1']:.3f} | {r['ref_top1']:.3f} | {r['agree']:.2f} | "
            f"{r['logit_diff']:.2e} | {r['matched']} | {r['zp_off']} | {r['seconds']:.1f} | "
            f"{r['per_layer']:.2f} | {r['speedup']:.1f}x |"
        )
    for r in rows:
        if r["off"]:
            print(f"W{r['bits']}: scale groups off by more than 1e-5: {r['off']}")


if __name__ == "__main__":
    main()
