"""Each unit's own objective (the loss it minimised) before and after its reconstruction, and the
normalisers that objective is measured against (``recon.norm_rounding``)."""

import copy

import pytest
import torch
from conftest import tiny_model

from fimaq.calib import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.models.swap import quantize_model
from fimaq.recon import reconstruct_model
from fimaq.recon.plot import plot_unit_errors


@pytest.fixture(scope="module")
def calibrated():
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    net = quantize_model(tiny_model("vit"), QuantSpec(w_bits=3, a_bits=3))
    calibrate_model(net, images[:16], CalibConfig(num_images=16, eq_n=32, search_rounds=0), progress=False)
    return net, images


def _patch_embed(calibrated, norm: str):
    net, images = calibrated
    cfg = ReconConfig(iters=400, batch_size=16, norm_rounding=norm)
    fisher = FisherConfig(rank=5, num_samples=64, batch_size=32)
    return reconstruct_model(copy.deepcopy(net), images, cfg, fisher, units=["patch_embed"], progress=False)


def test_hard_normalisers_measure_the_objective_against_the_rounding_the_unit_ends_with(calibrated):
    """``fisher_dplr`` is ``p1 L_lr / L_lr0 + p2 L_diag / L_diag0`` with p1 = p2 = 1: 2 on the output its
    normalisers were recorded on. Recorded on the hardened rounding (the default), the hard-rounded
    unit scores about 2 before and after; recorded on the soft output, which the float input lets the
    patch embedding fit almost exactly, the same hard rounding scores many times more."""
    hard = _patch_embed(calibrated, "hard")
    soft = _patch_embed(calibrated, "soft")
    u = "patch_embed"
    assert 1.5 < hard.objective_after[u] < 2.5 and 1.5 < hard.objective_before[u] < 2.5
    assert soft.objective_after[u] > 4 * hard.objective_after[u]
    assert hard.objective_after[u] < hard.objective_before[u]
    assert hard.error_after[u] < hard.error_before[u]


def test_every_trained_unit_reports_its_objective_and_the_plot_shows_both(calibrated, tmp_path):
    net, images = calibrated
    cfg = ReconConfig(iters=20, batch_size=16, loss="mse")
    report = reconstruct_model(copy.deepcopy(net), images, cfg, FisherConfig(), progress=False)
    units = ["patch_embed", "blocks.0", "blocks.1", "head"]
    assert list(report.objective_after) == list(report.error_after) == units
    assert all(v > 0 for v in report.objective_before.values())
    # mse: the normalised sum over tokens of the squared error, mean over images, recorded at step 0 on
    # the hard (here: calibrated) rounding, so the calibrated unit's objective is about 1
    assert 0.5 < report.objective_before["blocks.0"] < 2.0
    path = plot_unit_errors(report, tmp_path / "errors.png", loss="mse")
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
    assert height > width * 0.6  # two panels, one above the other


def test_a_unit_the_reconstruction_makes_worse_keeps_its_calibration(calibrated):
    """An AdaRound learning rate far too high scrambles the rounding: by the units' own objective the
    reconstruction ends worse than calibration, and with ``keep_better`` (the default) every such unit
    leaves with exactly its calibrated output error; without it, worse."""
    net, images = calibrated
    fisher = FisherConfig(rank=2, num_samples=32, batch_size=32)
    runs = {}
    for keep in (False, True):
        cfg = ReconConfig(iters=30, batch_size=16, lr_alpha=5.0, keep_better=keep)
        runs[keep] = reconstruct_model(
            copy.deepcopy(net), images, cfg, fisher, units=["patch_embed"], progress=False
        )
    worse, kept = runs[False], runs[True]
    u = "patch_embed"
    assert (
        worse.objective_after[u] > worse.objective_before[u] and worse.error_after[u] > worse.error_before[u]
    )
    assert kept.rejected == {u: pytest.approx(worse.objective_after[u])}
    assert kept.error_after[u] == kept.error_before[u] == worse.error_before[u]
    assert kept.objective_after[u] == kept.objective_before[u]
