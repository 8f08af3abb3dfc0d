"""Quantization math against hand-computed grids, torch's reference fake-quant and brute force."""

import pytest
import torch

from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode
from fimaq.quant import UniformQuantizer, check_bits, fake_quant, grids, matmul_sweep, search
from fimaq.quant.fake_quant import clamp_codes


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


@pytest.mark.parametrize(
    "zp_shape", [(1,), (1, 3, 1, 1), (1, 1, 5, 1), (2, 3, 1, 1)], ids=["one", "per_head", "per_row", "2d"]
)
@pytest.mark.parametrize("in_place", [False, True])
def test_clamp_codes_equals_clamping_to_tensor_bounds(zp_shape, in_place):
    """Every path (one zero point, one per index of a dimension, the general one) and ``out`` = the
    input give ``clamp(r, -zp, qmax - zp)``, also on a transposed view."""
    g = torch.Generator().manual_seed(0)
    r = torch.randint(-12, 13, (2, 3, 5, 4), generator=g).float().transpose(2, 3)
    zp = torch.randint(0, 8, zp_shape, generator=g).float()
    zp = zp.transpose(2, 3) if zp.dim() == 4 else zp
    expected = torch.clamp(r, -zp, 7 - zp)
    if in_place:
        t = r.clone()
        out = clamp_codes(t, zp, 7, out=t)
        assert out.data_ptr() == t.data_ptr()
    else:
        out = clamp_codes(r, zp, 7)
    assert torch.equal(out, expected) and (expected != r).any()


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
    set_quant_mode(q, enabled=True)
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


def _first_min(values: torch.Tensor) -> torch.Tensor:
    """Brute-force winner per group: the first minimum of float64 errors (P, G)."""
    return values.argmin(0)


def test_self_searches_equal_brute_force():
    torch.manual_seed(5)
    x = torch.randn(300, 4) * torch.tensor([1.0, 3.0, 0.2, 8.0])
    s_c, z_c = grids.activation_grid(x, 3, 64, channel_wise=True)
    brute = torch.stack(
        [((fake_quant(x, s_c[:, c], z_c[:, c], 3) - x).double() ** 2).sum(0) for c in range(s_c.shape[1])]
    )
    assert torch.equal(search.self_sse(x.T.contiguous(), s_c, z_c, 3), _first_min(brute))
    s_t, z_t = grids.activation_grid(x, 4, 64)
    brute_t = torch.stack(
        [((fake_quant(x, s_t[c], z_t[c], 4) - x).double() ** 2).sum() for c in range(len(s_t))]
    )
    got = search.self_sse(x.reshape(1, -1), s_t.view(1, -1), z_t.view(1, -1), 4)
    assert int(got[0]) == int(brute_t.argmin())
    w = x.T.contiguous()
    ws, wz = grids.weight_grid(w, 3, 64)
    brute_w = torch.stack(
        [((fake_quant(w, ws[c], wz[c], 3) - w).double() ** 2).sum(1) for c in range(ws.shape[0])]
    )
    assert torch.equal(search.self_sse(w, ws[..., 0].T, wz[..., 0].T, 3), _first_min(brute_w))


def test_pruned_totals_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        table = torch.rand(37, 9, 3, generator=g, dtype=torch.float64) * torch.rand(
            37, 1, 3, generator=g, dtype=torch.float64
        )
        if trial % 2:
            table[5] = table[11]  # an exact tie resolves to the lower index
        got = search.pruned_totals(lambda c, k, t=table: t[c, k], 37, 9, keep_rtol=1e-4).argmin(0)
        assert torch.equal(got, table.sum(1).argmin(0))


def test_weight_output_search_equals_brute_force():
    torch.manual_seed(2)
    w, b = torch.randn(6, 12), torch.randn(6)
    x, y = torch.randn(50, 12), torch.randn(50, 6)
    scales, zps = grids.weight_grid(w, 3, 32)
    brute = []
    for c in range(scales.shape[0]):
        w_hat = fake_quant(w, scales[c], zps[c], 3)
        brute.append(((x.double() @ w_hat.double().T + b.double() - y.double()) ** 2).sum(0))
    brute = torch.stack(brute)
    objective = search.WeightOutputError(w, b, x, y)
    assert torch.equal(objective.best(scales, zps, 3, chunk=5), _first_min(brute))
    fast = objective.fast(scales, zps, 3, chunk=5)
    assert ((fast - brute).abs() / brute).max() < search.GRAM_RTOL / 40  # the stated bound
    every, rows = torch.arange(scales.shape[0]), torch.tensor([1, 4])
    exact = objective.exact(scales, zps, 3, every, rows)
    torch.testing.assert_close(exact, brute[:, rows], rtol=1e-10, atol=0)


def test_act_output_search_equals_brute_force():
    torch.manual_seed(3)
    w, b = torch.randn(5, 8), torch.randn(5)
    x = torch.randn(40, 8)
    y = x @ w.T + b
    scales, zps = grids.activation_grid(x, 3, 64)
    brute = torch.stack(
        [
            ((fake_quant(x, scales[c], zps[c], 3) @ w.T + b - y).double() ** 2).sum()
            for c in range(len(scales))
        ]
    )
    assert search.act_output_sse(x, w, b, y, scales, zps, 3, chunk=7, rows_per_chunk=6) == int(brute.argmin())
    wide = torch.randn(9, 8)  # out > in: the Gram path
    y2 = x @ wide.T + 0.3
    brute2 = torch.stack(
        [
            ((fake_quant(x, scales[c], zps[c], 3) @ wide.T + 0.3 - y2).double() ** 2).sum()
            for c in range(len(scales))
        ]
    )
    got2 = search.act_output_sse(
        x, wide, torch.full((9,), 0.3), y2, scales, zps, 3, chunk=7, rows_per_chunk=6
    )
    assert got2 == int(brute2.argmin())


def test_matmul_image_errors_equal_brute_force():
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
            prod = xq.double() @ bm.double() if operand == "A" else a.double() @ xq.double()
            brute.append(((prod - out.double()) ** 2).mean((2, 3)))  # (n, H) per candidate
        brute = torch.stack(brute)
        torch.testing.assert_close(errors.double(), brute, rtol=1e-5, atol=1e-9)
        exact = matmul_sweep.exact_image_errors(a, bm, out, s, z, 3, operand)
        torch.testing.assert_close(exact, brute.sum(1), rtol=1e-12, atol=0)


def test_choose_rescores_near_ties_and_breaks_exact_ties_by_index():
    values = torch.tensor([[1.0, 5.0], [1.00001, 4.0], [2.0, 4.00000001], [1.0, 4.0]], dtype=torch.float64)
    scales = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.2]])
    zps = torch.zeros(4, 2)
    zps[3, 1] = 0.0  # candidate 3 repeats candidate 1 in group 1: never scored there
    calls = []

    def rescore(cands, groups):
        calls.append((cands.tolist(), groups.tolist()))
        table = torch.tensor([[3.0, 7.0], [1.0, 9.0], [5.0, 2.0], [1.0, 0.5]], dtype=torch.float64)
        return table[cands][:, groups]

    got = search.choose(values, rescore, 1e-4, scales, zps)
    # group 0: 0, 1 and 3 are within 1e-4; float64 says 1 and 3 tie exactly -> the lower index, 1.
    # group 1: 1 and 2 are near (3 repeats 1 and is out); float64 prefers 2; 0 is no tie there.
    assert calls == [([0, 1, 2, 3], [0, 1])]
    assert got.tolist() == [1, 2]
    calls.clear()
    assert search.choose(values, rescore, 1e-9, scales, zps).tolist() == [3, 1]  # only 0 and 3 are near
    assert calls == [([0, 3], [0])]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fast_passes_stay_inside_the_tie_window(bits):
    """The float32 fast passes deviate from the float64 errors by less than a quarter of tie_rtol."""
    torch.manual_seed(9)
    rtol = search.tie_rtol(bits)
    x = torch.randn(256, 48) * torch.linspace(0.2, 3, 48)
    w, b = torch.randn(96, 48) / 7, torch.randn(96)
    y = x @ w.T + b
    scales, zps = grids.activation_grid(x, bits, 64)
    every = torch.arange(len(scales))
    captured = {}

    def spy(evaluate, num_cand, num_chunks, keep_rtol):
        captured["fast"] = sum(evaluate(every, k) for k in range(num_chunks))
        captured["exact"] = sum(evaluate(every, k, torch.float64) for k in range(num_chunks))
        return orig(evaluate, num_cand, num_chunks, keep_rtol)

    orig = search.pruned_totals
    search.pruned_totals = spy
    try:
        search.act_output_sse(x, w, b, y, scales, zps, bits, chunk=8, rows_per_chunk=32)
    finally:
        search.pruned_totals = orig
    a = torch.randn(4, 2, 17, 16)
    bm = torch.randn(4, 2, 16, 17)
    up, lo = grids.matmul_operand_bounds(a, 64)
    ms, mz = grids.bounds_to_qparams(up, lo, bits)
    fast = matmul_sweep.matmul_image_errors(a, bm, a @ bm, ms, mz, bits, "A", 8, 4).sum(
        1, dtype=torch.float64
    )
    exact = matmul_sweep.exact_image_errors(a, bm, a @ bm, ms, mz, bits, "A")
    assert ((captured["fast"] - captured["exact"]).abs() / captured["exact"]).max() < rtol / 4
    assert ((fast - exact).abs() / exact).max() < rtol / 4


def test_searches_do_not_depend_on_the_thread_count():
    torch.manual_seed(10)
    a, bm = torch.randn(8, 2, 33, 16), torch.randn(8, 2, 16, 33)
    out = a @ bm
    up, lo = grids.matmul_operand_bounds(a, 32)
    s, z = grids.bounds_to_qparams(up[:32], lo[:32], 8)
    threads = torch.get_num_threads()
    picks = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            picks.append(matmul_sweep.matmul_sweep(a, bm, out, s, z, 8, "A", chunk=8, images_per_chunk=2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(picks[0], picks[1])


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
    o_up, o_lo = grids.matmul_operand_bounds(other, 32)
    o_s, o_z = grids.bounds_to_qparams(o_up[20], o_lo[20], 4)
    other_hat = fake_quant(other, o_s.view(1, -1, 1, 1), o_z.view(1, -1, 1, 1), 4)
    brute = []
    for c in range(s.shape[0]):
        xq = fake_quant(x, s[c].view(1, -1, 1, 1), z[c].view(1, -1, 1, 1), bits)
        prod = xq.double() @ other_hat.double() if operand == "A" else other_hat.double() @ xq.double()
        brute.append(((prod - out.double()) ** 2).mean((2, 3)).sum(0))
    brute = torch.stack(brute)
    best = brute.argmin(0)
    s[30, 0], z[30, 0] = s[best[0], 0], z[best[0], 0]  # a later copy of head 0's winner: it must not win
    got = matmul_sweep.matmul_sweep(
        a,
        bm,
        out,
        s,
        z,
        bits,
        operand,
        chunk=5,
        images_per_chunk=images_per_chunk,
        other_qparams=(o_s, o_z, 4),
    )
    assert torch.equal(got, best)
