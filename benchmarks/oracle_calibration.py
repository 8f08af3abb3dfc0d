"""fimaq's calibration against the reference implementation's, on the oracle folder's model and tensors.

Prints the CPU capability and thread count, then per bit-width: top-1 of both on the 450 test
tensors, argmax agreement, mean KL divergence from the FP model, max logit difference, how many search
decisions (weight rows, matmul heads, activation tensors) match (scale within 1e-5, same zero point),
and the calibration wall time next to the reference's. Every decision that differs is listed with both
sides' (scale, zero point) and the float64 gap of its search criterion (``fimaq.oracle.objective_gaps``:
positive where fimaq's candidate is better on the tensors it searched).
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
from fimaq.oracle import (
    ORACLE_ARCH,
    ORACLE_KWARGS,
    compare_qparams,
    differing_groups,
    objective_gaps,
    oracle_dir,
)

REFERENCE_SECONDS = {
    8: 435,
    4: 436,
    3: 401,
}  # the reference's calibration time (2 threads, this kind of machine)


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
    fp = create_fp_model(ORACLE_ARCH, str(folder / "model.safetensors"), model_kwargs=ORACLE_KWARGS).eval()
    with torch.no_grad():
        fp_logp = fp(inputs["test"]).log_softmax(1)

    def kl(q_logits: torch.Tensor) -> float:
        """Mean KL(FP || quantized) over the test tensors."""
        return float((fp_logp.exp() * (fp_logp - q_logits.log_softmax(1))).sum(1).mean())

    rows, notes = [], []
    for bits in args.bits:
        ref = load_file(str(folder / f"official_calib_w{bits}a{bits}.safetensors"))
        model = create_fp_model(ORACLE_ARCH, str(folder / "model.safetensors"), model_kwargs=ORACLE_KWARGS)
        quantize_model(model, QuantSpec(w_bits=bits, a_bits=bits))
        report = calibrate_model(model, inputs["calib"], CalibConfig(), progress=False)
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
                "kl": kl(logits),
                "ref_kl": kl(ref_logits),
                "seconds": report.total_seconds,
                "speedup": REFERENCE_SECONDS.get(bits, float("nan")) / report.total_seconds,
            }
        )
        gaps = {(key, group): gap for key, group, gap in objective_gaps(model, inputs["calib"], ref)}
        for key, group, ours, theirs in differing_groups(state, ref):
            notes.append(
                f"W{bits}/A{bits} {key.rsplit('.', 1)[0]}[{group}]: fimaq (scale {ours[0]:.7g}, zero "
                f"point {ours[1]:g}), reference ({theirs[0]:.7g}, {theirs[1]:g}); "
                f"criterion gap {gaps[key, group]:+.2e}"
            )
        print(f"W{bits}/A{bits} done in {report.total_seconds:.1f} s", flush=True)
    print(
        "| bits | top-1 fimaq | top-1 reference | argmax agree | KL fimaq | KL reference | max logit diff | "
        "decisions equal | seconds | reference seconds | speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| W{r['bits']}/A{r['bits']} | {r['top1']:.3f} | {r['ref_top1']:.3f} | {r['agree']:.2f} | "
            f"{r['kl']:.4f} | {r['ref_kl']:.4f} | {r['logit_diff']:.2e} | {r['matched']} | "
            f"{r['seconds']:.1f} | "
            f"{REFERENCE_SECONDS.get(r['bits'], float('nan'))} | {r['speedup']:.1f}x |"
        )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
