"""The structure of a reconstruction step on the eager path (what a GPU runs): the compute operations
it dispatches, against a plain float forward and backward of the same block. Counted, not timed, so
the same on every machine."""

from __future__ import annotations

import collections
import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fimaq.artifacts import resolve_checkpoint
from fimaq.calib.minmax import minmax_calibrate
from fimaq.config import FisherConfig, QuantSpec, ReconConfig
from fimaq.data import DigitsDataModule
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.quant import native
from fimaq.recon import reconstruct_model

# operations that only make views, allocate or read a value back: not compute
META = {
    "view", "detach", "t", "select", "permute", "expand", "reshape", "unsqueeze", "squeeze", "as_strided",
    "slice", "transpose", "_unsafe_view", "alias", "unbind", "split", "lift_fresh", "split_with_sizes",
    "_local_scalar_dense", "is_nonzero", "empty", "empty_like", "empty_strided", "new_empty", "set_",
}  # fmt: skip
KW = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in META:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _model():
    torch.manual_seed(0)
    return create_fp_model(
        "deit_tiny_patch16_224", resolve_checkpoint("embedded:digits_deit_tiny"), model_kwargs=KW
    )


def test_eager_step_dispatches_at_most_four_times_the_plain_pass():
    """Block 0 of the embedded default at W4/A4 (QDrop, AdaRound, fisher_dplr): the operations of a
    40-step reconstruction minus those of a 20-step one (fixed costs cancel), per step, are at most
    four times those of a plain float forward + squared-mean loss + backward of the block."""
    dm = DigitsDataModule(recon_size=256)
    dm.setup()
    images = dm.reconstruction_tensors()[0]
    fp = _model()
    block = copy.deepcopy(fp.blocks[0])
    with torch.no_grad():
        x = fp._pos_embed(fp.patch_embed(images[:32]))
    block(x).pow(2).mean().backward()  # (first-call work out of the count)
    plain = Count()
    with plain:
        block(x).pow(2).mean().backward()
    plain_ops = sum(plain.ops.values())
    totals = {}
    for iters in (20, 40):
        net = quantize_model(_model(), QuantSpec(w_bits=4, a_bits=4))
        minmax_calibrate(net, images[:128])
        count = Count()
        with native.enabled(False), count:
            reconstruct_model(
                net, images, ReconConfig(iters=iters), FisherConfig(rank=1, num_samples=64),
                progress=False, units=["blocks.0"],
            )  # fmt: skip
        totals[iters] = count.ops
    per_step = {k: (totals[40][k] - totals[20][k]) / 20 for k in totals[40]}
    step_ops = sum(per_step.values())
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:8]
    assert 40 <= plain_ops <= 60, plain.ops  # the block itself: linear layers, attention, norms, MLP
    assert step_ops <= 4 * plain_ops, f"{step_ops:.1f} ops per step vs {plain_ops} plain; most: {top}"
    # the step's structure: one random draw and one comparison for every QDrop mask of a step at most,
    # one pass per AdaRound operation for all four weights together (not one per layer)
    assert per_step.get("randint", 0) <= 1 and per_step.get("lt", 0) <= 1, top
    assert per_step.get("sigmoid", 0) == 1, top
