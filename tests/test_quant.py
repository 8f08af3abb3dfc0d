"""Quantization math against hand-computed grids, torch's reference fake-quant and brute force."""

import pytest
import torch

from fimaq.errors import FimaqError
from fimaq.quant import UniformQuantizer, check_bits, fake_quant, grids, matmul_sweep, search


def test_fake_quant_hand_computed_grid():
    # 3 bits, scale 0.5, zero point 3: codes 0..7 represent (q - 3) * 0.5 = -1.5 .. 2.0
    x = torch.tensor([-3.0, -1.5, -0.74, -0.26, 0.0, 0.26, 0.75, 1.24, 2.0, 9.0])
    expected = torch.tensor([-1.5, -1.5, -0.5, -0.5, 0.0, 0.5, 1.0, 1.0, 2.0, 2.0])
    out = fake_quant(x, torch.tensor(0.5), torch.tensor(3.0), bits=3)
    assert torch.equal(out, expected)


def test_fake_quant_matches_torch_per_channel():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    scale = torch.rand(16) * 0.1 + 0.01
    zp = torch.randint(0, 16, (16,))
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, 0, 15)
    ours = fake_quant(w, scale.view(-1, 1), zp.view(-1, 1).float(), bits=4)
    # torch multiplies by 1/scale, we divide: only exact .5 ties may round apart (one step)
    assert (ours - ref).abs().le(scale.view(-1, 1) * 1.0001).all()
    assert (ours == ref).float().mean() > 0.999


def test_ste_gradients():
    x = torch.tensor([-10.0, 0.3, 0.4, 10.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = fake_quant(x, s, torch.tensor(2.0), bits=2, ste=True)  # range (0-2)*.5 .. (3-2)*.5
    out.sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert s.grad is not None and s.grad.abs() > 0


@pytest.mark.parametrize("bits", [1, 9, 0, 2.5, "4"])
def test_bits_outside_range_rejected(bits):
    with pytest.raises(FimaqError, match="outside the supported range"):
        check_bits(bits)


def test_quantizer_off_is_identity_and_on_quantizes():
    q = UniformQuantizer(4, (1, 3, 1), (1,))
    x = torch.randn(2, 3, 5)
    assert torch.equal(q(x), x)
    q.set_qparams(torch.tensor(0.25), torch.tensor(8.0))
    q.enabled = True
    assert torch.equal(q(x), fake_quant(x, torch.tensor(0.25), torch.tensor(8.0), 4))
    assert q.scale.shape == (1, 3, 1) and torch.all(q.scale == 0.25)


def test_weight_grid_by_hand():
    w = torch.linspace(-1, 1, 101).view(1, -1)  # quantiles are exact here: q0.1 = -0.8, q0.9 = 0.8
    scales, zps = grids.weight_grid(w, bits=3, eq_n=128)
    assert scales.shape == (129, 1, 1) and zps.shape == (129, 1, 1)
    # 8 zero points (0..7 around 4) x 16 scales from 1.6/7 to 2.0/7, last candidate repeated
    assert torch.allclose(scales[0, 0, 0], torch.tensor(1.6 / 7))
    assert torch.allclose(scales[15, 0, 0], torch.tensor(2.0 / 7))
    assert torch.allclose(scales[16, 0, 0], torch.tensor(1.6 / 7))
    assert zps[:16].eq(0).all() and zps[112:128].eq(7).all() and zps[128].eq(7).all()
    assert torch.equal(scales[128], scales[127])


def test_activation_grid_clamps_and_matches_weight_grid():
    torch.manual_seed(1)
    x = torch.randn(4, 10, 6)
    s_t, z_t = grids.activation_grid(x, 4, 128)
    s_w, z_w = grids.weight_grid(x.reshape(1, -1), 4, 128)
    assert torch.allclose(s_t, s_w.flatten()) and torch.equal(z_t, z_w.flatten())
    tiny = torch.zeros(2, 3, 4)
    s0, _ = grids.activation_grid(tiny, 4, 128)
    assert s0.min() == pytest.approx(1e-4)


def test_self_searches_equal_brute_force():
    torch.manual_seed(5)
    x = torch.randn(300, 4) * torch.tensor([1.0, 3.0, 0.2, 8.0])
    s_c, z_c = grids.activation_grid(x, 3, 64, channel_wise=True)
    brute = torch.stack(
        [((fake_quant(x, s_c[:, c], z_c[:, c], 3) - x).double() ** 2).sum(0) for c in range(s_c.shape[1])]
    )
    assert torch.equal(search.act_self_sse(x, s_c, z_c, 3, channel_wise=True).argmin(0), brute.argmin(0))
    s_t, z_t = grids.activation_grid(x, 4, 64)
    brute_t = torch.stack(
        [((fake_quant(x, s_t[c], z_t[c], 4) - x).double() ** 2).sum() for c in range(len(s_t))]
    )
    assert int(search.act_self_sse(x, s_t, z_t, 4).argmin(0)[0]) == int(brute_t.argmin())
    w = x.T.contiguous()
    ws, wz = grids.weight_grid(w, 3, 64)
    brute_w = torch.stack(
        [((fake_quant(w, ws[c], wz[c], 3) - w).double() ** 2).sum(1) for c in range(ws.shape[0])]
    )
    assert torch.equal(search.weight_self_sse(w, ws, wz, 3).argmin(0), brute_w.argmin(0))


def test_pruned_totals_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        table = torch.rand(37, 9, 3, generator=g, dtype=torch.float64) * torch.rand(
            37, 1, 3, generator=g, dtype=torch.float64
        )
        if trial % 2:
            table[5] = table[11]  # an exact tie resolves to the lower index
        got = search.pruned_totals(lambda c, k, t=table: t[c, k], 37, 9).argmin(0)
        assert torch.equal(got, table.sum(1).argmin(0))


def test_weight_output_search_equals_brute_force():
    torch.manual_seed(2)
    w, b = torch.randn(6, 12), torch.randn(6)
    x, y = torch.randn(50, 12), torch.randn(50, 6)
    scales, zps = grids.weight_grid(w, 3, 32)
    vals = search.weight_output_sse(w, b, x, y, scales, zps, 3, chunk=5)
    brute = []
    for c in range(scales.shape[0]):
        w_hat = fake_quant(w, scales[c], zps[c], 3)
        brute.append(((x.double() @ w_hat.double().T + b.double() - y.double()) ** 2).sum(0))
    brute = torch.stack(brute)
    assert torch.equal(vals.argmin(0), brute.argmin(0))
    kept = torch.isfinite(vals)  # scored exactly; the others are clearly worse than their row's best
    torch.testing.assert_close(vals[kept], brute[kept], rtol=1e-7, atol=1e-9)
    best = brute.min(0).values.expand_as(brute)
    assert (brute[~kept] > best[~kept] * (1 + search.PREFILTER_RTOL / 2)).all()
    assert (brute <= best * (1 + search.PREFILTER_RTOL / 2))[~kept].sum() == 0


def test_act_output_search_equals_brute_force():
    torch.manual_seed(3)
    w, b = torch.randn(5, 8), torch.randn(5)
    x = torch.randn(40, 8)
    y = x @ w.T + b
    scales, zps = grids.activation_grid(x, 3, 64)
    brute = [
        ((fake_quant(x, scales[c], zps[c], 3) @ w.T + b - y).double() ** 2).sum() for c in range(len(scales))
    ]
    totals = search.act_output_sse(x, w, b, y, scales, zps, 3, chunk=7, rows_per_chunk=6)[:, 0]
    brute = torch.stack(brute)
    assert int(totals.argmin()) == int(brute.argmin())
    kept = torch.isfinite(totals)
    torch.testing.assert_close(totals[kept], brute[kept], rtol=1e-6, atol=1e-9)
    assert (brute[~kept] > brute.min() * 1.0001).all()  # only clearly worse candidates are pruned
    wide = torch.randn(9, 8)  # out > in: the Gram path
    y2 = x @ wide.T + 0.3
    brute2 = [
        ((fake_quant(x, scales[c], zps[c], 3) @ wide.T + 0.3 - y2).double() ** 2).sum()
        for c in range(len(scales))
    ]
    got2 = search.act_output_sse(
        x, wide, torch.full((9,), 0.3), y2, scales, zps, 3, chunk=7, rows_per_chunk=6
    )
    assert int(got2.argmin(0)) == int(torch.stack(brute2).argmin())


def test_matmul_operand_search_equals_brute_force():
    from fimaq.calib import reference_order as ref

    torch.manual_seed(4)
    a, bm = torch.randn(6, 2, 5, 4), torch.randn(6, 2, 4, 5)
    out = a @ bm
    for operand, x in (("A", a), ("B", bm)):
        up, lo = grids.matmul_operand_bounds(x, 16)
        s, z = grids.bounds_to_qparams(up, lo, 3)
        errors = matmul_sweep.matmul_image_errors(a, bm, out, s, z, 3, operand, chunk=4, images_per_chunk=4)
        brute = []
        for c in range(s.shape[0]):
            xq = fake_quant(x, s[c].view(1, -1, 1, 1), z[c].view(1, -1, 1, 1), 3)
            prod = xq @ bm if operand == "A" else a @ xq
            brute.append(((prod - out).double() ** 2).sum((0, 2, 3)))
        brute = torch.stack(brute)
        assert torch.equal(errors.sum(1, dtype=torch.float64).argmin(0), brute.argmin(0))
        torch.testing.assert_close(errors.sum(1, dtype=torch.float64) * 25, brute, rtol=1e-5, atol=1e-9)
        cands, heads = torch.tensor([0, 3, 9]), torch.tensor([1])
        got = ref.matmul_error_from_images(errors, cands, heads, batch_size=4, cand_chunk=2)
        expect = errors[cands][:, :4, heads].sum(1) + errors[cands][:, 4:, heads].sum(1)
        assert torch.equal(got, expect)


def test_resolve_near_ties_defers_to_reference_only_within_tolerance():
    values = torch.tensor([[1.0, 5.0], [1.00001, 4.0], [2.0, 4.00000001]], dtype=torch.float64)
    calls = []

    def reference(cands, groups):
        calls.append((cands.tolist(), groups.tolist()))
        return torch.tensor([[3.0, 7.0], [1.0, 9.0], [5.0, 2.0]])

    got = search.resolve_near_ties(values, reference, rtol=1e-4)
    # group 0: candidates 0 and 1 tie within 1e-4 and the reference prefers 1; group 1: 1 and 2 tie and
    # it prefers 2 (candidate 0 is no tie there, so its low reference score does not count)
    assert calls == [([0, 1, 2], [0, 1])]
    assert got.tolist() == [1, 2]
    assert search.resolve_near_ties(values, reference, rtol=1e-9).tolist() == [0, 1]


def test_reference_order_errors_equal_exact_errors():
    from fimaq.calib import reference_order as ref

    torch.manual_seed(6)
    n, tokens, d_in, d_out = 6, 5, 8, 7
    x, w, b = torch.randn(n, tokens, d_in), torch.randn(d_out, d_in), torch.randn(d_out)
    y = x @ w.T + b
    ws, wz = grids.weight_grid(w, 3, 32)
    rows, cands = torch.tensor([1, 4]), torch.tensor([0, 5, 30])
    got = ref.linear_weight_error(w, b, x, y, ws, wz, 3, cands, rows, batch_size=4)
    exact = torch.stack(
        [((x @ fake_quant(w, ws[c], wz[c], 3).T + b - y).double() ** 2).sum((0, 1))[rows] for c in cands]
    )
    torch.testing.assert_close(got.double() * tokens, exact, rtol=1e-4, atol=1e-6)
    a_s, a_z = grids.activation_grid(x, 3, 32)
    got_a = ref.linear_act_error(x, w, b, y, a_s, a_z, 3, cands, batch_size=4)
    exact_a = torch.stack(
        [((fake_quant(x, a_s[c], a_z[c], 3) @ w.T + b - y).double() ** 2).sum() for c in cands]
    )
    torch.testing.assert_close(got_a[:, 0].double() * tokens * d_out, exact_a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 8])
def test_sorted_sse_equals_direct_error(bits):
    from fimaq.quant.sorted_sse import SortedValues

    torch.manual_seed(7)
    x = torch.randn(20, 500) * torch.linspace(0.1, 5, 20).view(-1, 1) + torch.linspace(-1, 1, 20).view(-1, 1)
    amax = x.abs().amax(1, keepdim=True)
    scales = 2 * amax * torch.linspace(0.2, 1.2, 129).view(1, -1) / (2**bits - 1)  # (20, 129): several steps
    zps = torch.randint(0, 2**bits, (20, 129)).float()
    got = SortedValues(x).sse(scales, zps, bits)
    s, z = scales.unsqueeze(-1), zps.unsqueeze(-1)
    codes = (torch.round(x.unsqueeze(1) / s) + z).clamp(0, 2**bits - 1)  # the float32 level assignment
    direct = x.unsqueeze(1).double() - (codes.double() - z.double()) * s.double()  # exact in float64
    torch.testing.assert_close(got, direct.pow(2).sum(-1), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits", [3, 8])
@pytest.mark.parametrize("operand", ["A", "B"])
@pytest.mark.parametrize("images_per_chunk", [2, 16])
def test_matmul_sweep_prunes_exactly(bits, operand, images_per_chunk):
    torch.manual_seed(8)
    a, bm = torch.randn(10, 2, 5, 4), torch.randn(10, 2, 4, 6)
    a[3:] *= 0.3  # most of the error in the first images, so that pruning engages late
    out = a @ bm
    x, other = (a, bm) if operand == "A" else (bm, a)
    up, lo = grids.matmul_operand_bounds(x, 32)
    s, z = grids.bounds_to_qparams(up, lo, bits)
    s[9], z[9] = s[4], z[4]  # a repeated candidate: scored once, as the first
    o_up, o_lo = grids.matmul_operand_bounds(other, 32)
    o_s, o_z = grids.bounds_to_qparams(o_up[20], o_lo[20], 4)
    other_hat = fake_quant(other, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), 4)
    brute = []
    for c in range(s.shape[0]):
        xq = fake_quant(x, s[c].view(1, -1, 1, 1), z[c].view(1, -1, 1, 1), bits)
        prod = xq @ other_hat if operand == "A" else other_hat @ xq
        brute.append(((prod.double() - out.double()) ** 2).mean((2, 3)).sum(0))
    brute = torch.stack(brute)
    rtol = search.tie_rtol(bits)
    totals, image_errors = matmul_sweep.matmul_sweep(
        a,
        bm,
        out,
        s,
        z,
        bits,
        operand,
        chunk=5,
        images_per_chunk=images_per_chunk,
        keep_rtol=rtol,
        other_qparams=(o_s, o_z, 4),
    )
    assert torch.equal(totals.argmin(0), brute.argmin(0))
    kept = torch.isfinite(totals)
    assert not kept[9].any()
    torch.testing.assert_close(totals[kept], brute[kept], rtol=1e-5, atol=1e-9)
    dropped = ~kept
    dropped[9] = False
    assert dropped.any()  # pruned (or, with one slice of images, known to be worse)
    assert (brute[dropped] > brute.min(0).values.expand_as(brute)[dropped] * (1 + rtol)).all()
    heads = torch.tensor([1])
    cands = kept[:, 1].nonzero().flatten()  # per-image errors are complete for every kept candidate
    a_used, b_used = (a, other_hat) if operand == "A" else (other_hat, bm)
    full = matmul_sweep.matmul_image_errors(
        a_used, b_used, out, s, z, bits, operand, chunk=4, images_per_chunk=3
    )
    torch.testing.assert_close(image_errors(cands, heads), full[cands][:, :, heads], rtol=1e-6, atol=0)
