"""Exact int8 products for the candidate searches, against brute force in float64."""

import pytest
import torch

from fimaq.quant import fake_quant, grids, search
from fimaq.quant.int_sweep import int_matmul_available, product_sse

needs_int_mm = pytest.mark.skipif(
    not int_matmul_available(torch.device("cpu")), reason="torch._int_mm unavailable"
)


def _brute(x, y, out, y_s, y_z, y_bits, scales, zps, bits):
    """Squared error per (candidate, image, group) of out - x_hat y_hat, both dequantized in float64
    from the float32 codes (the quantizer's own rounding)."""
    g = x.shape[1]
    y_s, y_z = y_s.view(1, g, 1, -1), y_z.view(1, g, 1, -1)
    y_codes = torch.clamp(torch.round(y / y_s) + y_z, 0, 2**y_bits - 1)
    y_hat = (y_codes.double() - y_z.double()) * y_s.double()
    rows = []
    for c in range(scales.shape[0]):
        s, z = scales[c].view(1, g, 1, 1), zps[c].view(1, g, 1, 1)
        codes = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
        x_hat = (codes.double() - z.double()) * s.double()
        rows.append(((out.double() - x_hat @ y_hat) ** 2).sum((2, 3)))
    return torch.stack(rows)


@needs_int_mm
@pytest.mark.parametrize("bits,y_bits", [(2, 3), (4, 4), (8, 4), (3, 8), (8, 8)])
def test_product_sse_equals_brute_force(bits, y_bits):
    torch.manual_seed(bits * 10 + y_bits)
    x, y = torch.randn(3, 2, 7, 5), torch.randn(3, 2, 5, 6)
    out = x @ y
    up, lo = grids.matmul_operand_bounds(x, 16)
    scales, zps = grids.bounds_to_qparams(up, lo, bits)
    yu, yl = grids.matmul_operand_bounds(y, 16)
    y_s, y_z = grids.bounds_to_qparams(yu[8], yl[8], y_bits)
    got = product_sse(x, y, out, (y_s, y_z, y_bits), scales, zps, bits)
    expect = _brute(x, y, out, y_s, y_z, y_bits, scales, zps, bits)
    # float32 scaling of the exact integer product: well inside the searches' tie tolerance
    rtol = min(2e-6 * 2 ** max(0, bits - 4), search.tie_rtol(bits) / 10)
    torch.testing.assert_close(got, expect, rtol=rtol, atol=1e-9)


@needs_int_mm
@pytest.mark.parametrize("w_bits", [3, 8])
def test_product_sse_per_column_qparams_shared_operand(w_bits):
    """A linear layer: one weight for every image, quantized per output column."""
    torch.manual_seed(w_bits)
    w = torch.randn(4, 9)  # (out, in)
    x = torch.randn(5, 1, 6, 9)
    out = x @ w.T + 0.1 * torch.randn(5, 1, 6, 4)
    ws, wz = grids.weight_grid(w, w_bits, 16)
    ws, wz = ws[5, :, 0], wz[5, :, 0]  # one candidate per row
    scales, zps = grids.activation_grid(x, 4, 32)
    got = product_sse(
        x,
        w.T.reshape(1, 1, 9, 4),
        out,
        (ws.view(1, 4), wz.view(1, 4), w_bits),
        scales.view(-1, 1),
        zps.view(-1, 1),
        4,
    )
    w_hat = fake_quant(w, ws.view(4, 1), wz.view(4, 1), w_bits).double()
    expect = torch.stack(
        [
            ((out.double() - fake_quant(x, scales[c], zps[c], 4).double() @ w_hat.T) ** 2).sum((2, 3))
            for c in range(scales.shape[0])
        ]
    )
    torch.testing.assert_close(got, expect, rtol=2e-6, atol=1e-9)


@needs_int_mm
def test_act_output_search_int_path_equals_float_path():
    """fc2-like layer (in >= out) with a quantized weight: the int8 path ranks like brute force."""
    torch.manual_seed(5)
    w, b = torch.randn(4, 12), torch.randn(4)
    x = torch.randn(48, 12)
    y = x @ w.T + b
    ws, wz = grids.weight_grid(w, 4, 16)
    ws, wz = ws[7], wz[7]
    w_hat = fake_quant(w, ws, wz, 4)
    scales, zps = grids.activation_grid(x, 3, 64)
    brute = torch.stack(
        [
            ((fake_quant(x, scales[c], zps[c], 3) @ w_hat.T + b - y).double() ** 2).sum()
            for c in range(len(scales))
        ]
    )
    got = search.act_output_sse(x, w_hat, b, y, scales, zps, 3, 7, 12, w_qparams=(w, ws, wz, 4))[:, 0]
    assert int(got.argmin()) == int(brute.argmin())
    kept = torch.isfinite(got)
    torch.testing.assert_close(got[kept], brute[kept], rtol=2e-6, atol=1e-9)


@needs_int_mm
@pytest.mark.parametrize(("bits", "zp"), [(3, 2.0), (8, 0.0), (8, 131.0)])
def test_code_gram_equals_float64_gram(bits, zp, monkeypatch):
    from fimaq.quant import int_sweep

    monkeypatch.setattr(int_sweep, "_GRAM_ROWS", 64)  # several int32 slices
    torch.manual_seed(11)
    x = torch.randn(300, 7) * 3
    s, z = torch.tensor(0.37 if bits == 3 else 0.031), torch.tensor(zp)
    codes = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1).double() - zp
    expect = (codes.T @ codes) * s.double() ** 2  # exact: the codes are small integers
    torch.testing.assert_close(int_sweep.code_gram(x, s, z, bits), expect, rtol=1e-12, atol=0)


def test_weight_output_search_from_codes_equals_brute_force():
    torch.manual_seed(12)
    w, b = torch.randn(6, 12), torch.randn(6)
    x = torch.randn(80, 12)
    y = x @ w.T + b + 0.05 * torch.randn(80, 6)
    s, z = torch.tensor(0.4), torch.tensor(3.0)
    x_hat = fake_quant(x, s, z, 3)
    scales, zps = grids.weight_grid(w, 3, 32)
    vals = search.weight_output_sse(w, b, x_hat, y, scales, zps, 3, chunk=5, x_qparams=(s, z, 3))
    brute = torch.stack(
        [
            (
                (x_hat.double() @ fake_quant(w, scales[c], zps[c], 3).double().T + b.double() - y.double())
                ** 2
            ).sum(0)
            for c in range(scales.shape[0])
        ]
    )
    assert torch.equal(vals.argmin(0), brute.argmin(0))
    kept = torch.isfinite(vals)
    # the codes' Gram is s^2 C^T C; float32 x_hat holds fl(s * C), 6e-8 relative off per element
    torch.testing.assert_close(vals[kept], brute[kept], rtol=1e-6, atol=1e-9)
