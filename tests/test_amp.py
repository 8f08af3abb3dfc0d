"""Mixed precision on CPU: bf16 autocast in every forward pass, float32 quantizers and losses."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from fimaq.amp import autocast, check_precision
from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers import QuantLinear
from fimaq.layers.mode import generator_masks, quant_mode, set_quant_mode
from fimaq.models.swap import quantize_model
from fimaq.quant.fake_quant import fake_quant
from fimaq.quant.quantizer import UniformQuantizer


def test_quantizer_computes_in_float32_under_autocast():
    q = UniformQuantizer(4, (1,), (1,))
    q.set_qparams(torch.tensor([0.1]), torch.tensor([8.0]))
    masks = generator_masks(torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(1)).bfloat16().requires_grad_()
    with quant_mode(q, train=True, qdrop=0.5, masks=masks):
        y = q(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert q.scale.dtype == torch.float32 and q.scale.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16
    # without QDrop the values are the float32 grid points rounded once to bf16
    expected = fake_quant(x.detach().float(), q.scale.detach(), q.zero_point, 4).bfloat16()
    with quant_mode(q, train=True):
        assert torch.equal(q(x.detach()), expected)


def test_quant_linear_runs_under_cpu_autocast():
    layer = QuantLinear(8, 4, w_bits=4, a_bits=4)
    for qz in (layer.w_quantizer, layer.a_quantizer):
        qz.set_qparams(torch.tensor([0.05]), torch.tensor([8.0]))
    set_quant_mode(layer, enabled=True)
    x = torch.randn(2, 3, 8)
    with autocast("bf16-mixed", "cpu"):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), layer(x), atol=0.05, rtol=0.02)


def test_unsupported_precisions_are_named():
    assert check_precision("bf16-mixed") == "bf16-mixed" and check_precision(32) == "32"
    with pytest.raises(FimaqError, match="bf16-true"):
        check_precision("bf16-true")
    with pytest.raises(FimaqError, match="needs a GPU"):
        autocast("16-mixed", "cpu")


def _dtype_spy(module: torch.nn.Module, seen: list[torch.dtype]):
    return module.register_forward_hook(lambda _m, _a, out: seen.append(out.dtype))


def test_bf16_calibration_and_reconstruction_use_autocast_and_stay_close_to_float32():
    from fimaq.recon import reconstruct_model

    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cfg = CalibConfig(num_images=16, eq_n=32, search_rounds=1)
    nets = {}
    for precision in ("32-true", "bf16-mixed"):
        net = quantize_model(tiny_model("vit"), QuantSpec(w_bits=4, a_bits=4))
        seen: list[torch.dtype] = []
        hook = _dtype_spy(net.blocks[0].attn.qkv, seen)
        calibrate_model(net, images[:16], cfg, progress=False, precision=precision)
        expect = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
        assert seen and set(seen) == {expect}  # the capture passes ran under autocast (or not)
        nets[precision] = net
        hook.remove()
    # the calibrated scales differ only by what bf16 activations change in the searches
    s32 = nets["32-true"].blocks[0].mlp.fc1.w_quantizer.scale
    s16 = nets["bf16-mixed"].blocks[0].mlp.fc1.w_quantizer.scale
    assert s16.dtype == torch.float32
    assert torch.allclose(s32, s16, rtol=0.1)

    net = nets["bf16-mixed"]
    seen = []
    hook = _dtype_spy(net.blocks[1].mlp.fc2, seen)
    recon = ReconConfig(iters=4, batch_size=8, error_images=16)
    report = reconstruct_model(
        net, images, recon, FisherConfig(rank=2, batch_size=16), precision="bf16-mixed", progress=False
    )
    hook.remove()
    assert torch.bfloat16 in seen  # caching, Fisher refreshes and training steps under autocast
    assert all(math.isfinite(v) for v in report.error_after.values())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        agree = (net(images).argmax(1) == nets["32-true"](images).argmax(1)).float().mean()
    assert agree > 0.5
