"""The native fused fake-quant kernel: the same values bit for bit as the eager passes (output, both
straight-through derivatives, the gradients, QDrop selections), on every operand layout a block
hands it, on one and two threads; and the fallback when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from fimaq.config import FisherConfig, ReconConfig
from fimaq.layers.mode import set_quant_mode
from fimaq.quant import native
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.ste import drop_threshold, fake_quant_drop, fake_quant_ste, mask_from_bytes, random_bytes
from fimaq.recon.batches import BatchMasks
from fimaq.recon.cache import UnitCache
from fimaq.recon.module import BlockReconModule
from fimaq.recon.units import Unit

needs_native = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: the eager kernel runs")


def _operands(kind: str, g: torch.Generator):
    """(x, scale, zero point) as a block's quantizers see them."""
    if kind == "linear_input":  # per-token scale, one zero point
        x = torch.randn(4, 9, 40, generator=g) * 3
        return x, torch.rand(1, 9, 1, generator=g) + 0.2, torch.tensor([3.0])
    qkv = torch.randn(4, 9, 3 * 2 * 40, generator=g) * 3
    q, k, v = qkv.reshape(4, 9, 3, 2, 40).permute(2, 0, 3, 1, 4)  # strided views, as in attention
    heads = torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1)
    if kind == "q":  # per-row scale of the first product's left operand
        return q, torch.rand(1, 2, 9, 1, generator=g) + 0.2, heads
    if kind == "k_transposed":  # per-column scale, the operand a transposed view
        return k.transpose(-2, -1), torch.rand(1, 2, 1, 9, generator=g) + 0.2, heads
    if kind == "v":  # the scale varies along the innermost dimension in memory
        return v, torch.rand(1, 2, 1, 40, generator=g) + 0.2, heads
    # exact ties (x / s = n + 1/2), rounded half to even, and many clamped codes
    x = (torch.randint(-12, 12, (3, 50, 30), generator=g).float() + 0.5) * 0.25
    return x, torch.tensor(0.25), torch.tensor(3.0)


KINDS = ["linear_input", "q", "k_transposed", "v", "ties"]


def _run(x, s, zp, keep, p, upstream):
    x = x.detach().requires_grad_()
    s = s.detach().requires_grad_()
    out = fake_quant_ste(x, s, zp, 3, keep, p)
    gx, gs = torch.autograd.grad((out * upstream).sum(), [x, s])
    return out.detach(), gx, gs


@needs_native
@pytest.mark.parametrize("p", [None, 0.5, 1.0])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("upstream_layout", ["contiguous", "transposed"])
def test_native_kernel_gives_the_eager_values_bit_for_bit(kind, p, upstream_layout):
    """The same output, input gradient and scale gradient bit for bit; the upstream gradient in the
    layout of the saved derivatives or another (one pass, or the products apart)."""
    g = torch.Generator().manual_seed(0)
    x, s, zp = _operands(kind, g)
    assert native.applies(x, s, zp)
    keep = random_bytes(x.shape, torch.Generator().manual_seed(1), x.device) if p is not None else None
    upstream = torch.randn(x.shape, generator=g)
    if upstream_layout == "transposed":
        upstream = upstream.transpose(0, -1).contiguous().transpose(0, -1)
    got = _run(x, s, zp, keep, p, upstream)
    with native.enabled(False):
        assert not native.applies(x, s, zp)
        want = _run(x, s, zp, keep, p, upstream)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    # in x's logical order (what a product reads without a copy), whatever x's own layout
    assert got[0].is_contiguous()
    # the kernel did quantize: codes were clamped, and QDrop kept some float values
    assert (got[0] != torch.round(x / s) * s).any()
    if p == 0.5:
        assert (got[0] == x).any() and (got[0] != x).any()
    # no autograd (a Fisher refresh): the same values from the same bytes, in the same layout
    drop = fake_quant_drop(x, s, zp, 3, keep, p)
    assert torch.equal(drop, want[0]) and drop.stride() == got[0].stride()


@needs_native
def test_native_kernel_on_two_threads_and_large_operands():
    """Above ATen's grain (32768 elements) the kernel splits the work across threads; the values do
    not depend on the split."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 65, 384, generator=g)[:, :, 64:320] * 2  # not contiguous, 133120 elements
    s, zp = torch.rand(1, 65, 1, generator=g) + 0.1, torch.tensor([4.0])
    keep = random_bytes(x.shape, g, x.device)
    upstream = torch.randn(x.shape, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(x, s, zp, keep, 0.25, upstream))
        with native.enabled(False):
            results.append(_run(x, s, zp, keep, 0.25, upstream))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("grad", [True, False])
def test_quantizer_draws_the_same_masks_with_and_without_the_native_kernel(grad):
    """Through a training quantizer with QDrop: the native kernel reads the raw bytes, the eager one
    a float mask made from them; the generator advances the same and the output is the same."""
    x = torch.randn(4, 2, 9, 40, generator=torch.Generator().manual_seed(0)).transpose(-2, -1) * 3
    q = UniformQuantizer(3, (1, 2, 1, 9), (1, 2, 1, 1))
    q.set_qparams(torch.rand(1, 2, 1, 9) + 0.2, torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1))
    outs = []
    for on in (True, False):
        masks = BatchMasks(torch.Generator().manual_seed(5))
        set_quant_mode(q, enabled=True, train=True, qdrop=0.5, masks=masks)
        with native.enabled(on), torch.set_grad_enabled(grad):
            outs.append(q(x).detach())
        outs.append(torch.rand(3, generator=masks.generator))
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_without_a_compiler_the_eager_kernel_runs(monkeypatch, tmp_path):
    """No C++ compiler: no library, ``applies`` is False, and quantizing still works."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("FIMAQ_CACHE", str(tmp_path))
    x, s, zp = _operands("q", torch.Generator().manual_seed(0))
    assert native.library() is None and not native.applies(x, s, zp)
    keep = random_bytes(x.shape, torch.Generator().manual_seed(1), x.device)
    out = fake_quant_ste(x, s, zp, 3, keep, 0.5)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not list(tmp_path.iterdir())


@needs_native
@pytest.mark.parametrize("p", [0.5, 1.0, 0.0])
def test_input_mix_kernel_gives_the_rows_and_lerp_bit_for_bit(p):
    """The step's QDrop input mix from the cached rows: ``index_select`` and ``torch.lerp`` with the
    float mask of the same bytes, bit for bit (signed zeros, infinities and NaN included)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 9, 16, generator=g), torch.randn(20, 9, 16, generator=g)
    a[:, 0, :3] = torch.tensor([-0.0, float("inf"), float("nan")])
    b[:, 1, :3] = torch.tensor([0.0, float("-inf"), float("nan")])
    idx = torch.randperm(20, generator=g)[:7]
    keep = random_bytes((7, 9, 16), torch.Generator().manual_seed(1), a.device)
    want = torch.lerp(a.index_select(0, idx), b.index_select(0, idx), mask_from_bytes(keep, p))
    got = native.mix_rows(a, b, idx, keep, drop_threshold(p))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    rows_a, rows_b = a.index_select(0, idx), b.index_select(0, idx)
    if p == 0.5:  # both kinds of element, each from its own row
        assert (got == rows_a).any() and (got == rows_b).any()
    else:  # all quantized (p = 1) or all float (p = 0)
        assert torch.equal(got[:, 2:], (rows_b if p == 1.0 else rows_a)[:, 2:])
    with pytest.raises(RuntimeError, match="refused"):
        native.mix_rows(a, b, torch.tensor([3, 20]), keep[:2], drop_threshold(p))


@needs_native
def test_reconstruction_step_inputs_are_the_same_with_and_without_the_native_mix():
    """A unit's step input (QDrop mix of its cached float and quantized inputs) from the same
    generator: the same values and the same draws consumed either way."""
    g = torch.Generator().manual_seed(0)
    cache = UnitCache(*(torch.randn(30, 5, 8, generator=g) for _ in range(3)))
    idx = torch.tensor([4, 17, 0, 29, 4])
    got = []
    for on in (True, False):
        gen = torch.Generator().manual_seed(7)
        unit = Unit("blocks.0", torch.nn.Linear(8, 8), "block")
        module = BlockReconModule(unit, cache, ReconConfig(), FisherConfig(), masks=BatchMasks(gen))
        with native.enabled(on):
            got.append((module._inputs(idx), gen.get_state()))
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1])
    assert not torch.equal(got[0][0], cache.x_fp[idx]) and not torch.equal(got[0][0], cache.x_q[idx])


@needs_native
def test_reconstruction_with_the_native_kernels_is_the_eager_one_bit_for_bit():
    """A whole AdaRound reconstruction (warm-up, then the regulariser, QDrop, a Fisher loss): the same
    state, tensor for tensor, with the native kernels and with eager PyTorch (``FIMAQ_NATIVE=0``)."""
    from conftest import tiny_model

    from fimaq.calib import calibrate_model
    from fimaq.config import CalibConfig, QuantSpec
    from fimaq.models.swap import quantize_model
    from fimaq.recon.driver import reconstruct_model

    states = []
    for on in (True, False):
        net = quantize_model(tiny_model("vit", seed=1), QuantSpec(w_bits=3, a_bits=3))
        images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        calib = CalibConfig(num_images=16, eq_n=32, search_rounds=1)
        calibrate_model(net, images[:16], calib, progress=False)
        cfg = ReconConfig(iters=30, batch_size=8, error_images=16, loss="fisher_dplr")
        with native.enabled(on):
            reconstruct_model(
                net, images, cfg, FisherConfig(rank=2), progress=False, units=["blocks.0", "head"]
            )
        states.append(net.state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
