"""Reconstruction: AdaRound, the fused STE, the Fisher losses against brute force, the refresh
schedule, one unit's training, and the driver (resume equals uninterrupted, NaN stops cleanly)."""

import math

import lightning as L
import numpy as np
import pytest
import torch
from conftest import tiny_model

from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode
from fimaq.quant.adaround import (
    AdaRoundQuantizer,
    SoftRounding,
    beta_schedule,
    rectified_sigmoid,
    round_regulariser_on,
)
from fimaq.quant.fake_quant import dense_order, fake_quant
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.ste import bernoulli_mask, fake_quant_ste, fake_quant_ste_composed
from fimaq.recon.batches import BatchMasks, local_batch
from fimaq.recon.losses import (
    FisherStats,
    ReconObjective,
    implied_fisher,
    inverse_gram,
    lowrank_loss,
)


def _weight_quantizer(rows=6, cols=10, bits=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    q = UniformQuantizer(bits, (rows, 1), (rows, 1))
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = (hi - lo) / (2**bits - 1) * 0.8  # a clipping grid, so some weights saturate
    q.set_qparams(scale, torch.round(-lo / scale).clamp(0, 2**bits - 1))
    set_quant_mode(q, enabled=True)
    return w, q


# ----------------------------------------------------------------------------- AdaRound
def test_adaround_starts_at_the_clamped_float_weight():
    w, q = _weight_quantizer()
    ada = AdaRoundQuantizer(q, w)
    s, zp, qmax = q.scale, q.zero_point, 2**q.bits - 1
    expected = (torch.clamp(w / s + zp, 0, qmax) - zp) * s  # float weight clipped to the grid's range
    assert torch.allclose(ada(w), expected, atol=1e-5)


def test_hard_rounding_is_floor_plus_indicator_of_alpha():
    w, q = _weight_quantizer(seed=1)
    ada = AdaRoundQuantizer(q, w)
    with torch.no_grad():
        ada.alpha.copy_(torch.randn(ada.alpha.shape, generator=torch.Generator().manual_seed(5)))
    s, zp = q.scale.detach(), q.zero_point
    codes = torch.floor(w / s) + (ada.alpha >= 0).float()
    expected = (torch.clamp(codes + zp, 0, 2**q.bits - 1) - zp) * s
    assert torch.equal(ada.hard_weight(), expected)
    # re-quantizing the folded weight with round-to-nearest gives the same weight
    assert torch.equal(fake_quant(ada.hard_weight(), s, zp, q.bits), ada.hard_weight())


def _saturated_adarounds():
    """Two AdaRound quantizers of different shapes and bit-widths, some offsets clipped at 0 and 1 and
    some codes saturated at both ends of the grid."""
    quantizers = []
    for rows, cols, bits, seed in ((8, 40, 3, 3), (5, 24, 4, 4)):
        w, q = _weight_quantizer(rows=rows, cols=cols, bits=bits, seed=seed)
        ada = AdaRoundQuantizer(q, w)
        with torch.no_grad():
            ada.alpha.add_(torch.randn(ada.alpha.shape, generator=torch.Generator().manual_seed(seed)) * 3)
        quantizers.append((w, ada))
    return quantizers


def _written_out(w, ada, alpha, beta):
    """The soft weight and the rounding penalty as written in the paper, through autograd."""
    s, zp, qmax = ada.base.scale.detach(), ada.base.zero_point, 2**ada.bits - 1
    h = rectified_sigmoid(alpha)
    weight = (torch.clamp(ada.floor + h + zp, 0, qmax) - zp) * s
    return weight, (1 - (2 * h - 1).abs().pow(beta)).sum() if beta is not None else 0


@pytest.mark.parametrize("beta", [None, 2.0, 7.5, 20.0, 0.5])
def test_grouped_soft_weights_are_autograd_of_the_written_out_formula(beta):
    """A unit's AdaRound weights computed together from one flat alpha (SoftRounding): the soft
    weights, the weighted penalty and the gradient to every alpha equal autograd's on the paper's
    formula (float rounding), with clipped offsets and saturated codes; a quantizer's own alpha is
    the group's memory and learns through it."""
    pairs = _saturated_adarounds()
    g = torch.Generator().manual_seed(9)
    upstream = [torch.randn(w.shape, generator=g) for w, _ in pairs]
    refs, alphas, loss_ref = [], [], 0.0
    for (w, ada), up in zip(pairs, upstream, strict=True):
        alpha = ada.alpha.detach().clone().requires_grad_()
        weight, penalty = _written_out(w, ada, alpha, beta)
        refs.append(weight.detach())
        alphas.append(alpha)
        loss_ref = loss_ref + (weight * up).sum() + 0.01 * penalty
    grads_ref = torch.autograd.grad(loss_ref, alphas)
    group = SoftRounding([ada for _, ada in pairs], weight=0.01)
    group.begin_step(beta)
    outs = [ada(w) for w, ada in pairs]
    loss = sum((out * up).sum() for out, up in zip(outs, upstream, strict=True))
    if beta is not None:
        loss = loss + group.penalty()
    (grad,) = torch.autograd.grad(loss, group.alpha)
    for out, ref in zip(outs, refs, strict=True):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, torch.cat([g.reshape(-1) for g in grads_ref]), rtol=1e-5, atol=1e-6)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    h = torch.cat([rectified_sigmoid(ada.alpha).reshape(-1) for _, ada in pairs])
    assert ((h == 0) | (h == 1)).any() and ((h > 0) & (h < 1)).any()
    w0, ada0 = pairs[0]
    codes = torch.floor(w0 / ada0.base.scale) + ada0.base.zero_point
    assert (codes > 2**ada0.bits - 1).any() or (codes < 0).any()
    with torch.no_grad():  # the quantizers' alphas are views of the group's
        group.alpha.add_(1.0)
    assert torch.equal(pairs[1][1].alpha.reshape(-1), group.alpha[-pairs[1][1].alpha.numel() :].detach())
    assert not pairs[0][1].alpha.requires_grad
    group.release()
    assert pairs[0][1].alpha.requires_grad and pairs[0][1].group is None


def test_grouped_penalty_gradient_is_the_hand_derivative():
    """d/dalpha of weight * (1 - |2h - 1|^beta) = -2 beta weight sign(u) |u|^(beta - 1) h'(alpha),
    and 0 at h = 1/2 (u = 0) and where h is clipped."""
    w, q = _weight_quantizer(rows=1, cols=7)
    ada = AdaRoundQuantizer(q, w)
    with torch.no_grad():
        ada.alpha.copy_(torch.tensor([[-9.0, -1.0, -0.3, 0.0, 0.4, 2.0, 9.0]]))
    group = SoftRounding([ada], weight=0.5)
    group.begin_step(7.5)
    (grad,) = torch.autograd.grad(group.penalty(), group.alpha)
    sig = torch.sigmoid(ada.alpha.detach().reshape(-1).double())
    y = sig * 1.2 - 0.1
    h = y.clamp(0, 1)
    u = 2 * h - 1
    dh = torch.where((y > 0) & (y < 1), 1.2 * sig * (1 - sig), torch.zeros_like(y))
    expected = -2 * 7.5 * 0.5 * torch.sign(u) * u.abs() ** 6.5 * dh
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert grad[3] == 0 and grad[0] == 0 and grad[-1] == 0


def test_rectified_sigmoid_and_regulariser():
    alpha = torch.tensor([-100.0, 0.0, 100.0])
    assert torch.equal(rectified_sigmoid(alpha), torch.tensor([0.0, 0.5, 1.0]))
    w, q = _weight_quantizer()
    ada = AdaRoundQuantizer(q, w)
    with torch.no_grad():
        ada.alpha.fill_(100.0)  # every offset at 1: nothing left to regularise
    assert ada.regulariser(2.0).item() == 0.0
    with torch.no_grad():
        ada.alpha.fill_(0.0)  # every offset at 1/2: the maximum, 1 per weight
    assert ada.regulariser(20.0).item() == pytest.approx(w.numel())


def test_beta_schedule_endpoints_and_warmup():
    iters, warm = 1000, 0.2
    assert beta_schedule(0, iters, warm, 20, 2) == 20
    assert beta_schedule(198, iters, warm, 20, 2) == 20  # t = 199 < 200
    assert beta_schedule(iters - 1, iters, warm, 20, 2) == pytest.approx(2.0)
    mid = beta_schedule(599, iters, warm, 20, 2)  # t = 600: halfway through the decay
    assert mid == pytest.approx(11.0)
    assert not round_regulariser_on(198, iters, warm) and round_regulariser_on(199, iters, warm)


# ----------------------------------------------------------------------------- STE / QDrop
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize(
    "shapes",
    [((4, 9, 5), (1, 9, 1), (1,)), ((4, 3, 9, 7), (1, 3, 1, 7), (1, 3, 1, 1))],
    ids=["per_token_one_zero_point", "per_head_zero_points"],
)
def test_fused_ste_matches_autograd_of_the_composed_ops(with_mask, shapes):
    shape, scale_shape, zp_shape = shapes
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).requires_grad_()
    s = (torch.rand(scale_shape, generator=g) + 0.2).requires_grad_()
    zp = torch.randint(0, 8, zp_shape, generator=g).float()
    keep = bernoulli_mask(x.shape, 0.5, torch.Generator().manual_seed(1), x.device) if with_mask else None
    ref = fake_quant(x, s, zp, 3, ste=True)
    if keep is not None:
        assert set(keep.unique().tolist()) == {0.0, 1.0}
        ref = torch.where(keep.bool(), ref, x)
    out = fake_quant_ste(x, s, zp, 3, keep)
    assert (out != x).any() and (ref.detach() != torch.round(x / s) * s).any()  # clamping happens
    upstream = torch.randn(x.shape, generator=g)
    gx_ref, gs_ref = torch.autograd.grad((ref * upstream).sum(), [x, s])
    gx, gs = torch.autograd.grad((out * upstream).sum(), [x, s])
    assert torch.equal(out, ref)
    assert torch.allclose(gx, gx_ref, atol=1e-6) and torch.allclose(gs, gs_ref, atol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("qdrop", [None, 0.5])
def test_training_quantizer_without_autograd_gives_the_same_values_and_draws(qdrop, transposed):
    """Inside a Fisher refresh the unit runs without autograd: the same output bit for bit from the
    same QDrop draws, without the derivative buffers (also for a transposed view, whose buffers
    follow its layout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 6, generator=g) * 3
    x = x.transpose(1, 2) if transposed else x
    q = UniformQuantizer(3, (1, 1, 1), (1,))
    q.set_qparams(torch.tensor(0.4), torch.tensor(3.0))
    outs = []
    for grad in (True, False):
        masks = BatchMasks(torch.Generator().manual_seed(5))
        set_quant_mode(q, enabled=True, train=True, qdrop=qdrop, masks=masks)
        with torch.set_grad_enabled(grad):
            outs.append(q(x))
        outs.append(torch.rand(1, generator=masks.generator))  # the generator advanced equally
    assert outs[0].requires_grad and not outs[2].requires_grad
    assert torch.equal(outs[0].detach(), outs[2]) and torch.equal(outs[1], outs[3])
    quantized = fake_quant(x, q.scale, q.zero_point, 3)
    assert (outs[2] == quantized).all() if qdrop is None else (outs[2] != quantized).any()


def test_written_out_ste_is_the_fused_function_and_compiles():
    """What a compiled step traces: the written-out straight-through fake quantization gives the fused
    function's output and input gradient bit for bit and its scale gradient to rounding, eagerly and
    through ``torch.compile`` (per-head zero points, QDrop)."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 9, 7, generator=g) * 3).requires_grad_()
    s = (torch.rand(1, 3, 9, 1, generator=g) + 0.2).requires_grad_()
    zp = torch.tensor([2.0, 4.0, 6.0]).reshape(1, 3, 1, 1)
    keep = bernoulli_mask(x.shape, 0.5, torch.Generator().manual_seed(1), x.device)
    upstream = torch.randn(x.shape, generator=g)
    out = fake_quant_ste(x, s, zp, 3, keep)
    gx, gs = torch.autograd.grad((out * upstream).sum(), [x, s])
    assert ((out == x) & (keep == 0)).any() and (gx == 0).any()  # dropped elements, clamped codes
    compiled = torch.compile(lambda x, s: fake_quant_ste(x, s, zp, 3, keep), dynamic=False)
    for fn in (lambda x, s: fake_quant_ste_composed(x, s, zp, 3, keep), compiled):
        out_c = fn(x, s)
        gx_c, gs_c = torch.autograd.grad((out_c * upstream).sum(), [x, s])
        torch.testing.assert_close(out_c, out, rtol=0, atol=1e-6)
        torch.testing.assert_close(gx_c, gx, rtol=0, atol=1e-6)
        torch.testing.assert_close(gs_c, gs, rtol=1e-5, atol=1e-5)


def test_masks_and_kernel_follow_a_permuted_operand():
    """An attention operand such as ``k^T`` is a permuted view: its QDrop mask is laid out like it in
    memory, with the same draw for every element, and the quantizer's output and gradients are the
    same bit for bit as with a contiguous mask (also for a data-parallel rank's rows)."""
    g = torch.Generator().manual_seed(0)
    qkv = (torch.randn(4, 7, 3 * 2 * 5, generator=g) * 3).requires_grad_()
    kt = qkv.reshape(4, 7, 3, 2, 5).permute(2, 0, 3, 1, 4)[1].transpose(-2, -1)  # (4, 2, 5, 7)
    order = dense_order(kt)
    assert order == (0, 3, 1, 2)
    cpu = torch.device("cpu")
    ordered = bernoulli_mask(kt.shape, 0.5, torch.Generator().manual_seed(1), cpu, order=order)
    flat = bernoulli_mask(kt.shape, 0.5, torch.Generator().manual_seed(1), cpu)
    assert torch.equal(ordered, flat) and flat.is_contiguous() and not ordered.is_contiguous()
    assert sorted(range(4), key=lambda d: -ordered.stride(d)) == list(order)
    u = bernoulli_mask(kt.shape, 0.5, torch.Generator().manual_seed(1), cpu, torch.uint8, order=order)
    assert torch.equal(u.float(), flat) and u.stride() == ordered.stride()
    s = (torch.rand(1, 2, 1, 7, generator=g) + 0.2).requires_grad_()
    zp = torch.tensor([2.0, 5.0]).reshape(1, 2, 1, 1)
    upstream = torch.randn(kt.shape, generator=g)
    results = []
    for keep in (flat, ordered):
        out = fake_quant_ste(kt, s, zp, 3, keep)
        results.append((out, *torch.autograd.grad((out * upstream).sum(), [qkv, s])))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    # a rank whose shard holds images 1 and 2, here at places 1 and 3 of the global batch
    rows = local_batch(torch.tensor([5, 1, 7, 2]), 0, 3)
    assert rows.positions.tolist() == [1, 3]
    part = kt[:2]
    drawn = []
    for o in (None, dense_order(part)):
        masks = BatchMasks(torch.Generator().manual_seed(1))
        with masks.of(rows):
            drawn.append(masks(part.shape, 0.5, cpu, order=o))
    assert torch.equal(drawn[0], drawn[1]) and torch.equal(drawn[0], flat[[1, 3]])


def test_bernoulli_mask_rate_and_determinism():
    a = bernoulli_mask((200, 300), 0.5, torch.Generator().manual_seed(3), torch.device("cpu"))
    b = bernoulli_mask((200, 300), 0.5, torch.Generator().manual_seed(3), torch.device("cpu"))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.float().mean().item() - 0.5) < 0.01
    c = bernoulli_mask((200, 300), 0.25, torch.Generator().manual_seed(4), torch.device("cpu"))
    assert abs(c.float().mean().item() - 0.25) < 0.01
    # the compiled kernel's uint8 masks are the same draws
    u = bernoulli_mask((200, 300), 0.5, torch.Generator().manual_seed(3), torch.device("cpu"), torch.uint8)
    assert u.dtype == torch.uint8 and torch.equal(u.float(), a)


# ----------------------------------------------------------------------------- losses
def _stats(rank, d, cols=slice(None), seed=0):
    g = torch.Generator().manual_seed(seed)
    G = torch.rand(rank, d, generator=g, dtype=torch.float64)
    Delta = torch.rand(rank, d, generator=g, dtype=torch.float64)
    M, cond = inverse_gram(Delta[:, cols], ridge=0.0)
    return FisherStats(G=G, Delta=Delta, M=M, cols=cols, condition=cond)


# 3 tokens of 6 channels; the class token's 6 columns keep Delta's Gram invertible up to rank 5 (with
# fewer columns than the rank it is singular, and both inverses are rounding noise)
@pytest.mark.parametrize("cols", [slice(None), slice(0, 6)], ids=["all_tokens", "cls_token"])
@pytest.mark.parametrize("rank", [1, 2, 5])
def test_dplr_loss_equals_brute_force_quadratic_form(rank, cols):
    d, b = 18, 7
    stats = _stats(rank, d, cols, seed=rank)
    g = torch.Generator().manual_seed(10 + rank)
    target = torch.randn(b, 3, 6, generator=g, dtype=torch.float64)
    first = target + 0.3 * torch.randn(b, 3, 6, generator=g, dtype=torch.float64)
    pred = target + 0.1 * torch.randn(b, 3, 6, generator=g, dtype=torch.float64)
    obj = ReconObjective("fisher_dplr", p1=0.7, p2=1.3)
    obj(first, target, stats)  # records the normalisers on the first call
    loss = obj(pred, target, stats).item()

    # independent dense construction with numpy: F = p1/lr0 Gc^T (Dc Dc^T)^-1 Gc + p2/(D diag0) diag(g_bar)
    Gn, Dn = stats.G.numpy(), stats.Delta.numpy()
    mask = np.zeros(d, dtype=bool)
    mask[cols] = True
    Gc = np.where(mask, Gn, 0.0)
    Dc = Dn[:, mask]
    low = Gc.T @ np.linalg.inv(Dc @ Dc.T) @ Gc
    g_bar = Gn.mean(0)
    e0 = np.abs((first - target).reshape(b, -1).numpy())
    lr0 = np.mean([x @ low @ x for x in e0])
    diag0 = np.mean(e0**2 * g_bar)
    F = 0.7 / lr0 * low + 1.3 / (d * diag0) * np.diag(g_bar)
    e = np.abs((pred - target).reshape(b, -1).numpy())
    brute = np.mean([x @ F @ x for x in e])
    assert loss == pytest.approx(brute, rel=1e-9)
    dense = implied_fisher(stats, d, 0.7, 1.3, float(obj.norms["lr"]), float(obj.norms["diag"]))
    assert np.allclose(dense.numpy(), F, rtol=1e-9)


def test_fisher_lr_works_at_every_rank_and_resets_its_normaliser():
    for rank in (1, 2, 3, 5):
        stats = _stats(rank, 8, seed=rank)
        obj = ReconObjective("fisher_lr")
        target = torch.zeros(4, 8, dtype=torch.float64)
        pred = torch.full((4, 8), 0.5, dtype=torch.float64)
        assert obj(pred, target, stats).item() == pytest.approx(1.0)  # its own normaliser
        assert obj(pred * 2, target, stats).item() == pytest.approx(4.0)  # quadratic in e
        obj.reset()
        assert obj(pred * 2, target, stats).item() == pytest.approx(1.0)
        e = (pred - target).abs()
        a = e @ stats.G.T
        assert lowrank_loss(e, stats).item() == pytest.approx(((a @ stats.M) * a).sum(1).mean().item())


def test_inverse_gram_with_ridge_handles_repeated_rows():
    row = torch.rand(1, 6, dtype=torch.float64)
    M, cond = inverse_gram(torch.cat([row, row]), ridge=1e-8)
    assert torch.isfinite(M).all() and cond > 1e10
    with pytest.raises(FimaqError, match="singular"):  # one error row zero, no ridge
        inverse_gram(torch.cat([row, torch.zeros_like(row)]), ridge=0.0)


def test_an_all_zero_error_gives_a_zero_low_rank_term():
    """A unit whose output quantization leaves unchanged (Delta = 0; a SwinV2 block with timm's
    zero-initialised post-norms): no singular-matrix error, and M = 0, as any M would weigh Delta = 0."""
    M, cond = inverse_gram(torch.zeros(3, 6, dtype=torch.float64), ridge=1e-4)
    assert torch.equal(M, torch.zeros(3, 3, dtype=torch.float64)) and cond == 1.0


def test_refresh_schedule():
    assert FisherConfig(rank=5).refresh_steps(20000) == [0, 4000, 8000, 12000, 16000]
    assert FisherConfig(rank=3).refresh_steps(10) == [0, 3, 6]
    assert FisherConfig(rank=5, mode="qf").refresh_steps(100) == [0, 1, 2, 3, 4]
    assert FisherConfig(rank=5).refresh_steps(3) == [0, 1, 2]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ReconConfig(loss="l1"), "recon loss must be one of"),
        (ReconConfig(iters=0), "recon iters must be an integer >= 1"),
        (ReconConfig(drop_prob=1.5), "recon drop_prob"),
        (ReconConfig(input_mode="x"), "recon input_mode"),
        (FisherConfig(mode="z"), "fisher mode"),
        (FisherConfig(lowrank_tokens="first"), "fisher lowrank_tokens"),
        (FisherConfig(temperature=0.0), "fisher temperature must be > 0"),
    ],
)
def test_bad_settings_are_named(cfg, message):
    with pytest.raises(FimaqError, match=message):
        cfg.validate()


# ----------------------------------------------------------------------------- one unit, the driver
def _calibrated_tiny(w_bits=3, a_bits=3, seed=0):
    from fimaq.calib import calibrate_model
    from fimaq.models.swap import quantize_model

    net = quantize_model(tiny_model("vit", seed=seed), QuantSpec(w_bits=w_bits, a_bits=a_bits))
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=1), progress=False)
    return net, images


def _fast_recon(**kw):
    base = dict(iters=6, batch_size=8, error_images=16)
    base.update(kw)
    return ReconConfig(**base)


def test_one_unit_trains_its_alphas_and_refreshes_at_the_scheduled_steps(monkeypatch):
    from fimaq.callbacks import FisherRefresh
    from fimaq.recon import driver

    net, images = _calibrated_tiny()
    fired: list[list[int]] = []
    alphas_moved: list[bool] = []
    original_fit = L.Trainer.fit

    scales_moved: list[bool] = []

    def spy_fit(self, module, *args, **kwargs):
        start = [a.alpha.detach().clone() for a in module.adarounds]
        scales = [s.detach().clone() for s in module.act_scales]
        assert all(s.requires_grad for s in module.act_scales)
        original_fit(self, module, *args, **kwargs)
        alphas_moved.append(
            all(not torch.equal(s, a.alpha) for s, a in zip(start, module.adarounds, strict=True))
        )
        # the learned activation scales (every quantized input of the unit) moved too
        scales_moved.append(
            all(not torch.equal(s, p) for s, p in zip(scales, module.act_scales, strict=True))
        )
        fired.extend(cb.fired for cb in self.callbacks if isinstance(cb, FisherRefresh))
        assert self.global_step == module.cfg.iters

    monkeypatch.setattr(L.Trainer, "fit", spy_fit)
    report = driver.reconstruct_model(
        net, images, _fast_recon(iters=7), FisherConfig(rank=3, batch_size=16), progress=False
    )
    # patch_embed, blocks.0, blocks.1 use the Fisher loss; the head does not
    assert fired == [[0, 2, 4]] * 3
    assert len(alphas_moved) == 4 and all(alphas_moved)
    assert scales_moved == [True] * 4  # the patch embedding has no quantized input: vacuously true
    assert set(report.error_after) == {"patch_embed", "blocks.0", "blocks.1", "head"}
    # afterwards: no AdaRound state left, hard-rounded weights sit on the grid, quantizers on
    for mod in net.modules():
        assert not isinstance(mod, AdaRoundQuantizer)
        if isinstance(mod, UniformQuantizer):
            assert mod.enabled and not mod.ste and mod.qdrop is None
    qkv = net.blocks[0].attn.qkv
    wq = qkv.w_quantizer
    assert torch.equal(fake_quant(qkv.weight, wq.scale, wq.zero_point, wq.bits), qkv.weight)


@pytest.mark.parametrize("loss", ["mse", "fisher_diag", "fisher_lr", "fisher_brecq"])
def test_every_loss_runs_and_keeps_outputs_finite(loss):
    from fimaq.recon import reconstruct_model

    net, images = _calibrated_tiny()
    report = reconstruct_model(
        net, images, _fast_recon(loss=loss, iters=4), FisherConfig(rank=2, batch_size=16), progress=False
    )
    assert all(math.isfinite(v) for v in report.error_after.values())
    with torch.no_grad():
        assert torch.isfinite(net(images[:4])).all()


def test_low_precision_caches_and_qinp_input(tmp_path):
    from fimaq.recon import reconstruct_model

    net, images = _calibrated_tiny(w_bits=4, a_bits=4)
    cfg = _fast_recon(iters=3, loss="mse", cache_dtype="bfloat16", input_mode="qinp")
    report = reconstruct_model(net, images, cfg, FisherConfig(), progress=False)
    assert all(math.isfinite(v) for v in report.error_after.values())
    with pytest.raises(FimaqError, match="unknown units"):
        reconstruct_model(net, images, cfg, FisherConfig(), progress=False, units=["blocks.9"])


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from fimaq.recon import STATE_FILE, driver

    cfg, fcfg = _fast_recon(iters=5), FisherConfig(rank=2, batch_size=16)
    meta = {"arch": "tiny", "quant": {"w_bits": 3}}
    net, images = _calibrated_tiny()
    driver.reconstruct_model(net, images, cfg, fcfg, state_dir=tmp_path / "a", meta=meta, progress=False)
    uninterrupted = {k: v.clone() for k, v in net.state_dict().items()}

    net, images = _calibrated_tiny()
    original = driver._reconstruct_unit
    calls = {"n": 0}

    def killed_on_third_unit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "_reconstruct_unit", killed_on_third_unit)
    with pytest.raises(KeyboardInterrupt):
        driver.reconstruct_model(net, images, cfg, fcfg, state_dir=tmp_path / "b", meta=meta, progress=False)
    monkeypatch.setattr(driver, "_reconstruct_unit", original)
    from fimaq.artifacts import read_artifact

    _, saved = read_artifact(tmp_path / "b" / STATE_FILE)
    assert saved["units_done"] == ["patch_embed", "blocks.0"]

    fresh, images = _calibrated_tiny()  # a new process: a calibrated model, then the saved state
    report = driver.reconstruct_model(
        fresh, images, cfg, fcfg, state_dir=tmp_path / "b", meta=meta, progress=False
    )
    assert report.resumed_units == ["patch_embed", "blocks.0"]
    assert list(report.unit_seconds) == ["patch_embed", "blocks.0", "blocks.1", "head"]  # the whole record
    resumed = fresh.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k

    # the same folder refuses a run with other settings
    with pytest.raises(
        FimaqError, match=r"belongs to a run with other settings \(recon.iters: \d+ there, 9 here\)"
    ):
        driver.reconstruct_model(
            fresh, images, _fast_recon(iters=9), fcfg, state_dir=tmp_path / "b", meta=meta, progress=False
        )


def test_nan_stops_with_the_unit_named_and_keeps_finished_units(tmp_path):
    from fimaq.artifacts import read_meta
    from fimaq.recon import STATE_FILE, reconstruct_model

    net, images = _calibrated_tiny()
    with torch.no_grad():
        net.blocks[1].mlp.fc1.bias[0] = float("nan")
    with pytest.raises(FimaqError, match="unit blocks.1"):
        reconstruct_model(
            net, images, _fast_recon(iters=3, loss="mse"), FisherConfig(), state_dir=tmp_path, progress=False
        )
    saved = read_meta(tmp_path / STATE_FILE)  # the finished units' state is on disk (its NaN-free part)
    assert saved["units_done"] == ["patch_embed", "blocks.0"]


def test_units_of_swin_and_distilled_deit_reconstruct():
    import timm

    from fimaq.calib import calibrate_model
    from fimaq.models.swap import quantize_model
    from fimaq.recon import recon_units, reconstruct_model

    distilled = timm.create_model(
        "deit_tiny_distilled_patch16_224",
        img_size=32,
        patch_size=8,
        depth=1,
        embed_dim=48,
        num_heads=3,
        num_classes=10,
    ).eval()
    for fp, size, expected in (
        (
            tiny_model("swin"),
            56,
            [
                "patch_embed",
                "layers.0.blocks.0",
                "layers.0.blocks.1",
                "layers.1.downsample",
                "layers.1.blocks.0",
                "layers.1.blocks.1",
                "head.fc",
            ],
        ),
        (distilled, 32, ["patch_embed", "blocks.0", "head", "head_dist"]),
    ):
        net = quantize_model(fp, QuantSpec(w_bits=4, a_bits=4))
        assert [u.name for u in recon_units(net)] == expected
        images = torch.randn(24, 3, size, size, generator=torch.Generator().manual_seed(0))
        calibrate_model(net, images[:8], CalibConfig(num_images=8, eq_n=32, search_rounds=1), progress=False)
        cfg = _fast_recon(iters=3)
        report = reconstruct_model(
            net, images, cfg, FisherConfig(rank=2, lowrank_tokens="cls"), progress=False
        )
        assert list(report.error_after) == expected
        with torch.no_grad():
            assert torch.isfinite(net(images[:2])).all()


@pytest.mark.parametrize("eq_n", [8, 16, 31])
def test_a_grid_too_small_for_two_scales_per_zero_point_is_refused(eq_n):
    """Below 32 candidates an 8-bit grid (16 zero points) has one scale each: every tensor would be
    clipped to its inner 80% (the (q0.1, q0.9) range)."""
    with pytest.raises(FimaqError, match=r"calibration eq_n must be an integer >= 32 .*two scales"):
        CalibConfig(eq_n=eq_n).validate()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_smallest_grid_reaches_the_full_range_at_every_bit_width(bits):
    from fimaq.quant import grids

    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    scales, _ = grids.weight_grid(w, bits, CalibConfig(eq_n=32).validate().eq_n)
    full = (w.amax(1) - w.amin(1)) / (2**bits - 1)  # a scale that spans max - min
    torch.testing.assert_close(scales.amax(0).flatten(), full)


def _calibrated_swin():
    from fimaq.calib import calibrate_model
    from fimaq.models.swap import quantize_model

    net = quantize_model(tiny_model("swin"), QuantSpec(w_bits=3, a_bits=3))
    images = torch.randn(24, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    calibrate_model(net, images[:8], CalibConfig(num_images=8, eq_n=32, search_rounds=1), progress=False)
    return net, images


@pytest.mark.parametrize(("which", "index"), [("vit", 2), ("swin", 4)])
def test_refresh_from_the_cached_input_equals_the_whole_model_and_skips_earlier_units(which, index):
    """blocks.1 of the ViT; layers.1.blocks.0 of the Swin (after a patch merging)."""
    from fimaq.recon import recon_units
    from fimaq.recon.batches import BatchMasks
    from fimaq.recon.cache import capture_unit, soft_targets
    from fimaq.recon.fisher import FisherEstimator

    net, images = _calibrated_tiny() if which == "vit" else _calibrated_swin()
    units = recon_units(net)
    unit, before = units[index], [u.module for u in units[:index]]
    cfg = FisherConfig(rank=2, batch_size=8)
    with torch.no_grad():
        set_quant_mode(net, enabled=False)
        targets = soft_targets(net, images, cfg.temperature, cfg.batch_size)
        x_fp, y_fp = capture_unit(net, unit, images, 8, True, torch.device("cpu"), torch.float32)
    calls = []
    inner = next(iter(before[-1].children()))  # part of the last earlier unit
    inner.register_forward_pre_hook(lambda *_: calls.append(1))
    rows, ran = {}, {}
    for shortcut in (False, True):
        masks = BatchMasks(torch.Generator().manual_seed(3))  # the same QDrop draws both times
        set_quant_mode(net, only=[unit.module], train=True, qdrop=0.5, masks=masks)
        est = FisherEstimator(net, images, targets, cfg)
        if shortcut:
            est.start(unit, y_fp, masks, x_in=x_fp, before=before)
            assert est.shortcut is not None
        else:
            est.start(unit, y_fp, masks)
        calls.clear()
        est.refresh()
        stats = est.refresh()
        rows[shortcut], ran[shortcut] = (stats.G, stats.Delta), len(calls)
    assert ran == {False: 2 * images.shape[0] // 8, True: 0}  # earlier units skipped
    for a, b in zip(rows[False], rows[True], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_a_cached_input_that_does_not_match_the_model_is_not_used():
    from fimaq.recon import recon_units
    from fimaq.recon.cache import capture_unit, soft_targets
    from fimaq.recon.fisher import FisherEstimator

    net, images = _calibrated_tiny()
    units = recon_units(net)
    unit = units[2]
    cfg = FisherConfig(rank=1, batch_size=16)
    set_quant_mode(net, enabled=False)
    targets = soft_targets(net, images, cfg.temperature, cfg.batch_size)
    x_fp, y_fp = capture_unit(net, unit, images, 16, True, torch.device("cpu"), torch.float32)
    est = FisherEstimator(net, images, targets, cfg)
    est.start(unit, y_fp, x_in=x_fp * 1.1, before=[u.module for u in units[:2]])
    assert est.shortcut is None
    set_quant_mode(net, only=[unit.module])
    reference = FisherEstimator(net, images, targets, cfg)
    reference.start(unit, y_fp)
    torch.testing.assert_close(est.refresh().G, reference.refresh().G)


@pytest.mark.parametrize("cols", [slice(None), slice(0, 4)], ids=["all_tokens", "cls_token"])
@pytest.mark.parametrize("rank", [1, 3])
def test_fused_dplr_terms_equal_the_composed_losses_and_their_gradient(rank, cols):
    from fimaq.recon.losses import dplr_terms, flat_error

    stats = _stats(rank, 12, cols, seed=rank)
    g = torch.Generator().manual_seed(20 + rank)
    target = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    pred = (target + 0.2 * torch.randn(5, 3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    pred.data[0, 0, 0] = target[0, 0, 0]  # an exact zero error: |e| has gradient 0 there in both
    w_low, w_diag = 0.7, 1.9
    low, diag = dplr_terms(pred, target, stats)
    (fused,) = torch.autograd.grad(w_low * low + w_diag * diag, pred)
    e = flat_error(pred, target)
    low_ref, diag_ref = lowrank_loss(e, stats), (e.pow(2) * stats.g_bar).mean()
    (ref,) = torch.autograd.grad(w_low * low_ref + w_diag * diag_ref, pred)
    torch.testing.assert_close(low, low_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(diag, diag_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused, ref, rtol=1e-10, atol=1e-14)
    # by hand: the diagonal term's gradient is 2 g_bar d / (B D) everywhere
    (gd,) = torch.autograd.grad(dplr_terms(pred, target, stats)[1], pred)
    by_hand = 2 * stats.g_bar.reshape(3, 4) * (pred - target) / pred.numel()
    torch.testing.assert_close(gd, by_hand.detach(), rtol=1e-12, atol=0)
