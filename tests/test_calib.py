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


def _brute_matmul_calibration(a, b, out, bits, eq_n, rounds):
    """Section 2.3 written out plainly: full float64 errors, no pruning, no reuse."""
    from fimaq.quant import grids
    from fimaq.quant.fake_quant import fake_quant

    bounds = {}
    for op, x in (("A", a), ("B", b)):
        up, lo = grids.matmul_operand_bounds(x, eq_n)
        bounds[op] = (up[:eq_n], lo[:eq_n])
    heads = a.shape[1]
    sel = {op: [torch.full((heads,), eq_n - 1), torch.full((heads,), eq_n - 1)] for op in "AB"}

    def qp(op, iu, il):
        up, lo = bounds[op]
        return grids.bounds_to_qparams(up.gather(0, iu.view(1, -1))[0], lo.gather(0, il.view(1, -1))[0], bits)

    def quant(op, t, s, z):
        return fake_quant(t, s.view(1, -1, 1, 1), z.view(1, -1, 1, 1), bits)

    def sweep(op, mode):
        up, lo = bounds[op]
        if mode == "upper":
            lo = lo.gather(0, sel[op][1].view(1, -1)).expand_as(up)
        if mode == "lower":
            up = up.gather(0, sel[op][0].view(1, -1)).expand_as(lo)
        s, z = grids.bounds_to_qparams(up, lo, bits)
        other = "B" if op == "A" else "A"
        fixed = quant(other, b if op == "A" else a, *qp(other, *sel[other]))
        errs = []
        for c in range(s.shape[0]):
            q = quant(op, a if op == "A" else b, s[c], z[c])
            prod = q @ fixed if op == "A" else fixed @ q
            errs.append(((prod - out).double() ** 2).sum((0, 2, 3)))
        idx = torch.stack(errs).argmin(0)
        if mode in ("joint", "upper"):
            sel[op][0] = idx
        if mode in ("joint", "lower"):
            sel[op][1] = idx

    sweep("A", "joint")
    sweep("B", "joint")
    for _ in range(rounds):
        for op in "AB":
            sweep(op, "lower")
            sweep(op, "upper")
    return qp("A", *sel["A"]), qp("B", *sel["B"])


def test_matmul_calibration_equals_plain_coordinate_descent():
    from fimaq.calib.layers import calibrate_matmul
    from fimaq.layers import QuantMatMul

    torch.manual_seed(7)
    gains = torch.tensor([1.0, 8.0, 0.2]).view(1, 3, 1, 1)  # heads of very different ranges
    a, b = torch.randn(10, 3, 6, 5) * gains, torch.randn(10, 3, 5, 7).exp()
    out = a @ b
    cfg = CalibConfig(eq_n=16, search_rounds=2, candidate_chunk=5, images_per_chunk=3)
    layer = QuantMatMul(3, 6, 7, 3, 3)
    calibrate_matmul(layer, a, b, out, cfg)
    (sa, za), (sb, zb) = _brute_matmul_calibration(a, b, out, 3, 16, 2)
    torch.testing.assert_close(layer.A_quantizer.scale[0, :, 0, 0], sa)
    torch.testing.assert_close(layer.B_quantizer.scale[0, :, 0, 0], sb)
    assert torch.equal(layer.A_quantizer.zero_point.flatten(), za) and torch.equal(
        layer.B_quantizer.zero_point.flatten(), zb
    )
