"""Calibration: the LayerNorm fold keeps the float function, searches fill every quantizer, and a
calibrated tiny model tracks its float outputs."""

import copy

import pytest
import torch

from fimaq.calib import calibrate_model
from fimaq.calib.layers import fold_layernorm
from fimaq.config import CalibConfig, QuantSpec
from fimaq.errors import FimaqError
from fimaq.models.swap import iter_qlayers, quantize_model, set_quant_enabled
from tests.conftest import tiny_model

FAST = CalibConfig(num_images=8, eq_n=32, search_rounds=1, batch_size=4)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_layernorm_fold_keeps_float_function(which):
    model = quantize_model(tiny_model(which), QuantSpec(w_bits=4, a_bits=4))
    x = torch.randn(4, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        ref = model(x)
    for layer in iter_qlayers(model):
        if layer.norm is None:
            continue
        captured = []
        hook = layer.module.register_forward_hook(lambda m, a, o, store=captured: store.append(a[0]))
        with torch.no_grad():
            model(x)
        hook.remove()
        inp = captured[0].reshape(-1, captured[0].shape[-1])
        with torch.no_grad():
            folded = fold_layernorm(layer.norm, layer.module, inp, 4, FAST)
        assert not torch.allclose(folded, inp)  # the LayerNorm output really changed
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_calibration_fills_quantizers_and_tracks_fp(which):
    fp = tiny_model(which)
    images = torch.randn(8, 3, *fp.patch_embed.img_size)
    model = quantize_model(copy.deepcopy(fp), QuantSpec(w_bits=8, a_bits=8))
    report = calibrate_model(model, images, FAST, progress=False)
    layers = list(iter_qlayers(model))
    assert set(report.layer_seconds) == {layer.name for layer in layers}
    for layer in layers:
        for q in (
            getattr(layer.module, n, None)
            for n in ("w_quantizer", "a_quantizer", "A_quantizer", "B_quantizer")
        ):
            if q is not None and q.bits is not None:
                assert q.enabled and torch.isfinite(q.scale).all() and (q.scale > 0).all()
                assert torch.all(q.zero_point == q.zero_point.round())
    with torch.no_grad():
        out_q, out_fp = model(images), fp(images)
        set_quant_enabled(model, False)
        out_off = model(images)
    torch.testing.assert_close(out_off, out_fp, rtol=1e-4, atol=1e-4)  # folds kept the FP function
    rel = (out_q - out_fp).norm() / out_fp.norm()
    assert rel < 0.1, f"W8A8 output deviates {rel:.3f} from FP"


def test_calibration_rejects_bad_images():
    model = quantize_model(tiny_model("vit"), QuantSpec())
    with pytest.raises(FimaqError, match="NaN"):
        calibrate_model(model, torch.full((2, 3, 32, 32), float("nan")), FAST, progress=False)
    with pytest.raises(FimaqError, match="shape"):
        calibrate_model(model, torch.zeros(3, 32, 32), FAST, progress=False)
