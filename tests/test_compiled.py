"""``recon.compile``: every unit of the embedded default reconstructed with its training step compiled
whole, against the eager step from the same starting point."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from fimaq.artifacts import resolve_checkpoint
from fimaq.calib.calibrate import calibrate_model
from fimaq.config import CalibConfig, FisherConfig, QuantSpec, ReconConfig
from fimaq.data import DigitsDataModule
from fimaq.layers.mode import set_quant_mode
from fimaq.models import create_fp_model
from fimaq.models.swap import quantize_model
from fimaq.recon import recon_units, reconstruct_model

KW = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}


def _quantized() -> torch.nn.Module:
    checkpoint = resolve_checkpoint("embedded:digits_deit_tiny")
    net = create_fp_model("deit_tiny_patch16_224", checkpoint, model_kwargs=KW)
    return quantize_model(net, QuantSpec(w_bits=3, a_bits=3))


@torch.no_grad()
def _top1(net, images, labels) -> float:
    hits = 0
    for s in range(0, len(labels), 128):
        hits += int((net(images[s : s + 128]).argmax(-1) == labels[s : s + 128]).sum())
    return 100.0 * hits / len(labels)


def test_compiled_step_reconstructs_every_unit_like_the_eager_one(tmp_path):
    """The main job's model and reconstruction (W3/A3, fisher_dplr, QDrop, AdaRound; here 100 steps
    per unit on 512 images): unit by unit from the eager run's state, the compiled step (the same
    QDrop draws) ends with the unit's output error within 1% of the eager step's; the model with
    every unit's compiled result has the eager model's top-1 within one image."""
    dm = DigitsDataModule(calib_size=128, recon_size=512)
    dm.setup()
    images = dm.reconstruction_tensors()[0]
    val_images, val_labels = dm.val_tensors()
    torch.manual_seed(0)
    net = _quantized()
    calibrate_model(net, dm.calibration_tensors()[0], CalibConfig(search_rounds=1), progress=False)
    cfg, fisher = ReconConfig(iters=100), FisherConfig(num_samples=128)
    eager_dir, start_dir = tmp_path / "eager", tmp_path / "start"
    reconstruct_model(net, images, cfg, fisher, state_dir=eager_dir, progress=False, units=[])  # calibrated
    assembled: dict[str, torch.Tensor] = {}
    errors = {}
    for unit in recon_units(net):
        if start_dir.exists():
            shutil.rmtree(start_dir)
        shutil.copytree(eager_dir, start_dir)  # the state before this unit
        run = {"progress": False, "units": [unit.name]}
        eager = reconstruct_model(net, images, cfg, fisher, state_dir=eager_dir, **run)
        other = _quantized()  # (loads the state: calibrated, earlier units reconstructed eagerly)
        compiled_cfg = dataclasses.replace(cfg, compile=True)
        compiled = reconstruct_model(other, images, compiled_cfg, fisher, state_dir=start_dir, **run)
        errors[unit.name] = (eager.error_after[unit.name], compiled.error_after[unit.name])
        prefix = unit.name + "."
        assembled.update({k: v for k, v in other.state_dict().items() if k.startswith(prefix)})
    for name, (e, c) in errors.items():
        assert c == pytest.approx(e, rel=0.01), (name, errors)
    mixed = _quantized()
    mixed.load_state_dict({**net.state_dict(), **assembled})
    set_quant_mode(mixed, enabled=True)
    eager_top1, compiled_top1 = _top1(net, val_images, val_labels), _top1(mixed, val_images, val_labels)
    assert abs(compiled_top1 - eager_top1) <= 100.0 / len(val_labels) + 1e-9, (eager_top1, compiled_top1)
