"""STE rounding (``recon.rounding: ste``): the quantizer against hand-computed values and gradients,
its schedule, a whole reconstruction with it, and resume."""

import dataclasses

import lightning as L
import pytest
import torch
from conftest import tiny_model

from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers.mode import set_quant_mode
from fimaq.quant.fake_quant import fake_quant
from fimaq.quant.quantizer import UniformQuantizer
from fimaq.quant.rounding import LearnedRounding, finalize_rounding
from fimaq.quant.ste_rounding import SteRoundingQuantizer, attach_ste_rounding


def _hand_quantizer() -> tuple[torch.Tensor, UniformQuantizer]:
    """Two rows of 3-bit weights on power-of-two grids (every value below is exact in float32)."""
    q = UniformQuantizer(3, (2, 1), (2, 1))
    q.set_qparams(torch.tensor([[0.5], [0.25]]), torch.tensor([[2.0], [4.0]]))
    set_quant_mode(q, enabled=True)
    # row 0: W/s = -3.0 (clamped to code 0), -0.75, 0.25, 0.5 (a tie: half to even), 1.75, 9.0 (clamped)
    # row 1: W/s = -5.0 (clamped), -1.5 (tie), 0.0, 1.25, 2.5 (tie), 3.75 (clamped to code 7)
    w = torch.tensor([[-1.5, -0.375, 0.125, 0.25, 0.875, 4.5], [-1.25, -0.375, 0.0, 0.3125, 0.625, 0.9375]])
    return w, q


def test_ste_rounding_starts_at_round_to_nearest_bit_for_bit():
    w, q = _hand_quantizer()
    ste = SteRoundingQuantizer(q, w)
    # codes clamp(round(W/s) + zp, 0, 7) - zp, by hand: row 0 zp 2, row 1 zp 4
    centred = torch.tensor([[-2.0, -1.0, 0.0, 0.0, 2.0, 5.0], [-4.0, -2.0, 0.0, 1.0, 2.0, 3.0]])
    expected = centred * torch.tensor([[0.5], [0.25]])
    assert torch.equal(ste(w), expected)
    assert torch.equal(ste.hard_weight(), expected)
    assert torch.equal(ste(w), fake_quant(w, q.scale, q.zero_point, q.bits))
    # and on a random weight, bit for bit the plain quantizer's round-to-nearest
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 11, generator=g)
    q = UniformQuantizer(4, (5, 1), (5, 1))
    q.set_qparams(torch.rand(5, 1, generator=g) * 0.3 + 0.05, torch.randint(0, 16, (5, 1), generator=g))
    set_quant_mode(q, enabled=True)
    assert torch.equal(SteRoundingQuantizer(q, w)(w), q(w))


def test_ste_rounding_gradient_is_the_scale_inside_the_grid_and_zero_outside():
    w, q = _hand_quantizer()
    ste = SteRoundingQuantizer(q, w)
    with torch.no_grad():
        ste.v.copy_(torch.tensor([[0.2, -0.3, 0.4, 0.1, 0.0, -0.2], [-0.1, 0.3, 0.45, -0.2, 0.1, -0.4]]))
    upstream = torch.arange(1.0, 13.0).reshape(2, 6)
    (ste(w) * upstream).sum().backward()
    # d w_hat / d v = s where round(W/s + v) + zp lies in [0, 7], else 0: row 0 codes
    # (-3, -1, 1, 1, 2, 9) + 2: the first and last are clamped; row 1 codes (-5, -1, 0, 1, 3, 3) + 4:
    # the first is clamped, the last (3.35 -> 3, code 7) is the grid's top, still inside
    inside = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(ste.v.grad, upstream * inside * torch.tensor([[0.5], [0.25]]))
    assert q.scale.grad is None  # the weight grid stays fixed


def test_hardening_freezes_the_offsets_and_the_finalized_weight_sits_on_the_grid():
    layer = torch.nn.Linear(11, 5)
    from fimaq.layers import QuantLinear

    layer = QuantLinear.from_float(layer, 3, None, None)
    w = layer.weight.detach().clone()
    s = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 7
    layer.w_quantizer.set_qparams(s, torch.round(-w.amin(1, keepdim=True) / s))
    set_quant_mode(layer, enabled=True)
    ste = attach_ste_rounding(layer)
    assert isinstance(layer.w_quantizer, SteRoundingQuantizer) and isinstance(ste, LearnedRounding)
    with torch.no_grad():
        ste.v.copy_(torch.randn(ste.v.shape, generator=torch.Generator().manual_seed(1)))
    learned = layer.quantized_weight().detach()
    ste.harden()
    assert not ste.soft and not ste.v.requires_grad
    assert torch.equal(layer.quantized_weight(), learned)  # the forward pass was already hard
    finalize_rounding(layer)
    wq = layer.w_quantizer
    assert type(wq) is UniformQuantizer
    assert torch.equal(layer.weight, learned)
    assert torch.equal(fake_quant(layer.weight, wq.scale, wq.zero_point, wq.bits), layer.weight)
    assert not torch.equal(learned, fake_quant(w, wq.scale, wq.zero_point, wq.bits))  # v did change it


def test_ste_base_quantizers_get_no_straight_through_training():
    from fimaq.layers import QuantLinear

    layer = QuantLinear.from_float(torch.nn.Linear(4, 3), 4, 4, None)
    attach_ste_rounding(layer)
    set_quant_mode(layer, train=True)
    assert layer.a_quantizer.ste and not layer.w_quantizer.base.ste


def test_the_ste_schedule_and_its_settings():
    assert ReconConfig(rounding="ste").unit_iters == 3000  # the ImageNet schedule of 20000 steps
    assert ReconConfig(iters=200, rounding="ste").unit_iters == 30
    assert ReconConfig(iters=3, rounding="ste").unit_iters == 1
    assert ReconConfig(iters=200, rounding="ste", ste_iters=77).unit_iters == 77
    assert ReconConfig(iters=200, ste_iters=77).unit_iters == 200  # AdaRound keeps its own
    for cfg, message in [
        (ReconConfig(rounding="sgn"), "recon rounding must be one of adaround, ste"),
        (ReconConfig(ste_iters=0), "recon ste_iters must be an integer >= 1"),
        (ReconConfig(lr_ste=-1.0), "recon lr_ste must be a finite number >= 0"),
    ]:
        with pytest.raises(FimaqError, match=message):
            cfg.validate()


# ----------------------------------------------------------------------------- the driver
def _calibrated_tiny(seed=0):
    from fimaq.calib import calibrate_model
    from fimaq.models.swap import quantize_model

    net = quantize_model(tiny_model("vit", seed=seed), QuantSpec(w_bits=3, a_bits=3))
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=1), progress=False)
    return net, images


def _ste_recon(**kw):
    base = dict(iters=200, rounding="ste", ste_iters=12, lr_ste=0.01, batch_size=8, error_images=32)
    return ReconConfig(**{**base, **kw})


def test_ste_reconstruction_trains_only_offsets_and_scales_and_ends_on_the_grid(monkeypatch):
    from fimaq.recon import driver

    net, images = _calibrated_tiny()
    seen = []
    original_fit = L.Trainer.fit

    def spy_fit(self, module, *args, **kwargs):
        offsets = [r.v for r in module.roundings]
        assert offsets and all(isinstance(r, SteRoundingQuantizer) for r in module.roundings)
        assert not module.adarounds
        trained = {id(p) for p in net.parameters() if p.requires_grad}
        assert trained == {id(p) for p in offsets + module.act_scales}
        start = [v.detach().clone() for v in offsets]
        original_fit(self, module, *args, **kwargs)
        groups = self.optimizers[0].param_groups
        scales = [len(module.act_scales)] if module.act_scales else []  # patch_embed: an FP image
        assert [len(g["params"]) for g in groups] == [len(offsets), *scales]
        assert groups[0]["lr"] == 0.01  # constant
        moved = all(not torch.equal(a, b) for a, b in zip(start, offsets, strict=True))
        seen.append((module.unit_name, self.global_step, moved))

    monkeypatch.setattr(L.Trainer, "fit", spy_fit)
    report = driver.reconstruct_model(net, images, _ste_recon(loss="mse"), FisherConfig(), progress=False)
    assert seen == [(u, 12, True) for u in ("patch_embed", "blocks.0", "blocks.1", "head")]  # ste_iters
    # the output error falls below calibration's (round to nearest). Not asserted for the patch
    # embedding: its input, i.i.d. Gaussian pixels here, has a diagonal second moment, for which
    # round to nearest is already the least-squares rounding
    for unit in ("blocks.0", "blocks.1", "head"):
        assert report.error_after[unit] < report.error_before[unit], unit
    for mod in net.modules():
        assert not isinstance(mod, LearnedRounding)
        if isinstance(mod, UniformQuantizer):
            assert mod.enabled and not mod.ste and mod.qdrop is None
    for layer in (net.patch_embed.proj, net.blocks[0].attn.qkv, net.blocks[1].mlp.fc2, net.head):
        wq = layer.w_quantizer
        flat = layer.weight.reshape(wq.scale.shape[0], -1)
        assert torch.equal(fake_quant(flat, wq.scale, wq.zero_point, wq.bits), flat)


def test_ste_resume_after_a_kill_equals_an_uninterrupted_run_and_refuses_adaround_state(
    tmp_path, monkeypatch
):
    from fimaq.callbacks import FisherRefresh
    from fimaq.recon import driver

    cfg, fcfg = _ste_recon(ste_iters=4), FisherConfig(rank=2, batch_size=16)
    meta = {"arch": "tiny", "quant": {"w_bits": 3}}
    net, images = _calibrated_tiny()
    refreshes = []
    original_fit = L.Trainer.fit

    def spy_fit(self, module, *args, **kwargs):
        original_fit(self, module, *args, **kwargs)
        refreshes.extend(cb.fired for cb in self.callbacks if isinstance(cb, FisherRefresh))

    monkeypatch.setattr(L.Trainer, "fit", spy_fit)
    driver.reconstruct_model(net, images, cfg, fcfg, state_dir=tmp_path / "a", meta=meta, progress=False)
    monkeypatch.setattr(L.Trainer, "fit", original_fit)
    assert refreshes == [[0, 2]] * 3  # refresh_steps(ste_iters=4) of the units before the head
    uninterrupted = {k: v.clone() for k, v in net.state_dict().items()}

    net, images = _calibrated_tiny()
    original = driver._reconstruct_unit
    calls = {"n": 0}

    def killed_on_second_unit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return original(*args, **kwargs)

    monkeypatch.setattr(driver, "_reconstruct_unit", killed_on_second_unit)
    with pytest.raises(KeyboardInterrupt):
        driver.reconstruct_model(net, images, cfg, fcfg, state_dir=tmp_path / "b", meta=meta, progress=False)
    monkeypatch.setattr(driver, "_reconstruct_unit", original)

    fresh, images = _calibrated_tiny()
    report = driver.reconstruct_model(
        fresh, images, cfg, fcfg, state_dir=tmp_path / "b", meta=meta, progress=False
    )
    assert report.resumed_units == ["patch_embed"]
    resumed = fresh.state_dict()
    assert resumed.keys() == uninterrupted.keys()
    for k in uninterrupted:
        assert torch.equal(resumed[k], uninterrupted[k]), k

    # a state written with AdaRound (here: after the head alone) is refused for STE rounding
    net, images = _calibrated_tiny()
    ada = dataclasses.replace(cfg, rounding="adaround", iters=2)
    c = tmp_path / "c"
    driver.reconstruct_model(net, images, ada, fcfg, state_dir=c, meta=meta, progress=False, units=["head"])
    with pytest.raises(FimaqError) as err:
        driver.reconstruct_model(
            net,
            images,
            dataclasses.replace(ada, rounding="ste"),
            fcfg,
            state_dir=c,
            meta=meta,
            progress=False,
        )
    message = str(err.value)
    assert "\n" not in message
    assert "belongs to a run with other settings (recon.rounding: 'adaround' there, 'ste' here)" in message


def test_a_state_from_before_the_rounding_settings_counts_as_adaround():
    """Settings added later take their defaults in an older state's fingerprint: an AdaRound state that
    predates ``rounding`` resumes with the default, and is refused for ``ste`` naming the key."""
    from fimaq.recon.state import _differences, _with_defaults, recon_fingerprint

    current = recon_fingerprint(ReconConfig(), FisherConfig(), 1024)
    older = recon_fingerprint(ReconConfig(), FisherConfig(), 1024)
    for key in ("rounding", "ste_iters", "lr_ste"):
        del older["recon"][key]
    assert _differences(_with_defaults(older), current) == []
    ste = recon_fingerprint(ReconConfig(rounding="ste"), FisherConfig(), 1024)
    assert _differences(_with_defaults(older), ste) == [("recon.rounding", "adaround", "ste")]
