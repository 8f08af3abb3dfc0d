"""Calibration: the LayerNorm fold keeps the float function, searches fill every quantizer, and a
calibrated tiny model tracks its float outputs."""

import copy

import pytest
import torch

from fimaq.calib import calibrate_model
from fimaq.calib.layers import fold_layernorm
from fimaq.config import CalibConfig, QuantSpec
from fimaq.errors import FimaqError
from fimaq.layers.mode import quant_mode
from fimaq.models.swap import iter_qlayers, quantize_model
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
        with quant_mode(model, enabled=False):
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


def _float64_error(a, b, out, qa, qb, bits):
    """Per-head squared error of the product of the quantized operands, float64 (H,)."""
    from fimaq.quant.fake_quant import fake_quant

    def quant(t, q):
        return fake_quant(t, q[0].view(1, -1, 1, 1), q[1].view(1, -1, 1, 1), bits).double()

    return ((quant(a, qa) @ quant(b, qb) - out.double()) ** 2).sum((0, 2, 3))


def test_matmul_calibration_ends_at_a_coordinatewise_optimum():
    """Run to convergence, the per-head bounds of both operands are each optimal with the other three
    fixed (brute force over every candidate of that bound, float64): what coordinate descent over
    the four bounds guarantees, checked without following its schedule."""
    from fimaq.calib.layers import calibrate_matmul
    from fimaq.layers import QuantMatMul
    from fimaq.quant import grids

    torch.manual_seed(7)
    gains = torch.tensor([1.0, 8.0, 0.2]).view(1, 3, 1, 1)  # heads of very different ranges
    a, b = torch.randn(10, 3, 6, 5) * gains, torch.randn(10, 3, 5, 7).exp()
    out = a @ b
    eq_n, bits = 16, 3
    cfg = CalibConfig(eq_n=eq_n, search_rounds=12, candidate_chunk=5, images_per_chunk=3)
    layer = QuantMatMul(3, 6, 7, bits, bits)
    calibrate_matmul(layer, a, b, out, cfg)
    got = {
        op: (q.scale[0, :, 0, 0].detach(), q.zero_point.flatten())
        for op, q in (("A", layer.A_quantizer), ("B", layer.B_quantizer))
    }
    best = _float64_error(a, b, out, got["A"], got["B"], bits)
    for op, x in (("A", a), ("B", b)):
        up, lo = grids.matmul_operand_bounds(x, eq_n)
        up, lo = up[:eq_n], lo[:eq_n]
        for h in range(3):
            pairs = [(i, j) for i in range(eq_n) for j in range(eq_n)]
            s, z = grids.bounds_to_qparams(up[[i for i, _ in pairs], h], lo[[j for _, j in pairs], h], bits)
            match = [k for k in range(len(pairs)) if s[k] == got[op][0][h] and z[k] == got[op][1][h]]
            assert match, f"{op} head {h}: the calibrated qparams are not on the candidate grid"
            iu, il = pairs[match[0]]
            for fixed_upper in (True, False):  # sweep one bound, the other fixed
                errors = []
                for c in range(eq_n):
                    u, low = (up[iu, h], lo[c, h]) if fixed_upper else (up[c, h], lo[il, h])
                    cs, cz = grids.bounds_to_qparams(u, low, bits)
                    trial = {k: (v[0].clone(), v[1].clone()) for k, v in got.items()}
                    trial[op][0][h], trial[op][1][h] = cs, cz
                    errors.append(_float64_error(a, b, out, trial["A"], trial["B"], bits)[h])
                assert best[h] <= min(errors) * (1 + 1e-12), (op, h, fixed_upper)


def test_an_interrupted_calibration_resumes_after_its_last_layer(tmp_path, monkeypatch):
    from fimaq.artifacts import read_meta
    from fimaq.calib import calibrate as calib_mod
    from fimaq.errors import Interrupted

    images = torch.randn(8, 3, 32, 32)
    spec = QuantSpec(w_bits=4, a_bits=4)
    meta = {"arch": "tiny", "quant": {"w_bits": 4}}
    whole = quantize_model(tiny_model("vit"), spec)
    calibrate_model(whole, images, FAST, progress=False)

    state = tmp_path / "calib_state.safetensors"
    first = quantize_model(tiny_model("vit"), spec)
    real, calls = calib_mod.calibrate_layer, []

    def stop_at_the_ninth(layer, *args):
        if len(calls) == 8:
            raise Interrupted(15)
        calls.append(layer.name)
        real(layer, *args)

    monkeypatch.setattr(calib_mod, "calibrate_layer", stop_at_the_ninth)
    with pytest.raises(Interrupted) as exc:
        calibrate_model(first, images, FAST, progress=False, state_path=state, meta=meta)
    assert "during calibration, at layer" in exc.value.where
    saved = read_meta(state)["layers_done"]
    assert 0 < len(saved) <= 8 and saved == calls[: len(saved)]  # written after each finished unit

    monkeypatch.setattr(calib_mod, "calibrate_layer", real)
    resumed = quantize_model(tiny_model("vit"), spec)
    seen = []
    monkeypatch.setattr(
        calib_mod, "calibrate_layer", lambda layer, *a: (seen.append(layer.name), real(layer, *a))
    )
    calibrate_model(resumed, images, FAST, progress=False, state_path=state, meta=meta)
    assert seen and not set(seen) & set(saved)  # only the layers the first run had not finished
    want, got = whole.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(FimaqError, match="belongs to a calibration with"):
        calibrate_model(
            quantize_model(tiny_model("vit"), spec), images, FAST, progress=False, state_path=state
        )
