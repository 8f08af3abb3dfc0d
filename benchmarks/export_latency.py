"""CPU latency of the exported ONNX model (onnxruntime) vs the float and fake-quant PyTorch models.

Median milliseconds per batch (batch 1 and 32 by default) of: the float PyTorch model, the
fake-quantized PyTorch model, the float model exported to ONNX, and fimaq's quantized ONNX export
(``fimaq.export_onnx``), all on the CPU with the same number of threads.

Default: the embedded digits DeiT at W4/A4 with min-max qparams (latency does not depend on their
values; ``--fimaq-calib`` runs a short fimaq calibration instead, whose per-head matmul scales become
explicit arithmetic in the ONNX graph). Any timm ViT/DeiT/Swin, e.g. ``--arch deit_small_patch16_224
--model-kwargs '{}' --checkpoint ''`` (random weights, synthetic images).
Run: python benchmarks/export_latency.py [--bits 4] [--threads 1] [--batches 1 32] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import machine_line

import fimaq  # noqa: F401  (torchvision shim before timm)
from fimaq.artifacts import resolve_checkpoint
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import CalibConfig, QuantSpec
from fimaq.export import export_copy
from fimaq.export_onnx import export_onnx
from fimaq.models import create_fp_model
from fimaq.models.swap import example_input, quantize_model
from fimaq.onnx_parity import onnx_parity, onnx_session


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``run()`` in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def export_fp_onnx(fp: torch.nn.Module, path: Path, x: torch.Tensor) -> None:
    """The float model as ONNX (same exporter settings as the quantized one)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fp,
            (x,),
            str(path),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="deit_tiny_patch16_224")
    parser.add_argument(
        "--model-kwargs", default='{"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}'
    )
    parser.add_argument("--checkpoint", default="embedded:digits_deit_tiny", help="'' for random weights")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--fimaq-calib", action="store_true", help="short fimaq calibration, not min-max")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    kwargs = json.loads(args.model_kwargs)
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
    torch.manual_seed(0)
    fp = create_fp_model(args.arch, ckpt, model_kwargs=kwargs)
    net = quantize_model(
        create_fp_model(args.arch, ckpt, model_kwargs=kwargs), QuantSpec(args.bits, args.bits)
    )
    shape = example_input(net).shape[1:]
    images = torch.randn(max(64, *args.batches), *shape, generator=torch.Generator().manual_seed(0))
    if ckpt and "digits" in args.checkpoint:
        from fimaq.data import DigitsDataModule

        dm = DigitsDataModule()
        dm.setup()
        images = dm.val_tensors()[0][: images.shape[0]]
    if args.fimaq_calib:
        from fimaq.calib import calibrate_model

        calibrate_model(
            net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=0), progress=False
        )
    else:
        minmax_calibrate(net, images[:32])
    net = export_copy(net)
    with tempfile.TemporaryDirectory() as tmp:
        q_path, fp_path = Path(tmp) / "quantized.onnx", Path(tmp) / "fp.onnx"
        res = export_onnx(net, q_path, images[:2])
        export_fp_onnx(fp, fp_path, images[:2])
        parity = onnx_parity(q_path, net, images[:64], threads=args.threads)
        sessions = {"q": onnx_session(q_path, args.threads), "fp": onnx_session(fp_path, args.threads)}
        sizes = {"q": q_path.stat().st_size, "fp": fp_path.stat().st_size}
        rows = []
        for batch in args.batches:
            xb = images[:batch].contiguous()
            feed = {"images": xb.numpy()}
            with torch.inference_mode():
                rows.append(
                    (
                        batch,
                        median_ms(lambda xb=xb: fp(xb), args.repeats),
                        median_ms(lambda xb=xb: net(xb), args.repeats),
                        median_ms(lambda feed=feed: sessions["fp"].run(None, feed), args.repeats),
                        median_ms(lambda feed=feed: sessions["q"].run(None, feed), args.repeats),
                    )
                )
    import onnxruntime

    calib = "short fimaq calibration" if args.fimaq_calib else "min-max qparams"
    print(
        f"{args.arch} {kwargs}, W{args.bits}/A{args.bits} ({calib}), checkpoint {args.checkpoint or 'random'}"
    )
    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {machine_line()}; "
        f"ONNX forms {res['forms']}"
    )
    print(
        f"ONNX sizes: float {sizes['fp'] / 1e6:.2f} MB, quantized {sizes['q'] / 1e6:.2f} MB; parity on 64 "
        f"images: max |diff| {parity['max_abs_diff']:.2e}, mean {parity['mean_abs_diff']:.2e} "
        f"(limit {parity['mean_limit']:.2e}), argmax agreement {100 * parity['argmax_agreement']:.1f}%"
    )
    print(
        "| batch | PyTorch FP | PyTorch fake-quant | ONNX FP (onnxruntime) | ONNX quantized (onnxruntime) |\n"
        "|---|---|---|---|---|"
    )
    for batch, *ms in rows:
        print(f"| {batch} | " + " | ".join(f"{m:.2f} ms" for m in ms) + " |")


if __name__ == "__main__":
    main()
