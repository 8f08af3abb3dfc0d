"""Speed of one reconstruction unit: the time of one optimisation step divided by the time of one
plain forward+backward of the same unit in float (goal <= 1.3), the share of the unit's training
time spent in Fisher refreshes, and peak memory.

Default: block 0 of the embedded digits DeiT at W4/A4 (min-max qparams: speed does not depend on
them). Real scale, e.g. on a GPU: ``--arch deit_small_patch16_224 --model-kwargs '{}' --images 1024
--iters 1000 --rank 1 --device cuda`` (random weights, synthetic images, one Fisher refresh).
Run: python benchmarks/recon_speed.py [--unit blocks.0] [--iters 300] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import resource
import statistics
import time

import torch
from _machine import machine_line

import fimaq  # noqa: F401
import fimaq.recon.driver as driver
from fimaq.artifacts import resolve_checkpoint
from fimaq.calib.minmax import minmax_calibrate
from fimaq.callbacks import StepClock
from fimaq.config import FisherConfig, QuantSpec, ReconConfig
from fimaq.layers.mode import quant_mode
from fimaq.models import create_fp_model
from fimaq.models.swap import example_input, quantize_model
from fimaq.quant import native
from fimaq.recon import recon_units, reconstruct_model
from fimaq.recon.cache import capture_unit


def plain_step_fn(net, unit, images, batch):
    """A plain float forward+backward of a float copy of the unit (weights with gradients), batch
    ``batch``; the model itself is left as it was."""
    with quant_mode(net, enabled=False):
        x, _ = capture_unit(net, unit, images[:batch], batch, False, images.device, torch.float32)
        module = copy.deepcopy(unit.module)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)

    def step():
        module(x).float().pow(2).mean().backward()
        for p in params:
            p.grad = None
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    return step


def plain_step_seconds(net, unit, images, batch, repeats=20) -> float:
    """The mean seconds of :func:`plain_step_fn` over ``repeats`` runs after three warm-up runs."""
    step = plain_step_fn(net, unit, images, batch)
    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - t0) / repeats


class InterleavedClock(StepClock):
    """The reconstruction's step clock, also keeping every step's time, and timing ``plain`` (a plain
    float forward+backward of the same unit) before every ``every``-th step, so that both are sampled
    over the same minutes of a shared machine (its pace drifts by 10-15%)."""

    every = 4

    def __init__(self, plain, alternate_native: bool = False) -> None:
        super().__init__()
        self.plain = plain
        self.times: list[float] = []
        self.plain_times: list[float] = []
        # with alternate_native, every other run of `every` steps goes without the native kernels
        # (the same values): both kinds of step sampled over the same minutes, after plain passes alike
        self.alternate_native = alternate_native
        self.eager_times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % self.every == 0:
            t0 = time.perf_counter()
            self.plain()
            self.plain_times.append(time.perf_counter() - t0)
        if self.alternate_native:
            native._enabled = (batch_idx // self.every) % 2 == 0
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        t0 = self.started
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        eager = self.alternate_native and not native._enabled
        (self.eager_times if eager else self.times).append(time.perf_counter() - t0)
        if self.alternate_native:
            native._enabled = True


def refresh_seconds(
    net, unit, before, images, fcfg, bits_on: bool, shortcut: bool = True
) -> tuple[float, float]:
    """One Fisher refresh over ``images`` and, of it, the seconds of its forward and backward passes
    (the unit's forward, the rest of the model forward and back to the unit's output, batch by batch;
    the remainder is the statistics): with the unit quantized in training mode (QDrop) as during
    reconstruction, or (``bits_on=False``) with every quantizer off, which is the float forward and
    backward that a refresh cannot do without. ``shortcut``: start at the unit from its cached input
    (as reconstruction does; ``before`` are the earlier units), else run the whole model."""
    from fimaq.quant.adaround import attach_adaround
    from fimaq.recon.batches import BatchMasks
    from fimaq.recon.cache import soft_targets
    from fimaq.recon.fisher import FisherEstimator

    with torch.no_grad(), quant_mode(net, enabled=False):
        targets = soft_targets(net, images, fcfg.temperature, fcfg.batch_size)
        x_fp, y_fp = capture_unit(net, unit, images, fcfg.batch_size, True, images.device, torch.float32)
    fisher = FisherEstimator(net, images, targets, fcfg)
    masks = BatchMasks(torch.Generator(device=images.device).manual_seed(0))
    if shortcut:
        fisher.start(unit, y_fp, masks, x_in=x_fp, before=before)
    else:
        fisher.start(unit, y_fp, masks)
    mode = {"only": [unit.module], "train": True, "qdrop": 0.5, "masks": masks} if bits_on else {}
    bases = [(layer, layer.w_quantizer) for layer in unit.weight_layers()]
    for layer, _ in bases:
        attach_adaround(layer)  # soft rounding, as while the unit trains
    import fimaq.recon.fisher as fisher_module

    inverse = fisher_module.inverse_gram
    if not bits_on:  # all float: the output error is 0 and its Gram singular; its (tiny) inverse is skipped
        fisher_module.inverse_gram = lambda delta, ridge: (torch.eye(delta.shape[0], dtype=delta.dtype), 1.0)
    passes = fisher._output_grads
    spent = [0.0]

    def timed(part):
        t = time.perf_counter()
        out = passes(part)
        spent[0] += time.perf_counter() - t
        return out

    fisher._output_grads = timed
    try:
        with quant_mode(net, **(mode or {"enabled": False})):
            fisher.refresh()  # warm-up
            spent[0] = 0.0
            t0 = time.perf_counter()
            fisher.refresh()
            return time.perf_counter() - t0, spent[0]
    finally:
        fisher_module.inverse_gram = inverse
        for layer, base in bases:
            layer.w_quantizer = base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="deit_tiny_patch16_224")
    parser.add_argument(
        "--model-kwargs", default='{"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}'
    )
    parser.add_argument("--checkpoint", default="embedded:digits_deit_tiny", help="'' for random weights")
    parser.add_argument("--unit", default="blocks.0")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--loss", default="fisher_dplr")
    parser.add_argument("--fisher-samples", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="recon.compile: the whole step compiled")
    parser.add_argument(
        "--native-ab",
        action="store_true",
        help="every other step without the native kernels (medians of both)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    kwargs = json.loads(args.model_kwargs)
    ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else None
    torch.manual_seed(0)
    net = create_fp_model(args.arch, ckpt, model_kwargs=kwargs).to(args.device)
    net = quantize_model(net, QuantSpec(w_bits=args.bits, a_bits=args.bits))
    shape = example_input(net).shape[1:]
    images = torch.randn(args.images, *shape, generator=torch.Generator().manual_seed(0)).to(args.device)
    if ckpt and "digits" in args.checkpoint:
        from fimaq.data import DigitsDataModule

        dm = DigitsDataModule(recon_size=min(args.images, 1347))
        dm.setup()
        images = dm.reconstruction_tensors()[0].to(args.device)
    minmax_calibrate(net, images[:128])
    units = recon_units(net)
    index = next(i for i, u in enumerate(units) if u.name == args.unit)
    unit, before = units[index], [u.module for u in units[:index]]
    plain = plain_step_seconds(net, unit, images, 32)
    refresh_images = images[: args.fisher_samples] if args.fisher_samples else images
    fcfg_one = FisherConfig(rank=args.rank, num_samples=args.fisher_samples)
    refresh_q, passes_q = refresh_seconds(net, unit, before, refresh_images, fcfg_one, True)
    refresh_whole, _ = refresh_seconds(net, unit, before, refresh_images, fcfg_one, True, shortcut=False)
    refresh_fp, _ = refresh_seconds(net, unit, before, refresh_images, fcfg_one, False)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    cfg = ReconConfig(iters=args.iters, loss=args.loss, compile=args.compile)
    fcfg = FisherConfig(rank=args.rank, num_samples=args.fisher_samples)
    plain_step = plain_step_fn(net, unit, images, 32)
    for _ in range(3):
        plain_step()  # warm-up
    clocks: list[InterleavedClock] = []

    def new_clock() -> InterleavedClock:  # the driver's clock for the unit
        clocks.append(InterleavedClock(plain_step, args.native_ab))
        return clocks[-1]

    driver.StepClock = new_clock
    report = reconstruct_model(net, images, cfg, fcfg, progress=False, units=[args.unit])
    train, refresh = report.train_seconds[args.unit], report.refresh_seconds[args.unit]
    step = report.step_seconds[args.unit]
    clock = clocks[-1]
    step_median = statistics.median(clock.times[3:])
    plain_median = statistics.median(clock.plain_times[1:])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    where = f"{args.images} images, device {args.device}"
    print(
        f"{args.arch} {kwargs} unit {args.unit}, W{args.bits}/A{args.bits}, {where}, compile {args.compile}, "
        f"native kernels {native.library() is not None and native._enabled}"
    )
    print(machine_line())
    print("| measure | value |\n|---|---|")
    print(f"| plain FP forward+backward, batch 32 | {plain * 1e3:.1f} ms |")
    print(f"| reconstruction step (no refresh), batch 32 | {step * 1e3:.1f} ms |")
    print(f"| step / plain | {step / plain:.2f} |")
    print(
        f"| the same interleaved (plain before every {InterleavedClock.every}th step), medians: "
        f"step / plain | {step_median * 1e3:.1f} / {plain_median * 1e3:.1f} ms = "
        f"{step_median / plain_median:.2f} (difference {(step_median - plain_median) * 1e3:.2f} ms) |"
    )
    if args.native_ab:
        eager_median = statistics.median(clock.eager_times[2:])
        print(
            f"| the same, every other {InterleavedClock.every} steps without the native kernels, medians: "
            f"step / plain | "
            f"{eager_median * 1e3:.1f} / {plain_median * 1e3:.1f} ms = {eager_median / plain_median:.2f} "
            f"(native {step_median * 1e3:.1f} ms, {100 * (1 - step_median / eager_median):.0f}% less) |"
        )
    print(f"| {args.iters} steps + {min(args.rank, args.iters)} Fisher refreshes | {train:.1f} s |")
    print(f"| Fisher refreshes | {refresh:.1f} s ({100 * refresh / train:.0f}% of the unit's training) |")
    n_ref = refresh_images.shape[0]
    print(
        f"| one refresh over {n_ref} images: unit quantized (QDrop) / the same passes in float | "
        f"{refresh_q:.2f} s / {refresh_fp:.2f} s = {refresh_q / refresh_fp:.2f} |"
    )
    print(
        f"| of which its forward+backward passes / the statistics | {passes_q:.2f} s / "
        f"{refresh_q - passes_q:.3f} s (refresh / passes {refresh_q / passes_q:.3f}) |"
    )
    print(
        f"| the same refresh running the whole model (earlier units too) | {refresh_whole:.2f} s "
        f"({refresh_whole / refresh_q:.2f}x) |"
    )
    for steps in (1000, 20000):  # the share at longer schedules, from the measured step and refresh
        share = args.rank * refresh_q / (args.rank * refresh_q + steps * step)
        print(f"| Fisher refresh share at {steps} steps ({args.rank} refreshes) | {100 * share:.1f}% |")
    print(f"| whole unit (caches, errors, training) | {report.unit_seconds[args.unit]:.1f} s |")
    if args.device.startswith("cuda"):
        print(f"| peak GPU memory | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |")
    print(f"| peak process memory (RSS) | {peak_rss:.0f} MiB |")


if __name__ == "__main__":
    main()
