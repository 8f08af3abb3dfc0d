"""The log-domain grid of the attention probabilities (``quant.attn_probs``): values by hand, the
straight-through gradients, the calibration search against brute force, and the model-level wiring."""

import math

import pytest
import torch

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers import QuantMatMul
from fimaq.layers.mode import set_quant_mode
from fimaq.models.swap import quantize_model
from fimaq.quant.log_quantizer import LogQuantizer, log_fake_quant
from fimaq.quant.matmul_sweep import log_grid_search
from tests.conftest import tiny_model


def test_log2_grid_by_hand():
    # 3 bits: codes 0..6 are 1, 1/2, ..., 1/64; code 7 is 0. Rounding is in the log domain:
    # -log2(0.7) = 0.51 -> 1; -log2(0.75) = 0.42 -> 0; -log2(0.012) = 6.38 -> 6; -log2(0.011) = 6.51 -> 0
    x = torch.tensor([1.0, 0.75, 0.7, 0.3, 0.1, 0.012, 0.011, 0.0, 1.5])
    want = torch.tensor([1.0, 1.0, 0.5, 0.25, 0.125, 1 / 64, 0.0, 0.0, 1.0])
    got = log_fake_quant(x, torch.tensor(1.0), torch.tensor(1.0), 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # scale 0.8: levels 0.8 * 2^-q; 0.3 -> -log2(0.375) = 1.415 -> 1 -> 0.4
    assert log_fake_quant(
        torch.tensor([0.3]), torch.tensor(0.8), torch.tensor(1.0), 3
    ).item() == pytest.approx(0.4)


def test_adaptive_base_by_hand():
    # base 2^0.5, 2 bits: codes 0..2 are 1, 2^-0.5, 1/2; code 3 is 0
    x = torch.tensor([0.9, 0.6, 0.45, 0.36, 0.35, 0.0])
    # -2 log2(x): 0.30 -> 0; 1.47 -> 1; 2.30 -> 2; 2.95 -> 3 (zero); 3.03 -> 3 (zero)
    want = torch.tensor([1.0, 2**-0.5, 0.5, 0.0, 0.0, 0.0])
    got = log_fake_quant(x, torch.tensor(1.0), torch.tensor(0.5), 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_straight_through_gradients():
    x = torch.tensor([0.3, 0.05, 2.0, 1e-6], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    y = log_fake_quant(x, s, torch.tensor(1.0), 3, ste=True)
    torch.testing.assert_close(y.detach(), torch.tensor([0.25, 1 / 16, 1.0, 0.0]))
    y.sum().backward()
    # the rounding of the log-domain code passes its gradient straight through, so inside the grid
    # d x_hat / d x = x_hat / x and s gets none (a change of s moves the code with it); at the top
    # level the value is s (gradient 1 to s, none to x); a value rounded to 0 passes nothing
    torch.testing.assert_close(x.grad, torch.tensor([0.25 / 0.3, 0.0625 / 0.05, 0.0, 0.0]))
    assert s.grad.item() == pytest.approx(1.0)


def _brute_force(a, b_hat, out, bits, steps, num_scales):
    """Every (c, t) candidate of the documented grid scored in float64, per head."""
    heads = a.shape[1]
    top = a.transpose(0, 1).reshape(heads, -1).amax(1)
    best = [(math.inf, None, None)] * heads
    for c in steps:
        for t in torch.linspace(0, 1, num_scales):
            s = top * 2.0 ** (-c * t)
            a_hat = log_fake_quant(a, s.view(1, -1, 1, 1), torch.tensor(c).view(1, 1, 1, 1), bits)
            err = (out.double() - a_hat.double() @ b_hat.double()).pow(2).sum(dim=(0, 2, 3))
            for h in range(heads):
                if err[h] < best[h][0]:
                    best[h] = (float(err[h]), float(s[h]), c)
    return best


@pytest.mark.parametrize("steps", [(1.0,), (0.5, 1.0, 2.0)])
def test_grid_search_matches_brute_force(steps):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 2, 9, 9, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    a = logits.softmax(-1)
    b = torch.randn(6, 2, 9, 5, generator=g)
    out = a @ b
    scale, step = log_grid_search(a, b, out, 3, steps, 16, 4)
    brute = _brute_force(a, b, out, 3, steps, 16)
    for h in range(2):
        err = out[:, h].double() - log_fake_quant(a[:, h], scale[h], step[h], 3).double() @ b[:, h].double()
        mine = float(err.pow(2).sum())
        assert scale[h].item() == pytest.approx(brute[h][1], rel=1e-6)  # every candidate scored: the best
        assert step[h].item() == brute[h][2]
        assert mine == pytest.approx(brute[h][0], rel=1e-9)


def test_spec_puts_probabilities_on_the_log_grid():
    model = tiny_model("vit")
    quantize_model(model, QuantSpec(w_bits=4, a_bits=3, attn_probs="log2"))
    mm = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMatMul)]
    assert mm
    for name, m in mm:
        is_probs = name.endswith("matmul2")
        assert isinstance(m.A_quantizer, LogQuantizer) == is_probs
        assert not isinstance(m.B_quantizer, LogQuantizer)
        if is_probs:
            assert m.A_quantizer.bits == 3 and m.A_quantizer.kind == "log2"
    with pytest.raises(FimaqError, match="attn_probs"):
        QuantSpec(attn_probs="log10").validate()


@pytest.mark.parametrize("kind", ["log2", "adalog"])
def test_calibrated_probabilities_lie_on_the_grid(kind):
    torch.manual_seed(0)
    model = tiny_model("vit")
    images = torch.randn(8, 3, 32, 32)
    quantize_model(model, QuantSpec(w_bits=4, a_bits=3, attn_probs=kind))
    calibrate_model(model, images, CalibConfig(num_images=8, eq_n=32, search_rounds=1), progress=False)
    q = model.blocks[0].attn.matmul2.A_quantizer
    seen = {}
    q.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(images[:2])
    s, c = q.scale.detach()[0, :, :1, :], q.step[0]  # (H, 1, 1) each
    assert torch.isfinite(s).all() and (s > 0).all()
    if kind == "log2":
        assert torch.equal(q.step, torch.ones_like(q.step))
    y = seen["y"][0]  # (H, N, N)
    nonzero = y > 0
    codes = -torch.log2(y.clamp_min(1e-30) / s) / c
    assert torch.allclose(codes[nonzero], codes[nonzero].round(), atol=1e-4)  # on the levels s 2^(-q c)
    assert codes[nonzero].round().max() <= 2**3 - 2
    assert nonzero.float().mean() > 0.5  # most probabilities keep a level at 3 bits


def test_state_round_trip_and_exports(tmp_path):
    from fimaq.export import export_quantized, load_quantized
    from fimaq.export_onnx import export_onnx
    from tests.conftest import TINY_VIT

    torch.manual_seed(0)
    model = tiny_model("vit")
    with torch.no_grad():  # a unit-scale head: no near-tied logits for the argmax parity check
        model.head.weight.copy_(torch.randn(model.head.weight.shape))
    images = torch.randn(8, 3, 32, 32)
    spec = QuantSpec(w_bits=4, a_bits=4, attn_probs="adalog")
    quantize_model(model, spec)
    calibrate_model(model, images, CalibConfig(num_images=8, eq_n=32, search_rounds=0), progress=False)
    state = model.state_dict()
    assert "blocks.0.attn.matmul2.A_quantizer.step" in state
    other = quantize_model(tiny_model("vit"), spec)
    other.load_state_dict(state, strict=True)
    set_quant_mode(other, enabled=True)
    with torch.no_grad():
        want = model(images)
        torch.testing.assert_close(other(images), want)
    quant = {"w_bits": 4, "a_bits": 4, "head_a_bits": None, "overrides": {}, "attn_probs": "adalog"}
    meta = {"arch": TINY_VIT[0], "model_kwargs": TINY_VIT[1], "quant": quant, "stage": "calibrated"}
    export_quantized(model, meta, tmp_path / "m.safetensors", check_input=images)  # checks the reload
    loaded = load_quantized(tmp_path / "m.safetensors")
    assert isinstance(loaded.blocks[1].attn.matmul2.A_quantizer, LogQuantizer)
    with torch.no_grad():
        assert torch.equal(loaded(images), want)
    pytest.importorskip("onnxruntime")
    result = export_onnx(model, tmp_path / "m.onnx", images[:2], check_input=images)
    assert result["forms"]["act_log"] == 2 and result["parity"]["ok"]
    assert result["parity"]["max_abs_diff"] < 1e-5


def test_reconstruction_learns_the_log_scale():
    from fimaq.config import FisherConfig, ReconConfig
    from fimaq.recon import reconstruct_model

    torch.manual_seed(0)
    net = quantize_model(tiny_model("vit"), QuantSpec(w_bits=3, a_bits=3, attn_probs="log2"))
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=1), progress=False)
    q = net.blocks[0].attn.matmul2.A_quantizer
    before = q.scale.detach().clone()
    cfg = ReconConfig(iters=8, batch_size=8, error_images=16, loss="fisher_dplr")
    report = reconstruct_model(net, images, cfg, FisherConfig(rank=2, batch_size=16), progress=False)
    assert all(math.isfinite(v) for v in report.error_after.values())
    assert isinstance(q, LogQuantizer) and q.ste is False and q.enabled  # back to inference mode
    assert not torch.equal(q.scale.detach(), before)  # learned (its top level clips the largest values)
    with torch.no_grad():
        assert torch.isfinite(net(images[:4])).all()
