"""Data-free calibration images (fimaq.data.synthetic) and ``--data.synthetic true`` on the command line."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from fimaq.cli import main
from fimaq.data import DigitsDataModule
from fimaq.data import synthetic as syn
from fimaq.errors import FimaqError, Interrupted
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(num_classes=10, steps=6, lr=0.5, batch_size=8, progress=False)


@pytest.fixture
def counted_steps(monkeypatch):
    """The optimisation steps taken, counted (``_step`` is the forward and backward of one step)."""
    calls = []
    real = syn._step

    def step(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(syn, "_step", step)
    return calls


def test_same_seed_gives_the_same_images_another_seed_others(tiny_vit):
    images, labels = syn.synthesize_images(tiny_vit, 8, seed=1, **FAST)
    again, again_labels = syn.synthesize_images(tiny_vit, 8, seed=1, **FAST)
    other, _ = syn.synthesize_images(tiny_vit, 8, seed=2, **FAST)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other)


def test_targets_are_balanced_over_the_classes_in_every_prefix():
    labels = syn.balanced_labels(25, 10, seed=0)
    assert torch.bincount(labels[:10], minlength=10).tolist() == [1] * 10
    assert torch.bincount(labels, minlength=10).max() - torch.bincount(labels, minlength=10).min() == 1
    assert torch.equal(syn.balanced_labels(12, 10, seed=0), labels[:12])
    assert not torch.equal(syn.balanced_labels(10, 10, seed=1), labels[:10])


def test_shifted_views_extend_a_set_the_same_way_whatever_its_size():
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([4, 5, 6])
    few, few_labels = syn.shifted_views(images, labels, 5, seed=0)
    many, many_labels = syn.shifted_views(images, labels, 9, seed=0)
    assert torch.equal(many[:5], few) and torch.equal(few[:3], images)
    assert many_labels.tolist() == [4, 5, 6] * 3 and torch.equal(many_labels[:5], few_labels)


def test_patch_similarity_entropy_matches_a_scipy_kernel_density():
    from scipy.stats import gaussian_kde

    tokens = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(0))
    got = syn.patch_similarity_entropy(tokens)
    for image, value in zip(tokens.double().numpy(), got, strict=True):
        unit = image / np.linalg.norm(image, axis=1, keepdims=True)
        sims = (unit @ unit.T)[np.triu_indices(7, k=1)]
        kde = gaussian_kde(sims, bw_method=syn.KDE_BANDWIDTH / sims.std(ddof=1))
        grid = np.linspace(sims.min(), sims.max(), syn.KDE_POINTS)
        pdf = kde(grid) + 1e-4
        assert float(value) == pytest.approx(np.trapezoid(-pdf * np.log(pdf), grid), rel=1e-4, abs=1e-5)


def test_the_images_come_to_show_their_targets_and_stay_finite():
    from fimaq.artifacts import resolve_checkpoint
    from fimaq.models import create_fp_model

    kwargs = {"img_size": 32, "patch_size": 4, "depth": 4, "num_classes": 10}
    ckpt = resolve_checkpoint("embedded:digits_deit_tiny")
    model = create_fp_model("deit_tiny_patch16_224", ckpt, model_kwargs=kwargs).eval()
    settings = {**FAST, "batch_size": 16}
    noise, labels = syn.synthesize_images(model, 16, seed=0, **{**settings, "steps": 0})
    images, same_labels = syn.synthesize_images(model, 16, seed=0, **{**settings, "steps": 20})
    assert torch.equal(labels, same_labels)
    with torch.no_grad():
        before = (model(noise).argmax(-1) == labels).float().mean().item()
        after = (model(images).argmax(-1) == labels).float().mean().item()
    assert after >= 0.9 and after >= before + 0.5, (before, after)
    assert torch.isfinite(images).all() and images.abs().max() < 10


def test_the_model_is_left_as_it_was(tiny_vit):
    from fimaq.layers.mode import set_quant_mode
    from fimaq.models.swap import quantize_model
    from fimaq.quant.quantizer import UniformQuantizer
    from fimaq.spec import QuantSpec

    float_images, _ = syn.synthesize_images(tiny_vit, 8, seed=0, **FAST)
    net = quantize_model(tiny_model("vit"), QuantSpec(w_bits=4, a_bits=4))
    set_quant_mode(net, enabled=True)  # quantizers on: synthesis must still use the float model
    net.train()
    net.head.weight.requires_grad_(True)
    images, _ = syn.synthesize_images(net, 8, seed=0, **FAST)
    torch.testing.assert_close(images, float_images, rtol=1e-4, atol=1e-4)
    assert net.training and net.head.weight.requires_grad
    quantizers = [q for q in net.modules() if isinstance(q, UniformQuantizer)]
    assert quantizers and all(q.enabled for q in quantizers)
    assert not any(m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("stop", ["interrupted", "killed"])
def test_an_interrupted_synthesis_resumes_to_the_uninterrupted_result(tiny_vit, tmp_path, monkeypatch, stop):
    whole, labels = syn.synthesize_images(tiny_vit, 16, seed=3, **FAST)  # two chunks of six steps
    path = tmp_path / syn.SYNTHETIC_FILE
    real = syn._step
    calls = []

    def stop_at_the_ninth(*args):
        if len(calls) == 8:
            raise Interrupted(15) if stop == "interrupted" else RuntimeError("killed")
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(syn, "_step", stop_at_the_ninth)
    # "killed": no save on the way out, only the one after every step (save_seconds=0)
    save_seconds = 60.0 if stop == "interrupted" else 0.0
    with pytest.raises(Interrupted if stop == "interrupted" else RuntimeError) as exc:
        syn.synthesize_images(tiny_vit, 16, seed=3, state_path=path, save_seconds=save_seconds, **FAST)
    if stop == "interrupted":
        assert "chunk 2/2, step 2/6" in exc.value.where
    calls.clear()
    monkeypatch.setattr(syn, "_step", lambda *args: calls.append(1) or real(*args))
    resumed, resumed_labels = syn.synthesize_images(tiny_vit, 16, seed=3, state_path=path, **FAST)
    assert len(calls) == 4  # the steps left, not more
    assert torch.equal(resumed, whole) and torch.equal(resumed_labels, labels)


def test_a_finished_synthesis_is_reused_and_extended(tiny_vit, tmp_path, counted_steps):
    path = tmp_path / syn.SYNTHETIC_FILE
    first, _ = syn.synthesize_images(tiny_vit, 8, seed=0, state_path=path, **FAST)
    assert len(counted_steps) == 6
    again, _ = syn.synthesize_images(tiny_vit, 8, seed=0, state_path=path, **FAST)
    assert len(counted_steps) == 6 and torch.equal(again, first)  # no step: read from the file
    more, _ = syn.synthesize_images(tiny_vit, 16, seed=0, state_path=path, **FAST)
    assert len(counted_steps) == 12  # only the new chunk
    assert torch.equal(more[:8], first)
    whole, _ = syn.synthesize_images(tiny_vit, 16, seed=0, **FAST)
    assert torch.equal(more, whole)  # the calibration images are the first rows of a larger set
    syn.synthesize_images(tiny_vit, 8, seed=0, state_path=path, fingerprint={"sha256": "other"}, **FAST)
    assert len(counted_steps) == 12 + 12 + 6  # (the uncached run, then) another model: made anew


@pytest.mark.parametrize(
    "change, message",
    [
        ({"steps": -1}, "synthetic steps must be an integer >= 0, got -1"),
        ({"lr": 0.0}, "synthetic lr must be a positive number, got 0.0"),
        ({"lr": float("nan")}, "synthetic lr must be a positive number, got nan"),
        ({"batch_size": 0}, "synthetic batch_size must be an integer >= 1, got 0"),
        ({"seed": -3}, "synthetic seed must be an integer >= 0, got -3"),
        (
            {"image_shape": (3, 0, 32)},
            "synthetic image_shape must be (channels, height, width), got (3, 0, 32)",
        ),
    ],
)
def test_bad_settings_are_refused_with_one_message(tiny_vit, change, message):
    with pytest.raises(FimaqError) as exc:
        syn.synthesize_images(tiny_vit, 4, **{**FAST, **change})
    assert str(exc.value) == message


def test_the_data_module_hands_out_synthetic_images_only_after_they_are_made(tiny_vit, counted_steps):
    with pytest.raises(FimaqError, match="synthetic_steps must be an integer >= 0, got -1"):
        DigitsDataModule(synthetic=True, synthetic_steps=-1)
    with pytest.raises(FimaqError, match="synthetic_lr must be a positive number"):
        DigitsDataModule(synthetic=True, synthetic_lr=-0.1)
    with pytest.raises(FimaqError, match="synthetic_size must be an integer >= 1 or null, got 0"):
        DigitsDataModule(synthetic=True, synthetic_size=0)
    dm = DigitsDataModule(synthetic=True, synthetic_steps=2, calib_size=8, recon_size=12, batch_size=8)
    with pytest.raises(FimaqError, match="call use_synthetic"):
        dm.calibration_tensors()
    assert dm.use_synthetic(tiny_vit, progress=False)
    images, labels = dm.calibration_tensors()
    assert images.shape == (8, 3, 32, 32) and labels.shape == (8,)
    assert len(counted_steps) == 2
    assert dm.use_synthetic(tiny_vit, reconstruction=True, progress=False)
    assert len(counted_steps) == 2  # the reconstruction rows beyond calib_size are views: no steps
    recon, _ = dm.reconstruction_tensors()
    assert recon.shape[0] == 12 and torch.equal(recon[:8], images)
    # beyond the optimised images (synthetic_size: calib_size by default), shifted copies of them
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    for row in range(8, 12):
        assert any(torch.equal(recon[row], images[row - 8].roll(s, dims=(-2, -1))) for s in shifts)
    assert dm.val_tensors()[0].shape == (450, 3, 32, 32)  # validation stays real
    assert not DigitsDataModule().use_synthetic(tiny_vit)  # synthetic off: nothing to do


def _calibrate_args(root: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        "-c",
        str(ROOT / "configs/digits/w8a8.yaml"),
        f"--trainer.default_root_dir={root}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.limit_val_batches=1",
        "--validate_fp=false",
        "--model.calib.search_rounds=0",
        "--model.calib.eq_n=32",
        "--model.calib.num_images=16",
        "--data.init_args.calib_size=16",
        "--data.init_args.batch_size=16",
        "--data.init_args.val_batch_size=64",
        "--data.synthetic=true",
        "--data.synthetic_steps=3",
        *extra,
    ]


def test_calibrate_with_synthetic_images_from_the_command_line(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    root = tmp_path / "run"
    main(_calibrate_args(root))
    assert "synthetic calibration images from the float model" in caplog.text
    metrics = json.loads((root / "metrics.json").read_text())
    assert metrics["seconds"]["synthesize"] > 0 and "calibrated_top1" in metrics
    from fimaq.artifacts import read_artifact

    state, meta = read_artifact(root / syn.SYNTHETIC_FILE)
    assert state["images"].shape == (16, 3, 32, 32) and "current" not in state
    assert (
        meta["synthetic"]["steps"] == 3
        and meta["synthetic"]["fingerprint"]["arch"] == "deit_tiny_patch16_224"
    )


def test_bad_synthetic_settings_give_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_calibrate_args(tmp_path / "run", "--data.synthetic_steps=-2"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: synthetic_steps must be an integer >= 0, got -2"
