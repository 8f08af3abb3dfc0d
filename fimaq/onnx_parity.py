"""onnxruntime against PyTorch: the check an ONNX export must pass before it is written.

Parity (:func:`onnx_parity`): each quantizer alone is bit-exact in onnxruntime (ties included), but
the float operations between quantizers (matmul accumulation order, LayerNorm, GELU, softmax kernels)
differ by ~1e-7, which now and then moves a value across a rounding boundary and flips an activation
code; that moves the logits by far more than float noise, and how far depends on the model (trained
digits DeiT at W4/A4: most images agree to ~1e-6, 8% of them differ by up to ~0.2 with logits up to
~3; a random-init DeiT-Tiny at W4/A4 is chaotic: a 1e-7 input perturbation alone moves PyTorch's own
logits by 0.012 on average). The check therefore measures the model's own sensitivity: ``flip_noise``
is the mean |logit change| of the PyTorch model when its input is scaled by ``1 + 1e-6 * N(0, 1)``
(seeded). The stated tolerance is

    mean |onnxruntime - PyTorch| <= max(MEAN_REL * max(1, max |logit|), NOISE_FACTOR * flip_noise)

with ``MEAN_REL = 1e-4`` and ``NOISE_FACTOR = 10`` (the first term covers models whose activations
are not quantized: float noise only, ~1e-7 of the logits). On the trained digits DeiT the mean
difference is 2-4x below ``flip_noise`` at W8/A8 and W4/A4, while an int8 approximation of a float
matmul input (onnxruntime's MatMulNBits default) gives 4e-4 of the logits at W4/A32, and a missing
clamp is of the order of the logits: both fail.
Two more bounds: ``max |onnxruntime - PyTorch| <= MAX_REL * max(1, max |logit|)`` with ``MAX_REL =
0.1`` (a flipped code moves a logit by a fraction of it: 0.077 of logits up to 4.4 on the digits DeiT
at W3/A3), and the same argmax on every check image. An export that misses any bound writes nothing
and names the images and logits that differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fimaq.export import export_copy

if TYPE_CHECKING:
    import onnxruntime

MEAN_REL = 1e-4
MAX_REL = 0.1
NOISE_FACTOR = 10.0
NOISE_EPS = 1e-6


def onnx_session(path: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session of an exported model."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_parity(
    path: str | Path, net: nn.Module, images: torch.Tensor, threads: int = 1, batch_size: int = 32
) -> dict[str, Any]:
    """onnxruntime vs PyTorch logits of ``net`` on ``images``, judged against the module's three bounds.

    Returns:
        ``max_abs_diff`` (with ``max_at``: image and logit), ``mean_abs_diff``, ``max_abs_logit``
        (PyTorch), ``flip_noise``, ``mean_limit``, ``max_limit``, ``argmax_agreement`` (fraction),
        ``argmax_differs`` (image indices, PyTorch class, onnxruntime class), ``images``, ``failed`` (the
        bounds not met, as text) and ``ok``.
    """
    session = onnx_session(path, threads)
    model = export_copy(net)
    gen = torch.Generator().manual_seed(0)
    diffs, noise, top, differs = [], [], 0.0, []
    for start in range(0, images.shape[0], batch_size):
        xb = images[start : start + batch_size].detach().cpu().float()
        jitter = 1 + NOISE_EPS * torch.randn(xb.shape, generator=gen)
        with torch.no_grad():
            want, moved = model(xb), model(xb * jitter)
        got = torch.from_numpy(session.run(["logits"], {"images": xb.numpy()})[0])
        diffs.append((got - want).abs())
        noise.append((moved - want).abs().flatten())
        top = max(top, float(want.abs().max()))
        for i in (got.argmax(-1) != want.argmax(-1)).nonzero().flatten().tolist():
            differs.append((start + i, int(want[i].argmax()), int(got[i].argmax())))
    diff, flip_noise = torch.cat(diffs), float(torch.cat(noise).mean())
    where = divmod(int(diff.argmax()), diff.shape[1])
    out: dict[str, Any] = {
        "max_abs_diff": float(diff.max()),
        "max_at": where,
        "mean_abs_diff": float(diff.mean()),
        "max_abs_logit": top,
        "flip_noise": flip_noise,
        "mean_limit": max(MEAN_REL * max(1.0, top), NOISE_FACTOR * flip_noise),
        "max_limit": MAX_REL * max(1.0, top),
        "argmax_agreement": 1 - len(differs) / images.shape[0],
        "argmax_differs": differs,
        "images": images.shape[0],
    }
    failed = []
    if differs:
        shown = ", ".join(f"image {i} (PyTorch class {a}, onnxruntime {b})" for i, a, b in differs[:3])
        failed.append(f"argmax differs on {len(differs)} of {images.shape[0]} images: {shown}")
    if out["max_abs_diff"] > out["max_limit"]:
        at = f"image {where[0]}, logit {where[1]}"
        failed.append(f"max |diff| {out['max_abs_diff']:.3g} > {out['max_limit']:.3g} ({at})")
    if out["mean_abs_diff"] > out["mean_limit"]:
        failed.append(f"mean |diff| {out['mean_abs_diff']:.3g} > {out['mean_limit']:.3g}")
    out["failed"] = failed
    out["ok"] = not failed
    return out
