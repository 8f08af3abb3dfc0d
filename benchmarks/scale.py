"""What a full-size W3/A3 ``fit`` costs, per model: calibration seconds, reconstruction cache sizes,
the reconstruction step of each stage's first block against a plain float forward+backward of it,
the compute operations a step dispatches, the seconds of a Fisher refresh, peak memory, and the
predicted wall time of a whole ``fit`` with the default schedule (ReconConfig/FisherConfig defaults).

Random weights (no checkpoint) and random 224 px images: the costs do not depend on what the weights
learned. Only the representative units are measured: the patch embedding, the first block of each
stage, every patch merging and the head, each block standing for the other blocks of its stage.
Calibration runs on ``--calib-images`` images (the real run uses 128; fewer are scaled up linearly),
the reconstruction steps on ``--recon-images`` cached images (a step's cost depends on its batch, not
on the cache) for ``--steps`` steps (the first, which records the normalisers, is left out); one
Fisher refresh over all of them is scaled to the default refresh images. Everything the tables mark
as extrapolated is computed from these measurements.

CPU (32 calibration images scaled x4, 64 reconstruction images, 6 steps; hours on 2 cores for all six
models, ``--models`` one at a time to split it; the peak RSS printed is the process's, cumulative):
    python benchmarks/scale.py --device cpu --threads 2
GPU (the prepared command: 128 calibration images, 256 reconstruction images, 50 steps):
    python benchmarks/scale.py --device cuda
Options: --models a,b --calib-images N --recon-images N --steps N --batch 32 --bits 3 --compile
(with --compile use --steps 20 or more: the first compiled steps compile).
"""

from __future__ import annotations

import argparse
import collections
import copy
import logging
import math
import resource
import statistics
import sys
import time
import warnings

import torch
from _machine import machine_line
from torch.utils._python_dispatch import TorchDispatchMode

import fimaq  # noqa: F401  (torchvision shim before timm)
import fimaq.recon.driver as driver
from fimaq.calib import calibrate_model
from fimaq.callbacks import StepClock
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.layers.mode import quant_mode
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.quant import native
from fimaq.recon import recon_units, reconstruct_model
from fimaq.recon.cache import capture_unit

MODELS = (
    "deit_tiny_patch16_224,deit_small_patch16_224,deit_base_patch16_224,vit_base_patch16_224,"
    "swin_tiny_patch4_window7_224,swin_base_patch4_window7_224"
)
RECON_IMAGES = 1024  # the data modules' default recon_size
# operations that only make views, allocate or read a value back: not compute (tests/test_step_ops.py)
META = {
    "view", "detach", "t", "select", "permute", "expand", "reshape", "unsqueeze", "squeeze", "as_strided",
    "slice", "transpose", "_unsafe_view", "alias", "unbind", "split", "lift_fresh", "split_with_sizes",
    "_local_scalar_dense", "is_nonzero", "empty", "empty_like", "empty_strided", "new_empty", "set_",
}  # fmt: skip


def sync(device: torch.device) -> None:
    """Wait for the GPU (before a clock is read)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_of(unit) -> str:
    """The group a unit belongs to: a stage's blocks (``layers.0.blocks``, ViT ``blocks``), or the
    unit itself (patch embedding, each patch merging, head)."""
    return unit.name.rsplit(".", 1)[0] if unit.kind == "block" else unit.name


class Count(TorchDispatchMode):
    """Counts the compute operations dispatched (those not in ``META``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in META:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


class StepTimes(StepClock):
    """The driver's step clock, also keeping every step's seconds per unit (synchronised on a GPU)."""

    def __init__(self, store: dict[str, list[float]], device: torch.device) -> None:
        super().__init__()
        self.store, self.device = store, device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        sync(self.device)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sync(self.device)
        self.store.setdefault(pl_module.unit_name, []).append(time.perf_counter() - self.started)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def calibrate(net, images, reps) -> dict[str, dict[str, float]]:
    """Calibrate each representative unit on its own: per unit ``{"captures": s, kind: s, ...}``
    (the kind is the last component of the layer name)."""
    seconds = {}
    for unit in reps:
        cfg = CalibConfig(num_images=images.shape[0])
        report = calibrate_model(net, images, cfg, progress=False, units=[unit.name])
        parts = {"captures": report.capture_seconds}
        for name, s in report.layer_seconds.items():
            kind = name.rsplit(".", 1)[-1]
            parts[kind] = parts.get(kind, 0.0) + s
        seconds[unit.name] = parts
    return seconds


def forward_profile(net, units, images, device):
    """One float forward of ``images`` (after a warm-up on two): every unit's per-image input and
    output shapes, its start and end (seconds from the start of the pass), and the whole pass."""
    shapes, starts, ends, handles = {}, {}, {}, []
    for u in units:

        def pre(_m, args, name=u.name):
            sync(device)
            starts[name] = time.perf_counter()

        def post(_m, args, out, name=u.name):
            sync(device)
            ends[name] = time.perf_counter()
            shapes[name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))

        handles += [u.module.register_forward_pre_hook(pre), u.module.register_forward_hook(post)]
    try:
        with torch.no_grad(), quant_mode(net, enabled=False):
            net(images[:2])
            sync(device)
            t0 = time.perf_counter()
            net(images)
            sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    return shapes, {k: v - t0 for k, v in starts.items()}, {k: v - t0 for k, v in ends.items()}, total


def plain_seconds(net, unit, images, batch, device, repeats) -> float:
    """Median seconds of a plain float forward + squared-mean loss + backward of a float copy of the
    unit (weights with gradients) at batch ``batch``, after two warm-up runs."""
    with quant_mode(net, enabled=False):
        x, _ = capture_unit(net, unit, images[:batch], batch, False, device, torch.float32)
        module = copy.deepcopy(unit.module)
    params = [p.requires_grad_(True) for p in module.parameters()]
    times = []
    for _ in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        module(x).float().pow(2).mean().backward()
        for p in params:
            p.grad = None
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def recon_timing(net, images, reps, args, device):
    """Reconstruct the representative units (``args.steps`` steps, one Fisher refresh over all
    ``images`` at the first step): per unit the median step seconds without the first step, and
    the refresh seconds."""
    store: dict[str, list[float]] = {}
    clock = driver.StepClock
    driver.StepClock = lambda: StepTimes(store, device)  # the driver's clock for every unit
    try:
        cfg = ReconConfig(iters=args.steps, batch_size=args.batch, compile=args.compile)
        fcfg = FisherConfig(rank=1, num_samples=images.shape[0])
        report = reconstruct_model(net, images, cfg, fcfg, progress=False, units=[u.name for u in reps])
    finally:
        driver.StepClock = clock
    steps = {name: statistics.median(times[1:]) for name, times in store.items()}
    return steps, report.refresh_seconds


def step_ops(net, images, unit, batch) -> float:
    """Compute operations per reconstruction step on the eager path (native kernels off): those of
    a 4-step minus those of a 2-step reconstruction of ``unit``, halved (fixed costs cancel)."""
    totals = []
    for iters in (2, 4):
        count = Count()
        cfg = ReconConfig(iters=iters, batch_size=batch, keep_better=False)
        with native.enabled(False), count:
            fcfg = FisherConfig(rank=1, num_samples=min(8, batch))
            reconstruct_model(net, images[:batch], cfg, fcfg, progress=False, units=[unit.name])
        totals.append(sum(count.ops.values()))
    return (totals[1] - totals[0]) / 2


def run_model(arch: str, args, device: torch.device) -> dict:
    """Measure one model, print its tables, return its summary row."""
    torch.manual_seed(0)
    net = quantize_model(create_fp_model(arch), QuantSpec(w_bits=args.bits, a_bits=args.bits)).to(device)
    net.eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(max(args.calib_images, args.recon_images, args.batch), 3, 224, 224, generator=gen)
    images = images.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    units = recon_units(net)
    parts: dict[str, list] = {}
    for u in units:
        parts.setdefault(part_of(u), []).append(u)
    reps = [members[0] for members in parts.values()]
    blocks = [u for u in reps if u.kind == "block"]
    rc, fc, cc = ReconConfig(), FisherConfig(), CalibConfig()
    print(f"\n## {arch}, W{args.bits}/A{args.bits}, device {device}, {len(units)} units")
    print(f"measured units: {', '.join(u.name for u in reps)}")

    # 1. calibration
    cal = calibrate(net, images[: args.calib_images], reps)
    scale = max(1.0, cc.num_images / args.calib_images)
    kinds = list(dict.fromkeys(k for parts_s in cal.values() for k in parts_s))
    measured = {k: sum(s.get(k, 0.0) for s in cal.values()) for k in kinds}
    whole = {k: scale * sum(cal[m[0].name].get(k, 0.0) * len(m) for m in parts.values()) for k in kinds}
    print(f"\n{machine_line()}; device {device}")
    print(
        f"calibration: measured on the {len(reps)} units above with {args.calib_images} images; whole "
        f"model extrapolated (every block costs its stage's first block), x{scale:g} to "
        f"{cc.num_images} images"
    )
    print("| part | measured s | whole model s (extrapolated) |\n|---|---|---|")
    for k in kinds:
        print(f"| {k} | {measured[k]:.1f} | {whole[k]:.1f} |")
    calib_total = sum(whole.values())
    print(f"| total | {sum(measured.values()):.1f} | {calib_total:.1f} |")

    # 2. caches (one float forward: shapes and the time up to every unit)
    fwd = images[: args.batch]
    shapes, starts, ends, total = forward_profile(net, units, fwd, device)
    print(f"\nreconstruction caches of one unit at a time, {RECON_IMAGES} images, input mode {rc.input_mode}")
    print("| part | units | input, output per image | MiB float32 | MiB bfloat16 |\n|---|---|---|---|---|")
    peak = 0.0
    for p, members in parts.items():
        (x, y), first = shapes[members[0].name], units.index(members[0]) == 0
        shared = first or rc.input_mode == "rinp"  # x_q is x_fp
        elements = RECON_IMAGES * (math.prod(x) * (1 if shared else 2) + math.prod(y))
        mib = elements * 4 / 2**20
        peak = max(peak, mib)
        note = " (x_q = x_fp)" if shared else ""
        print(f"| {p} | {len(members)} | {x}, {y}{note} | {mib:.0f} | {mib / 2:.0f} |")
    print(f"| largest unit | | | {peak:.0f} | {peak / 2:.0f} |")

    # 3. steps of the representative units, plain passes and op counts of the blocks
    repeats = 20 if device.type == "cuda" else 3
    plain = {u.name: plain_seconds(net, u, images, args.batch, device, repeats) for u in blocks}
    recon = images[: args.recon_images]
    steps, refresh = recon_timing(net, recon, reps, args, device)
    ops = {u.name: step_ops(net, images, u, args.batch) for u in blocks}
    refresh_images = min(fc.num_samples or RECON_IMAGES, RECON_IMAGES)
    per_image = refresh_images / args.recon_images
    print(f"\n{machine_line()}; device {device}")
    print(
        f"blocks, batch {args.batch}: the step is the median of steps 2..{args.steps} of a reconstruction on "
        f"{args.recon_images} cached images (compile {args.compile}); plain = float forward+backward of the "
        f"block; ops counted eager (native kernels off); one refresh measured over {args.recon_images} "
        f"images, scaled to the default {refresh_images}"
    )
    print(
        "| block | plain ms | step ms | step / plain | ops per step | refresh s (measured) | "
        f"refresh s ({refresh_images} images) |\n|---|---|---|---|---|---|---|"
    )
    for u in blocks:
        n = u.name
        print(
            f"| {n} | {plain[n] * 1e3:.1f} | {steps[n] * 1e3:.1f} | {steps[n] / plain[n]:.2f} | "
            f"{ops[n]:.0f} | {refresh[n]:.2f} | {refresh[n] * per_image:.1f} |"
        )

    # 4. memory
    if device.type == "cuda":
        memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
        print(f"\npeak GPU memory of this model's measurements: {memory}")
    else:
        memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
        print(f"\npeak process RSS so far (cumulative over the models run before in this process): {memory}")

    # 5. predicted fit
    iters = rc.unit_iters
    n_refresh = len(fc.refresh_steps(iters))
    to_end = {u.name: total - starts[u.name] for u in units}  # a refresh runs from the unit to the logits
    per_batch = RECON_IMAGES / fwd.shape[0]
    print(f"\n{machine_line()}; device {device}")
    print(
        f"predicted fit: {iters} steps per unit at the measured step (batch {args.batch}) of its part's "
        f"first unit; {n_refresh} refreshes per unit over {refresh_images} images, scaled by the forward "
        f"time from the unit to the logits; caches: float forwards of {RECON_IMAGES} images up to the unit "
        "(x_q counted as float)"
    )
    print("| part | units | steps s | refreshes s | caches s | total s |\n|---|---|---|---|---|---|")
    fit = calib_total + per_batch * total  # calibration, soft targets (one full forward)
    print(f"| calibration (extrapolated) | | | | | {calib_total:.0f} |")
    print(f"| soft targets (one forward) | | | | {per_batch * total:.0f} | {per_batch * total:.0f} |")
    for p, members in parts.items():
        rep = members[0].name
        train = iters * steps[rep] * len(members)
        fisher = sum(
            0.0 if u.is_head else n_refresh * refresh[rep] * per_image * to_end[u.name] / to_end[rep]
            for u in members
        )
        captures = sum(
            per_batch * ends[u.name] * (1 if units.index(u) == 0 or rc.input_mode == "rinp" else 2)
            for u in members
        )
        fit += train + fisher + captures
        print(
            f"| {p} | {len(members)} | {train:.0f} | {fisher:.0f} | {captures:.0f} | "
            f"{train + fisher + captures:.0f} |"
        )
    print(f"| **fit** | {len(units)} | | | | **{fit:.0f} s = {fit / 3600:.1f} h** |")
    first = blocks[0].name
    return {
        "model": arch,
        "calib": calib_total,
        "cache": peak,
        "step": steps[first] * 1e3,
        "ratio": steps[first] / plain[first],
        "ops": ops[first],
        "refresh": refresh[first] * per_image,
        "memory": memory,
        "fit": fit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS, help="comma-separated timm names")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-images", type=int, default=None, help="default 128 on a GPU, 32 on the CPU")
    parser.add_argument("--recon-images", type=int, default=None, help="default 256 on a GPU, 64 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="default 50 on a GPU, 6 on the CPU")
    parser.add_argument("--batch", type=int, default=ReconConfig().batch_size)
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="recon.compile: the whole step compiled")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.calib_images = args.calib_images or (128 if gpu else 32)
    args.recon_images = args.recon_images or (256 if gpu else 64)
    args.steps = args.steps or (50 if gpu else 6)
    if args.steps < 2 or args.recon_images < args.batch:
        parser.error("--steps must be at least 2 and --recon-images at least --batch")
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    sys.stdout.reconfigure(line_buffering=True)  # each table shows as soon as it is measured
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # (Lightning's, once per unit)
    if gpu:  # full float32 products, as the calibration searches use
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = [run_model(arch, args, device) for arch in args.models.split(",")]
    print(f"\n## summary, W{args.bits}/A{args.bits}\n\n{machine_line()}; device {device}")
    print(
        f"calibration extrapolated from representative units ({args.calib_images} images); first block: "
        f"step at batch {args.batch} ({args.steps} steps, compile {args.compile}), eager ops per step, "
        f"one Fisher refresh scaled to the default images; fit predicted with the default schedule"
    )
    print(
        "| model | calibration s | largest cache MiB f32 / bf16 | step ms | step / plain | ops per step | "
        "refresh s | peak memory | predicted fit |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['model']} | {r['calib']:.0f} | {r['cache']:.0f} / {r['cache'] / 2:.0f} | "
            f"{r['step']:.1f} | {r['ratio']:.2f} | {r['ops']:.0f} | {r['refresh']:.1f} | {r['memory']} | "
            f"{r['fit'] / 3600:.1f} h |"
        )


if __name__ == "__main__":
    main()
