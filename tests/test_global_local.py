"""The global-local loss: the frozen float rest of the model, the loss value by hand, a whole run."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, QuantSpec, ReconConfig
from fimaq.errors import FimaqError
from fimaq.layers.mode import quant_mode
from fimaq.models.swap import quantize_model
from fimaq.recon import recon_units, reconstruct_model
from fimaq.recon.global_local import penultimate, suffix
from fimaq.recon.losses import ReconObjective


def _through_the_whole_model(net, unit, y, images):
    """The head's input when the full forward pass runs with ``unit``'s output replaced by ``y``."""
    seen = {}
    out_hook = unit.module.register_forward_hook(lambda m, a, o: y)
    in_hook = net.head.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    try:
        net(images)
    finally:
        out_hook.remove()
        in_hook.remove()
    return seen["x"]


@pytest.mark.parametrize("name", ["patch_embed", "blocks.0", "blocks.1"])
def test_the_float_rest_equals_the_full_forward_with_the_unit_output_replaced(name):
    net = tiny_model("vit")
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    unit = next(u for u in recon_units(net) if u.name == name)
    seen = {}
    handle = unit.module.register_forward_hook(lambda m, a, o: seen.setdefault("y", o))
    with torch.no_grad():
        net(images)
        handle.remove()
        y = seen["y"] + 0.1 * torch.randn(seen["y"].shape, generator=torch.Generator().manual_seed(1))
        expected = _through_the_whole_model(net, unit, y, images)
        got = suffix(net, unit)(y)
        assert torch.allclose(got, expected, atol=1e-6)
        # unchanged output: the float model's own penultimate features
        assert torch.allclose(suffix(net, unit)(seen["y"]), penultimate(net, images), atol=1e-6)


def test_global_local_loss_by_hand():
    """Each term divided by its first value: 1 + w at the first call, then the ratios."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    feats, feats_fp = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    objective = ReconObjective("global_local", local_weight=0.25)
    first = objective(pred, target, features=(feats, feats_fp))
    assert first.item() == pytest.approx(1.25, abs=1e-6)
    glob0 = sum(((feats[b] - feats_fp[b]) ** 2).sum() for b in range(3)) / 3
    local0 = sum(((pred[b, :, c] - target[b, :, c]) ** 2).sum() for b in range(3) for c in range(4)) / 12
    pred2, feats2 = pred * 0.5, feats * 0.3
    glob = sum(((feats2[b] - feats_fp[b]) ** 2).sum() for b in range(3)) / 3
    local = sum(((pred2[b, :, c] - target[b, :, c]) ** 2).sum() for b in range(3) for c in range(4)) / 12
    second = objective(pred2, target, features=(feats2, feats_fp))
    assert second.item() == pytest.approx((glob / glob0 + 0.25 * local / local0).item(), rel=1e-5)
    with pytest.raises(FimaqError, match="penultimate features"):
        ReconObjective("global_local")(pred, target)


def test_global_local_refuses_swin_in_one_line():
    net = tiny_model("swin")
    unit = recon_units(net)[1]
    with pytest.raises(FimaqError) as err:
        suffix(net, unit)
    assert "\n" not in str(err.value) and "SwinTransformer" in str(err.value)


def test_a_global_local_run_brings_the_penultimate_features_closer_to_float():
    net = quantize_model(tiny_model("vit"), QuantSpec(w_bits=3, a_bits=3))
    images = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=1), progress=False)
    with torch.no_grad():
        with quant_mode(net, enabled=False):
            fp = penultimate(net, images)
        with quant_mode(net):
            before = (penultimate(net, images) - fp).pow(2).mean().item()
    # every unit keeps its reconstruction (no keep_better): what is measured is the loss's own effect; at
    # 30 steps one block ended 0.7% worse by its own objective and the guard would put it back. 60 steps:
    # after / before 0.80-0.83 over four QDrop seeds (30 steps: 0.86-0.95, too close to the bound)
    cfg = ReconConfig(
        iters=60, loss="global_local", batch_size=8, error_images=32, lr_scale=1e-3, keep_better=False
    )
    report = reconstruct_model(net, images, cfg, progress=False)
    assert report.fisher_seconds == 0.0  # no Fisher statistics for this loss
    with torch.no_grad(), quant_mode(net):
        after = (penultimate(net, images) - fp).pow(2).mean().item()
    assert after < 0.9 * before
